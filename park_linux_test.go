package relay

import (
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
