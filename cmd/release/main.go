// Command release builds pipeswarm's release binaries into a directory with a
// SHA256SUMS file, and smoke-tests those this machine can run:
//
//	go run ./cmd/release [-out dist] [-smoke-steps 10]
//
// It builds, all without cgo (no C compiler or cross toolchain needed):
//
//	pipeswarm-linux-amd64, pipeswarm-linux-arm64
//	    the default build: dynamically linked against the system C library only,
//	    it loads oneDNN or OpenBLAS at run time where they are installed;
//	pipeswarm-linux-amd64-static, pipeswarm-linux-arm64-static
//	    the nodlopen build: fully static (musl or distroless images), computing
//	    with pipeswarm's own kernels only.
//
// Each binary for this machine's OS and architecture then runs `train --steps N`.
// There is no darwin build: bench wan's netns mode (bench/netns) is Linux only.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
)

type target struct {
	goos, goarch string
	static       bool
}

func (t target) name() string {
	n := "pipeswarm-" + t.goos + "-" + t.goarch
	if t.static {
		n += "-static"
	}
	return n
}

var targets = []target{
	{"linux", "amd64", false},
	{"linux", "arm64", false},
	{"linux", "amd64", true},
	{"linux", "arm64", true},
}

func main() {
	out := flag.String("out", "dist", "directory for the binaries and SHA256SUMS")
	steps := flag.Int("smoke-steps", 10, "train steps each binary for this machine runs (0: none)")
	flag.Parse()
	if err := run(context.Background(), *out, *steps, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "release:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, out string, steps int, w io.Writer) error {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	sums := map[string]string{}
	for _, t := range targets {
		path := filepath.Join(out, t.name())
		args := []string{"build", "-trimpath", "-o", path}
		if t.static {
			args = append(args, "-tags", "nodlopen")
		}
		cmd := exec.CommandContext(ctx, "go", append(args, "./cmd/pipeswarm")...)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS="+t.goos, "GOARCH="+t.goarch)
		cmd.Stdout, cmd.Stderr = w, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("build %s: %w", t.name(), err)
		}
		sum, err := fileSHA256(path)
		if err != nil {
			return err
		}
		sums[t.name()] = sum
		fmt.Fprintf(w, "built %s\n", path)
	}
	names := make([]string, 0, len(sums))
	for n := range sums {
		names = append(names, n)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, n := range names {
		fmt.Fprintf(&b, "%s  %s\n", sums[n], n) // the format sha256sum -c reads
	}
	if err := os.WriteFile(filepath.Join(out, "SHA256SUMS"), []byte(b.String()), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(w, "wrote %s\n", filepath.Join(out, "SHA256SUMS"))
	if steps <= 0 {
		return nil
	}
	for _, t := range targets {
		if t.goos != runtime.GOOS || t.goarch != runtime.GOARCH {
			continue
		}
		if err := smoke(ctx, filepath.Join(out, t.name()), steps, w); err != nil {
			return err
		}
	}
	return nil
}

// smoke trains the built-in model for steps steps with bin, in a scratch directory.
func smoke(ctx context.Context, bin string, steps int, w io.Writer) error {
	tmp, err := os.MkdirTemp("", "pipeswarm-release-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	abs, err := filepath.Abs(bin)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, abs, "train", "--steps", strconv.Itoa(steps), "--out", filepath.Join(tmp, "run"), "--quiet")
	o, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s train --steps %d: %w\n%s", bin, steps, err, o)
	}
	last := strings.TrimSpace(string(o))
	for _, l := range strings.Split(last, "\n") {
		if strings.HasPrefix(l, "trained ") || strings.Contains(l, "gemm=") {
			fmt.Fprintf(w, "%s: %s\n", filepath.Base(bin), l)
		}
	}
	return nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
