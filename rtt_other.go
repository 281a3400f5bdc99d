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

// socketDraining reports false: without the kernel's view of the socket,
// a Ping that is late is taken as unanswered.
func socketDraining(sc syscall.Conn, d time.Duration) bool { return false }

// socketAcked reports false: without the kernel's view of the socket, a
// Ping that is not answered is taken as lost.
func socketAcked(sc syscall.Conn) bool { return false }

// peerSentLess reports false: without the kernel's view of the socket, a
// client that hung up is noticed when its bytes run out.
func peerSentLess(sc syscall.Conn, n int) bool { return false }
