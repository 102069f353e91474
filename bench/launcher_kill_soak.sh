#!/bin/sh
# Kills the launcher of a 2 × 2 DiLoCo run (four node processes) at N random steps, one
# run each, and resumes every one with `launch --resume`; each must continue exactly
# (every replica's every loss equal to `train`'s). CI runs 3 fixed kill points; this
# runs many, outside CI. Usage: bench/launcher_kill_soak.sh [N] (default 20), from the
# repository's root.
set -eu
n=${1:-20}
PIPESWARM_LAUNCHER_KILLS=$n go test ./cmd/pipeswarm -run '^TestLauncherKilledMidRunResumesExactly$' -count=1 -v -timeout 90m |
	grep -E 'launcherkill_e2e_test|^(--- |ok|FAIL)'
