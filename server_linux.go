//go:build linux

package relay

import (
	"errors"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// tcpUserTimeout is the socket option TCP_USER_TIMEOUT (linux/tcp.h), which
// package syscall does not name.
const tcpUserTimeout = 0x12

// setTCPUserTimeout makes the kernel end the connection when data sent on
// it stays unacknowledged for d, instead of retransmitting for many minutes.
func setTCPUserTimeout(tc *net.TCPConn, d time.Duration) error {
	rc, err := tc.SyscallConn()
	if err != nil {
		return err
	}
	ms := max(1, d.Milliseconds())
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, tcpUserTimeout, int(min(ms, 1<<31-1)))
	}); err != nil {
		return err
	}
	return serr
}

// tcpUserTimeoutOf reads TCP_USER_TIMEOUT back.
func tcpUserTimeoutOf(tc *net.TCPConn) (time.Duration, error) {
	rc, err := tc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var ms int
	var gerr error
	if err := rc.Control(func(fd uintptr) {
		ms, gerr = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_TCP, tcpUserTimeout)
	}); err != nil {
		return 0, err
	}
	return time.Duration(ms) * time.Millisecond, gerr
}

// parkSupported reports whether idle sessions can give up their reader
// goroutine on this platform.
const parkSupported = true

// parker holds the sessions whose readers are parked: their sockets sit in an
// epoll instance of the server's own, and one poller goroutine resumes a
// session (starts a new reader goroutine) when its socket becomes readable or
// hangs up. An idle session then costs its heap state and no stack.
//
// The epoll instance is itself registered with the Go runtime's network
// poller, so the poller goroutine waits without holding a thread. It exists
// only while something is parked.
type parker struct {
	mu    sync.Mutex
	ep    *epoller // nil while nothing is parked
	conns map[uint64]*sconn
	peak  int // most conns has held since it was last rebuilt (shrinkMap)
	next  uint64
	// failAdd, if set (by tests, before the server has sessions), is the
	// error of every add: a process out of file descriptors or epoll
	// watches, without lowering a limit of the whole test binary.
	failAdd error
}

type epoller struct {
	fd int
	f  *os.File
	rc syscall.RawConn
}

const parkEvents = syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT

func newEpoller() (*epoller, error) {
	fd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	if err := syscall.SetNonblock(fd, true); err != nil {
		syscall.Close(fd)
		return nil, os.NewSyscallError("setnonblock", err)
	}
	f := os.NewFile(uintptr(fd), "relay-park-epoll")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &epoller{fd: fd, f: f, rc: rc}, nil
}

// epollCtl adds c's socket to or removes it from ep.
func (ep *epoller) ctl(c *sconn, op int, id uint64) error {
	sc := parkSocket(c.nc)
	if sc == nil {
		return errNotParkable
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	ev := syscall.EpollEvent{Events: parkEvents, Fd: int32(uint32(id)), Pad: int32(uint32(id >> 32))}
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cerr = syscall.EpollCtl(ep.fd, op, int(fd), &ev)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return os.NewSyscallError("epoll_ctl", cerr)
	}
	return nil
}

// add parks c: its socket joins the epoll set, and c is resumed when it
// becomes readable. The caller holds c.mu.
func (p *parker) add(c *sconn) (uint64, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.failAdd != nil {
		return 0, p.failAdd
	}
	if p.ep == nil {
		ep, err := newEpoller()
		if err != nil {
			return 0, err
		}
		p.ep = ep
		go p.poll(ep)
	}
	p.next++
	id := p.next
	if err := p.ep.ctl(c, syscall.EPOLL_CTL_ADD, id); err != nil {
		p.stopIfEmptyLocked()
		return 0, err
	}
	if p.conns == nil {
		p.conns = make(map[uint64]*sconn)
	}
	p.conns[id] = c
	c.s.stats.parked.Add(1)
	c.s.stats.parks.Add(1)
	return id, nil
}

// remove takes c, parked as id, out of the epoll set. It reports whether c
// was still parked, in which case the caller resumes it.
func (p *parker) remove(c *sconn, id uint64) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conns[id] != c {
		return false // the poller resumed it first
	}
	p.takeLocked(id, c)
	p.stopIfEmptyLocked()
	return true
}

func (p *parker) takeLocked(id uint64, c *sconn) {
	// Every idle session is parked: after a spike of sessions, conns
	// would keep the spike's size. As in deleteShrink, the peak is the
	// size just before a deletion.
	p.peak = max(p.peak, len(p.conns))
	delete(p.conns, id)
	p.conns = shrinkMap(p.conns, &p.peak)
	c.s.stats.parked.Add(-1)
	// Fails harmlessly if the socket is already closed, which removed it.
	p.ep.ctl(c, syscall.EPOLL_CTL_DEL, id)
}

// stopIfEmptyLocked ends the poller when nothing is parked. Closing the
// epoll file wakes the poller goroutine, which then returns.
func (p *parker) stopIfEmptyLocked() {
	if len(p.conns) == 0 && p.ep != nil {
		// Close waits for the poller's read to return, which never
		// needs p.mu.
		p.ep.f.Close()
		p.ep = nil
	}
}

// poll resumes parked sessions whose sockets became readable, until ep is
// closed.
func (p *parker) poll(ep *epoller) {
	evs := make([]syscall.EpollEvent, 64)
	type ready struct {
		c  *sconn
		id uint64
	}
	var woken []ready
	for {
		var n int
		err := ep.rc.Read(func(fd uintptr) bool {
			for {
				var err error
				n, err = syscall.EpollWait(int(fd), evs, 0)
				if err != syscall.EINTR {
					// Returning false waits for the epoll set to become
					// readable; only do so when it was found empty.
					return err != nil || n > 0
				}
			}
		})
		if err != nil || n <= 0 {
			return // ep was closed
		}
		p.mu.Lock()
		if p.ep != ep {
			p.mu.Unlock()
			return
		}
		for _, ev := range evs[:n] {
			id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			if c := p.conns[id]; c != nil {
				p.takeLocked(id, c)
				woken = append(woken, ready{c, id})
			}
		}
		p.stopIfEmptyLocked()
		p.mu.Unlock()
		for i, r := range woken {
			r.c.resumed(r.id)
			woken[i] = ready{}
		}
		woken = woken[:0]
	}
}

// rawReader returns the raw connection of a plain socket, for
// connReader's raw reads, or nil.
func rawReader(nc net.Conn) syscall.RawConn {
	var sc syscall.Conn
	switch c := nc.(type) {
	case *net.TCPConn:
		sc = c
	case *net.UnixConn:
		sc = c
	default:
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// errWouldBlock is sysRead's answer when the socket has nothing to read.
var errWouldBlock = errors.New("relay: would block")

// sysRead reads from the non-blocking socket fd.
func sysRead(fd uintptr, p []byte) (int, error) {
	for {
		n, err := syscall.Read(int(fd), p)
		switch err {
		case nil:
			return n, nil
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return 0, errWouldBlock
		}
		return 0, os.NewSyscallError("read", err)
	}
}
