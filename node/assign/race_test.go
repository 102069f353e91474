//go:build race

package assign

// raceOn: under the race detector sync.Pool drops buffers at random, so the kernels'
// pooled packing buffers are made again on later steps and a step's allocations do
// not repeat.
const raceOn = true
