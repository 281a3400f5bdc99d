//go:build !linux

package relay

import (
	"errors"
	"net"
	"syscall"
	"time"
)

// setTCPUserTimeout does nothing here: TCP_USER_TIMEOUT is Linux's.
func setTCPUserTimeout(tc *net.TCPConn, d time.Duration) error { return nil }

func tcpUserTimeoutOf(tc *net.TCPConn) (time.Duration, error) { return 0, errors.ErrUnsupported }

// parkSupported reports whether idle sessions can give up their reader
// goroutine on this platform.
const parkSupported = false

// parker parks nothing here: every session keeps its reader goroutine.
type parker struct{}

func (p *parker) add(c *sconn) (uint64, error)    { return 0, errNotParkable }
func (p *parker) remove(c *sconn, id uint64) bool { return false }

// rawReader returns nil here: connReader reads through net.Conn.Read.
func rawReader(nc net.Conn) syscall.RawConn { return nil }

var errWouldBlock = errors.New("relay: would block")

func sysRead(fd uintptr, p []byte) (int, error) { return 0, errors.ErrUnsupported }
