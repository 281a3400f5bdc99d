package relay

import (
	"net/netip"
	"reflect"
	"runtime"
	"testing"
)

// heapInUse returns runtime.MemStats.HeapInuse after two collections.
func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// mapID identifies the map m refers to: it changes when the map is rebuilt.
// It is not a pointer, so as not to keep the map alive.
func mapID[K comparable, V any](m map[K]V) uintptr {
	return reflect.ValueOf(m).Pointer()
}

// spikeIP is the address of the i'th client of a spike.
func spikeIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
}

// admitFake admits n connections, from spikeIP(0) to spikeIP(n-1), as the
// sessions of addFakeConns would have been. The returned function releases
// the first m not yet released; the rest are released before s closes.
func admitFake(t *testing.T, s *Server, n int) (release func(m int)) {
	t.Helper()
	for i := range n {
		if err := s.admitConn(spikeIP(i)); err != nil {
			t.Fatal(err)
		}
	}
	released := 0
	release = func(m int) {
		for ; m > 0 && released < n; m-- {
			s.releaseConn(spikeIP(released))
			released++
		}
	}
	t.Cleanup(func() { release(n) }) // before s.Close, which waits for them
	return release
}

// TestServerTablesShrinkAfterSpike checks that the server-wide tables (the
// session list, the routing shards, the per-IP counts) give back their
// memory once a spike of sessions is over: a Go map keeps the space of its
// largest size, and a relay that once had 100k sessions (a login storm
// after an outage) and went back to 1k kept some 14 MB of tables for them
// for the life of the process.
func TestServerTablesShrinkAfterSpike(t *testing.T) {
	s := newTestServer(t)
	const n, stay = 30000, 300
	base := heapInUse()
	conns := addFakeConns(t, s, 0, n)
	release := admitFake(t, s, n)
	s.mu.Lock()
	connsID, perIPID := mapID(s.conns), mapID(s.perIP)
	s.mu.Unlock()
	var shardIDs [numShards]uintptr
	for i := range s.shards {
		shardIDs[i] = mapID(s.shards[i].m)
	}
	spike := heapInUse()

	for _, c := range conns[stay:] {
		s.unregister(c)
	}
	release(n - stay)
	after := heapInUse()
	// The sessions themselves stay in memory (conns holds them): what
	// the spike's end gives back is the tables' space.
	t.Logf("%d sessions took %d KiB; after all but %d left, %d KiB were given back",
		n, (int64(spike)-int64(base))>>10, stay, (int64(spike)-int64(after))>>10)

	s.mu.Lock()
	if mapID(s.conns) == connsID {
		t.Errorf("the session list was not rebuilt when it went from %d to %d sessions", n, len(s.conns))
	}
	if mapID(s.perIP) == perIPID {
		t.Errorf("the per-IP counts were not rebuilt when they went from %d to %d addresses", n, len(s.perIP))
	}
	s.mu.Unlock()
	kept := 0
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.RLock()
		if mapID(sh.m) == shardIDs[i] {
			kept++
		}
		sh.mu.RUnlock()
	}
	if kept > 0 {
		t.Errorf("%d of %d routing shards were not rebuilt when they went from %d to %d keys in all", kept, numShards, n, stay)
	}
	// The tables took about 7 MB: a third of that is well above noise.
	if got := int64(spike) - int64(after); got < 2<<20 {
		t.Errorf("the end of a spike of %d sessions gave back %d KiB of heap, want at least 2048", n, got>>10)
	}
	if err := s.ConsistencyCheck(); err != nil {
		t.Error(err)
	}
	for _, c := range conns[:stay] {
		if s.lookup(c.key) != c {
			t.Fatalf("conn %d is not routed after the tables shrank", c.connNum)
		}
	}
}

// TestSessionListShrinksAfterWalks checks that the session list is not
// rebuilt while a walk over it (Stats, Sessions) is paused between batches,
// so that the walk goes on over the list as it is (visiting no session that
// ended, each other once, and Stats stays exact), and that it is rebuilt
// once the last walk in progress is done.
func TestSessionListShrinksAfterWalks(t *testing.T) {
	s := newTestServer(t)
	const n, stay, more = 4*connsBatch + 10, 10, 1000
	conns := addFakeConns(t, s, 0, n)
	admitFake(t, s, stay) // for ConsistencyCheck, once the others left
	s.mu.Lock()
	before := mapID(s.conns)
	s.mu.Unlock()
	var want int64 // what the walk in progress must count
	var listed int
	var midID uintptr
	mid := func() {
		s.mu.Lock()
		w := s.statsWalk
		for i, c := range conns {
			switch {
			case i < stay:
				want += int64(i + 1) // not counted yet or counted: the same
			case w == nil || c.statsGen == w.gen: // counted
				want += int64(i + 1)
			default:
				want += int64(i + 1 + more)
			}
			if i >= stay {
				c.recvPkts.Add(more)
			}
		}
		s.mu.Unlock()
		for _, c := range conns[stay:] {
			s.unregister(c)
		}
		// A whole walk of Sessions, begun and ended while Stats's is
		// paused, must leave the list to the walk still in progress.
		for range s.Sessions() {
			listed++
		}
		s.mu.Lock()
		midID = mapID(s.conns)
		s.mu.Unlock()
	}
	var st Stats
	total, _, holds := connsBatches(t, mid, func() { st = s.Stats() })
	if listed != stay {
		t.Errorf("Sessions mid-walk listed %d sessions, want %d", listed, stay)
	}
	if midID != before {
		t.Error("the session list was rebuilt while a walk over it was paused")
	}
	// The first batch, then the sessions still there, then Sessions's.
	if total > connsBatch+2*stay {
		t.Errorf("Stats and Sessions visited %d sessions in %d batches; want at most %d: the walk went on over sessions that had ended",
			total, holds, connsBatch+2*stay)
	}
	if st.PacketsReceived != want {
		t.Errorf("Stats while all but %d of %d sessions ended: %d packets received, want %d", stay, n, st.PacketsReceived, want)
	}
	s.mu.Lock()
	after, left := mapID(s.conns), len(s.conns)
	s.mu.Unlock()
	if after == before {
		t.Errorf("the session list was not rebuilt when the walks were done, with %d of %d sessions left", left, n)
	}
	if want := int64(n*(n+1)/2 + (n-stay)*more); s.Stats().PacketsReceived != want {
		t.Errorf("Stats after the walk: %d packets received, want %d", s.Stats().PacketsReceived, want)
	}
	if err := s.ConsistencyCheck(); err != nil {
		t.Error(err)
	}
}

// TestMeshRoutesShrinkAfterSpike checks that the mesh routes, and the set
// of keys each peer announced, give back their memory once most of the
// keys a peer announced have left it: a region's spike of logins reaches
// every server through its mesh watchers.
func TestMeshRoutesShrinkAfterSpike(t *testing.T) {
	s := newTestServer(t, WithMeshKey(testMeshKey))
	la := newMeshLink(s, "a")
	const n, stay = 10000, 100
	for i := range n {
		s.meshAdd(fakeKey(i), la)
	}
	s.mesh.mu.RLock()
	routesID, keysID := mapID(s.mesh.routes), mapID(la.keys)
	s.mesh.mu.RUnlock()
	for i := stay; i < n; i++ {
		s.meshRemove(fakeKey(i), la, true)
	}
	s.mesh.mu.RLock()
	if mapID(s.mesh.routes) == routesID {
		t.Errorf("the mesh routes were not rebuilt when they went from %d to %d keys", n, len(s.mesh.routes))
	}
	if mapID(la.keys) == keysID {
		t.Errorf("a peer's announced keys were not rebuilt when they went from %d to %d", n, len(la.keys))
	}
	s.mesh.mu.RUnlock()
	for i := range n {
		want := la
		if i >= stay {
			want = nil
		}
		if l := s.meshLookup(fakeKey(i)); l != want {
			t.Fatalf("route to key %d after the routes shrank: %v, want %v", i, l, want)
		}
	}
	s.meshForgetLink(la, true)
	s.mesh.mu.RLock()
	left := len(s.mesh.routes)
	s.mesh.mu.RUnlock()
	if left != 0 || len(la.keys) != 0 {
		t.Errorf("after forgetting the link: %d routes, %d keys of the link; want 0, 0", left, len(la.keys))
	}
}

// TestMeshWaitingShrinksAfterSpike checks that mesh.waiting, the keys with
// neither a route nor a session here that sessions wait to hear of, gives
// back its memory once most of the waits have ended, while others still
// wait (empty, it was already dropped).
func TestMeshWaitingShrinksAfterSpike(t *testing.T) {
	s := newTestServer(t, WithMeshKey(testMeshKey))
	const n, stay = 4000, 10
	many, few := &sconn{s: s, key: fakeKey(n + 1)}, &sconn{s: s, key: fakeKey(n + 2)}
	keys := make([]PublicKey, n)
	srcs := make([]meshSrc, n)
	for i := range keys {
		keys[i] = fakeKey(i)
		srcs[i] = meshSrc{key: keys[i]}
	}
	s.meshNoteRecipient(many, srcs[stay:], false)
	s.meshNoteRecipient(few, srcs[:stay], false)
	s.mesh.mu.RLock()
	before, waits := mapID(s.mesh.waiting), s.mesh.waits
	s.mesh.mu.RUnlock()
	if waits != n {
		t.Fatalf("%d waits, want %d", waits, n)
	}
	s.forgetRecipient(many)
	s.mesh.mu.RLock()
	after, left, waits := mapID(s.mesh.waiting), len(s.mesh.waiting), s.mesh.waits
	s.mesh.mu.RUnlock()
	if left != stay || waits != stay {
		t.Fatalf("after the session waiting for %d keys ended: %d keys, %d waits; want %d, %d", n-stay, left, waits, stay, stay)
	}
	if after == before {
		t.Errorf("the waits were not rebuilt when they went from %d keys to %d", n, left)
	}
	// Those left are handed over as before when their keys get a route.
	la := newMeshLink(s, "a")
	for _, k := range keys[:stay] {
		s.meshAdd(k, la)
	}
	s.mesh.mu.RLock()
	defer s.mesh.mu.RUnlock()
	if len(s.mesh.waiting) != 0 || s.mesh.waits != 0 {
		t.Errorf("after their routes came: %d keys wait, %d waits; want none", len(s.mesh.waiting), s.mesh.waits)
	}
	for _, k := range keys[:stay] {
		if _, ok := s.mesh.routes[k].recipients.m[few]; !ok {
			t.Fatalf("the waiting session is not among the recipients of %s's route", k.ShortString())
		}
	}
}
