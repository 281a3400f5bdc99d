//go:build !linux || 386

package relay

import (
	"syscall"
	"time"
)

// socketRTT returns zero: the kernel's RTT is read on Linux only (linux/386
// has getsockopt only through socketcall, which package syscall does not
// export).
func socketRTT(sc syscall.Conn) time.Duration { return 0 }
