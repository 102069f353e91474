//go:build !linux

package backend

import "time"

func threadCPUTime() (time.Duration, bool) { return 0, false }
