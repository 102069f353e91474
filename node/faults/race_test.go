//go:build race

package faults

// raceDetector: the race detector slows training several times over.
const raceDetector = true
