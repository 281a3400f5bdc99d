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

// TestParkFailureLogBounded: sessions that cannot be parked (the process is
// out of file descriptors, as in a flood of connections, or out of epoll
// watches) go on unparked, and each says so once. Anyone who can connect
// can make many sessions, so those lines must be bounded like the other
// lines clients can cause, not one per session at Warn. The failure is
// the parker's own (failAdd): lowering RLIMIT_NOFILE instead would fail
// every file and socket the rest of the test binary opened meanwhile.
func TestParkFailureLogBounded(t *testing.T) {
	h := &recHandler{}
	s := NewServer(mustKey(t), WithIdlePark(300*time.Millisecond), WithLogger(slog.New(h)))
	s.park.failAdd = os.NewSyscallError("epoll_create1", syscall.EMFILE)
	addr := tcpServer(t, s)
	const n = 100
	start := time.Now()
	clients := make([]*Client, n)
	for i := range clients {
		clients[i] = tcpClient(t, addr)
	}
	// Each session fails to park once.
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
	warn, _ := failed()
	if limit := logLineBurst + int(elapsed.Seconds()*logLineRate) + 1; warn > limit {
		t.Errorf("%d sessions that could not park logged %d lines at Info or above in %v; want at most %d", n, warn, elapsed.Round(time.Millisecond), limit)
	}
	if st := s.Stats(); st.CurrentParked != 0 {
		t.Errorf("%d sessions parked, want none", st.CurrentParked)
	}
	// The sessions still relay.
	exchange(t, clients[0], clients[1])
}
