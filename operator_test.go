package relay

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// Tests of the operator's tools: SetRateLimit, ClosePeer, Sessions and
// ConsistencyCheck.

func TestSetRateLimit(t *testing.T) {
	s := NewServer(mustKey(t)) // no limit at first
	addr := tcpServer(t, s)
	a, b := tcpClient(t, addr), tcpClient(t, addr)
	if a.limiter != nil {
		t.Fatal("client limited without a server limit")
	}
	a.Send(b.PublicKey(), []byte{1})
	recvMsg[*ReceivedPacket](t, b)

	// 1 byte/s: after one maximal packet (the burst) the next one owes
	// its whole size, which would take minutes to pay.
	s.SetRateLimit(1, 0)
	a.Send(b.PublicKey(), make([]byte, MaxPacketSize))
	recvMsg[*ReceivedPacket](t, b)
	a.Send(b.PublicKey(), []byte{2})
	waitFor(t, func() bool { return s.Stats().RateLimitWaits == 1 })
	b.opts.recvTimeout = 200 * time.Millisecond
	if m, err := b.Recv(); err == nil {
		t.Fatalf("a paced packet arrived at once: %T", m)
	}
	// b's read timed out, which ends its Client: reconnect it under the
	// same key.
	b = tcpClientKey(t, addr, b.priv)

	// Raising the limit wakes the waiting read: the debt is paid at the
	// new rate.
	s.SetRateLimit(1<<30, 0)
	if p, ok := recvMsg[*ReceivedPacket](t, b); !ok || len(p.Data) != 1 || p.Data[0] != 2 {
		t.Fatalf("after raising the limit got %+v", p)
	}

	// A new login is told the current limit; burst is raised to one
	// maximal SendPacket.
	if info, _ := recvMsg[ServerInfo](t, pipeClientRaw(t, s)); info.TokenBucketBytesPerSecond != 1<<30 || info.TokenBucketBytesBurst != minRateBurst {
		t.Fatalf("ServerInfo after SetRateLimit: %+v", info)
	}

	// Removing the limit forgives a debt being waited for.
	s.SetRateLimit(1, 0)
	a.Send(b.PublicKey(), make([]byte, MaxPacketSize)) // refills nothing: the old bucket is kept
	a.Send(b.PublicKey(), []byte{3})
	waitFor(t, func() bool { return s.Stats().RateLimitWaits >= 2 })
	s.SetRateLimit(0, 0)
	for want := byte(3); ; {
		p, ok := recvMsg[*ReceivedPacket](t, b)
		if !ok {
			t.FailNow()
		}
		if len(p.Data) == 1 && p.Data[0] == want {
			break
		}
	}
	if info, _ := recvMsg[ServerInfo](t, pipeClientRaw(t, s)); info.TokenBucketBytesPerSecond != 0 {
		t.Fatalf("ServerInfo after removing the limit: %+v", info)
	}
}

// tcpClientKey logs in a client with the given key over TCP.
func tcpClientKey(t *testing.T, addr string, priv PrivateKey) *Client {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return loginClient(t, nc, priv)
}

// pipeClientRaw connects a client to s over a pipe without reading anything.
func pipeClientRaw(t *testing.T, s *Server) *Client {
	t.Helper()
	cc, sc := net.Pipe()
	go s.Accept(context.Background(), sc, nil, "127.0.0.1:1")
	c, err := NewClient(mustKey(t), cc, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestSetRateLimitSparesMesh(t *testing.T) {
	const mk = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	s := newTestServer(t, WithMeshKey(mk))
	m := pipeClient(t, s, MeshKey(mk))
	dst := pipeClient(t, s)
	s.SetRateLimit(1, 0)
	src := mustKey(t).Public()
	for i := range 3 { // three maximal packets: a client would wait for days
		if err := m.ForwardPacket(src, dst.PublicKey(), make([]byte, MaxPacketSize)); err != nil {
			t.Fatal(i, err)
		}
		recvMsg[*ReceivedPacket](t, dst)
	}
	if n := s.Stats().RateLimitWaits; n != 0 {
		t.Fatalf("mesh peer waited %d times", n)
	}
}

func TestClosePeer(t *testing.T) {
	s := newTestServer(t)
	priv := mustKey(t)
	var dups []*Client
	for i := range 2 {
		cc, sc := net.Pipe()
		go s.Accept(context.Background(), sc, nil, "127.0.0.1:"+string(rune('1'+i)))
		dups = append(dups, loginClient(t, cc, priv))
	}
	other := pipeClient(t, s)
	other.Send(priv.Public(), []byte("x")) // other will be told PeerGone
	recvMsg[*ReceivedPacket](t, dups[1])

	if n := s.ClosePeer(mustKey(t).Public()); n != 0 {
		t.Fatalf("ClosePeer of an unknown key closed %d", n)
	}
	if n := s.ClosePeer(priv.Public()); n != 2 {
		t.Fatalf("ClosePeer closed %d sessions, want 2", n)
	}
	for i, d := range dups {
		if _, err := recvUntilErr(t, d); err == nil {
			t.Fatalf("session %d not closed", i)
		}
	}
	if g, _ := recvMsg[PeerGone](t, other); g.Peer != priv.Public() || g.Reason != PeerGoneDisconnected {
		t.Fatalf("PeerGone %+v", g)
	}
	waitFor(t, func() bool { return !s.IsClientConnected(priv.Public()) })
	// Not a ban: the key logs in again.
	cc, sc := net.Pipe()
	go s.Accept(context.Background(), sc, nil, "127.0.0.1:3")
	loginClient(t, cc, priv)
	if !s.IsClientConnected(priv.Public()) {
		t.Fatal("key could not reconnect after ClosePeer")
	}
	if err := s.ConsistencyCheck(); err != nil {
		t.Fatal(err)
	}
}

func TestSessions(t *testing.T) {
	s := NewServer(mustKey(t))
	addr := tcpServer(t, s)
	a := tcpClient(t, addr, AppName("app-a"), CanAckPings(true))
	b := tcpClient(t, addr)
	a.NotePreferred(true)
	for i := range 3 {
		a.Send(b.PublicKey(), make([]byte, 100+i))
		recvMsg[*ReceivedPacket](t, b)
	}
	a.SendPing([8]byte{}) // frames are handled in order: NotePreferred is seen
	recvMsg[Pong](t, a)
	dupPriv := mustKey(t)
	cc, sc := net.Pipe()
	go s.Accept(context.Background(), sc, nil, "10.1.2.3:4")
	loginClient(t, cc, dupPriv)
	tcpClientKey(t, addr, dupPriv)

	// The server counts a packet sent once its write returned, which may
	// be just after the client read it.
	var got map[PublicKey][]SessionInfo
	waitFor(t, func() bool {
		got = map[PublicKey][]SessionInfo{}
		for si := range s.Sessions() {
			got[si.Key] = append(got[si.Key], si)
		}
		return len(got[b.PublicKey()]) == 1 && got[b.PublicKey()][0].PacketsSent == 3
	})
	if len(got) != 3 || len(got[dupPriv.Public()]) != 2 {
		t.Fatalf("sessions %+v", got)
	}
	sa, sb := got[a.PublicKey()][0], got[b.PublicKey()][0]
	if !sa.Home || sb.Home || sa.Info.AppName != "app-a" || !sa.Info.CanAckPings || sa.Info.Version != ProtocolVersion {
		t.Errorf("a: %+v", sa)
	}
	if sa.PacketsReceived != 3 || sa.BytesReceived != 303 || sa.PacketsSent != 0 {
		t.Errorf("a's traffic %+v", sa)
	}
	if sb.PacketsSent != 3 || sb.BytesSent != 303 || sb.PacketsReceived != 0 {
		t.Errorf("b's traffic %+v", sb)
	}
	if sa.Senders != 0 || sb.Senders != 1 {
		t.Errorf("senders: a %d, b %d; want 0 and 1", sa.Senders, sb.Senders)
	}
	if sa.RemoteAddr.Addr().String() != "127.0.0.1" || sa.RemoteAddr.Port() == 0 || sa.Connected.IsZero() || time.Since(sa.Connected) > time.Minute {
		t.Errorf("a's address and time %+v", sa)
	}
	if !sa.Active || sa.Duplicate || sa.Mesh || sa.WebSocket {
		t.Errorf("a's flags %+v", sa)
	}
	if runtime.GOOS == "linux" && runtime.GOARCH != "386" && (sa.RTT <= 0 || sa.RTT > time.Second) {
		t.Errorf("a's RTT over loopback TCP: %v", sa.RTT)
	}
	ds := got[dupPriv.Public()]
	if ds[0].RemoteAddr.String() != "10.1.2.3:4" || ds[0].RTT != 0 {
		t.Errorf("first duplicate (over a pipe): %+v", ds[0])
	}
	if !ds[0].Duplicate || !ds[1].Duplicate || ds[0].Active || !ds[1].Active {
		t.Errorf("duplicates: %+v", ds)
	}

	// Stopping early stops; the loop body may call the server.
	n := 0
	for range s.Sessions() {
		n++
		s.Stats()
		if err := s.ConsistencyCheck(); err != nil {
			t.Error(err)
		}
		break
	}
	if n != 1 {
		t.Fatalf("broke after %d", n)
	}
	// a leaves: b no longer counts it among its senders.
	a.Close()
	waitFor(t, func() bool {
		for si := range s.Sessions() {
			if si.Key == b.PublicKey() {
				return si.Senders == 0
			}
		}
		return false
	})
	b.Close()
	waitFor(t, func() bool {
		for si := range s.Sessions() {
			if si.Key == b.PublicKey() {
				return false
			}
		}
		return true
	})
}

// A duplicate login's session is listed by Sessions as soon as its client
// has ServerInfo. The server tells each of a key's sessions about the
// duplicate, and that notice started the new session's writer, which
// wrote ServerInfo before the session was marked registered: Sessions
// skipped it (and Close would not have told it the server was restarting)
// until register finished. The log handler holds register, after the
// notices, until the test has looked.
func TestSessionsListsDuplicateOnceLoggedIn(t *testing.T) {
	release := make(chan struct{})
	h := &recHandler{hook: func(r slog.Record) {
		if r.Message == "relay: duplicate key" {
			select {
			case <-release:
			case <-time.After(30 * time.Second):
			}
		}
	}}
	s := newTestServer(t, WithLogger(slog.New(h)))
	var once sync.Once
	releaseLog := func() { once.Do(func() { close(release) }) }
	t.Cleanup(releaseLog) // before s.Close, which waits for the session
	priv := mustKey(t)
	pipeLogin(t, s, priv)
	pipeLogin(t, s, priv) // has ServerInfo: its session is logged in
	n := 0
	for si := range s.Sessions() {
		if si.Key == priv.Public() {
			n++
		}
	}
	releaseLog()
	if n != 2 {
		t.Fatalf("Sessions lists %d of the key's 2 logged-in sessions", n)
	}
}

// TestConsistencyCheckOneLine: ConsistencyCheck lists the problems it
// finds, the first 20, on one line, as every error of this package holds
// no line break.
func TestConsistencyCheckOneLine(t *testing.T) {
	s := newTestServer(t)
	s.stats.current.Add(1)
	s.stats.watchers.Add(1)
	err := s.ConsistencyCheck()
	if err == nil || !strings.Contains(err.Error(), "current_connections") || !strings.Contains(err.Error(), "watchers") {
		t.Fatalf("two wrong gauges: %v", err)
	}
	if strings.ContainsAny(err.Error(), "\r\n") {
		t.Fatalf("error holds a line break: %q", err)
	}
	s.mu.Lock()
	for i := range 30 {
		s.perIP[netip.AddrFrom4([4]byte{10, 0, 0, byte(i)})] = 0
	}
	s.mu.Unlock()
	err = s.ConsistencyCheck()
	if err == nil || strings.ContainsAny(err.Error(), "\r\n") {
		t.Fatalf("many problems: %q", err)
	}
	if n := strings.Count(err.Error(), "; ") + 1; n != 20 {
		t.Fatalf("%d problems listed, want the first 20: %v", n, err)
	}
	s.mu.Lock()
	clear(s.perIP)
	s.mu.Unlock()
	s.stats.current.Add(-1)
	s.stats.watchers.Add(-1)
}

func TestConsistencyCheck(t *testing.T) {
	const mk = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	s := newTestServer(t, WithMeshKey(mk), WithMaxConnections(0, 50))
	if err := s.ConsistencyCheck(); err != nil {
		t.Fatalf("empty server: %v", err)
	}
	w := pipeClient(t, s, MeshKey(mk))
	w.WatchConnectionChanges()
	recvMsg[PeerPresent](t, w)

	// Logins, duplicates and logouts race with the checks, which must
	// never see the table and the gauges disagree.
	var wg sync.WaitGroup
	stop := make(chan struct{})
	errc := make(chan error, 1)
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := s.ConsistencyCheck(); err != nil {
				select {
				case errc <- err:
				default:
				}
				return
			}
		}
	})
	shared := mustKey(t)
	for i := range 40 {
		priv := mustKey(t)
		if i%3 == 0 {
			priv = shared
		}
		cc, sc := net.Pipe()
		go s.Accept(context.Background(), sc, nil, "127.0.0.1:1")
		c, err := NewClient(priv, cc, nil)
		if err != nil {
			t.Fatal(err)
		}
		if i%2 == 0 {
			go func() { recvUntilErr(t, c) }()
			c.Close()
		} else {
			t.Cleanup(func() { c.Close() })
			go func() {
				for {
					if _, err := c.Recv(); err != nil {
						return
					}
				}
			}()
		}
	}
	waitFor(t, func() bool { return s.Stats().Accepts == 41 && s.Stats().CurrentConnections <= 21 })
	close(stop)
	wg.Wait()
	select {
	case err := <-errc:
		t.Fatalf("check during logins and logouts: %v", err)
	default:
	}
	waitFor(t, func() bool { return s.ConsistencyCheck() == nil })

	// Damage is reported, each kind by name.
	s.stats.current.Add(1)
	err := s.ConsistencyCheck()
	if err == nil || !strings.Contains(err.Error(), "current_connections") {
		t.Fatalf("wrong gauge: %v", err)
	}
	s.stats.current.Add(-1)
	sh := s.shard(w.PublicKey())
	sh.mu.Lock()
	e := sh.m[w.PublicKey()]
	delete(sh.m, w.PublicKey())
	sh.mu.Unlock()
	err = s.ConsistencyCheck()
	if err == nil || !strings.Contains(err.Error(), "logged in but not routed") {
		t.Fatalf("unrouted session: %v", err)
	}
	sh.mu.Lock()
	sh.m[w.PublicKey()] = e
	active := e.active.Swap(nil)
	sh.mu.Unlock()
	err = s.ConsistencyCheck()
	if err == nil || !strings.Contains(err.Error(), "not one of its") {
		t.Fatalf("bad active session: %v", err)
	}
	e.active.Store(active)
	if err := s.ConsistencyCheck(); err != nil {
		t.Fatal(err)
	}
}

func TestPrometheusRTT(t *testing.T) {
	s := NewServer(mustKey(t))
	addr := tcpServer(t, s)
	a, b := tcpClient(t, addr), tcpClient(t, addr)
	a.Send(b.PublicKey(), []byte("x"))
	recvMsg[*ReceivedPacket](t, b)
	pipeClient(t, s) // no RTT over a pipe: not counted
	var buf strings.Builder
	if err := s.WritePrometheus(&buf); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	if runtime.GOOS != "linux" || runtime.GOARCH == "386" {
		if strings.Contains(out, "rtt") {
			t.Fatalf("RTT histogram without RTTs:\n%s", out)
		}
		return
	}
	if !strings.Contains(out, "# TYPE derp_client_rtt_seconds histogram\n") ||
		!strings.Contains(out, "derp_client_rtt_seconds_bucket{le=\"+Inf\"} 2\n") ||
		!strings.Contains(out, "derp_client_rtt_seconds_count 2\n") {
		t.Fatalf("no RTT histogram of 2 sessions in:\n%s", out)
	}
	// Buckets are cumulative: counts never fall, and 2.5 s holds both
	// loopback sessions.
	prev := int64(0)
	for line := range strings.Lines(out) {
		rest, ok := strings.CutPrefix(line, "derp_client_rtt_seconds_bucket{le=\"")
		if !ok {
			continue
		}
		le, count, _ := strings.Cut(strings.TrimSpace(rest), "\"} ")
		var n int64
		if _, err := fmt.Sscan(count, &n); err != nil || n < prev {
			t.Fatalf("bucket le=%s count %q after %d", le, count, prev)
		}
		prev = n
		if le == "2.5" && n != 2 {
			t.Fatalf("bucket le=2.5 holds %d of 2 loopback sessions", n)
		}
	}
}

// logLines returns the lines of b that contain substr.
func logLines(b *syncBuffer, substr string) []string {
	var out []string
	for l := range strings.Lines(b.String()) {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return out
}

func TestSetDebugKeys(t *testing.T) {
	var logs syncBuffer
	s := newTestServer(t, WithLogger(slog.New(slog.NewTextHandler(&logs, nil))), WithQueueDepth(4), WithWriteTimeout(0))
	debugged := mustKey(t)
	s.SetDebugKeys(debugged.Public())
	// The debugged client does not read: its queue overflows.
	cc, sc := net.Pipe()
	go s.Accept(context.Background(), sc, nil, "127.0.0.1:7")
	a := loginClient(t, cc, debugged)
	b := pipeClient(t, s)
	short := a.PublicKey().ShortString()
	if got := logLines(&logs, "debug key: connected"); len(got) != 1 || !strings.Contains(got[0], short) {
		t.Fatalf("connected lines %q", got)
	}

	// Drops to and from the debugged key are logged; b's own are not.
	nowhere := mustKey(t).Public()
	b.Send(nowhere, []byte("b to nowhere"))
	for range 50 {
		b.Send(a.PublicKey(), []byte("to the stalled a"))
	}
	b.SendPing([8]byte{})
	recvMsg[Pong](t, b)
	// The lines are written by a goroutine of their own: wait for the
	// burst the limit allows.
	waitFor(t, func() bool { return len(logLines(&logs, "debug key: packet dropped")) >= 20 })
	drops := logLines(&logs, "debug key: packet dropped")
	if n := s.Stats().PacketsDropped["queue_head/other"]; len(drops) == 0 || int64(len(drops)) >= n || len(drops) > 30 {
		// 20 at once, then 10 a second: the flood takes milliseconds.
		t.Fatalf("%d drop lines for %d drops, want about 20", len(drops), n)
	}
	for _, l := range drops {
		if !strings.Contains(l, "reason=queue_head") || !strings.Contains(l, "dst="+short) {
			t.Errorf("drop line %q", l)
		}
	}
	// After a pause the limit lets a line through and it says how many
	// were left out.
	time.Sleep(150 * time.Millisecond)
	a.Send(nowhere, []byte("a to nowhere"))
	waitFor(t, func() bool { return len(logLines(&logs, "reason=unknown_dest")) == 1 })
	if l := logLines(&logs, "reason=unknown_dest")[0]; !strings.Contains(l, "src="+short) || !strings.Contains(l, "suppressed=") {
		t.Errorf("line after the pause %q", l)
	}

	a.Close()
	waitFor(t, func() bool { return len(logLines(&logs, "debug key: disconnected")) == 1 })
	if l := logLines(&logs, "debug key: disconnected")[0]; !strings.Contains(l, short) || !strings.Contains(l, "dropped=") {
		t.Errorf("disconnected line %q", l)
	}

	// Off: nothing more, and b was never logged.
	s.SetDebugKeys()
	pipeClient(t, s, AppName("c"))
	if got := logLines(&logs, "debug key: connected"); len(got) != 1 {
		t.Errorf("connected lines after SetDebugKeys(): %q", got)
	}
	// b's own drop (to nowhere) and b's login concern no debug key.
	if got := logLines(&logs, "dst="+nowhere.ShortString()+" "); len(got) != 1 {
		t.Errorf("drops to nowhere logged: %q, want only a's", got)
	}
	if got := logLines(&logs, "key="+b.PublicKey().ShortString()); len(got) != 0 {
		t.Errorf("lines about b's session, which is not debugged: %q", got)
	}
}

// addFakeConns puts sessions with no connection, of keys fakeKey(from) to
// fakeKey(to-1), into s's session list and routing table, as register would
// (without announcing them), the one of fakeKey(i) having received i+1
// packets of 10 bytes each; whichever are still there are unregistered
// before s closes. It returns them.
func addFakeConns(t *testing.T, s *Server, from, to int) []*sconn {
	t.Helper()
	conns := make([]*sconn, to-from)
	s.mu.Lock()
	for j := range conns {
		i := from + j
		c := &sconn{s: s, key: fakeKey(i), connNum: s.stats.connNum.Add(1), registered: true}
		c.recvPkts.Store(int64(i + 1))
		c.recvBytes.Store(10 * int64(i+1))
		c.entry = addFakeSession(s, c)
		sh := s.shard(c.key)
		sh.mu.Lock()
		s.changeLocked(sh)
		c.regSeq = s.tableSeq
		sh.mu.Unlock()
		s.conns[c] = struct{}{}
		conns[j] = c
	}
	s.stats.current.Add(int64(len(conns)))
	s.mu.Unlock()
	t.Cleanup(func() { // before s.Close, which would start their writers
		for _, c := range conns {
			s.mu.Lock()
			_, ok := s.conns[c]
			s.mu.Unlock()
			if ok {
				s.unregister(c)
			}
		}
	})
	return conns
}

// connsBatches runs op with testHookConnsBatch recording how many sessions
// each hold of s.mu visited; after the first hold it calls mid (if not
// nil), which must not wait for op to finish. It returns the total, the
// largest batch and the number of holds.
func connsBatches(t *testing.T, mid func(), op func()) (total, most, holds int) {
	t.Helper()
	return lockBatches(t, &testHookConnsBatch, "s.mu", mid, op)
}

// TestStatsLetsLoginsInMidWalk checks that Stats, which adds up every
// session's traffic counters, takes the server's lock a batch of sessions
// at a time: it held it for the whole walk (10 ms at 100k sessions), and
// every login and logout waited for each scrape of the metrics.
func TestStatsLetsLoginsInMidWalk(t *testing.T) {
	s := newTestServer(t)
	const n = 4*connsBatch + 10
	addFakeConns(t, s, 0, n)
	var cl *Client
	var st Stats
	total, most, holds := connsBatches(t, func() { cl = pipeLogin(t, s, mustKey(t)) }, func() { st = s.Stats() })
	t.Logf("Stats visited %d sessions in %d holds of the lock, at most %d in one", total, holds, most)
	if most > connsBatch || total < n {
		t.Errorf("Stats visited %d sessions, up to %d under one hold of the lock; want all %d, at most %d at a time", total, most, n, connsBatch)
	}
	if cl == nil {
		t.Fatal("no login mid-walk")
	}
	if want := int64(n * (n + 1) / 2); st.PacketsReceived != want || st.BytesReceived != 10*want {
		t.Errorf("Stats: %d packets, %d bytes received; want %d, %d", st.PacketsReceived, st.BytesReceived, want, 10*want)
	}
}

// TestStatsCountsSessionsEndingMidWalk checks that a session that ends
// while Stats walks the sessions is counted once: by the walk if it got
// there first, else with the totals of ended sessions, and that no counter
// goes down from one snapshot to the next.
func TestStatsCountsSessionsEndingMidWalk(t *testing.T) {
	s := newTestServer(t)
	const n, more = 4*connsBatch + 10, 1000
	conns := addFakeConns(t, s, 0, n)
	var want int64 // what the walk in progress must count
	mid := func() {
		// Every session receives more packets and ends: those the walk
		// counted already count as they were; the others with the
		// packets they have at the end.
		s.mu.Lock()
		w := s.statsWalk
		for i, c := range conns {
			if w == nil || c.statsGen == w.gen { // counted
				want += int64(i + 1)
			} else {
				want += int64(i + 1 + more)
			}
			c.recvPkts.Add(more)
		}
		s.mu.Unlock()
		for _, c := range conns {
			s.unregister(c)
		}
	}
	var st Stats
	connsBatches(t, mid, func() { st = s.Stats() })
	if st.PacketsReceived != want {
		t.Errorf("Stats while every session ended: %d packets received, want %d", st.PacketsReceived, want)
	}
	after := s.Stats()
	if want := int64(n*(n+1)/2 + n*more); after.PacketsReceived != want {
		t.Errorf("Stats once they ended: %d packets received, want %d", after.PacketsReceived, want)
	}
	if after.PacketsReceived < st.PacketsReceived {
		t.Errorf("PacketsReceived went down from %d to %d", st.PacketsReceived, after.PacketsReceived)
	}
	if err := s.ConsistencyCheck(); err != nil {
		t.Error(err)
	}
}

// TestSessionsLetsLoginsInMidWalk checks that Sessions takes its snapshot of
// the sessions with the server's lock held a batch at a time (it held it
// for the whole list, 6-30 ms at 100k sessions, and every login and logout
// waited), and that the snapshot is still of the sessions logged in when
// the call began, each once: sessions that log in mid-walk (enough to make
// the session list grow) are not listed, one that ends before the loop
// reaches it is skipped.
func TestSessionsLetsLoginsInMidWalk(t *testing.T) {
	s := newTestServer(t)
	const n, more = 4*connsBatch + 10, 2000
	conns := addFakeConns(t, s, 0, n)
	var cl *Client
	mid := func() {
		cl = pipeLogin(t, s, mustKey(t))
		addFakeConns(t, s, n, n+more)
		s.unregister(conns[0])
	}
	listed := map[PublicKey]int{}
	var order []int
	total, most, holds := connsBatches(t, mid, func() {
		for si := range s.Sessions() {
			listed[si.Key]++
			if i := int(si.Key[0]) | int(si.Key[1])<<8; si.Key == fakeKey(i) {
				order = append(order, i)
			}
		}
	})
	t.Logf("Sessions visited %d sessions in %d holds of the lock, at most %d in one", total, holds, most)
	if most > connsBatch || total < n-1 {
		t.Errorf("Sessions visited %d sessions, up to %d under one hold of the lock; want %d or more, at most %d at a time", total, most, n-1, connsBatch)
	}
	if cl == nil {
		t.Fatal("no login mid-walk")
	}
	if listed[cl.PublicKey()] != 0 {
		t.Error("Sessions listed a session that logged in after the call began")
	}
	if listed[conns[0].key] != 0 {
		t.Error("Sessions listed a session that had ended")
	}
	late := 0
	for i := range n + more {
		switch k := fakeKey(i); {
		case i >= n:
			late += listed[k]
		case i > 0 && listed[k] != 1:
			t.Errorf("Sessions listed conn %d %d times, want once", i, listed[k])
		}
	}
	if late > 0 {
		t.Errorf("Sessions listed %d of the %d sessions that logged in after the call began", late, more)
	}
	if !slices.IsSorted(order) {
		t.Error("Sessions did not list the sessions in the order they connected")
	}
}

// TestWalkSkipsSessionsEndedAtPause checks that a walk over the sessions
// (Stats, Sessions) visits none that ended while it let go of the lock
// between batches. It took the next session from the map before letting
// go, and visited that one after it ended: one ended session per pause.
func TestWalkSkipsSessionsEndedAtPause(t *testing.T) {
	for _, op := range []string{"Stats", "Sessions"} {
		t.Run(op, func(t *testing.T) {
			s := newTestServer(t)
			const n = 4*connsBatch + 10
			conns := addFakeConns(t, s, 0, n)
			mid := func() {
				for _, c := range conns {
					s.unregister(c)
				}
			}
			listed := 0
			total, _, holds := connsBatches(t, mid, func() {
				if op == "Stats" {
					s.Stats()
					return
				}
				for range s.Sessions() {
					listed++
				}
			})
			// Every session ended at the first pause, after the first
			// batch: the walk must visit no more.
			if total != connsBatch || listed != 0 {
				t.Errorf("%s visited %d sessions in %d holds of the lock (listed %d), when all ended after the first %d: it visited %d ended sessions",
					op, total, holds, listed, connsBatch, total-connsBatch)
			}
		})
	}
}
