package relay

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func TestBackoffBounds(t *testing.T) {
	lo, hi := 100*time.Millisecond, 5*time.Second
	for failures := 1; failures <= 12; failures++ {
		want := lo
		for i := 1; i < failures && want < hi; i++ {
			want *= 2
		}
		want = min(want, hi)
		for range 200 {
			d := backoffStep(lo, hi, failures, false)
			if d < want/2 || d > want {
				t.Fatalf("failures=%d: %v outside [%v, %v]", failures, d, want/2, want)
			}
		}
	}
	for range 100 {
		if d := backoffStep(lo, hi, 10, true); d > lo {
			t.Fatalf("during a restart window backoff %v > %v", d, lo)
		}
	}
}

// TestBackoffHugeMax: with MaxBackoff too long to ever cap the doubling
// (math.MaxInt64, "no cap"), many failures in a row (as a restart window
// collects, retrying at MinBackoff for up to a minute) must neither
// overflow into a negative step, which panics in rand.N, nor wait less
// than the step before.
func TestBackoffHugeMax(t *testing.T) {
	lo, hi := 100*time.Millisecond, time.Duration(math.MaxInt64)
	prev := time.Duration(0)
	for failures := 1; failures <= 200; failures++ {
		d := backoffStep(lo, hi, failures, false)
		if d < lo/2 || d < prev/4 {
			t.Fatalf("failures=%d: backoff %v after %v", failures, d, prev)
		}
		prev = d
	}
}

// rcHarness runs a ReconnectingClient against a test server with a Recv loop
// that forwards every message.
type rcHarness struct {
	rc       *ReconnectingClient
	msgs     chan Message
	mu       sync.Mutex
	connects []Handshake
}

func newRCHarness(t *testing.T, ts *TestServer, configure ...func(*ReconnectingClient)) *rcHarness {
	h := &rcHarness{msgs: make(chan Message, 64)}
	h.rc = &ReconnectingClient{
		URL:        ts.URL,
		PrivateKey: mustKey(t),
		Dialer:     &FastStart{TLSConfig: ts.TLSConfig},
		MinBackoff: 10 * time.Millisecond,
		MaxBackoff: 50 * time.Millisecond,
		OnConnect: func(hs Handshake) {
			h.mu.Lock()
			h.connects = append(h.connects, hs)
			h.mu.Unlock()
		},
	}
	for _, f := range configure {
		f(h.rc)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			m, err := h.rc.Recv(ctx)
			if err != nil {
				return
			}
			if p, ok := m.(*ReceivedPacket); ok {
				cp := *p
				cp.Data = append([]byte(nil), p.Data...)
				m = &cp
			}
			h.msgs <- m
		}
	}()
	t.Cleanup(func() { cancel(); h.rc.Close(); <-done })
	return h
}

// next waits for a message of type T.
func rcNext[T Message](t *testing.T, h *rcHarness) T {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case m := <-h.msgs:
			if v, ok := m.(T); ok {
				return v
			}
		case <-timeout:
			var zero T
			t.Fatalf("no %T in 10s", zero)
			return zero
		}
	}
}

func TestReconnectingClientAfterCut(t *testing.T) {
	ts := StartTestServer(t)
	h := newRCHarness(t, ts)
	ctx := context.Background()
	self := h.rc.PrivateKey.Public()
	if err := h.rc.NotePreferred(true); err != nil {
		t.Fatal(err)
	}
	if err := h.rc.Send(ctx, self, []byte("one")); err != nil {
		t.Fatal(err)
	}
	rcNext[ServerInfo](t, h)
	if p := rcNext[*ReceivedPacket](t, h); string(p.Data) != "one" {
		t.Fatalf("got %q", p.Data)
	}
	waitFor(t, func() bool { return ts.Server.Stats().CurrentHomeConnections == 1 })
	if _, err := h.rc.Ping(ctx); err != nil {
		t.Fatal(err)
	}

	// Cut the connection from the server side.
	ts.Server.closePeer(self)
	rcNext[ServerInfo](t, h) // the Recv loop reconnected by itself
	if g := h.rc.Generation(); g != 2 {
		t.Fatalf("generation %d, want 2", g)
	}
	if err := h.rc.Send(ctx, self, []byte("two")); err != nil {
		t.Fatal(err)
	}
	if p := rcNext[*ReceivedPacket](t, h); string(p.Data) != "two" {
		t.Fatalf("got %q", p.Data)
	}
	// NotePreferred was sent again on the new connection.
	waitFor(t, func() bool { return ts.Server.Stats().CurrentHomeConnections == 1 })
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.connects) != 2 || h.connects[0].Path != FastPath || h.connects[1].Path != FastPath {
		t.Fatalf("connects %+v", h.connects)
	}
	if h.rc.ServerPublicKey() != ts.Server.PublicKey() {
		t.Fatal("learned the wrong server key")
	}
}

func TestReconnectingClientHonoursRestart(t *testing.T) {
	ts := StartTestServer(t, WithRestartNotice(300*time.Millisecond, time.Second))
	// No Recv loop (newRCHarness): only this goroutine calls Recv, so
	// nothing dials again between the notice and the look at the
	// schedule it set. A loop's next Recv redials once the notice's delay
	// (0-300 ms) is over, and a failed dial moves nextDial.
	rc := &ReconnectingClient{URL: ts.URL, PrivateKey: mustKey(t), Dialer: &FastStart{TLSConfig: ts.TLSConfig},
		MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}
	t.Cleanup(func() { rc.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	recv := func() Message {
		t.Helper()
		m, err := rc.Recv(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	if err := rc.Send(ctx, rc.PrivateKey.Public(), []byte("x")); err != nil {
		t.Fatal(err)
	}
	for {
		if _, ok := recv().(ServerInfo); ok {
			break
		}
	}
	// Close returns once the session has ended, which needs the client
	// to read the notice: not on this goroutine.
	closed := make(chan struct{})
	go func() { ts.Server.Close(); close(closed) }()
	t.Cleanup(func() { rc.Close(); <-closed }) // the client's close ends the session
	var r ServerRestarting
	for {
		if m, ok := recv().(ServerRestarting); ok {
			r = m
			break
		}
	}
	received := time.Now()
	if r.ReconnectIn >= 300*time.Millisecond || r.TryFor != time.Second {
		t.Fatalf("restart notice %+v", r)
	}
	rc.mu.Lock()
	next, until := rc.nextDial, rc.restartUntil
	rc.mu.Unlock()
	// The next dial waits for the announced delay, and the restart window
	// (fast retries) lasts for the announced total.
	if noticed := next.Add(-r.ReconnectIn); noticed.After(received) || noticed.Before(received.Add(-time.Second)) {
		t.Errorf("next dial at %v, notice received %v with delay %v", next, received, r.ReconnectIn)
	}
	if got := until.Sub(next); got != r.TryFor {
		t.Errorf("restart window %v, want %v", got, r.TryFor)
	}
}

func TestReconnectingClientBacksOffWhenRefused(t *testing.T) {
	ts := StartTestServer(t, WithAdmission(func(context.Context, Admission) error {
		return errors.New("no")
	}))
	refused := func() int64 { return ts.Server.Stats().Errors["login:login_rejected"] }
	start := time.Now()
	h := newRCHarness(t, ts, func(rc *ReconnectingClient) {
		rc.MinBackoff, rc.MaxBackoff = 20*time.Millisecond, 40*time.Millisecond
	})
	time.Sleep(500 * time.Millisecond)
	// It tries again (a busy machine may take longer than the half
	// second for two attempts).
	waitFor(t, func() bool { return refused() >= 2 })
	// Without backoff a refused client would reconnect thousands of times
	// in half a second; with a 20..40 ms backoff (waits of at least 10 ms)
	// it can try at most once per 10 ms, about 50 times in half a second.
	n, elapsed := refused(), time.Since(start)
	if most := 10 + int64(elapsed/(10*time.Millisecond)); n > most {
		t.Fatalf("%d refused logins in %v, want at most %d", n, elapsed.Round(time.Millisecond), most)
	}
	// The client counts a failure once it has seen the refusal, a moment
	// after the server counted it.
	waitForT(t, "two failures counted by the client", func() bool {
		h.rc.mu.Lock()
		defer h.rc.mu.Unlock()
		return h.rc.failures >= 2
	})
}

func TestReconnectingClientClosed(t *testing.T) {
	ts := StartTestServer(t)
	rc := &ReconnectingClient{URL: ts.URL, PrivateKey: mustKey(t), Dialer: &FastStart{TLSConfig: ts.TLSConfig}}
	ctx := context.Background()
	if err := rc.Send(ctx, rc.PrivateKey.Public(), nil); err != nil {
		t.Fatal(err)
	}
	rc.Close()
	if err := rc.Send(ctx, rc.PrivateKey.Public(), nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Send after Close: %v", err)
	}
	if _, err := rc.Recv(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("Recv after Close: %v", err)
	}
	big := make([]byte, MaxPacketSize+1)
	if err := rc.Send(ctx, rc.PrivateKey.Public(), big); !errors.Is(err, ErrClosed) {
		t.Errorf("Send of a packet too large after Close: %v", err)
	}
	if err := rc.ForwardPacket(ctx, rc.PrivateKey.Public(), rc.PrivateKey.Public(), big); !errors.Is(err, ErrClosed) {
		t.Errorf("ForwardPacket of a packet too large after Close: %v", err)
	}
}

func TestStartTestServer(t *testing.T) {
	ts := StartTestServer(t)
	c, hs, err := (&FastStart{TLSConfig: ts.TLSConfig}).Dial(context.Background(), ts.URL, mustKey(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if hs.Path != FastPath || hs.ServerKey != ts.Server.PublicKey() {
		t.Fatalf("handshake %+v", hs)
	}
	ts.Close() // idempotent with the cleanup
}

// nodeSwitch is a DialContext that makes chosen addresses unreachable:
// refused at once, or a black hole that never answers.
type nodeSwitch struct {
	mu    sync.Mutex
	state map[string]string // addr → "refuse" or "blackhole"
	dials []string
}

func (n *nodeSwitch) set(addr, state string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.state == nil {
		n.state = map[string]string{}
	}
	n.state[addr] = state
}

func (n *nodeSwitch) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	n.mu.Lock()
	st := n.state[addr]
	n.dials = append(n.dials, addr)
	n.mu.Unlock()
	switch st {
	case "refuse":
		return nil, &net.OpError{Op: "dial", Net: network, Err: syscall.ECONNREFUSED}
	case "blackhole":
		<-ctx.Done()
		return nil, &net.OpError{Op: "dial", Net: network, Err: ctx.Err()}
	}
	var d net.Dialer
	return d.DialContext(ctx, network, addr)
}

// TestReconnectingClientFailover runs a ReconnectingClient over a region of
// two servers (plain HTTP, so remembered keys decide the path): it fails
// over to the second node when the first refuses or does not answer,
// tells that node its ideal node, goes back to the first node on the next
// reconnect once it is reachable, and remembers each node's own key.
func TestReconnectingClientFailover(t *testing.T) {
	sA, sB := newTestServer(t), newTestServer(t)
	logA, logB := &headerLog{next: sA, header: IdealNodeHeader}, &headerLog{next: sB, header: IdealNodeHeader}
	a := serveDERP(t, sA, derpServeOpts{plain: true, handler: logA})
	b := serveDERP(t, sB, derpServeOpts{plain: true, handler: logB})
	sw := &nodeSwitch{}
	sw.set(a.Addr, "refuse") // before the harness's Recv loop connects
	h := newRCHarness(t, &TestServer{URL: a.URL}, func(rc *ReconnectingClient) {
		rc.Fallbacks = []string{b.URL}
		rc.NodeConnectTimeout = 100 * time.Millisecond
		rc.Dialer = &FastStart{DialContext: sw.dial}
	})
	ctx := context.Background()
	self := h.rc.PrivateKey.Public()
	connect := func(want string, wantServer *Server) Handshake {
		t.Helper()
		rcNext[ServerInfo](t, h) // the Recv loop connected by itself
		if err := h.rc.Send(ctx, self, []byte("hi")); err != nil {
			t.Fatal(err)
		}
		if p := rcNext[*ReceivedPacket](t, h); string(p.Data) != "hi" {
			t.Fatalf("got %q", p.Data)
		}
		h.mu.Lock()
		hs := h.connects[len(h.connects)-1]
		h.mu.Unlock()
		if hs.URL != want || hs.ServerKey != wantServer.PublicKey() || h.rc.ServerPublicKey() != wantServer.PublicKey() {
			t.Fatalf("connected to %s with key %s, want %s with %s", hs.URL, hs.ServerKey.ShortString(), want, wantServer.PublicKey().ShortString())
		}
		return hs
	}
	cut := func(s *Server) {
		t.Helper()
		s.closePeer(self)
		waitFor(t, func() bool { return !s.IsClientConnected(self) })
	}

	hs := connect(b.URL, sB)
	if hs.Path != UpgradePath {
		t.Errorf("first connection to B took %s, want upgrade (no key known)", hs.Path)
	}
	if got := logB.values(); !slices.Equal(got, []string{"127.0.0.1"}) {
		t.Errorf("B saw Ideal-Node %q, want [127.0.0.1]", got)
	}
	if st := sB.Stats(); st.CurrentNotIdealConns != 1 {
		t.Errorf("B counts %d not-ideal connections, want 1", st.CurrentNotIdealConns)
	}

	// A is back: the next reconnect goes to the ideal node, with no
	// Ideal-Node header.
	sw.set(a.Addr, "")
	cut(sB)
	connect(a.URL, sA)
	if got := logA.values(); !slices.Equal(got, []string{""}) {
		t.Errorf("A saw Ideal-Node %q, want one empty", got)
	}

	// A stops answering: after NodeConnectTimeout the client is on B
	// again, and takes the fast path with B's own key at the first try.
	sw.set(a.Addr, "blackhole")
	cut(sA)
	hs = connect(b.URL, sB)
	if hs.Path != FastPath || hs.KeySource != "configured" || hs.Attempts != 1 {
		t.Errorf("reconnect to B: %+v, want the fast path with B's remembered key at the first attempt", hs)
	}
}

// TestReconnectingClientFailoverBeyondTCP checks that a node that accepts
// TCP but cannot serve DERP (here it answers 503) also sends the client on
// to the next node, over WebSocket too, with the Ideal-Node header.
func TestReconnectingClientFailoverBeyondTCP(t *testing.T) {
	for _, ws := range []bool{false, true} {
		t.Run(fmt.Sprintf("websocket=%v", ws), func(t *testing.T) {
			sA, sB := newTestServer(t), newTestServer(t)
			down := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
			})
			a := serveDERP(t, sA, derpServeOpts{plain: true, handler: down})
			logB := &headerLog{next: sB, header: IdealNodeHeader}
			b := serveDERP(t, sB, derpServeOpts{plain: true, handler: logB})
			h := newRCHarness(t, &TestServer{URL: a.URL}, func(rc *ReconnectingClient) {
				rc.Fallbacks = []string{b.URL}
				rc.Dialer = &FastStart{WebSocket: ws}
			})
			rcNext[ServerInfo](t, h)
			self := h.rc.PrivateKey.Public()
			if err := h.rc.Send(context.Background(), self, []byte("hi")); err != nil {
				t.Fatal(err)
			}
			if p := rcNext[*ReceivedPacket](t, h); string(p.Data) != "hi" {
				t.Fatalf("got %q", p.Data)
			}
			h.mu.Lock()
			hs := h.connects[0]
			h.mu.Unlock()
			if hs.URL != b.URL || hs.ServerKey != sB.PublicKey() {
				t.Errorf("connected to %s (%s), want %s", hs.URL, hs.ServerKey.ShortString(), b.URL)
			}
			if got := logB.values(); !slices.Equal(got, []string{"127.0.0.1"}) {
				t.Errorf("B saw Ideal-Node %q, want [127.0.0.1]", got)
			}
			if st := sB.Stats(); ws && st.WebSocketAccepts != 1 {
				t.Errorf("B counted %d WebSocket accepts, want 1", st.WebSocketAccepts)
			}
		})
	}
}

// connectCutShort has rc's Connect dial under ctx, which cut ends once
// the server has the request (asked), and checks that it failed with want.
func connectCutShort(t *testing.T, rc *ReconnectingClient, asked chan struct{}, ctx context.Context, cut func(), want error) {
	t.Helper()
	errc := make(chan error, 1)
	go func() { errc <- rc.Connect(ctx) }()
	select {
	case <-asked:
	case <-time.After(30 * time.Second):
		t.Fatal("the server did not get the dial's request")
	}
	cut()
	if err := <-errc; !errors.Is(err, want) {
		t.Fatalf("Connect whose ctx ended during the dial: %v, want %v", err, want)
	}
}

// refusingPair is two servers served over plain HTTP: A refuses every
// login after a fast-path dial has succeeded (counting them in refused),
// B takes them.
type refusingPair struct {
	refused atomic.Int32
	sA, sB  *Server
	a, b    derpHTTP
}

func newRefusingPair(t *testing.T) *refusingPair {
	p := &refusingPair{}
	p.sA = newTestServer(t, WithAdmission(func(ctx context.Context, _ Admission) error {
		p.refused.Add(1)
		return errors.New("not today")
	}))
	p.sB = newTestServer(t)
	p.a = serveDERP(t, p.sA, derpServeOpts{plain: true})
	p.b = serveDERP(t, p.sB, derpServeOpts{plain: true})
	return p
}

// TestReconnectingClientFailoverAfterRefusedLogin checks a node that takes
// the fast path (so the dial succeeds before the server answers) and then
// refuses the login: the next dial starts with the next node instead of
// returning to the refusing one, and the reconnect after that starts with
// the ideal node again.
func TestReconnectingClientFailoverAfterRefusedLogin(t *testing.T) {
	p := newRefusingPair(t)
	refused, sA, sB, a, b := &p.refused, p.sA, p.sB, p.a, p.b
	h := newRCHarness(t, &TestServer{URL: a.URL}, func(rc *ReconnectingClient) {
		rc.Fallbacks = []string{b.URL}
		rc.Dialer = &FastStart{ServerKey: sA.PublicKey()} // the fast path to A
	})
	self := h.rc.PrivateKey.Public()
	urls := func() []string {
		h.mu.Lock()
		defer h.mu.Unlock()
		var us []string
		for _, hs := range h.connects {
			us = append(us, hs.URL)
		}
		return us
	}
	rcNext[ServerInfo](t, h)
	if got, want := urls(), []string{a.URL, b.URL}; !slices.Equal(got, want) {
		t.Fatalf("connections %q, want %q: A's refusal must move the next dial to B", got, want)
	}
	h.mu.Lock()
	first := h.connects[0]
	h.mu.Unlock()
	if first.Path != FastPath {
		t.Errorf("connection to A took %s, want the fast path (the dial must succeed before the refusal)", first.Path)
	}
	if !sB.IsClientConnected(self) {
		t.Error("B does not see the client")
	}

	// B drops the client: the next dial tries the ideal node A first
	// again, and A's refusal sends it back to B.
	sB.closePeer(self)
	rcNext[ServerInfo](t, h)
	if got, want := urls(), []string{a.URL, b.URL, a.URL, b.URL}; !slices.Equal(got, want) {
		t.Fatalf("connections %q, want %q", got, want)
	}
	if n := refused.Load(); n != 2 {
		t.Errorf("A refused %d logins, want 2", n)
	}
}

// TestReconnectingClientFailoverStalledNode checks nodes that accept TCP
// and then never answer: one stalls the TLS handshake, one the HTTP
// upgrade. Each gets an equal share of DialTimeout while more nodes remain,
// so the client still reaches the last node within one DialTimeout.
func TestReconnectingClientFailoverStalledNode(t *testing.T) {
	// stall listens for connections it never answers, and counts them.
	stall := func(t *testing.T) (string, *atomic.Int32) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		var n atomic.Int32
		acceptLoop(t, ln, func(nc net.Conn) {
			n.Add(1)
			io.Copy(io.Discard, nc) // until the test ends
		})
		return ln.Addr().String(), &n
	}
	ts := StartTestServer(t)
	tlsAddr, tlsConns := stall(t)
	httpAddr, httpConns := stall(t)
	h := newRCHarness(t, &TestServer{URL: "https://" + tlsAddr + "/derp"}, func(rc *ReconnectingClient) {
		rc.Fallbacks = []string{"http://" + httpAddr + "/derp", ts.URL}
		rc.Dialer = &FastStart{TLSConfig: ts.TLSConfig}
		rc.DialTimeout = 3 * time.Second
	})
	rcNext[ServerInfo](t, h)
	h.mu.Lock()
	hs := h.connects[0]
	h.mu.Unlock()
	if hs.URL != ts.URL {
		t.Fatalf("first connection to %s, want %s", hs.URL, ts.URL)
	}
	// One dial reached the last node: each stalled node was tried once
	// (3 s / 3 = 1 s, then 2 s / 2 = 1 s), without using up DialTimeout.
	if a, b := tlsConns.Load(), httpConns.Load(); a != 1 || b != 1 {
		t.Errorf("the stalled nodes saw %d and %d connections, want 1 each: one dial", a, b)
	}
}

// TestReconnectingClientLastGoodAddress breaks DNS after a first connection:
// the reconnect dials the address the name was last reached at, and the
// certificate is still checked against the name. Without a last good
// address, the DNS error is returned.
func TestReconnectingClientLastGoodAddress(t *testing.T) {
	s := newTestServer(t)
	ns := serveRegionNode(t, s, nil, "derp.test")
	var mu sync.Mutex
	var dialled []string
	dnsDown := false
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		mu.Lock()
		dialled = append(dialled, addr)
		down := dnsDown
		mu.Unlock()
		if host, port, _ := net.SplitHostPort(addr); host == "derp.test" {
			if down {
				return nil, &net.OpError{Op: "dial", Net: network, Err: &net.DNSError{Err: "server misbehaving", Name: host, IsTemporary: true}}
			}
			addr = net.JoinHostPort("127.0.0.1", port)
		}
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	url := "https://derp.test:" + strconv.Itoa(ns.port) + "/derp"
	newRC := func() *ReconnectingClient {
		rc := &ReconnectingClient{URL: url, PrivateKey: mustKey(t), MinBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond,
			Dialer: &FastStart{TLSConfig: ns.roots, DialContext: dial}}
		t.Cleanup(func() { rc.Close() })
		return rc
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rc := newRC()
	peer := pipeClient(t, s)
	if err := rc.Send(ctx, peer.PublicKey(), []byte("one")); err != nil {
		t.Fatal(err)
	}
	if p, _ := recvMsg[*ReceivedPacket](t, peer); string(p.Data) != "one" {
		t.Fatalf("got %q", p.Data)
	}

	mu.Lock()
	dnsDown, dialled = true, nil
	mu.Unlock()
	s.ClosePeer(rc.PrivateKey.Public())
	var err error
	for range 100 { // the first Send may still find the old connection
		if err = rc.Send(ctx, peer.PublicKey(), []byte("two")); err == nil && rc.Generation() == 2 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err != nil || rc.Generation() != 2 {
		t.Fatalf("reconnect with DNS down: %v (generation %d)", err, rc.Generation())
	}
	if p, _ := recvMsg[*ReceivedPacket](t, peer); string(p.Data) != "two" {
		t.Fatalf("got %q", p.Data)
	}
	mu.Lock()
	got := strings.Join(dialled, ", ")
	mu.Unlock()
	if want := "derp.test:P, 127.0.0.1:P"; strings.ReplaceAll(got, strconv.Itoa(ns.port), "P") != want {
		t.Errorf("dialled %s, want %s", got, want)
	}
	if sni := ns.lastSNI(); sni != "derp.test" {
		t.Errorf("TLS server name %q, want derp.test", sni)
	}

	// A client that never reached the name has nothing to fall back on.
	err = newRC().Send(ctx, peer.PublicKey(), []byte("three"))
	var dnsErr *net.DNSError
	if !errors.As(err, &dnsErr) {
		t.Errorf("fresh client with DNS down: %v, want the DNS error", err)
	}
}

// TestReconnectingClientMesh uses a ReconnectingClient as a mesh peer:
// Connect, WatchConnectionChanges (asked again on each new connection, which
// RecvDetail's generation tells apart), ForwardPacket, ClosePeer and
// LocalAddr.
func TestReconnectingClientMesh(t *testing.T) {
	const mk = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	ts := StartTestServer(t, WithMeshKey(mk))
	s := ts.Server
	rc := &ReconnectingClient{
		URL:        ts.URL,
		PrivateKey: mustKey(t),
		Dialer:     &FastStart{TLSConfig: ts.TLSConfig},
		Options:    []ClientOption{MeshKey(mk)},
		MinBackoff: 10 * time.Millisecond,
		MaxBackoff: 50 * time.Millisecond,
	}
	defer rc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if rc.LocalAddr() != nil {
		t.Error("LocalAddr before connecting")
	}
	if err := rc.WatchConnectionChanges(); err != nil { // before connecting: asked on connect
		t.Fatal(err)
	}
	if err := rc.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	if a, ok := rc.LocalAddr().(*net.TCPAddr); !ok || !a.IP.IsLoopback() {
		t.Errorf("LocalAddr %v", rc.LocalAddr())
	}
	peer, _, err := (&FastStart{TLSConfig: ts.TLSConfig}).Dial(ctx, ts.URL, mustKey(t))
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	type msgGen struct {
		m   Message
		gen int
	}
	msgs := make(chan msgGen, 64)
	go func() {
		for {
			m, gen, err := rc.RecvDetail(ctx)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- msgGen{m, gen}
		}
	}()
	// presentOn waits for PeerPresent of key on connection generation gen.
	presentOn := func(key PublicKey, gen int) {
		t.Helper()
		for mg := range msgs {
			if p, ok := mg.m.(PeerPresent); ok && p.Key == key && p.Flags != 0 {
				if mg.gen != gen {
					t.Fatalf("PeerPresent on generation %d, want %d", mg.gen, gen)
				}
				return
			}
		}
		t.Fatalf("no PeerPresent for %s", key.ShortString())
	}
	presentOn(peer.PublicKey(), 1)

	// Forwarded packets arrive from the source named.
	src := mustKey(t).Public()
	if err := rc.ForwardPacket(ctx, src, peer.PublicKey(), []byte("fwd")); err != nil {
		t.Fatal(err)
	}
	if p, _ := recvMsg[*ReceivedPacket](t, peer); p == nil || p.Source != src || string(p.Data) != "fwd" {
		t.Fatalf("forwarded packet %+v", p)
	}

	// A new connection watches again and lists the peer again.
	s.closePeer(rc.PrivateKey.Public())
	presentOn(peer.PublicKey(), 2)
	if g := rc.Generation(); g != 2 {
		t.Errorf("generation %d, want 2", g)
	}

	// ClosePeer ends the peer's session.
	if err := rc.ClosePeer(ctx, peer.PublicKey()); err != nil {
		t.Fatal(err)
	}
	if _, err := recvUntilErr(t, peer); err == nil {
		t.Error("the peer's session was not closed")
	}
}

// A dial that the caller's ctx cut short (its deadline or its cancel,
// here while the server had not answered the upgrade) is no failure of
// the server's: it sets no wait for the next call, which may come from
// another caller with no deadline. It was counted, so callers with short
// deadlines backed the client off for everyone. A dial that its own bound
// (DialTimeout) ends still counts, and so does one cut short by its
// caller right after another was: callers whose ctx never leaves a dial
// time to finish must not redial a slow server at the pace of their calls.
func TestReconnectingCallerCtxCutsDialShort(t *testing.T) {
	// stalling returns rc, dialling s, whose connections numbered in
	// stall (from 1) take the request and answer nothing, and a channel
	// told when such a connection got its request.
	stalling := func(t *testing.T, stall ...int32) (*ReconnectingClient, *atomic.Int32, chan struct{}) {
		s := &scriptedServer{priv: mustKey(t)}
		s.init()
		s.script = func(_ int, _ net.Conn, br *bufio.Reader, _ PublicKey) { io.Copy(io.Discard, br) }
		rc := newScriptedRC(t, s)
		// Any counted failure would hold the next dial for half an hour
		// at least.
		rc.MinBackoff, rc.MaxBackoff = time.Hour, time.Hour
		asked := make(chan struct{}, 10)
		dials := new(atomic.Int32)
		rc.Dialer.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
			if !slices.Contains(stall, dials.Add(1)) {
				return s.dial(ctx, network, addr)
			}
			return s.silentAfterRequest(asked), nil
		}
		return rc, dials, asked
	}
	// connectsAtOnce checks that the next dial starts without a wait.
	connectsAtOnce := func(t *testing.T, rc *ReconnectingClient, dials *atomic.Int32, want int32) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := rc.Connect(ctx); err != nil {
			rc.mu.Lock()
			failures := rc.failures
			rc.mu.Unlock()
			t.Fatalf("Connect after a dial its caller's ctx cut short: %v (%d failures counted)", err, failures)
		}
		if n := dials.Load(); n != want {
			t.Fatalf("%d dials, want %d", n, want)
		}
	}
	// backedOff checks that the next dial waits (MinBackoff: an hour).
	backedOff := func(t *testing.T, rc *ReconnectingClient, dials *atomic.Int32, want int32) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		if err := rc.Connect(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Connect after the failure: %v, want a wait for the backoff that its ctx ends", err)
		}
		if n := dials.Load(); n != want {
			t.Fatalf("%d dials, want %d: a dial during the backoff", n, want)
		}
	}
	// cutByDeadline is cutShort by a deadline that passes.
	cutByDeadline := func(t *testing.T, rc *ReconnectingClient, asked chan struct{}) {
		t.Helper()
		ctx := newExpiringCtx()
		connectCutShort(t, rc, asked, ctx, ctx.expire, context.DeadlineExceeded)
	}
	t.Run("deadline", func(t *testing.T) {
		rc, dials, asked := stalling(t, 1)
		cutByDeadline(t, rc, asked)
		connectsAtOnce(t, rc, dials, 2)
	})
	t.Run("cancel", func(t *testing.T) {
		rc, dials, asked := stalling(t, 1)
		ctx, cancel := context.WithCancel(context.Background())
		connectCutShort(t, rc, asked, ctx, cancel, context.Canceled)
		connectsAtOnce(t, rc, dials, 2)
	})
	t.Run("twice", func(t *testing.T) {
		rc, dials, asked := stalling(t, 1, 2)
		cutByDeadline(t, rc, asked)
		cutByDeadline(t, rc, asked)
		backedOff(t, rc, dials, 2)
	})
	t.Run("after a connection", func(t *testing.T) {
		// A connection between two cut-short dials: the second is
		// forgiven too.
		rc, dials, asked := stalling(t, 1, 3)
		cutByDeadline(t, rc, asked)
		connectsAtOnce(t, rc, dials, 2)
		rc.Reconnect()
		cutByDeadline(t, rc, asked)
		connectsAtOnce(t, rc, dials, 4)
	})
	t.Run("after Reconnect", func(t *testing.T) {
		// Reconnect starts the count again: what the dials on the old
		// path met says nothing of the new one.
		rc, dials, asked := stalling(t, 1, 2)
		cutByDeadline(t, rc, asked)
		rc.Reconnect()
		cutByDeadline(t, rc, asked)
		connectsAtOnce(t, rc, dials, 3)
	})
	t.Run("own timeout", func(t *testing.T) {
		rc, dials, _ := stalling(t, 1)
		rc.DialTimeout = 300 * time.Millisecond
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := rc.Connect(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Connect to a server that does not answer within DialTimeout: %v, want context.DeadlineExceeded", err)
		}
		backedOff(t, rc, dials, 1)
	})
}

// A dial its caller's ctx cut short leaves the order of servers as it
// was: after a login the ideal server A refused, the next dial starts
// with the fallback B, and so does the one after a dial to B that its
// caller's ctx cut short (which is no failure: it says nothing of B). The
// cut-short dial used up the turn past A, and the next dial, perhaps a
// Recv loop's with no deadline, went back to the server that refused.
func TestReconnectingCutShortDialKeepsFailover(t *testing.T) {
	var mu sync.Mutex
	var dialled []string
	asked := make(chan struct{}, 1)
	s := &scriptedServer{}
	t.Cleanup(s.close)
	rc := &ReconnectingClient{
		URL:        "http://a.invalid/derp",
		Fallbacks:  []string{"http://b.invalid/derp"},
		PrivateKey: mustKey(t),
		MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond,
		DialTimeout: time.Minute, // the attempt's share, 30 s, does not end the stalled dial
		Dialer: &FastStart{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			mu.Lock()
			dialled = append(dialled, addr)
			first := len(dialled) == 1
			mu.Unlock()
			if !first {
				return nil, errors.New("refused")
			}
			// B's first connection takes the request and answers
			// nothing, until the caller's ctx ends the dial.
			return s.silentAfterRequest(asked), nil
		}},
	}
	defer rc.Close()
	// As after a login that A refused (see
	// TestReconnectingSendOnlyFailsOverAfterRefusedLogin).
	rc.mu.Lock()
	rc.startAt, rc.nTargets = 1, 2
	rc.mu.Unlock()

	ctx, cancel := context.WithCancel(context.Background())
	connectCutShort(t, rc, asked, ctx, cancel, context.Canceled)
	ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rc.Connect(ctx) // both refuse now: what counts is which is tried first
	mu.Lock()
	defer mu.Unlock()
	if len(dialled) < 2 || dialled[0] != "b.invalid:80" || dialled[1] != "b.invalid:80" {
		t.Fatalf("dialled %q; want b.invalid:80 first, then b.invalid:80 again first after the dial the caller's ctx cut short", dialled)
	}
}
