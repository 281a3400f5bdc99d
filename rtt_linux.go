//go:build linux && !386

package relay

import (
	"syscall"
	"time"
	"unsafe"
)

// tcpInfo reads the kernel's TCP_INFO of a socket, and the bytes of ours
// it still holds (sent and unacknowledged, or not sent yet: SIOCOUTQ).
func tcpInfo(sc syscall.Conn) (info syscall.TCPInfo, outq int32, ok bool) {
	if sc == nil {
		return info, 0, false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return info, 0, false
	}
	size := uint32(unsafe.Sizeof(info))
	var errno, qerrno syscall.Errno
	if rc.Control(func(fd uintptr) {
		_, _, errno = syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, syscall.IPPROTO_TCP, syscall.TCP_INFO,
			uintptr(unsafe.Pointer(&info)), uintptr(unsafe.Pointer(&size)), 0)
		_, _, qerrno = syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TIOCOUTQ, uintptr(unsafe.Pointer(&outq)))
	}) != nil || errno != 0 {
		return info, 0, false
	}
	if qerrno != 0 {
		outq = 0
	}
	return info, outq, true
}

// socketRTT returns the kernel's smoothed round-trip time of a TCP socket, or
// zero if sc is nil or not TCP.
func socketRTT(sc syscall.Conn) time.Duration {
	info, _, ok := tcpInfo(sc)
	if !ok {
		return 0
	}
	return time.Duration(info.Rtt) * time.Microsecond
}

// socketDraining reports whether a TCP socket still holds bytes of ours
// and the peer acknowledged some within the last d: whatever waits behind
// them (a Ping) is slow to arrive, on a path that is not dead.
func socketDraining(sc syscall.Conn, d time.Duration) bool {
	info, outq, ok := tcpInfo(sc)
	return ok && outq > 0 && time.Duration(info.Last_ack_recv)*time.Millisecond < d
}

// socketAcked reports whether the peer acknowledged every byte written to a
// TCP socket: the path to the peer's host is alive, whatever its
// application does with them.
func socketAcked(sc syscall.Conn) bool {
	info, outq, ok := tcpInfo(sc)
	return ok && outq == 0 && info.Unacked == 0
}

// TCP states (linux/include/net/tcp_states.h) in which the peer sends no
// more: its FIN arrived (close wait), or a reset did (close).
const (
	tcpStateClose     = 7
	tcpStateCloseWait = 8
)

// peerSentLess reports whether the peer of TCP socket sc has stopped
// sending (its FIN or a reset arrived) with fewer than n bytes left unread
// in the socket: a frame that still needs n bytes from it can never be
// completed. It reports false when it cannot tell (not TCP).
func peerSentLess(sc syscall.Conn, n int) bool {
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	var info syscall.TCPInfo
	size := uint32(unsafe.Sizeof(info))
	var inq int32
	var errno, qerrno syscall.Errno
	if rc.Control(func(fd uintptr) {
		_, _, errno = syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, syscall.IPPROTO_TCP, syscall.TCP_INFO,
			uintptr(unsafe.Pointer(&info)), uintptr(unsafe.Pointer(&size)), 0)
		_, _, qerrno = syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TIOCINQ, uintptr(unsafe.Pointer(&inq)))
	}) != nil || errno != 0 || qerrno != 0 {
		return false
	}
	return (info.State == tcpStateCloseWait || info.State == tcpStateClose) && int(inq) < n
}
