package simlink

import (
	"syscall"
	"time"
)

// prSetTimerSlack is prctl's PR_SET_TIMERSLACK.
const prSetTimerSlack = 29

// preciseSleep sleeps d in the kernel, blocking the thread: short, so the
// runtime need not hand its P to another. The thread's timer slack is set
// to 1 ns first (the default 50 µs would be most of the error); the
// goroutine may be on a different thread each time, and a runtime thread
// that keeps the smaller slack only sleeps more exactly.
func preciseSleep(d time.Duration) {
	syscall.RawSyscall(syscall.SYS_PRCTL, prSetTimerSlack, 1, 0)
	ts := syscall.NsecToTimespec(int64(d))
	syscall.Nanosleep(&ts, nil)
}
