//go:build race

package simlink

// raceEnabled: the race detector slows everything down ten times, so tests
// run their code but do not hold it to timings.
const raceEnabled = true
