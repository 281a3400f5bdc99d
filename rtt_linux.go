//go:build linux && !386

package relay

import (
	"syscall"
	"time"
	"unsafe"
)

// socketRTT returns the kernel's smoothed round-trip time of a TCP socket, or
// zero if sc is nil or not TCP.
func socketRTT(sc syscall.Conn) time.Duration {
	if sc == nil {
		return 0
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0
	}
	var info syscall.TCPInfo
	size := uint32(unsafe.Sizeof(info))
	var errno syscall.Errno
	if rc.Control(func(fd uintptr) {
		_, _, errno = syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, syscall.IPPROTO_TCP, syscall.TCP_INFO,
			uintptr(unsafe.Pointer(&info)), uintptr(unsafe.Pointer(&size)), 0)
	}) != nil || errno != 0 {
		return 0
	}
	return time.Duration(info.Rtt) * time.Microsecond
}
