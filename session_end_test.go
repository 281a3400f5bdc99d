package relay

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"
	"weak"
)

// What a session leaves behind when it ends, and what one client's ending
// does to the others' streams.

// The writer splits a batch's control frames so that a Restarting notice
// goes after the packets. It must know where that notice starts, not guess
// from the bytes: a PeerGone frame's last 13 bytes begin with byte 20 of the
// departed key, which an attacker can choose to be FrameRestarting's type,
// and a PeerGone cut there would derail the victim's stream.
func TestPeerGoneKeyByteNotTakenForRestarting(t *testing.T) {
	s := newTestServer(t, WithWriteTimeout(0))
	victim := pipeClient(t, s)
	vk := victim.priv.Public()
	b := pipeClient(t, s)

	var apriv PrivateKey
	for {
		apriv = mustKey(t)
		if apriv.Public()[20] == byte(FrameRestarting) {
			break
		}
	}
	cc, sc := net.Pipe()
	go s.Accept(context.Background(), sc, nil, "127.0.0.1:3")
	attacker := loginClient(t, cc, apriv)
	ak := apriv.Public()

	// The victim receives from the attacker, so it will be told PeerGone.
	if err := attacker.Send(vk, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	if p, ok := recvMsg[*ReceivedPacket](t, victim); !ok || p.Source != ak {
		t.Fatal("attacker's packet not relayed")
	}
	// The victim reads nothing for now: its writer blocks on b's first
	// packet (net.Pipe has no buffer), and the next batch holds both
	// PeerGone(attacker) and b's second packet.
	if err := b.Send(vk, []byte("one")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	attacker.Close()
	waitFor(t, func() bool { return !s.IsClientConnected(ak) })
	if err := b.Send(vk, []byte("two")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)

	victim.opts.recvTimeout = 2 * time.Second
	var got []string
	for range 3 {
		m, err := victim.Recv()
		if err != nil {
			got = append(got, "error: "+err.Error())
			break
		}
		switch m := m.(type) {
		case *ReceivedPacket:
			got = append(got, "packet "+string(m.Data))
		case PeerGone:
			if m.Peer == ak {
				got = append(got, "PeerGone(attacker)")
			} else {
				got = append(got, "PeerGone(corrupted key "+m.Peer.ShortString()+")")
			}
		default:
			got = append(got, "other")
		}
	}
	want := []string{"packet one", "PeerGone(attacker)", "packet two"}
	if len(got) != 3 || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Errorf("victim received %q, want %q", got, want)
	}
}

// A client that reconnects in a loop, sending to or receiving from one
// long-lived peer, must not grow that peer's set of sessions to tell
// PeerGone: each ended session leaves it.
func TestEndedSessionsLeaveRecipientSets(t *testing.T) {
	for _, dir := range []string{"sent to", "received from"} {
		t.Run(dir, func(t *testing.T) {
			s := newTestServer(t)
			long := pipeClient(t, s)
			lk := long.priv.Public()
			const n = 30
			for i := range n {
				x := pipeClient(t, s)
				xk := x.priv.Public()
				if dir == "sent to" {
					if err := x.Send(lk, []byte{byte(i)}); err != nil {
						t.Fatal(err)
					}
					if _, ok := recvMsg[*ReceivedPacket](t, long); !ok {
						t.Fatal("packet not relayed")
					}
				} else {
					if err := long.Send(xk, []byte{byte(i)}); err != nil {
						t.Fatal(err)
					}
					if _, ok := recvMsg[*ReceivedPacket](t, x); !ok {
						t.Fatal("packet not relayed")
					}
				}
				x.Close()
				waitFor(t, func() bool { return !s.IsClientConnected(xk) })
			}
			waitFor(t, func() bool { return s.Stats().CurrentConnections == 1 })
			e, _ := s.lookupEntry(lk)
			sh := s.shard(lk)
			// The last session's shutdown may still be under way.
			waitFor(t, func() bool {
				sh.mu.RLock()
				defer sh.mu.RUnlock()
				return len(e.recipients.m) == 0
			})
		})
	}
}

// TestForgetRecipientInBatches checks that a session that heard from many
// peers leaves their recipient sets a batch at a time, releasing mesh.mu
// in between: it held mesh.mu across all of them (8 ms for 10k senders,
// 80 ms for 100k), and with it every packet for a key not connected here
// waited.
func TestForgetRecipientInBatches(t *testing.T) {
	s := newTestServer(t, WithMeshKey(testMeshKey))
	la := newMeshLink(s, "a")
	other := mustKey(t).Public()
	s.meshAdd(other, la)
	c := &sconn{s: s, sentFrom: map[PublicKey]struct{}{}, sentToMesh: map[PublicKey]*meshRoute{}}
	const n = 4*meshLockBatch + 10 // local senders
	const remote = meshLockBatch   // destinations reached through the mesh
	var entries []*keyEntry
	for i := range n + remote {
		k := fakeKey(i)
		if i >= n {
			s.meshAdd(k, la)
			r, _ := s.meshRoute(k)
			r.recipients.add(c)
			c.sentToMesh[k] = r
			continue
		}
		o := &sconn{s: s, key: k}
		e := &keyEntry{conns: []*sconn{o}}
		e.active.Store(o)
		e.recipients.add(c)
		sh := s.shard(k)
		sh.mu.Lock()
		sh.m[k] = e
		sh.mu.Unlock()
		entries = append(entries, e)
		c.sentFrom[k] = struct{}{}
	}
	total, most, holds := meshBatches(t, s, other, la, func() { s.forgetRecipient(c) })
	if total != n+remote || most > meshLockBatch {
		t.Errorf("%d keys handled in %d holds of mesh.mu, the largest %d; want %d, at most %d each", total, holds, most, n+remote, meshLockBatch)
	}
	for i, e := range entries {
		sh := s.shard(e.active.Load().key)
		sh.mu.RLock()
		_, still := e.recipients.m[c]
		sh.mu.RUnlock()
		if still {
			t.Fatalf("sender %d still has the ended session as a recipient", i)
		}
	}
	s.mesh.mu.RLock()
	defer s.mesh.mu.RUnlock()
	for k, r := range s.mesh.routes {
		if _, still := r.recipients.m[c]; still {
			t.Fatalf("route to %s still has the ended session as a recipient", k.ShortString())
		}
	}
}

// Sessions that ended without removing themselves (a session that sent to
// more than maxSentTo peers forgets the first ones) are swept out as the
// set grows: it holds at most about twice its live members.
func TestRecipientSetSweepsEndedSessions(t *testing.T) {
	var rs recipientSet
	live := make([]*sconn, 10)
	for i := range live {
		live[i] = new(sconn)
		rs.add(live[i])
	}
	most := 0
	for range 1000 {
		c := new(sconn)
		rs.add(c)
		c.left.Store(true)
		most = max(most, len(rs.m))
	}
	if most > 2*minSweep {
		t.Errorf("the set grew to %d members with %d live, want at most %d", most, len(live), 2*minSweep)
	}
	for _, c := range live {
		if _, ok := rs.m[c]; !ok {
			t.Fatal("a live member was swept out")
		}
	}
}

// badLogin sends s a ClientInfo whose box does not open, with more bytes
// behind it in the same write, and waits for the login to end.
func badLogin(t *testing.T, s *Server) {
	t.Helper()
	cc, sc := net.Pipe()
	done := make(chan struct{})
	go func() {
		s.Accept(context.Background(), sc, nil, "127.0.0.1:1")
		close(done)
	}()
	go io.Copy(io.Discard, cc) // ServerKey
	payload := make([]byte, 300)
	for i := range payload {
		payload[i] = byte(i + 1)
	}
	bw := bufio.NewWriter(cc)
	writeFrame(bw, FrameClientInfo, payload)
	bw.Write(make([]byte, 100)) // the client's next bytes, pipelined
	bw.Flush()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("login did not end")
	}
	cc.Close()
}

// A session or login that ends with bytes still in its read buffer gives
// the buffer back: otherwise the budget of big buffers (maxBigReadBufs)
// would shrink with every such connection, which needs no authentication,
// and then every reader of the process would get small buffers for good.
func TestReadBufferReturnedWhenSessionEnds(t *testing.T) {
	t.Run("protocol error", func(t *testing.T) {
		s := newTestServer(t)
		before := bigReadBufs.Load()
		const n = 10
		for range n {
			cc, sc := net.Pipe()
			done := make(chan struct{})
			go func() {
				s.Accept(context.Background(), sc, nil, "127.0.0.1:1")
				close(done)
			}()
			c := loginClient(t, cc, mustKey(t))
			// A 2-byte NotePreferred (fatal) and 300 more bytes in
			// one write.
			b := appendFrame(nil, FrameNotePreferred, []byte{1, 1})
			b = append(b, make([]byte, 300)...)
			go cc.Write(b)
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("session did not end")
			}
			c.Close()
		}
		if got := s.Stats().Errors["session:bad_note_preferred_length"]; got != n {
			t.Fatalf("%d bad_note_preferred_length errors, want %d", got, n)
		}
		if after := bigReadBufs.Load(); after != before {
			t.Errorf("big read buffers in use: %d before %d sessions ended by a protocol error, %d after", before, n, after)
		}
	})
	t.Run("failed login", func(t *testing.T) {
		s := newTestServer(t)
		before := bigReadBufs.Load()
		for range maxBigReadBufs + 20 {
			badLogin(t, s)
		}
		if got := s.Stats().Errors["login:bad_client_info_box"]; got != maxBigReadBufs+20 {
			t.Fatalf("%d bad_client_info_box login errors, want %d", got, maxBigReadBufs+20)
		}
		if after := bigReadBufs.Load(); after != before {
			t.Errorf("big read buffers in use: %d before %d failed logins, %d after", before, maxBigReadBufs+20, after)
		}
		b := getReadBuf()
		defer putReadBuf(b)
		if len(b) != bigReadBufSize {
			t.Errorf("after the failed logins getReadBuf returns %d bytes, want %d", len(b), bigReadBufSize)
		}
	})
}

// gateConn holds the server's next Write to the client until released;
// that write then succeeds, as one the kernel accepted.
type gateConn struct {
	net.Conn
	mu      sync.Mutex
	armed   bool
	entered chan struct{}
	release chan struct{}
}

func (g *gateConn) Write(p []byte) (int, error) {
	g.mu.Lock()
	armed := g.armed
	g.armed = false
	g.mu.Unlock()
	if armed {
		close(g.entered)
		<-g.release
		return len(p), nil
	}
	return g.Conn.Write(p)
}

// A batch whose write completes while its session is ending still counts in
// Stats.PacketsSent.
func TestStatsCountLastBatchOfEndingSession(t *testing.T) {
	s := newTestServer(t)
	a := pipeClient(t, s)
	cc, sc := net.Pipe()
	g := &gateConn{Conn: sc, entered: make(chan struct{}), release: make(chan struct{})}
	go s.Accept(context.Background(), g, nil, "127.0.0.1:2")
	x := loginClient(t, cc, mustKey(t))
	xk := x.priv.Public()
	before := s.Stats().PacketsSent

	g.mu.Lock()
	g.armed = true
	g.mu.Unlock()
	if err := a.Send(xk, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-g.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("no write to x")
	}
	cc.Close() // the client hangs up while the server writes its packet
	waitFor(t, func() bool { return !s.IsClientConnected(xk) })
	close(g.release) // the write succeeds
	waitFor(t, func() bool { return s.Stats().CurrentConnections == 1 })
	var st Stats
	waitFor(t, func() bool { st = s.Stats(); return st.PacketsSent != before })
	if sent := st.PacketsSent - before; sent != 1 {
		t.Errorf("one packet written to x, Stats.PacketsSent grew by %d", sent)
	}
}

// closeGateConn holds the server's Close of the connection, announced on
// closing, until the test releases it.
type closeGateConn struct {
	net.Conn
	once    sync.Once
	closing chan struct{}
	release chan struct{}
}

func (g *closeGateConn) Close() error {
	g.once.Do(func() {
		close(g.closing)
		<-g.release
	})
	return g.Conn.Close()
}

// A session that sent packets to its own key is not told, as it ends, that
// its key is gone: it was among the recipients of its own packets, and the
// notice went out between the reader's error and the close.
func TestEndingSessionNotToldItIsGone(t *testing.T) {
	s := newTestServer(t)
	cc, sc := net.Pipe()
	g := &closeGateConn{Conn: sc, closing: make(chan struct{}), release: make(chan struct{})}
	go s.Accept(context.Background(), g, nil, "127.0.0.1:3")
	a := loginClient(t, cc, mustKey(t))
	if err := a.Send(a.PublicKey(), []byte("me")); err != nil {
		t.Fatal(err)
	}
	recvMsg[*ReceivedPacket](t, a)
	var c *sconn
	s.mu.Lock()
	for sc := range s.conns {
		c = sc
	}
	s.mu.Unlock()
	msgs := make(chan []Message, 1)
	go func() {
		m, _ := recvUntilErr(t, a)
		msgs <- m
	}()
	// A NotePreferred of 0 bytes is a protocol error: the session ends.
	if _, err := cc.Write([]byte{byte(FrameNotePreferred), 0, 0, 0, 0}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-g.closing:
	case <-time.After(10 * time.Second):
		t.Fatal("the session did not end")
	}
	// Whatever was queued for the session by now goes out before the close.
	waitForWithin(t, 10*time.Second, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return !c.writing
	})
	close(g.release)
	for _, m := range <-msgs {
		if pg, ok := m.(PeerGone); ok && pg.Peer == a.PublicKey() {
			t.Errorf("the ending session was told its own key is gone: %+v", pg)
		}
	}
}

// A client that leaves while its packet still waits in a receiver's queue:
// the receiver is written the packet and then told PeerGone, and when the
// client comes back, sends again and leaves again, it is told again.
func TestPeerGoneForSourceThatLeftBeforeDelivery(t *testing.T) {
	s := newTestServer(t, WithWriteTimeout(20*time.Second))
	r := pipeClient(t, s)
	other := pipeClient(t, s)
	kPriv := mustKey(t)
	kk := kPriv.Public()
	k := pipeLogin(t, s, kPriv)

	other.Send(r.PublicKey(), []byte("first")) // r's writer blocks: r reads nothing yet
	time.Sleep(100 * time.Millisecond)
	k.Send(r.PublicKey(), []byte("from k #1")) // waits in r's queue
	time.Sleep(50 * time.Millisecond)
	k.Close()
	waitFor(t, func() bool { return !s.IsClientConnected(kk) })
	r.opts.recvTimeout = 5 * time.Second
	var got []string
	for len(got) < 3 {
		m, err := r.Recv()
		if err != nil {
			t.Fatalf("after %q: %v", got, err)
		}
		switch m := m.(type) {
		case *ReceivedPacket:
			got = append(got, string(m.Data))
		case PeerGone:
			if m.Peer == kk {
				got = append(got, "PeerGone(k)")
			}
		}
	}
	if want := []string{"first", "from k #1", "PeerGone(k)"}; !slices.Equal(got, want) {
		t.Fatalf("r received %q, want %q", got, want)
	}

	cc2, sc2 := net.Pipe()
	go s.Accept(context.Background(), sc2, nil, "127.0.0.1:1")
	k2 := loginClient(t, cc2, kPriv)
	k2.Send(r.PublicKey(), []byte("from k #2"))
	if p, ok := recvMsg[*ReceivedPacket](t, r); !ok || string(p.Data) != "from k #2" {
		t.Fatalf("got %+v", p)
	}
	k2.Close()
	if g, ok := recvMsg[PeerGone](t, r); !ok || g.Peer != kk {
		t.Fatalf("after k's second session: %+v, want PeerGone(k)", g)
	}
}

// The mesh form: the client's last packet through this server is written
// after it moved to a mesh peer; the receiver is told when it leaves the
// region.
func TestPeerGoneForSourceThatMovedBeforeDelivery(t *testing.T) {
	s := newTestServer(t, WithMeshKey(testMeshKey), WithWriteTimeout(20*time.Second))
	la := newMeshLink(s, "a")
	r := pipeClient(t, s)
	other := pipeClient(t, s)
	k := pipeClient(t, s)
	kk := k.PublicKey()

	other.Send(r.PublicKey(), []byte("first")) // r's writer blocks: r reads nothing yet
	time.Sleep(100 * time.Millisecond)
	k.Send(r.PublicKey(), []byte("last packet of k here"))
	time.Sleep(50 * time.Millisecond)
	s.meshAdd(kk, la) // k logged in at peer a
	k.Close()         // and left this server
	waitFor(t, func() bool { return !s.IsClientConnected(kk) })
	r.opts.recvTimeout = 5 * time.Second
	for got := 0; got < 2; {
		m, err := r.Recv()
		if err != nil {
			t.Fatal(err)
		}
		switch m := m.(type) {
		case *ReceivedPacket:
			got++
		case PeerGone:
			t.Fatalf("told PeerGone(%s) while k is still in the region", m.Peer.ShortString())
		}
	}
	waitFor(t, func() bool { // the writer registered r with k's route
		s.mesh.mu.Lock()
		defer s.mesh.mu.Unlock()
		rt := s.mesh.routes[kk]
		return rt != nil && len(rt.recipients.m) > 0
	})
	s.meshRemove(kk, la, true) // k left the region
	if g, ok := recvMsg[PeerGone](t, r); !ok || g.Peer != kk {
		t.Fatalf("after k left the region: %+v, want PeerGone(k)", g)
	}
}

// TestPeerGoneForDestinationThatLeftMidSend: a client whose packet to a
// local key is delivered while the key's session ends (after the sender's
// reader looked the key up, before it registered to be told of its
// departure, where a test hook holds it) is registered with the key's new
// session or mesh route, or told PeerGone at once. It was registered with
// nothing and told nothing until its next send.
func TestPeerGoneForDestinationThatLeftMidSend(t *testing.T) {
	for _, tc := range []string{"gone", "reconnected", "moved to a mesh peer"} {
		t.Run(tc, func(t *testing.T) {
			s := newTestServer(t, WithMeshKey(testMeshKey))
			la := newMeshLink(s, "a")
			a := pipeClient(t, s)
			bPriv := mustKey(t)
			bk := bPriv.Public()
			b := pipeLogin(t, s, bPriv)

			inHook, proceed := make(chan struct{}), make(chan struct{})
			var fired atomic.Bool
			hook := func(dst PublicKey) {
				if dst == bk && fired.CompareAndSwap(false, true) {
					close(inHook)
					<-proceed
				}
			}
			testHookNoteSentTo.Store(&hook)
			t.Cleanup(func() { testHookNoteSentTo.Store(nil) })

			if err := a.Send(bk, []byte("to b")); err != nil {
				t.Fatal(err)
			}
			select {
			case <-inHook: // a's reader looked b up and waits to register
			case <-time.After(5 * time.Second):
				t.Fatal("a's packet to b never reached noteSentTo")
			}
			if tc == "moved to a mesh peer" {
				s.meshAdd(bk, la) // b logged in at peer a
			}
			b.Close()
			waitFor(t, func() bool { return !s.IsClientConnected(bk) })
			var b2 *Client
			if tc == "reconnected" {
				b2 = pipeLogin(t, s, bPriv)
			}
			close(proceed)

			if tc == "gone" {
				if g, ok := recvMsg[PeerGone](t, a); !ok || g.Peer != bk || g.Reason != PeerGoneDisconnected {
					t.Fatalf("got %+v, want PeerGone(%s, Disconnected)", g, bk.ShortString())
				}
				return
			}
			// b is still reachable: a is not told it is gone (what it
			// gets next is its ping's pong), until b leaves for good.
			if err := a.SendPing([8]byte{7}); err != nil {
				t.Fatal(err)
			}
			a.opts.recvTimeout = 5 * time.Second
			for done := false; !done; {
				m, err := a.Recv()
				if err != nil {
					t.Fatal(err)
				}
				switch m := m.(type) {
				case PeerGone:
					t.Fatalf("told %+v while b is still reachable", m)
				case Pong:
					done = true
				}
			}
			if b2 != nil {
				b2.Close()
			} else {
				waitFor(t, func() bool { return meshRouteRecipients(s, bk) == 1 })
				s.meshRemove(bk, la, true) // b left the region
			}
			if g, ok := recvMsg[PeerGone](t, a); !ok || g.Peer != bk || g.Reason != PeerGoneDisconnected {
				t.Fatalf("got %+v, want PeerGone(%s, Disconnected)", g, bk.ShortString())
			}
		})
	}
}

// TestSentToForgetsDepartedDestinations: a session remembers the keys its
// client sent to (sentTo), and those it reached through mesh routes
// (sentToMesh), so that it is told when they leave; once it has been told,
// the next new destination makes it forget them and the memory they held.
// They stayed until the session had 4096 of them.
func TestSentToForgetsDepartedDestinations(t *testing.T) {
	const n = 100 // more than minShrink: the map is rebuilt smaller
	for _, mesh := range []bool{false, true} {
		t.Run(fmt.Sprintf("mesh=%v", mesh), func(t *testing.T) {
			s := newTestServer(t, WithMeshKey(testMeshKey))
			la := newMeshLink(s, "a") // down: what goes through it is dropped
			a := pipeClient(t, s)
			var ac *sconn
			for _, c := range s.snapshotConns() {
				if c.key == a.PublicKey() {
					ac = c
				}
			}
			// roundTrip returns once a's reader has handled all a sent
			// (it answers the ping after), so its maps may be read.
			roundTrip := func() {
				t.Helper()
				if err := a.SendPing([8]byte{1}); err != nil {
					t.Fatal(err)
				}
				if _, ok := recvMsg[Pong](t, a); !ok {
					t.FailNow()
				}
			}
			sizes := func() int {
				if mesh {
					return len(ac.sentToMesh)
				}
				return len(ac.sentTo)
			}
			var peers []*Client
			var keys []PublicKey
			for range n {
				if mesh {
					k := mustKey(t).Public()
					s.meshAdd(k, la)
					keys = append(keys, k)
				} else {
					p := pipeClient(t, s)
					peers = append(peers, p)
					keys = append(keys, p.PublicKey())
				}
			}
			for _, k := range keys {
				if err := a.Send(k, []byte("hi")); err != nil {
					t.Fatal(err)
				}
			}
			roundTrip()
			if got := sizes(); got != n {
				t.Fatalf("a's session remembers %d destinations, want %d", got, n)
			}
			// Every destination leaves; a is told of each.
			for i, k := range keys {
				if mesh {
					s.meshRemove(k, la, true)
				} else {
					peers[i].Close()
				}
			}
			told := map[PublicKey]bool{}
			for len(told) < n {
				g, ok := recvMsg[PeerGone](t, a)
				if !ok {
					t.Fatalf("a was told %d of %d departures", len(told), n)
				}
				told[g.Peer] = true
			}
			// One new destination.
			var k PublicKey
			if mesh {
				k = mustKey(t).Public()
				s.meshAdd(k, la)
			} else {
				k = pipeClient(t, s).PublicKey()
			}
			if err := a.Send(k, []byte("hi")); err != nil {
				t.Fatal(err)
			}
			roundTrip()
			peak := ac.sentToPeak
			if mesh {
				peak = ac.sentToMeshPeak
			}
			if got := sizes(); got != 1 || peak != 1 {
				t.Fatalf("after %d destinations left and a sent to a new one, a's session remembers %d (map sized for %d), want 1", n, got, peak)
			}
		})
	}
}

// A mesh client asking for the connection list again and again, without
// reading, has at most one list queued at a time.
func TestWatchConnsRepeatedStaysBounded(t *testing.T) {
	s := newTestServer(t, WithMeshKey(testMeshKey))
	const clients = 50
	for range clients {
		pipeClient(t, s)
	}
	w := pipeClient(t, s, MeshKey(testMeshKey))
	var wc *sconn
	for _, c := range s.snapshotConns() {
		if c.key == w.PublicKey() {
			wc = c
		}
	}
	for range 2000 {
		if err := w.WatchConnectionChanges(); err != nil {
			t.Fatal(err)
		}
	}
	// NotePreferred after them: once it counts, they were all handled.
	if err := w.NotePreferred(true); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return s.Stats().CurrentHomeConnections == 1 })
	wc.mu.Lock()
	n := len(wc.meshUpdates)
	wc.mu.Unlock()
	if n > clients+1 {
		t.Fatalf("2000 WatchConns queued %d updates for %d connected keys", n, clients+1)
	}
	// The list still arrives whole.
	seen := map[PublicKey]bool{}
	for len(seen) < clients+1 {
		p, ok := recvMsg[PeerPresent](t, w)
		if !ok {
			t.FailNow()
		}
		seen[p.Key] = true
	}
}

// TestWatchConnsRepeatedNoWalk checks that WatchConns while the list of
// connected keys is still queued for the watcher costs no walk over the
// routing table: each one walked every key under s.mu (2 ms for 10k keys,
// logins waiting) to build a list it then threw away. Holding one routing
// shard shows it: a walk could not finish.
func TestWatchConnsRepeatedNoWalk(t *testing.T) {
	s := newTestServer(t, WithMeshKey(testMeshKey))
	const n = 1000
	for i := range n {
		addFakeSession(s, &sconn{s: s, key: fakeKey(i)})
	}
	w := &sconn{s: s, writing: true} // no writer goroutine: nothing is taken
	s.addWatcher(w)
	sh := &s.shards[0]
	sh.mu.Lock()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 100 {
			s.addWatcher(w)
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Error("WatchConns with the list still queued walks the routing table")
	}
	sh.mu.Unlock()
	<-done
	w.mu.Lock()
	queued := len(w.meshUpdates)
	w.mu.Unlock()
	if queued != n {
		t.Errorf("%d updates queued, want the one list of %d", queued, n)
	}
}

// TestWatchConnsListBuiltWithoutServerLock checks that logins go on while
// a watcher's list of connected keys is built: the walk over every key
// (2 ms for 10k) held s.mu, for which each login and logout waits. Holding
// one routing shard stops the walk mid-way; a login of a key in another
// shard must still complete, and the watcher must learn of every key
// exactly once.
func TestWatchConnsListBuiltWithoutServerLock(t *testing.T) {
	s := newTestServer(t, WithMeshKey(testMeshKey), WithKeepAlive(0))
	const held = 5 // the shard the test holds
	const n = 200
	want := map[PublicKey]bool{}
	for i := range n {
		addFakeSession(s, &sconn{s: s, key: fakeKey(i)})
		want[fakeKey(i)] = true
	}
	priv := mustKey(t)
	for priv.Public()[0]%numShards == held {
		priv = mustKey(t)
	}
	w := &sconn{s: s, writing: true} // no writer goroutine: the test takes
	sh := &s.shards[held]
	sh.mu.Lock()
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		s.addWatcher(w)
	}()
	// Wait for the walk to be stuck at the held shard: listing, or (as
	// it was) holding s.mu.
	waitFor(t, func() bool {
		if !s.mu.TryLock() {
			return true
		}
		s.mu.Unlock()
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.listing
	})
	loggedIn := make(chan *Client, 1)
	go func() {
		var c *Client
		defer func() { loggedIn <- c }() // even if the login fails the test
		c = pipeLogin(t, s, priv)
	}()
	select {
	case <-loggedIn:
		sh.mu.Unlock()
	case <-time.After(10 * time.Second):
		t.Error("a login waited for a watcher's list to be built")
		sh.mu.Unlock()
		<-loggedIn
	}
	<-watched
	want[priv.Public()] = true
	w.mu.Lock()
	defer w.mu.Unlock()
	seen := map[PublicKey]int{}
	for _, u := range w.meshUpdates {
		if u.Flags == 0 {
			t.Fatalf("%s gone in the list", u.Key.ShortString())
		}
		seen[u.Key]++
	}
	for k := range want {
		if seen[k] != 1 {
			t.Errorf("%s listed %d times, want once", k.ShortString(), seen[k])
		}
	}
	if len(seen) != len(want) {
		t.Errorf("%d keys listed, want %d", len(seen), len(want))
	}
}

// TestWatcherListTakenInSlices checks that a watcher's writer takes the
// list of every connected key a slice at a time: it encoded the whole list
// at once under the watcher's mu, for which every login's and logout's
// broadcast waits, under s.mu (0.7 ms for 10k keys, 70 ms for 100k). The
// list still arrives whole and in order, and asking again mid-way queues
// it once more.
func TestWatcherListTakenInSlices(t *testing.T) {
	s := newTestServer(t, WithMeshKey(testMeshKey))
	const n = 3*maxUpdatesPerBatch + 10
	for i := range n {
		addFakeSession(s, &sconn{s: s, key: fakeKey(i), remoteAddr: netip.MustParseAddrPort("192.0.2.1:1")})
	}
	w := &sconn{s: s, writing: true} // no writer goroutine: the test takes
	s.addWatcher(w)
	ws := new(writerState)
	seen := map[PublicKey]int{}
	takes, frames := 0, 0
	for {
		w.mu.Lock()
		more := w.takeLocked(ws)
		w.mu.Unlock()
		if !more {
			break
		}
		takes++
		inTake := 0
		for b := ws.control; len(b) > 0; inTake++ {
			typ, size := FrameType(b[0]), int(binary.BigEndian.Uint32(b[1:5]))
			if typ != FramePeerPresent {
				t.Fatalf("frame %v in the list", typ)
			}
			seen[PublicKey(b[5:5+KeyLen])]++
			b = b[5+size:]
		}
		frames += inTake
		if inTake > maxUpdatesPerBatch {
			t.Errorf("take %d encoded %d updates under the watcher's lock, want at most %d", takes, inTake, maxUpdatesPerBatch)
		}
		if takes == 1 {
			s.addWatcher(w) // the first list has started: a second one
			s.addWatcher(w) // the second has not: nothing more
		}
		if takes > 100 {
			t.Fatal("the writer never runs out of updates")
		}
	}
	if frames != 2*n || len(seen) != n {
		t.Fatalf("%d updates for %d keys in %d takes; want %d for %d", frames, len(seen), takes, 2*n, n)
	}
	for k, c := range seen {
		if c != 2 {
			t.Fatalf("key %s listed %d times, want 2", k.ShortString(), c)
		}
	}
}

// TestWatcherTakeNoAllocPerFrame checks that the PeerPresent and PeerGone
// frames a writer takes are encoded straight into its control buffer, as
// appendFrame would encode them: each took a payload buffer of its own
// (two allocations per frame, 28k for a list of 10k keys and a burst of
// 4096 notices, all under the session's mu).
func TestWatcherTakeNoAllocPerFrame(t *testing.T) {
	s := newTestServer(t, WithMeshKey(testMeshKey))
	const n = 1000
	w := &sconn{s: s, writing: true} // no writer goroutine: the test takes
	var want []byte
	for i := range n {
		k := fakeKey(i)
		u := PeerPresent{Key: k, Addr: netip.MustParseAddrPort("192.0.2.1:41641"), Flags: PeerIsRegular, AppName: "tailscaled"}
		if i%3 == 0 {
			u = PeerPresent{Key: k} // gone
		}
		w.meshUpdates = append(w.meshUpdates, u)
		w.peerGone = append(w.peerGone, peerGoneItem{k, PeerGoneNotHere})
	}
	for _, g := range w.peerGone {
		want = appendFrame(want, FramePeerGone, appendPeerGone(nil, g.key, g.reason))
	}
	for _, u := range w.meshUpdates {
		if u.Flags == 0 {
			want = appendFrame(want, FramePeerGone, appendPeerGone(nil, u.Key, PeerGoneDisconnected))
		} else {
			want = appendFrame(want, FramePeerPresent, appendPeerPresent(nil, u))
		}
	}
	ws := &writerState{control: make([]byte, 0, 2*len(want))}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	w.mu.Lock()
	w.takeLocked(ws)
	w.mu.Unlock()
	runtime.ReadMemStats(&after)
	if !bytes.Equal(ws.control, want) {
		t.Fatalf("frames differ from appendFrame's: %d bytes, want %d", len(ws.control), len(want))
	}
	if allocs := after.Mallocs - before.Mallocs; allocs > n/2 {
		t.Errorf("taking %d frames made %d allocations", 2*n, allocs)
	}
}

// With WithLoginTimeout(0) the admission hook still runs, with no deadline
// of its own (it used to get one that had already passed).
func TestLoginTimeoutZeroAdmissionAsks(t *testing.T) {
	var asked atomic.Int64
	svc := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		fmt.Fprint(w, `{"Allow":false}`)
	}))
	defer svc.Close()
	s := newTestServer(t, WithLoginTimeout(0), WithAdmission(AdmissionURL(svc.URL, true, nil)))
	c := pipeClientRaw(t, s)
	c.opts.recvTimeout = 5 * time.Second
	if m, err := c.Recv(); err == nil {
		t.Fatalf("a client the service refuses was admitted (%T; service asked %d times)", m, asked.Load())
	}
	if asked.Load() != 1 {
		t.Fatalf("the service was asked %d times, want 1", asked.Load())
	}
}

// A client that answers pings and sends all the time, each frame arriving
// in two pieces, is never ended as idle, even with an idle timeout below
// the park delay (the reader's deadline, min of the two, passes inside
// frames and is not moved by traffic).
func TestActiveClientMidFrameNotIdle(t *testing.T) {
	skipIfNoPark(t)
	s := NewServer(mustKey(t), WithKeepAlive(100*time.Millisecond),
		WithIdleTimeout(250*time.Millisecond), WithIdlePark(time.Second))
	addr := tcpServer(t, s)
	b := tcpClient(t, addr)
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	a := loginClient(t, &slowConn{Conn: nc}, mustKey(t), CanAckPings(true))
	go func() { // answer pings
		a.opts.recvTimeout = 10 * time.Second
		for {
			m, err := a.Recv()
			if err != nil {
				return
			}
			if p, ok := m.(Ping); ok {
				a.SendPong(p)
			}
		}
	}()
	bk := b.PublicKey()
	frame := appendFrame(nil, FrameSendPacket, append(bk[:], bytes.Repeat([]byte("x"), 100)...))
	for end := time.Now().Add(1500 * time.Millisecond); time.Now().Before(end); {
		a.wmu.Lock() // no Pong between the pieces
		_, err := nc.Write(frame[:3])
		if err == nil {
			time.Sleep(20 * time.Millisecond) // never silent for longer
			_, err = nc.Write(frame[3:])
		}
		a.wmu.Unlock()
		if err != nil {
			t.Fatalf("active client cut off: %v (errors %v)", err, s.Stats().Errors)
		}
	}
	if e := s.Stats().Errors; len(e) != 0 || !s.IsClientConnected(a.PublicKey()) {
		t.Fatalf("active client ended: errors %v", e)
	}
}

// Under a rate limit, Pings longer than their 8 bytes of data are paced:
// they are not a way around the limit.
func TestRateLimitPacesLongPings(t *testing.T) {
	s := NewServer(mustKey(t), WithRateLimit(1000, 0))
	addr := tcpServer(t, s)
	a := tcpClient(t, addr)
	a.limiter = nil
	const n = 2000
	ping := appendFrame(nil, FramePing, make([]byte, maxServerPingLen))
	go a.nc.Write(bytes.Repeat(ping, n))
	time.Sleep(500 * time.Millisecond)
	// The burst is one maximal SendPacket (64 KiB): about 65 Pings, and
	// 1000 B/s after it.
	if got := s.Stats().PingsReceived; got > 200 {
		t.Errorf("%d Pings of %d bytes read in 0.5 s under a 1000 B/s limit", got, maxServerPingLen)
	}
}

// Nothing follows the Restarting notice of Server.Close: a packet queued
// while the notice is being written is refused (and counted), not written
// after it.
func TestRestartingNoticeIsLast(t *testing.T) {
	s := NewServer(mustKey(t), WithRestartNotice(time.Millisecond, time.Second))
	r := pipeClient(t, s) // reads nothing until told
	snd := pipeClient(t, s)
	var rc *sconn
	for _, c := range s.snapshotConns() {
		if c.key == r.PublicKey() {
			rc = c
		}
	}
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	// r's writer took the notice (Close set it with closeAfter) and is
	// blocked writing it into the pipe.
	waitFor(t, func() bool {
		rc.mu.Lock()
		defer rc.mu.Unlock()
		return rc.closeAfter && rc.restarting == nil && rc.flushing
	})
	if err := snd.Send(r.PublicKey(), []byte("after restarting")); err != nil {
		t.Fatal(err)
	}
	queued := func() bool {
		rc.mu.Lock()
		defer rc.mu.Unlock()
		return rc.other.n > 0
	}
	dropped := func() bool { return s.Stats().PacketsDropped["gone_disconnected/other"] == 1 }
	waitFor(t, func() bool { return queued() || dropped() })
	if queued() {
		t.Fatal("a packet was queued behind the Restarting notice")
	}
	r.opts.recvTimeout = 5 * time.Second
	var got []string
	for {
		m, err := r.Recv()
		if err != nil {
			break
		}
		got = append(got, fmt.Sprintf("%T", m))
	}
	if len(got) == 0 || got[len(got)-1] != "relay.ServerRestarting" {
		t.Errorf("r received %v, want ServerRestarting last", got)
	}
	r.Close()
	snd.Close()
	<-closed
}

// An ended session must be garbage once it has left: nothing a live session
// holds may keep it (with its connection and its map of destinations, up to
// 4096 keys, about 400 KiB) reachable. Two ways a client could otherwise
// make the server keep every session it ever had:
//   - a chain of sessions, each sending to the next and then leaving: a live
//     session remembers the routing entries of the keys it sent to, and an
//     entry that left the table kept its last session and its recipients;
//   - one key logging in many times and leaving newest first: its routing
//     entry's list of sessions kept those that left beyond its length.
func TestEndedSessionsAreFreed(t *testing.T) {
	// No keepalive: a stopped timer may stay in the runtime's heap, holding
	// its session, until it would have fired. Over TCP, so that the
	// clients need not read the PeerGone and Health frames they are sent.
	s := newTestServer(t, WithKeepAlive(0))
	addr := tcpServer(t, s)
	var ended []weak.Pointer[sconn]
	// login logs in a client with priv and returns it with its session.
	login := func(priv PrivateKey) (*Client, *sconn) {
		t.Helper()
		c := tcpClientKey(t, addr, priv)
		var newest *sconn
		for _, x := range s.snapshotConns() {
			if newest == nil || x.connNum > newest.connNum {
				newest = x
			}
		}
		return c, newest
	}
	var probe *sconn // the first to leave, kept to look inside
	leave := func(c *Client, sc *sconn) {
		t.Helper()
		if probe == nil {
			probe = sc
		} else {
			ended = append(ended, weak.Make(sc))
		}
		c.Close()
		waitFor(t, func() bool { return !slices.Contains(s.snapshotConns(), sc) })
	}

	const n = 20
	long, _ := login(mustKey(t))
	prev, prevConn := long, (*sconn)(nil)
	for i := range n {
		x, xc := login(mustKey(t))
		if err := prev.Send(x.PublicKey(), []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		if _, ok := recvMsg[*ReceivedPacket](t, x); !ok {
			t.Fatal("packet not relayed")
		}
		if prevConn != nil {
			leave(prev, prevConn)
		}
		prev, prevConn = x, xc
	}

	dupKey := mustKey(t)
	var dups []*Client
	var dupConns []*sconn
	for range n {
		c, sc := login(dupKey)
		dups, dupConns = append(dups, c), append(dupConns, sc)
	}
	for i := n - 1; i > 0; i-- {
		leave(dups[i], dupConns[i])
	}

	// long, the chain's last session and the first duplicate remain.
	waitFor(t, func() bool { return s.stats.sessions.Load() == 3 })
	// An ended session may still be in the recipient sets of keys it sent
	// to before maxSentTo made it forget them, until a sweep: meanwhile it
	// must not hold its map of up to 4096 destinations (about 400 KiB).
	if probe.sentTo != nil || probe.lastDstEntry != nil {
		t.Errorf("an ended session still holds %d destinations", len(probe.sentTo))
	}
	reachable := func() int {
		runtime.GC()
		k := 0
		for _, w := range ended {
			if w.Value() != nil {
				k++
			}
		}
		return k
	}
	deadline := time.Now().Add(5 * time.Second)
	for k := reachable(); k > 0; k = reachable() {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d ended sessions are still reachable", k, len(ended))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := s.stats.sessions.Load(); got != 3 {
		t.Fatalf("%d sessions left, want 3: the test's clients were disconnected", got)
	}
}

// peerGoneBurst logs in a receiver r (its session rc) and n senders that
// each send it a packet; then r stops reading, its writer blocks on the
// pipe with one more packet, and every sender leaves meanwhile, so that
// their PeerGone notices pile up in r's queue (up to maxPendingControl)
// until r reads again. The server must have no write timeout.
func peerGoneBurst(t *testing.T, s *Server, n int) (r *Client, rc *sconn, srcs []*Client) {
	t.Helper()
	r = pipeClient(t, s)
	rk := r.PublicKey()
	srcs = make([]*Client, n)
	for i := range srcs {
		srcs[i] = pipeClient(t, s)
		if err := srcs[i].Send(rk, []byte{1}); err != nil {
			t.Fatal(err)
		}
		if _, ok := recvMsg[*ReceivedPacket](t, r); !ok {
			t.Fatal("packet not relayed")
		}
	}
	for si := range s.Sessions() {
		if si.Key == rk && si.Senders != n {
			t.Fatalf("%d senders, want %d", si.Senders, n)
		}
	}
	for _, c := range s.snapshotConns() {
		if c.key == rk {
			rc = c
		}
	}
	if err := srcs[0].Send(rk, []byte{1}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		rc.mu.Lock()
		defer rc.mu.Unlock()
		return rc.flushing && rc.other.n == 0
	})
	for _, c := range srcs {
		c.Close()
	}
	// Each departure is handled (r forgets the sender, queues the notice
	// if it fits) after the session count drops: wait for all of them.
	waitFor(t, func() bool { return s.Stats().CurrentConnections == 1 })
	waitFor(t, func() bool {
		rc.mu.Lock()
		defer rc.mu.Unlock()
		return len(rc.sentFrom) == 0
	})
	return r, rc, srcs
}

// A client whose queue of PeerGone notices is full misses the notices
// beyond it, but must still forget the peers they were about: a peer left
// in its set of senders is counted in SessionInfo.Senders for good, and
// when it comes back and sends again it is not a new sender, so its next
// departure is never announced.
func TestPeerGoneQueueFullForgetsSenders(t *testing.T) {
	s := newTestServer(t, WithKeepAlive(0), WithWriteTimeout(0))
	const n = maxPendingControl + 4
	r, _, srcs := peerGoneBurst(t, s, n)
	rk := r.PublicKey()
	senders := func() int {
		for si := range s.Sessions() {
			if si.Key == rk {
				return si.Senders
			}
		}
		t.Fatal("receiver gone")
		return 0
	}
	announced := map[PublicKey]bool{}
	// Read until the notices that fit have come (a 5 s read timeout
	// bounds the wait: r's writer may pause longer than a quiet spell on
	// a busy machine), then until a quiet spell, to see that no more do.
	r.opts.recvTimeout = 5 * time.Second
	for len(announced) < maxPendingControl {
		m, err := r.Recv()
		if err != nil {
			t.Fatalf("%d of %d departures announced, want the %d that fit: %v", len(announced), n, maxPendingControl, err)
		}
		if g, ok := m.(PeerGone); ok {
			announced[g.Peer] = true
		}
	}
	r.opts.recvTimeout = 500 * time.Millisecond
	for {
		m, err := r.Recv()
		if err != nil {
			break // quiet: everything queued was read
		}
		if g, ok := m.(PeerGone); ok {
			announced[g.Peer] = true
		}
	}
	if len(announced) != maxPendingControl {
		t.Fatalf("%d of %d departures announced, want the %d that fit", len(announced), n, maxPendingControl)
	}
	if got := senders(); got != 0 {
		t.Errorf("%d senders left after all %d left (%d announced)", got, n, len(announced))
	}
	// A sender whose notice was lost comes back, sends, and leaves again:
	// this time r must be told.
	var back *Client
	for _, c := range srcs {
		if !announced[c.PublicKey()] {
			cc, sc := net.Pipe()
			go s.Accept(context.Background(), sc, nil, "127.0.0.1:1234")
			back = loginClient(t, cc, c.priv)
			break
		}
	}
	if err := back.Send(rk, []byte{2}); err != nil {
		t.Fatal(err)
	}
	if _, ok := recvMsg[*ReceivedPacket](t, r); !ok {
		t.Fatal("packet not relayed")
	}
	back.Close()
	if g, ok := recvMsg[PeerGone](t, r); !ok || g.Peer != back.PublicKey() {
		t.Fatalf("after the returning sender left: %+v, want its PeerGone", g)
	}
}

// A client that stops inside a large packet's payload pins the packet's
// buffer while the reader waits for the rest, but not a read buffer as
// well: the reader reads the payload straight into the packet, and the
// buffer, empty, goes back to the pool (and to the budget of big buffers,
// which a few hundred such clients would otherwise hold for good).
func TestStalledPayloadHoldsNoReadBuffer(t *testing.T) {
	s := newTestServer(t)
	addr := tcpServer(t, s)
	dst := tcpClient(t, addr)
	dk := dst.PublicKey()
	before := bigReadBufs.Load()
	const k = 10
	for range k {
		r := (&hostileEnv{addr: addr}).dialLogin(t, `{"version":2}`)
		hdr := binary.BigEndian.AppendUint32([]byte{byte(FrameSendPacket)}, KeyLen+MaxPacketSize)
		if err := r.send(hdr, dk[:], []byte("the first bytes of the payload")); err != nil {
			t.Fatal(err)
		}
	}
	// The readers are inside the payloads once they have noted dst as a
	// destination.
	e, _ := s.lookupEntry(dk)
	sh := s.shard(dk)
	waitFor(t, func() bool {
		sh.mu.RLock()
		defer sh.mu.RUnlock()
		return len(e.recipients.m) == k
	})
	waitBigReadBufsBack(t, before, k, "payloads")
}

// Likewise for a client that stops inside a frame header (on a plain
// socket): the few bytes it sent wait without a read buffer.
func TestStalledHeaderHoldsNoReadBuffer(t *testing.T) {
	s := newTestServer(t)
	addr := tcpServer(t, s)
	before := bigReadBufs.Load()
	const k = 10
	var conns []*rawConn
	for range k {
		r := (&hostileEnv{addr: addr}).dialLogin(t, `{"version":2}`)
		// The Pong says the reader has read the Ping and the two bytes
		// after it, which arrived with it.
		r.expectAlivePrefix(t, []byte{byte(FramePing), 0})
		conns = append(conns, r)
	}
	waitBigReadBufsBack(t, before, k, "frame headers")
	// The headers' first bytes were kept: the frames complete.
	for _, r := range conns {
		data := []byte("12345678")
		if err := r.send([]byte{0, 0, 8}, data); err != nil {
			t.Fatal(err)
		}
		for {
			ft, p, err := r.readFrame()
			if err != nil {
				t.Fatalf("waiting for the Pong of the completed Ping: %v", err)
			}
			if ft == FramePong && bytes.Equal(p, data) {
				break
			}
		}
	}
}

// Likewise over TLS and WebSocket, where the reader reads through
// crypto/tls or the WebSocket framing instead of the raw socket: a client
// that stops inside a frame header holds no read buffer once the reader's
// deadline (the park delay) has passed, and its frame still completes.
func TestStalledHeaderHoldsNoReadBufferTLSWebSocket(t *testing.T) {
	skipIfNoPark(t) // elsewhere such readers have no deadline
	for _, tc := range []struct {
		name string
		o    derpServeOpts
		ws   bool
	}{
		{"tls", derpServeOpts{}, false},
		{"websocket", derpServeOpts{plain: true}, true},
		{"websocket-tls", derpServeOpts{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestServer(t, WithIdlePark(10*time.Millisecond))
			srv := serveDERP(t, s, tc.o)
			fs := &FastStart{TLSConfig: srv.ClientTLS, WebSocket: tc.ws}
			before := bigReadBufs.Load()
			write := func(c *Client, b ...[]byte) {
				t.Helper()
				c.wmu.Lock()
				defer c.wmu.Unlock()
				if _, err := c.nc.Write(frames(b...)); err != nil {
					t.Fatal(err)
				}
			}
			const k = 10
			var cs []*Client
			for range k {
				c, _ := dialFast(t, fs, srv.URL)
				// The Pong says the reader has read the Ping and the
				// two bytes after it, which arrived with it.
				write(c, mkFrame(FramePing, []byte("stalled!")), []byte{byte(FramePing), 0})
				if p, ok := recvMsg[Pong](t, c); !ok || string(p[:]) != "stalled!" {
					t.Fatalf("pong %q", p)
				}
				cs = append(cs, c)
			}
			waitBigReadBufsBack(t, before, k, "frame headers")
			for _, c := range cs {
				write(c, []byte{0, 0, 8}, []byte("complete"))
				if p, ok := recvMsg[Pong](t, c); !ok || string(p[:]) != "complete" {
					t.Fatalf("pong %q, want that of the completed Ping", p)
				}
			}
		})
	}
}

// Once a burst of PeerGone notices has been written, the session does not
// keep the queue that held them: an idle session would otherwise hold
// about 150 KiB (4096 notices) for the rest of its life, fifty times what
// it costs parked.
func TestPeerGoneBurstReleasesQueue(t *testing.T) {
	s := newTestServer(t, WithKeepAlive(0), WithWriteTimeout(0))
	r, rc, _ := peerGoneBurst(t, s, maxPendingControl)
	readPeerGoneBurst(t, r, rc)
	rc.mu.Lock()
	held := cap(rc.peerGone) * int(unsafe.Sizeof(peerGoneItem{}))
	rc.mu.Unlock()
	if held > 4<<10 {
		t.Errorf("the idle session holds %d KiB of drained PeerGone queue", held>>10)
	}
}

// readPeerGoneBurst reads the notices of peerGoneBurst until r's writer,
// done, has given back what it borrowed.
func readPeerGoneBurst(t *testing.T, r *Client, rc *sconn) {
	t.Helper()
	// Until the notices that fit have come (a 5 s read timeout bounds the
	// wait: r's writer may pause longer than a quiet spell on a busy
	// machine), then until a quiet spell, to see that no more do.
	r.opts.recvTimeout = 5 * time.Second
	gone := 0
	for gone < maxPendingControl {
		m, err := r.Recv()
		if err != nil {
			t.Fatalf("%d notices, want %d: %v", gone, maxPendingControl, err)
		}
		if _, ok := m.(PeerGone); ok {
			gone++
		}
	}
	r.opts.recvTimeout = 500 * time.Millisecond
	for {
		m, err := r.Recv()
		if err != nil {
			break // quiet: everything queued was read
		}
		if _, ok := m.(PeerGone); ok {
			gone++
		}
	}
	if gone != maxPendingControl {
		t.Fatalf("%d notices, want %d", gone, maxPendingControl)
	}
	waitFor(t, func() bool {
		rc.mu.Lock()
		defer rc.mu.Unlock()
		return !rc.writing
	})
	// The writer clears writing before it returns and lets go of the
	// burst's control buffer: wait for it to have returned (nothing starts
	// another), or a test measuring the heap counts that buffer as freed.
	done := make(chan struct{})
	go func() { rc.writers.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("r's writer still running 30 s after it stopped writing")
	}
}

// Nor does the pool of writer states keep the buffer the burst was written
// from (about 190 KiB; a mesh peer's list of every client, far more): from
// then on, every writer that took that state from the pool would hold it.
func TestWriterPoolKeepsNoLargeControlBuffer(t *testing.T) {
	// One P: the pool gives this goroutine what the writer put back.
	// (Under -race the pool drops some of what is put back, so the test
	// may then miss a large buffer, never report a wrong one.)
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	s := newTestServer(t, WithKeepAlive(0), WithWriteTimeout(0))
	r, rc, _ := peerGoneBurst(t, s, maxPendingControl)
	readPeerGoneBurst(t, r, rc)
	var taken []*writerState
	defer func() {
		for _, ws := range taken {
			writerPool.Put(ws)
		}
	}()
	for range 64 {
		ws := writerPool.Get().(*writerState)
		taken = append(taken, ws)
		if c := cap(ws.control); c > maxPooledScratch {
			t.Fatalf("a pooled writer state holds a %d KiB control buffer", c>>10)
		}
	}
}

// waitBigReadBufsBack waits until the count of big read buffers in use is
// back at before, with k readers waiting inside what where says.
func waitBigReadBufsBack(t *testing.T, before int32, k int, where string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for bigReadBufs.Load() > before {
		if time.Now().After(deadline) {
			t.Fatalf("%d big read buffers held by %d readers waiting inside %s", bigReadBufs.Load()-before, k, where)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// heapFreedBy runs release and returns how many bytes of live heap it
// freed, measured after collections on either side (two before: pools
// keep what was put back until the second). The heap is global: anything
// else that becomes garbage meanwhile (a writer or an ended session whose
// goroutine is still returning) is counted too, so the caller first waits
// for those goroutines, and heapFreedBy waits (a bounded number of
// collections) for the live heap to stop shrinking.
func heapFreedBy(release func()) int64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	before := m.HeapAlloc
	for range 50 {
		time.Sleep(10 * time.Millisecond)
		runtime.GC()
		runtime.ReadMemStats(&m)
		settled := m.HeapAlloc+4<<10 >= before
		before = m.HeapAlloc
		if settled {
			break
		}
	}
	release()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return int64(before) - int64(m.HeapAlloc)
}

// waitSessionsReleased waits until s holds n sessions: the others have
// not only left the routing table (CurrentConnections) but released what
// they held, so that heapFreedBy does not count their memory.
func waitSessionsReleased(t *testing.T, s *Server, n int64) {
	t.Helper()
	waitForWithin(t, 30*time.Second, func() bool { return s.stats.sessions.Load() == n })
}

// A Go map keeps the space of its largest size: a session that once had
// thousands of senders must not hold their set (about 320 KiB for 4096)
// for the rest of its life once they have left.
func TestSendersSetShrinksWhenSendersLeave(t *testing.T) {
	s := newTestServer(t, WithKeepAlive(0), WithWriteTimeout(0))
	r, rc, _ := peerGoneBurst(t, s, maxPendingControl)
	readPeerGoneBurst(t, r, rc)
	// A set dropped, or made anew since it last held minShrink senders,
	// holds little for certain; only one that may still have the space of
	// thousands is measured, on the heap, which other goroutines make noisy.
	rc.mu.Lock()
	small := rc.sentFrom == nil || rc.sentFromPeak < minShrink
	rc.mu.Unlock()
	if small {
		return
	}
	waitSessionsReleased(t, s, 1)
	held := heapFreedBy(func() {
		rc.mu.Lock()
		rc.sentFrom = nil
		rc.mu.Unlock()
	})
	if held > 32<<10 {
		t.Errorf("the session holds %d KiB in its empty set of senders", held>>10)
	}
}

// Nor must a key keep the space of the thousands of sessions it once had
// to tell when it leaves (about 146 KiB for 4096) once they have ended.
func TestRecipientSetShrinksWhenRecipientsLeave(t *testing.T) {
	s := newTestServer(t, WithKeepAlive(0), WithWriteTimeout(0))
	r, rc, _ := peerGoneBurst(t, s, maxPendingControl) // each sender is r's recipient
	readPeerGoneBurst(t, r, rc)
	sh := s.shard(r.PublicKey())
	sh.mu.Lock()
	if n := len(rc.entry.recipients.m); n != 0 {
		t.Errorf("%d recipients left, want 0", n)
	}
	small := rc.entry.recipients.m == nil || rc.entry.recipients.peak < minShrink // see above
	sh.mu.Unlock()
	if small {
		return
	}
	waitSessionsReleased(t, s, 1)
	held := heapFreedBy(func() {
		sh.mu.Lock()
		rc.entry.recipients = recipientSet{}
		sh.mu.Unlock()
	})
	if held > 32<<10 {
		t.Errorf("the key holds %d KiB in its empty set of recipients", held>>10)
	}
}

// heldCtx is a context whose first Done call, which startSession makes
// after it took the connection slot and before the login starts, waits
// for release: a way to hold a login between the two.
type heldCtx struct {
	context.Context
	reached, release chan struct{}
	once             sync.Once
}

func (c *heldCtx) Done() <-chan struct{} {
	c.once.Do(func() {
		close(c.reached)
		<-c.release
	})
	return c.Context.Done()
}

// A connection admitted before Close whose login starts only after Close
// cut the logins it knew of must not hold Close up: nothing ended it, and
// with WithLoginTimeout(0) Close waited forever. (A WebSocket upgrade
// through ServeHTTP takes its slot at the hijack and starts its login on
// another goroutine, a wider window than Accept's.)
func TestCloseEndsLoginAdmittedBeforeIt(t *testing.T) {
	s := NewServer(mustKey(t), WithLoginTimeout(0))
	// A: a login in progress, so that the test sees Close's cut.
	ac, as := net.Pipe()
	defer ac.Close()
	go s.Accept(context.Background(), as, nil, "127.0.0.1:1")
	var b [1]byte
	if _, err := io.ReadFull(ac, b[:]); err != nil { // the ServerKey frame: A's login runs
		t.Fatal(err)
	}
	// B: admitted before Close, its login held until after the cut.
	bc, bs := net.Pipe()
	defer bc.Close()
	ctx := &heldCtx{Context: context.Background(), reached: make(chan struct{}), release: make(chan struct{})}
	go s.Accept(ctx, bs, nil, "127.0.0.1:2")
	<-ctx.reached
	closed := make(chan struct{})
	go func() {
		s.Close()
		close(closed)
	}()
	io.Copy(io.Discard, ac) // until Close cuts A's login, after its grace period
	close(ctx.release)
	go io.Copy(io.Discard, bc) // B's ServerKey, if its login runs
	select {
	case <-closed:
	case <-time.After(20 * time.Second):
		t.Fatalf("Server.Close still waiting 20 s after it cut the logins: a login admitted before Close and started after its cut is never ended (%d slots taken)", s.stats.sessions.Load())
	}
	if got := s.Stats().Rejected["server_closed"]; got != 1 {
		t.Errorf("Stats.Rejected[server_closed] = %d, want 1 (the login refused after Close)", got)
	}
}

// hijackRecorder is a ResponseWriter whose Hijack hands over nc, and tells
// hijacked when it has (ServeHTTP has taken the connection slot by then).
type hijackRecorder struct {
	*httptest.ResponseRecorder
	nc       net.Conn
	hijacked chan struct{}
}

func (h *hijackRecorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	close(h.hijacked)
	return h.nc, bufio.NewReadWriter(bufio.NewReader(h.nc), bufio.NewWriter(h.nc)), nil
}

// webSocketUpgrade is a DERP-over-WebSocket upgrade request from remote.
func webSocketUpgrade(remote string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "/derp", nil)
	r.RemoteAddr = remote
	r.Header.Set("Upgrade", "websocket")
	r.Header.Set("Connection", "Upgrade")
	r.Header.Set("Sec-WebSocket-Version", "13")
	r.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	r.Header.Set("Sec-WebSocket-Protocol", WebSocketProtocol)
	return r
}

// A WebSocket client that does not read its 101 (over a transport with no
// buffer) holds a connection slot: the login's deadline must bound that
// write, and Close must be able to cut it, as for the rest of the login.
// The 101 was written before the login, with neither: the slot was held,
// and Close waited, for as long as the client did not read.
func TestWebSocketUpgradeResponseBoundedByLogin(t *testing.T) {
	for _, tc := range []struct {
		name  string
		opt   ServerOption
		close bool
	}{
		{"login timeout", WithLoginTimeout(time.Second), false},
		{"Close", WithLoginTimeout(0), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := NewServer(mustKey(t), tc.opt)
			defer s.Close()
			cc, sc := net.Pipe()
			defer cc.Close()
			w := &hijackRecorder{ResponseRecorder: httptest.NewRecorder(), nc: sc, hijacked: make(chan struct{})}
			go s.ServeHTTP(w, webSocketUpgrade("127.0.0.1:2"))
			<-w.hijacked
			if !tc.close {
				// Nobody reads cc: the slot must come free by itself.
				waitForT(t, "slot of a client that never read its 101 freed by the login timeout",
					func() bool { return s.stats.sessions.Load() == 0 })
				return
			}
			closed := make(chan struct{})
			go func() {
				s.Close()
				close(closed)
			}()
			select {
			case <-closed:
			case <-time.After(20 * time.Second):
				t.Fatalf("Server.Close still waiting after 20 s for a WebSocket client that does not read its 101 (%d slots taken)", s.stats.sessions.Load())
			}
		})
	}
}

// fakeKey returns the i-th of up to 65536 distinct keys, spread over the
// routing shards.
func fakeKey(i int) PublicKey {
	var k PublicKey
	k[0], k[1], k[31] = byte(i), byte(i>>8), 1
	return k
}

// addFakeSession puts c, a session with no connection, into s's routing
// table as the only session of its key, as register would, without
// announcing it; it returns c's entry.
func addFakeSession(s *Server, c *sconn) *keyEntry {
	e := &keyEntry{conns: []*sconn{c}}
	e.active.Store(c)
	sh := s.shard(c.key)
	sh.mu.Lock()
	sh.m[c.key] = e
	sh.mu.Unlock()
	return e
}

func closeGraceOf(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.closeGrace = d }
}

// Close's grace is for logged-in sessions to read their restart notice. A
// login in progress gets no notice, so Close must cut it at once rather
// than wait the grace for it: one half-logged-in client made every Close
// take the full grace (2 s), a cost to every test that runs a server in
// process. Here the grace is an hour: Close returns only if it cut the
// logins itself and the logged-in session ended on its notice.
func TestCloseCutsLoginsWithoutGrace(t *testing.T) {
	admitting := make(chan struct{})
	admitEnded := make(chan struct{})
	release := make(chan struct{}) // so that a failing test ends
	e := newHostileEnv(t, WithLoginTimeout(0), closeGraceOf(time.Hour),
		WithAdmission(func(ctx context.Context, a Admission) error {
			if a.Info.Version == 7 { // only the held client; a and b pass
				close(admitting)
				select {
				case <-ctx.Done():
					close(admitEnded)
				case <-release:
				}
				return ctx.Err()
			}
			return nil
		}))
	t.Cleanup(func() { close(release) })
	var cuts []func(t *testing.T)
	// No ClientInfo at all, after the ServerKey (the login is running).
	r := e.dial(t)
	cuts = append(cuts, r.expectClosed)
	// Part of a ClientInfo.
	r2 := e.dial(t)
	if err := r2.send(r2.clientInfo(`{"version":2}`)[:20]); err != nil {
		t.Fatal(err)
	}
	cuts = append(cuts, r2.expectClosed)
	// The HTTP upgrade, answered, and nothing more.
	nc, br := httpDial(t, e.httpAddr, "GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n")
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	r3 := &rawConn{nc: nc, br: br}
	if ft, _, err := r3.readFrame(); err != nil || ft != FrameServerKey {
		t.Fatalf("reading ServerKey after the upgrade: %v %v", ft, err)
	}
	cuts = append(cuts, r3.expectClosed)
	// Held in the admission hook.
	r4 := e.dial(t)
	if err := r4.send(r4.clientInfo(`{"version":7}`)); err != nil {
		t.Fatal(err)
	}
	<-admitting
	cuts = append(cuts, r4.expectClosed)
	// A logged-in session still gets its notice, and ends when it closes.
	li := e.dialLogin(t, `{"version":2}`)
	for _, c := range []*Client{e.a, e.b} {
		c.Close()
	}
	waitForT(t, "a and b to leave", func() bool { return e.s.Stats().CurrentConnections == 1 })

	closed := make(chan struct{})
	go func() { e.s.Close(); close(closed) }()
	for {
		ft, _, err := li.readFrame()
		if err != nil {
			t.Fatalf("logged-in session: no Restarting notice: %v", err)
		}
		if ft == FrameRestarting {
			break
		}
	}
	li.nc.Close()
	for _, cut := range cuts {
		cut(t)
	}
	select {
	case <-admitEnded:
	default:
		t.Error("the admission hook's context did not end with the cut")
	}
	select {
	case <-closed:
	case <-time.After(30 * time.Second):
		t.Fatalf("Server.Close still waiting 30 s after the logged-in session closed, with a grace of an hour: it waits the grace for logins in progress (%d slots taken)", e.s.stats.sessions.Load())
	}
}

// A session that register has put in the routing table is one Close must
// tell it is restarting (it will be sent ServerInfo), even if Close looks
// at it before register is done: c.registered was set only after s.mu was
// released, and a Close in between skipped the session (no notice; it
// waited the grace, and Sessions did not list it).
func TestCloseNotifiesSessionBeingRegistered(t *testing.T) {
	e := newHostileEnv(t, closeGraceOf(time.Hour))
	for _, c := range []*Client{e.a, e.b} {
		c.Close()
	}
	waitForT(t, "a and b to leave", func() bool { return e.s.Stats().CurrentConnections == 0 })
	held, release := make(chan *sconn, 1), make(chan struct{})
	var once sync.Once
	h := func(c *sconn) {
		once.Do(func() {
			held <- c
			<-release
		})
	}
	testHookRegistering.Store(&h)
	defer testHookRegistering.Store(nil)
	defer once.Do(func() {}) // a later login does not wait
	r := e.dial(t)
	t.Cleanup(func() { r.nc.Close() }) // before the server's cleanup Close
	if err := r.send(r.clientInfo(`{"version":2}`)); err != nil {
		t.Fatal(err)
	}
	<-held // in the table, register not done
	closed := make(chan struct{})
	go func() { e.s.Close(); close(closed) }()
	var got []FrameType
	for {
		ft, _, err := r.readFrame()
		if err != nil {
			close(release)
			t.Fatalf("frames %v, then %v: Close did not tell a session in the routing table, but not yet marked registered, that it is restarting", got, err)
		}
		got = append(got, ft)
		if ft == FrameRestarting {
			break
		}
	}
	close(release)
	r.nc.Close()
	select {
	case <-closed:
	case <-time.After(30 * time.Second):
		t.Fatal("Server.Close still waiting 30 s after the session read its notice and closed")
	}
	if got[0] != FrameServerInfo {
		t.Errorf("frames %v: want ServerInfo first", got)
	}
}
