package relay

import (
	"log/slog"
	"os"
	"syscall"
	"testing"
	"time"
)

// TestParkedSetShrinksAfterSpike checks that the parker's set of parked
// sessions gives back its memory once most of them have ended: idle
// sessions are parked right after login, so a spike of logins filled it,
// and it kept the spike's size for the life of the server.
func TestParkedSetShrinksAfterSpike(t *testing.T) {
	s := NewServer(mustKey(t), WithIdlePark(20*time.Millisecond))
	addr := tcpServer(t, s)
	const n, stay = 200, 10
	clients := make([]*Client, n)
	for i := range clients {
		clients[i] = tcpClient(t, addr)
	}
	parked := func(want int64) func() bool {
		return func() bool { st := s.Stats(); return st.CurrentParked == want && st.CurrentConnections == want }
	}
	waitForWithin(t, time.Minute, parked(n))
	s.park.mu.Lock()
	before := mapID(s.park.conns)
	s.park.mu.Unlock()
	for _, c := range clients[stay:] {
		c.Close()
	}
	waitForWithin(t, time.Minute, parked(stay))
	s.park.mu.Lock()
	after, left := mapID(s.park.conns), len(s.park.conns)
	s.park.mu.Unlock()
	if after == before {
		t.Errorf("the set of parked sessions was not rebuilt when it went from %d to %d", n, left)
	}
	// The sessions still parked wake as before.
	exchange(t, clients[0], clients[1])
	if err := s.ConsistencyCheck(); err != nil {
		t.Error(err)
	}
}

// lowestFreeFD returns the number the next file descriptor of the process
// would get: open always takes the lowest free one.
func lowestFreeFD(t *testing.T) uint64 {
	t.Helper()
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Skip(err)
	}
	defer f.Close()
	return uint64(f.Fd())
}

// TestParkFailureLogBounded: sessions that cannot be parked (the process is
// out of file descriptors, as in a flood of connections, or out of epoll
// watches) go on unparked, and each says so once. Anyone who can connect
// can make many sessions, so those lines must be bounded like the other
// lines clients can cause, not one per session at Warn.
func TestParkFailureLogBounded(t *testing.T) {
	h := &recHandler{}
	s := NewServer(mustKey(t), WithIdlePark(300*time.Millisecond), WithLogger(slog.New(h)))
	addr := tcpServer(t, s)
	const n = 100
	clients := make([]*Client, n)
	for i := range clients {
		clients[i] = tcpClient(t, addr)
	}
	waitForWithin(t, time.Minute, func() bool { return s.Stats().CurrentParked == n })
	// Wake every session: with none parked the parker gives its epoll file
	// back, and the next park needs a new one. (On a busy machine the
	// first may park again before the last wakes: then again.)
	allAwake := func() bool {
		s.park.mu.Lock()
		defer s.park.mu.Unlock()
		return len(s.park.conns) == 0 && s.park.ep == nil
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Skip(err)
	}
	restore := func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim) }
	defer restore()
	var start time.Time
	for deadline := time.Now().Add(time.Minute); ; {
		if time.Now().After(deadline) {
			t.Fatal("sessions never all awake at once")
		}
		for _, c := range clients {
			if err := c.SendPing([8]byte{1}); err != nil {
				t.Fatal(err)
			}
		}
		for end := time.Now().Add(200 * time.Millisecond); time.Now().Before(end) && !allAwake(); {
			time.Sleep(2 * time.Millisecond)
		}
		if !allAwake() {
			continue
		}
		// No file descriptor left: the next park cannot make an epoll
		// file.
		low := lim
		low.Cur = lowestFreeFD(t)
		start = time.Now()
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
			t.Skip(err)
		}
		if allAwake() {
			break
		}
		restore() // one parked in between
	}
	// Each session now fails to park once.
	failed := func() (warn, all int) {
		h.mu.Lock()
		defer h.mu.Unlock()
		for _, r := range h.recs {
			if r.Message == "relay: cannot park idle session" {
				all++
				if r.Level >= slog.LevelInfo {
					warn++
				}
			}
		}
		return warn, all
	}
	waitForWithin(t, time.Minute, func() bool { _, all := failed(); return all == n })
	elapsed := time.Since(start)
	restore()
	warn, _ := failed()
	if limit := logLineBurst + int(elapsed.Seconds()*logLineRate) + 1; warn > limit {
		t.Errorf("%d sessions that could not park logged %d lines at Info or above in %v; want at most %d", n, warn, elapsed.Round(time.Millisecond), limit)
	}
	// The sessions still relay.
	exchange(t, clients[0], clients[1])
}
