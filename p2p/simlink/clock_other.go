//go:build !linux

package simlink

import "time"

// preciseSleep is time.Sleep where nanosleep is not at hand: wake-ups are
// then as coarse as Go's timers (about 1 ms on an idle process).
func preciseSleep(d time.Duration) { time.Sleep(d) }
