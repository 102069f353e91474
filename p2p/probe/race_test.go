//go:build race

package probe_test

// raceEnabled: under the race detector the tests run but hold nothing to
// timings.
const raceEnabled = true
