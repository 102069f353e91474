package simlink

import (
	"syscall"
	"time"
)

// preciseSleep sleeps d in the kernel (hrtimer, ~50 µs slack), blocking
// the thread: short, so the runtime need not hand its P to another.
func preciseSleep(d time.Duration) {
	ts := syscall.NsecToTimespec(int64(d))
	syscall.Nanosleep(&ts, nil)
}
