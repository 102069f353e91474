//go:build !race

package assign

const raceOn = false
