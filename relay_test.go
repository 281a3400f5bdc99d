package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go4.org/mem"
)

// TestMain fails the run if goroutines of this package outlive the tests.
//
// RELAY_TEST_IDLE_PARK (a duration) changes the servers' default idle park
// delay, so that the whole suite can run with sessions parked between any
// two packets: RELAY_TEST_IDLE_PARK=1ms go test -race .
func TestMain(m *testing.M) {
	if v := os.Getenv("RELAY_TEST_IDLE_PARK"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			fmt.Fprintln(os.Stderr, "RELAY_TEST_IDLE_PARK:", err)
			os.Exit(2)
		}
		defaultIdlePark = d
	}
	code := m.Run()
	if code == 0 {
		if leaked := waitNoLeaks(5 * time.Second); leaked != "" {
			fmt.Fprintf(os.Stderr, "leaked goroutines:\n%s\n", leaked)
			code = 1
		}
	}
	os.Exit(code)
}

// leakedGoroutines returns the stacks of goroutines running this package's
// code, other than the test harness.
func leakedGoroutines() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if !strings.Contains(g, "fastderp/relay.") || strings.Contains(g, "testing.(*M).Run") ||
			strings.Contains(g, "relay.leakedGoroutines") || strings.Contains(g, "testing.tRunner") {
			continue
		}
		out = append(out, g)
	}
	return strings.Join(out, "\n\n")
}

func waitNoLeaks(d time.Duration) string {
	deadline := time.Now().Add(d)
	for {
		l := leakedGoroutines()
		if l == "" || time.Now().After(deadline) {
			return l
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func mustKey(t testing.TB) PrivateKey {
	t.Helper()
	k, err := GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// newTestServer returns a server that is closed when the test ends.
func newTestServer(t testing.TB, opts ...ServerOption) *Server {
	t.Helper()
	s := NewServer(mustKey(t), opts...)
	t.Cleanup(func() { s.Close() })
	return s
}

// pipeClient connects a new client to s over an in-memory pipe, and waits for
// its ServerInfo.
func pipeClient(t testing.TB, s *Server, opts ...ClientOption) *Client {
	t.Helper()
	return pipeLogin(t, s, mustKey(t), opts...)
}

// pipeLogin logs a client with key priv in to s over a pipe.
func pipeLogin(t testing.TB, s *Server, priv PrivateKey, opts ...ClientOption) *Client {
	t.Helper()
	cc, sc := net.Pipe()
	go s.Accept(context.Background(), sc, nil, "127.0.0.1:1234")
	return loginClient(t, cc, priv, opts...)
}

func loginClient(t testing.TB, nc net.Conn, priv PrivateKey, opts ...ClientOption) *Client {
	t.Helper()
	c, err := NewClient(priv, nc, nil, opts...)
	if err != nil {
		nc.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, ok := recvMsg[ServerInfo](t, c); !ok {
		t.Fatal("no ServerInfo")
	}
	return c
}

// tcpServer serves s on a loopback TCP listener through Accept.
func tcpServer(t testing.TB, s *Server) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	acceptLoop(t, ln, func(nc net.Conn) {
		s.Accept(context.Background(), nc, nil, nc.RemoteAddr().String())
	})
	// Registered last, so it runs first: Server.Close ends sessions that
	// closing their connections alone would not wake (a reader waiting for
	// the rate limit).
	t.Cleanup(func() { s.Close() })
	return ln.Addr().String()
}

// acceptLoop runs handle on its own goroutine for every connection ln
// accepts. When the test ends it closes ln and every accepted connection and
// waits for the handlers to return.
func acceptLoop(t testing.TB, ln net.Listener, handle func(net.Conn)) {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns []net.Conn
	)
	wg.Go(func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, nc)
			mu.Unlock()
			wg.Go(func() { handle(nc) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
}

// tcpPair returns both ends of a loopback TCP connection, closed when the
// test ends.
func tcpPair(t testing.TB) (client, server net.Conn) {
	t.Helper()
	client, server, err := loopbackTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// loopbackTCP returns both ends of a new loopback TCP connection (for a
// dialer, which cannot end the test as tcpPair does).
func loopbackTCP() (client, server net.Conn, err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, err
	}
	defer ln.Close()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		return nil, nil, err
	}
	server, err = ln.Accept()
	if err != nil {
		client.Close()
		return nil, nil, err
	}
	return client, server, nil
}

func tcpClient(t testing.TB, addr string, opts ...ClientOption) *Client {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return loginClient(t, nc, mustKey(t), opts...)
}

// recvMsg receives until a message of type T arrives, skipping others, for at
// most 5 seconds.
func recvMsg[T Message](t testing.TB, c *Client) (T, bool) {
	t.Helper()
	var zero T
	saved := c.opts.recvTimeout
	c.opts.recvTimeout = 5 * time.Second
	defer func() { c.opts.recvTimeout = saved }()
	for {
		m, err := c.recv()
		if err != nil {
			t.Errorf("waiting for %T: %v", zero, err)
			return zero, false
		}
		if v, ok := m.(T); ok {
			return v, true
		}
	}
}

// recvErr receives until an error, for at most 5 seconds, and returns the
// messages seen.
func recvUntilErr(t testing.TB, c *Client) ([]Message, error) {
	t.Helper()
	c.opts.recvTimeout = 5 * time.Second
	var msgs []Message
	for {
		m, err := c.Recv()
		if err != nil {
			return msgs, err
		}
		msgs = append(msgs, m)
	}
}

func TestKeyText(t *testing.T) {
	priv := mustKey(t)
	pub := priv.Public()
	if pub.IsZero() {
		t.Fatal("zero public key")
	}
	s := pub.String()
	if len(s) != 64 || strings.ToLower(s) != s {
		t.Fatalf("String = %q", s)
	}
	for _, in := range []string{s, strings.ToUpper(s)} {
		got, err := ParsePublicKey(in)
		if err != nil || got != pub {
			t.Fatalf("ParsePublicKey(%q) = %v, %v", in, got, err)
		}
	}
	var viaText PublicKey
	if err := viaText.UnmarshalText([]byte("nodekey:" + s)); err != nil || viaText != pub {
		t.Fatalf("UnmarshalText nodekey: %v %v", viaText, err)
	}
	for _, bad := range []string{"", s[:63], s + "0", "zz" + s[2:]} {
		if _, err := ParsePublicKey(bad); err == nil {
			t.Errorf("ParsePublicKey(%q) succeeded", bad)
		}
	}
	if priv.String() == fmt.Sprint([32]byte(priv)) || strings.Contains(fmt.Sprint(priv), fmt.Sprintf("%x", priv[:4])) {
		t.Errorf("PrivateKey.String leaks the key: %v", priv)
	}
	if ss := pub.ShortString(); len(ss) != 7 || ss[0] != '[' || ss[6] != ']' {
		t.Errorf("ShortString = %q", ss)
	}
	pk, err := ParsePrivateKey("privkey:" + fmt.Sprintf("%x", priv[:]))
	if err != nil || pk != priv {
		t.Errorf("ParsePrivateKey: %v", err)
	}
}

func TestParsePublicKeyMemNoAlloc(t *testing.T) {
	s := mustKey(t).Public().String()
	m := mem.S(s)
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := ParsePublicKeyMem(m); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("ParsePublicKeyMem allocates %v times", allocs)
	}
}

func TestGeneratedKeysAreClamped(t *testing.T) {
	for range 20 {
		k := mustKey(t)
		if k[0]&7 != 0 || k[31]&0x80 != 0 || k[31]&0x40 == 0 {
			t.Fatalf("key not clamped: %x", k[:])
		}
	}
}

func TestCheckPeerKey(t *testing.T) {
	good := mustKey(t).Public()
	if err := checkPeerKey(good); err != nil {
		t.Fatalf("good key refused: %v", err)
	}
	var zero PublicKey
	if !errors.Is(checkPeerKey(zero), ErrZeroKey) {
		t.Error("zero key accepted")
	}
	high := good
	high[31] |= 0x80
	if !errors.Is(checkPeerKey(high), ErrWeakKey) {
		t.Error("key with bit 255 set accepted")
	}
	var p PublicKey // 2^255 - 19
	p[0] = 0xed
	for i := 1; i < 31; i++ {
		p[i] = 0xff
	}
	p[31] = 0x7f
	if !errors.Is(checkPeerKey(p), ErrWeakKey) {
		t.Error("p accepted")
	}
	// Small-order points are caught by the shared-key computation.
	one := PublicKey{1}
	if _, err := sharedKey(mustKey(t), one); !errors.Is(err, ErrWeakKey) {
		t.Errorf("small-order point: %v", err)
	}
}

func TestRelayOverPipe(t *testing.T) {
	s := newTestServer(t)
	a, b := pipeClient(t, s), pipeClient(t, s)
	exchange(t, a, b)
}

func TestRelayOverTCP(t *testing.T) {
	s := NewServer(mustKey(t))
	addr := tcpServer(t, s)
	a, b := tcpClient(t, addr), tcpClient(t, addr)
	exchange(t, a, b)
	st := s.Stats()
	if st.PacketsReceived < 4 || st.PacketsSent < 4 || st.CurrentConnections != 2 {
		t.Errorf("stats after exchange: %+v", st)
	}
}

// exchange sends packets both ways between a and b and checks them.
func exchange(t *testing.T, a, b *Client) {
	t.Helper()
	for i, size := range []int{0, 1, 100, 1400, 5000, MaxPacketSize} {
		pkt := bytes.Repeat([]byte{byte(i + 1)}, size)
		for _, dir := range [][2]*Client{{a, b}, {b, a}} {
			from, to := dir[0], dir[1]
			if err := from.Send(to.PublicKey(), pkt); err != nil {
				t.Fatalf("send %d bytes: %v", size, err)
			}
			got, ok := recvMsg[*ReceivedPacket](t, to)
			if !ok {
				t.FailNow()
			}
			if got.Source != from.PublicKey() || !bytes.Equal(got.Data, pkt) {
				t.Fatalf("got %d bytes from %s, want %d from %s", len(got.Data), got.Source.ShortString(), size, from.PublicKey().ShortString())
			}
		}
	}
}

func TestSendToSelf(t *testing.T) {
	s := newTestServer(t)
	a := pipeClient(t, s)
	if err := a.Send(a.PublicKey(), []byte("me")); err != nil {
		t.Fatal(err)
	}
	got, _ := recvMsg[*ReceivedPacket](t, a)
	if got.Source != a.PublicKey() || string(got.Data) != "me" {
		t.Fatalf("got %v", got)
	}
}

func TestSendTooLarge(t *testing.T) {
	s := newTestServer(t)
	a := pipeClient(t, s)
	if err := a.Send(a.PublicKey(), make([]byte, MaxPacketSize+1)); !errors.Is(err, ErrPacketTooLarge) {
		t.Fatalf("err = %v", err)
	}
	// Nothing was written: the connection still works.
	if err := a.Send(a.PublicKey(), []byte("x")); err != nil {
		t.Fatal(err)
	}
	recvMsg[*ReceivedPacket](t, a)
}

func TestPingPong(t *testing.T) {
	s := newTestServer(t)
	a := pipeClient(t, s)
	data := [8]byte{1, 2, 3, 4, 5, 6, 7, 8}
	if err := a.SendPing(data); err != nil {
		t.Fatal(err)
	}
	got, _ := recvMsg[Pong](t, a)
	if got != Pong(data) {
		t.Fatalf("pong %v, want %v", got, data)
	}
	if st := s.Stats(); st.PingsReceived != 1 || st.PongsSent != 1 {
		t.Errorf("ping stats %d/%d", st.PingsReceived, st.PongsSent)
	}
}

func TestPeerGoneDisconnected(t *testing.T) {
	s := newTestServer(t)
	a, b, c, d := pipeClient(t, s), pipeClient(t, s), pipeClient(t, s), pipeClient(t, s)
	// b received from a; c only sent to a; d never dealt with a.
	a.Send(b.PublicKey(), []byte("hi"))
	recvMsg[*ReceivedPacket](t, b)
	c.Send(a.PublicKey(), []byte("hi"))
	recvMsg[*ReceivedPacket](t, a)
	a.Close()
	for _, x := range []*Client{b, c} { // c is told too, unlike Tailscale
		g, _ := recvMsg[PeerGone](t, x)
		if g.Peer != a.PublicKey() || g.Reason != PeerGoneDisconnected {
			t.Fatalf("got %+v", g)
		}
	}
	// d is not told: what it gets next is its own ping's pong.
	d.SendPing([8]byte{9})
	d.opts.recvTimeout = 5 * time.Second
	m, err := d.Recv()
	if _, ok := m.(Pong); !ok || err != nil {
		t.Fatalf("d got %T %v, want Pong", m, err)
	}
}

func TestServerPingsClientsThatAckPings(t *testing.T) {
	// With parking, the silent client's session is parked when it times
	// out, and the keepalive timer must end it.
	for _, park := range []time.Duration{0, 10 * time.Millisecond} {
		t.Run(fmt.Sprintf("park=%v", park), func(t *testing.T) { testServerPings(t, park) })
	}
}

func testServerPings(t *testing.T, park time.Duration) {
	s := NewServer(mustKey(t), WithKeepAlive(20*time.Millisecond), WithIdleTimeout(300*time.Millisecond), WithIdlePark(park))
	addr := tcpServer(t, s)
	silent := tcpClient(t, addr, CanAckPings(true))
	answering := tcpClient(t, addr, CanAckPings(true))
	plain := tcpClient(t, addr) // cannot ack pings: keepalives, no deadline

	// answering answers every ping for a while; silent never reads.
	var pings int
	answering.opts.recvTimeout = 5 * time.Second
	for pings < 20 {
		m, err := answering.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if p, ok := m.(Ping); ok {
			pings++
			answering.SendPong(p)
		}
	}
	if _, ok := recvMsg[KeepAlive](t, plain); !ok {
		t.Fatal("no keepalive for a client that cannot ack pings")
	}
	waitFor(t, func() bool { return s.Stats().Errors["session:idle_timeout"] == 1 })
	if s.IsClientConnected(silent.PublicKey()) {
		t.Error("silent client still connected")
	}
	if !s.IsClientConnected(answering.PublicKey()) || !s.IsClientConnected(plain.PublicKey()) {
		t.Error("live client disconnected")
	}
	waitFor(t, func() bool { st := s.Stats(); return st.PingsSent >= 20 && st.PongsReceived >= 20 })
}

func TestRateLimitDoesNotDelayPings(t *testing.T) {
	// 1 byte/s with the minimum burst (one maximal packet): after one
	// maximal packet the bucket is empty. A Ping waiting behind it would
	// wait 13 s; it is answered at once.
	s := NewServer(mustKey(t), WithRateLimit(1, 0))
	addr := tcpServer(t, s)
	a, b := tcpClient(t, addr), tcpClient(t, addr)
	a.limiter = nil // bypass the client's own copy of the limit to reach the server's
	a.Send(b.PublicKey(), make([]byte, MaxPacketSize))
	recvMsg[*ReceivedPacket](t, b)
	a.SendPing([8]byte{7})
	if p, ok := recvMsg[Pong](t, a); !ok || p != (Pong{7}) {
		t.Fatal("ping not answered while rate limited")
	}
	// A packet, by contrast, waits.
	a.Send(b.PublicKey(), []byte{1})
	waitFor(t, func() bool { return s.Stats().RateLimitWaits == 1 })
}

// TestRateLimitPacketsWithinAnnouncedBurst: clients (ours, and
// Tailscale's) count their SendPackets alone against the limit ServerInfo
// announces, header and payload. One that pings and notes its home region,
// and then sends a whole burst of packets, as its own bucket lets it, keeps
// within the limit and is not paced: what it does not count (Pings,
// NotePreferred, over WebSocket the framing) must not make its packets
// wait.
func TestRateLimitPacketsWithinAnnouncedBurst(t *testing.T) {
	for _, ws := range []bool{false, true} {
		t.Run(map[bool]string{false: "tcp", true: "websocket"}[ws], func(t *testing.T) {
			// 1 byte/s: a packet that waited would wait for minutes.
			s := newTestServer(t, WithRateLimit(1, 0))
			var a, b *Client
			if ws {
				srv := serveDERP(t, s, derpServeOpts{plain: true})
				a, b = wsTestClient(t, srv.Addr), wsTestClient(t, srv.Addr)
			} else {
				addr := tcpServer(t, s)
				a, b = tcpClient(t, addr), tcpClient(t, addr)
			}
			if a.limiter == nil {
				t.Fatal("no limit announced")
			}
			if err := a.NotePreferred(true); err != nil {
				t.Fatal(err)
			}
			for i := range 50 {
				if err := a.SendPing([8]byte{byte(i)}); err != nil {
					t.Fatal(err)
				}
				if _, ok := recvMsg[Pong](t, a); !ok {
					t.FailNow()
				}
			}
			// The client's bucket is full: one maximal packet is its burst.
			if err := a.Send(b.PublicKey(), make([]byte, MaxPacketSize)); err != nil {
				t.Fatal(err)
			}
			if _, ok := recvMsg[*ReceivedPacket](t, b); !ok {
				t.Fatalf("a packet within the announced burst was held up (%d rate-limit waits)", s.Stats().RateLimitWaits)
			}
			if n := s.Stats().RateLimitWaits; n != 0 {
				t.Fatalf("%d rate-limit waits for a client within its announced burst", n)
			}
		})
	}
}

// wsTestClient logs a client in over DERP over WebSocket to the plain HTTP
// server at addr.
func wsTestClient(t *testing.T, addr string) *Client {
	t.Helper()
	c, _ := wsTestClientConn(t, addr)
	return c
}

// wsTestClientConn is wsTestClient that also returns the connection below
// the WebSocket, for tests that write raw WebSocket frames.
func wsTestClientConn(t *testing.T, addr string) (*Client, net.Conn) {
	t.Helper()
	nc, br, resp := wsDial(t, addr, nil)
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake: %s", resp.Status)
	}
	nc.SetDeadline(time.Time{})
	c, err := NewClient(mustKey(t), newWSConn(nc, br, true), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, ok := recvMsg[ServerInfo](t, c); !ok {
		t.FailNow()
	}
	return c, nc
}

func TestPeerGoneNotHereForDisco(t *testing.T) {
	s := newTestServer(t)
	a := pipeClient(t, s)
	nobody := mustKey(t).Public()
	disco := append([]byte(discoMagic), make([]byte, 100)...)
	// Non-disco to an unknown key: dropped, no PeerGone.
	a.Send(nobody, []byte("not disco"))
	for range 5 {
		if err := a.Send(nobody, disco); err != nil {
			t.Fatal(err)
		}
	}
	a.SendPing([8]byte{1})
	var notHere int
	for {
		m, err := a.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if g, ok := m.(PeerGone); ok {
			if g.Peer != nobody || g.Reason != PeerGoneNotHere {
				t.Fatalf("got %+v", g)
			}
			notHere++
		}
		if _, ok := m.(Pong); ok && notHere >= 3 {
			break
		}
		if _, ok := m.(Pong); ok {
			a.SendPing([8]byte{2})
		}
	}
	if notHere != 3 {
		t.Errorf("%d NotHere, want 3 (rate limited)", notHere)
	}
	st := s.Stats()
	if st.PacketsDropped["unknown_dest/disco"] != 5 || st.PacketsDropped["unknown_dest/other"] != 1 {
		t.Errorf("drops %v", st.PacketsDropped)
	}
}

func TestNotePreferred(t *testing.T) {
	s := newTestServer(t)
	a := pipeClient(t, s)
	a.NotePreferred(true)
	a.SendPing([8]byte{}) // the server handles frames in order
	recvMsg[Pong](t, a)
	if n := s.Stats().CurrentHomeConnections; n != 1 {
		t.Fatalf("home connections %d", n)
	}
	a.Close()
	waitFor(t, func() bool { return s.Stats().CurrentHomeConnections == 0 })
}

func waitFor(t testing.TB, cond func() bool) {
	t.Helper()
	waitForWithin(t, 5*time.Second, cond)
}

// waitForWithin is waitFor with a hang guard of d.
func waitForWithin(t testing.TB, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not reached in %v", d)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestDuplicateKeysHealthBounded checks that a login or logout among many
// sessions of one key tells at most maxDupHealthFanout of them: each one
// told all of them, so n logins with one key (one client, one IP) cost the
// server n²/2 Health frames. The counts stay exact up to the bound.
func TestDuplicateKeysHealthBounded(t *testing.T) {
	s := newTestServer(t, WithKeepAlive(0))
	k := mustKey(t).Public()
	const n = 3 * maxDupHealthFanout
	var conns []*sconn
	told := func() (int, []string) {
		var msgs []string
		for _, c := range conns {
			c.mu.Lock()
			if c.health != nil {
				msgs = append(msgs, *c.health)
				c.health = nil
			}
			c.mu.Unlock()
		}
		return len(msgs), msgs
	}
	for i := range n {
		c := &sconn{s: s, key: k, writing: true} // no writer goroutine
		conns = append(conns, c)
		if !s.register(c) {
			t.Fatal("register refused")
		}
		got, msgs := told()
		want := min(i+1, maxDupHealthFanout)
		if i+1 > maxDupHealthFanout {
			want = 1 // the newcomer
		} else if i == 0 {
			want = 0
		}
		if got > maxDupHealthFanout || got != want {
			t.Fatalf("login %d of one key told %d sessions, want %d", i+1, got, want)
		}
		for _, m := range msgs {
			if !strings.Contains(m, fmt.Sprintf("(%d in all)", i+1)) {
				t.Fatalf("login %d: health %q", i+1, m)
			}
		}
	}
	if st := s.Stats(); st.CurrentDupKeys != 1 || st.CurrentDupConns != n {
		t.Fatalf("dup gauges %d keys, %d conns; want 1, %d", st.CurrentDupKeys, st.CurrentDupConns, n)
	}
	for i, c := range conns {
		if !c.dup.Load() {
			t.Fatalf("session %d not marked duplicate", i)
		}
	}
	for len(conns) > 1 {
		c := conns[len(conns)-1]
		conns = conns[:len(conns)-1]
		s.unregister(c)
		left := len(conns)
		got, msgs := told()
		want := left
		switch {
		case left > maxDupHealthFanout:
			want = 0
		case left == 1:
			want = 1 // cleared
		}
		if got != want {
			t.Fatalf("logout leaving %d told %d sessions, want %d", left, got, want)
		}
		for _, m := range msgs {
			if left > 1 && !strings.Contains(m, fmt.Sprintf("(%d in all)", left)) || left == 1 && m != "" {
				t.Fatalf("logout leaving %d: health %q", left, m)
			}
		}
	}
	if conns[0].dup.Load() {
		t.Fatal("the last session is still marked duplicate")
	}
	s.unregister(conns[0])
}

func TestDuplicateKeys(t *testing.T) {
	const mk = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	s := newTestServer(t, WithMeshKey(mk))
	w := pipeClient(t, s, MeshKey(mk))
	if err := w.WatchConnectionChanges(); err != nil {
		t.Fatal(err)
	}
	// The watch is in place once its first flood arrives, which holds the
	// watcher itself. Were the duplicates to log in before, the flood
	// would hold only the key's active session, the second.
	if p, _ := recvMsg[PeerPresent](t, w); p.Key != w.PublicKey() {
		t.Fatalf("first flood: %+v", p)
	}
	priv := mustKey(t)
	// present waits for the watcher to see priv's key at port.
	present := func(port uint16) {
		t.Helper()
		for {
			p, ok := recvMsg[PeerPresent](t, w)
			if !ok {
				t.Fatalf("watcher never saw the key at port %d", port)
			}
			if p.Key == priv.Public() {
				if p.Flags == 0 || p.Addr.Port() != port {
					t.Fatalf("watcher saw %+v, want the key present at port %d", p, port)
				}
				return
			}
		}
	}
	cc1, sc1 := net.Pipe()
	go s.Accept(context.Background(), sc1, nil, "127.0.0.1:1")
	d1 := loginClient(t, cc1, priv)
	cc2, sc2 := net.Pipe()
	go s.Accept(context.Background(), sc2, nil, "127.0.0.1:2")
	d2 := loginClient(t, cc2, priv)
	sender := pipeClient(t, s)

	for _, d := range []*Client{d1, d2} {
		h, _ := recvMsg[Health](t, d)
		if !strings.Contains(h.Problem, "another connection") {
			t.Fatalf("health %q", h.Problem)
		}
	}
	if st := s.Stats(); st.CurrentDupKeys != 1 || st.CurrentDupConns != 2 || st.TotalDupLogins != 1 {
		t.Errorf("dup stats %+v", st)
	}
	present(1)
	present(2)

	// quiet checks that watchers were told nothing about priv's key: the
	// next update they get is a marker key's login.
	quiet := func() {
		t.Helper()
		m := pipeClient(t, s)
		for {
			p, ok := recvMsg[PeerPresent](t, w)
			if !ok {
				t.Fatal("watcher never saw the marker key")
			}
			if p.Key == priv.Public() {
				t.Fatalf("watcher told %+v about the key, which never left", p)
			}
			if p.Key == m.PublicKey() {
				return
			}
		}
	}
	// A third connection: all three are told there are 3. It is the
	// active one when it leaves: the two left are told there are 2, and
	// watchers are told nothing, as the key is still here (announcing the
	// session left would make this server the newest route to the key at
	// mesh peers, which may have a newer connection of the client).
	cc3, sc3 := net.Pipe()
	go s.Accept(context.Background(), sc3, nil, "127.0.0.1:3")
	d3 := loginClient(t, cc3, priv)
	for _, d := range []*Client{d1, d2, d3} {
		if h, _ := recvMsg[Health](t, d); !strings.Contains(h.Problem, "(3 in all)") {
			t.Fatalf("health with 3 connections %q", h.Problem)
		}
	}
	present(3)
	d3.Close()
	for _, d := range []*Client{d1, d2} {
		if h, _ := recvMsg[Health](t, d); !strings.Contains(h.Problem, "(2 in all)") {
			t.Fatalf("health with 2 connections left %q", h.Problem)
		}
	}
	quiet()
	if st := s.Stats(); st.CurrentDupKeys != 1 || st.CurrentDupConns != 2 || st.TotalDupLogins != 2 {
		t.Errorf("dup stats after the third left %+v", st)
	}

	// The newest is active.
	sender.Send(priv.Public(), []byte("to d2"))
	if p, _ := recvMsg[*ReceivedPacket](t, d2); string(p.Data) != "to d2" {
		t.Fatalf("d2 got %q", p.Data)
	}
	// d1 speaks: it becomes active (last writer).
	d1.SendPing([8]byte{})
	recvMsg[Pong](t, d1)
	sender.Send(priv.Public(), []byte("to d1"))
	if p, _ := recvMsg[*ReceivedPacket](t, d1); string(p.Data) != "to d1" {
		t.Fatalf("d1 got %q", p.Data)
	}
	// d1 leaves: d2 is alone again, is told the problem is over, and receives.
	d1.Close()
	h, _ := recvMsg[Health](t, d2)
	if h.Problem != "" {
		t.Fatalf("health after dup ended %q", h.Problem)
	}
	quiet() // d1 was active; d2 is still here
	sender.Send(priv.Public(), []byte("again"))
	if p, _ := recvMsg[*ReceivedPacket](t, d2); string(p.Data) != "again" {
		t.Fatalf("d2 got %q", p.Data)
	}
	if st := s.Stats(); st.CurrentDupKeys != 0 || st.CurrentDupConns != 0 {
		t.Errorf("dup stats after %+v", st)
	}
}

func TestServerCloseSendsRestarting(t *testing.T) {
	s := NewServer(mustKey(t), WithRestartNotice(3*time.Second, 20*time.Second))
	addr := tcpServer(t, s)
	a, b := tcpClient(t, addr), tcpClient(t, addr)
	s.Close()
	for _, c := range []*Client{a, b} {
		msgs, err := recvUntilErr(t, c)
		var r *ServerRestarting
		for _, m := range msgs {
			if v, ok := m.(ServerRestarting); ok {
				r = &v
			}
		}
		if r == nil {
			t.Fatalf("no ServerRestarting before %v; got %v", err, msgs)
		}
		if r.ReconnectIn < 0 || r.ReconnectIn >= 3*time.Second || r.TryFor != 20*time.Second {
			t.Errorf("restarting %+v", r)
		}
		if !errors.Is(err, io.EOF) {
			t.Errorf("after restart: %v, want EOF", err)
		}
	}
	// Accept after Close closes at once.
	cc, sc := net.Pipe()
	done := make(chan struct{})
	go func() { s.Accept(context.Background(), sc, nil, ""); close(done) }()
	<-done
	if _, err := cc.Read(make([]byte, 1)); err == nil {
		t.Error("connection accepted after Close")
	}
}

func TestKeepAlive(t *testing.T) {
	s := newTestServer(t, WithKeepAlive(time.Millisecond))
	a := pipeClient(t, s)
	if _, ok := recvMsg[KeepAlive](t, a); !ok {
		t.Fatal("no keepalive")
	}
}

// TestKeepAliveHuge: a keepalive interval too long to ever matter
// (math.MaxInt64, as a caller might pass for "never") must not overflow
// with the jitter into a negative period, which fires the keepalive timer
// at once and forever.
func TestKeepAliveHuge(t *testing.T) {
	s := newTestServer(t, WithKeepAlive(math.MaxInt64))
	a := pipeClient(t, s, RecvTimeout(300*time.Millisecond))
	if m, err := a.Recv(); err == nil {
		t.Fatalf("got %T, want nothing before the receive timeout", m)
	}
}

func TestQueueDropsOldest(t *testing.T) {
	s := newTestServer(t, WithQueueDepth(4), WithWriteTimeout(0))
	// A receiver that does not read: its writer blocks in the pipe.
	cc, sc := net.Pipe()
	go s.Accept(context.Background(), sc, nil, "127.0.0.1:9")
	stuck := loginClient(t, cc, mustKey(t))
	sender := pipeClient(t, s)
	for i := range 50 {
		if err := sender.Send(stuck.PublicKey(), []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	sender.SendPing([8]byte{})
	recvMsg[Pong](t, sender) // the sender was never blocked
	waitFor(t, func() bool { return s.Stats().PacketsDropped["queue_head/other"] > 0 })
	// Every drop is the stuck receiver's, and Sessions says so.
	for si := range s.Sessions() {
		want := int64(0)
		if si.Key == stuck.PublicKey() {
			want = s.Stats().PacketsDropped["queue_head/other"]
		}
		if si.PacketsDropped != want {
			t.Errorf("session %s: %d packets dropped, want %d", si.Key.ShortString(), si.PacketsDropped, want)
		}
	}
	// When the receiver reads, the newest packets are there.
	if last := lastPacketByte(stuck, 49, 300*time.Millisecond); last != 49 {
		t.Errorf("last packet delivered %d, want 49", last)
	}
}

// TestFloodDoesNotDelayControlFrames floods a receiver that is not reading,
// then has it ping: the Pong comes after at most the batch already being
// written, ahead of the full queue of packets behind it.
func TestFloodDoesNotDelayControlFrames(t *testing.T) {
	s := newTestServer(t, WithWriteTimeout(0))
	flooded := pipeClient(t, s) // over net.Pipe: its writer blocks until it reads
	sender := pipeClient(t, s)
	for i := range 200 {
		if err := sender.Send(flooded.PublicKey(), []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	// The sender's Pong says its packets are all queued (or dropped).
	sender.SendPing([8]byte{1})
	recvMsg[Pong](t, sender)
	if err := flooded.SendPing([8]byte{2}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return s.Stats().PingsReceived >= 2 })
	for n := 1; ; n++ {
		m, err := flooded.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if p, ok := m.(Pong); ok {
			if p != [8]byte{2} {
				t.Fatalf("pong %x", p)
			}
			// The batch being written when the flood began holds at
			// most the queue's 32 packets; the full queue of 32
			// behind it would put the Pong at 34 or later (writing
			// control frames last put it at 34 or 65 in checks).
			if n > 33 {
				t.Fatalf("Pong was message %d, behind the queued packets", n)
			}
			return
		}
	}
}

// A burst much larger than a queue, read in one go, reaches a receiver that
// keeps reading: the reader lets the queue's writer run when the queue
// fills instead of dropping, even on one CPU.
func TestBurstLargerThanQueue(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	s := NewServer(mustKey(t), WithQueueDepth(8))
	addr := tcpServer(t, s)
	recv := tcpClient(t, addr)
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	sender := loginClient(t, nc, mustKey(t))
	const burst = 200
	var frames []byte
	rk := recv.PublicKey()
	for i := range burst {
		frames = appendFrame(frames, FrameSendPacket, append(rk[:len(rk):len(rk)], byte(i), 1, 2, 3))
	}
	if _, err := nc.Write(frames); err != nil { // one write: the server reads it at once
		t.Fatal(err)
	}
	for i := range burst {
		got, ok := recvMsg[*ReceivedPacket](t, recv)
		if !ok {
			t.FailNow()
		}
		if got.Source != sender.PublicKey() || got.Data[0] != byte(i) {
			t.Fatalf("packet %d: got #%d; dropped: %v", i, got.Data[0], s.Stats().PacketsDropped)
		}
	}
}

func TestWriteTimeoutDropsStalledReader(t *testing.T) {
	// Long enough that a healthy session's writer, off the CPU for a
	// while on a loaded machine, does not time out instead.
	s := NewServer(mustKey(t), WithWriteTimeout(500*time.Millisecond))
	addr := tcpServer(t, s)
	stalled := tcpClient(t, addr)
	sender := tcpClient(t, addr)
	big := make([]byte, 60000)
	// Fill the socket buffers; the server's write deadline fires.
	deadline := time.Now().Add(10 * time.Second)
	for s.Stats().WriteTimeouts == 0 {
		if time.Now().After(deadline) {
			t.Fatal("stalled reader never timed out")
		}
		sender.Send(stalled.PublicKey(), big)
		time.Sleep(time.Millisecond)
	}
	waitFor(t, func() bool { return !s.IsClientConnected(stalled.PublicKey()) })
	// Others are fine.
	other := tcpClient(t, addr)
	sender.Send(other.PublicKey(), []byte("ok"))
	if p, _ := recvMsg[*ReceivedPacket](t, other); string(p.Data) != "ok" {
		t.Fatal("relay broken after eviction")
	}
}

func TestRateLimitAnnounced(t *testing.T) {
	s := newTestServer(t, WithRateLimit(100000, 0))
	c := pipeClientRaw(t, s)
	info, _ := recvMsg[ServerInfo](t, c)
	if info.TokenBucketBytesPerSecond != 100000 || info.TokenBucketBytesBurst != minRateBurst {
		t.Fatalf("info %+v", info)
	}
	// The client limits itself: a burst of more than the bucket is refused
	// locally with ErrRateLimited.
	var limited bool
	for range 10 {
		if err := c.Send(c.PublicKey(), make([]byte, 20000)); errors.Is(err, ErrRateLimited) {
			limited = true
			break
		}
	}
	if !limited {
		t.Fatal("client never rate limited itself")
	}
}

func TestLoginFailures(t *testing.T) {
	tests := []struct {
		name   string
		client func(t *testing.T, s *Server, nc net.Conn) error
		reason string
	}{
		{"wrong server key", func(t *testing.T, s *Server, nc net.Conn) error {
			go io.Copy(io.Discard, nc) // net.Pipe has no buffer: take the ServerKey frame
			_, err := NewClient(mustKey(t), nc, nil, ServerPublicKey(mustKey(t).Public()))
			return err
		}, "login:bad_client_info_box"},
		{"bad box", func(t *testing.T, s *Server, nc net.Conn) error {
			return rawClientInfo(t, nc, func(p []byte) []byte { p[len(p)-1] ^= 1; return p })
		}, "login:bad_client_info_box"},
		{"zero key", func(t *testing.T, s *Server, nc net.Conn) error {
			return rawClientInfo(t, nc, func(p []byte) []byte { clear(p[:32]); return p })
		}, "login:bad_client_key"},
		{"oversize info", func(t *testing.T, s *Server, nc net.Conn) error {
			return rawClientInfo(t, nc, func(p []byte) []byte { return append(p, make([]byte, 300<<10)...) })
		}, "login:bad_client_info_length"},
		{"not client info", func(t *testing.T, s *Server, nc net.Conn) error {
			br := bufio.NewReader(nc)
			readFrameHeader(br)
			br.Discard(serverKeyLen)
			bw := bufio.NewWriter(nc)
			writeFrame(bw, FrameSendPacket, make([]byte, 40))
			return bw.Flush()
		}, "login:unexpected_frame"},
		{"bad json", func(t *testing.T, s *Server, nc net.Conn) error {
			return rawClientInfoJSON(t, nc, []byte(`{"meshKey":""}`))
		}, "login:bad_client_info_json"},
		{"app name not printable", func(t *testing.T, s *Server, nc net.Conn) error {
			return rawClientInfoJSON(t, nc, []byte(`{"version":2,"AppName":"tab\there"}`))
		}, "login:bad_app_name"},
		{"app name too long", func(t *testing.T, s *Server, nc net.Conn) error {
			return rawClientInfoJSON(t, nc, []byte(`{"version":2,"AppName":"`+strings.Repeat("a", MaxAppNameLen+1)+`"}`))
		}, "login:bad_app_name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestServer(t)
			cc, sc := net.Pipe()
			done := make(chan struct{})
			go func() { s.Accept(context.Background(), sc, nil, "127.0.0.1:1"); close(done) }()
			go func() {
				tt.client(t, s, cc)
				io.Copy(io.Discard, cc)
			}()
			<-done
			cc.Close()
			if got := s.Stats().Errors[tt.reason]; got != 1 {
				t.Fatalf("Errors = %v, want %s", s.Stats().Errors, tt.reason)
			}
		})
	}
}

// rawClientInfo reads the ServerKey frame from nc and writes a ClientInfo
// frame whose payload is passed through mutate.
func rawClientInfo(t *testing.T, nc net.Conn, mutate func([]byte) []byte) error {
	return rawClientInfoWith(t, nc, []byte(`{"version":2}`), mutate)
}

func rawClientInfoJSON(t *testing.T, nc net.Conn, js []byte) error {
	return rawClientInfoWith(t, nc, js, func(p []byte) []byte { return p })
}

func rawClientInfoWith(t *testing.T, nc net.Conn, js []byte, mutate func([]byte) []byte) error {
	br := bufio.NewReader(nc)
	_, n, err := readFrameHeader(br)
	if err != nil {
		return err
	}
	p := make([]byte, n)
	io.ReadFull(br, p)
	sk, err := parseServerKey(p)
	if err != nil {
		return err
	}
	priv := mustKey(t)
	pub := priv.Public()
	shared, _ := sharedKey(priv, sk)
	payload := sealBox(append([]byte{}, pub[:]...), shared, js)
	bw := bufio.NewWriter(nc)
	writeFrame(bw, FrameClientInfo, mutate(payload))
	return bw.Flush()
}

func TestClientRejectsBadServerKeyFrame(t *testing.T) {
	for _, tt := range []struct {
		name  string
		frame []byte
		want  string
	}{
		{"wrong magic", appendFrame(nil, FrameServerKey, append([]byte("DERPXXXX"), make([]byte, 32)...)), "bad_magic"},
		{"short", appendFrame(nil, FrameServerKey, []byte(magic)), "short_server_key"},
		{"wrong type", appendFrame(nil, FrameServerInfo, make([]byte, 40)), "unexpected_frame"},
		{"too long", appendFrame(nil, FrameServerKey, make([]byte, 2000)), "frame_too_large"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cc, sc := net.Pipe()
			defer cc.Close()
			go func() { sc.Write(tt.frame); sc.Close() }()
			_, err := NewClient(mustKey(t), cc, nil)
			if got := ProtocolErrorReason(err); got != tt.want {
				t.Fatalf("err %v, reason %q want %q", err, got, tt.want)
			}
		})
	}
}

func TestReplayedClientInfoRefused(t *testing.T) {
	s := newTestServer(t)
	// Record a real client's ClientInfo frame.
	cc, sc := net.Pipe()
	rec := &recordingConn{Conn: cc}
	go s.Accept(context.Background(), sc, nil, "127.0.0.1:1")
	victim := loginClient(t, rec, mustKey(t))
	captured := rec.written()
	// Replay it on a second connection.
	cc2, sc2 := net.Pipe()
	done := make(chan struct{})
	go func() { s.Accept(context.Background(), sc2, nil, "127.0.0.1:2"); close(done) }()
	go func() {
		br := bufio.NewReader(cc2)
		readFrameHeader(br)
		br.Discard(serverKeyLen)
		cc2.Write(captured)
		io.Copy(io.Discard, br)
	}()
	<-done
	cc2.Close()
	if got := s.Stats().Errors["login:replayed_client_info"]; got != 1 {
		t.Fatalf("errors %v", s.Stats().Errors)
	}
	if !s.IsClientConnected(victim.PublicKey()) {
		t.Fatal("victim disconnected")
	}
}

type recordingConn struct {
	net.Conn
	mu  sync.Mutex
	buf bytes.Buffer
}

func (r *recordingConn) Write(p []byte) (int, error) {
	r.mu.Lock()
	r.buf.Write(p)
	r.mu.Unlock()
	return r.Conn.Write(p)
}

func (r *recordingConn) written() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Clone(r.buf.Bytes())
}

func TestAdmission(t *testing.T) {
	allowed := mustKey(t)
	s := newTestServer(t, WithAdmission(func(ctx context.Context, a Admission) error {
		if a.Key != allowed.Public() {
			return errors.New("not on the list")
		}
		if _, ok := ctx.Deadline(); !ok {
			return errors.New("no deadline")
		}
		return nil
	}))
	pipeLogin(t, s, allowed)

	wantLoginRefused(t, s, 1)
}

// wantLoginRefused logs a client with a new key in to s and checks that the
// server refuses it, as its n-th rejected login.
func wantLoginRefused(t *testing.T, s *Server, n int64) {
	t.Helper()
	cc, sc := net.Pipe()
	go s.Accept(context.Background(), sc, nil, "127.0.0.1:2")
	c, err := NewClient(mustKey(t), cc, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = recvUntilErr(t, c)
	if err == nil || !strings.Contains(err.Error(), "before ServerInfo") {
		t.Fatalf("refused client got %v", err)
	}
	waitFor(t, func() bool { return s.Stats().Errors["login:login_rejected"] == n })
}

func TestNonMeshCannotSendPrivilegedFrames(t *testing.T) {
	for _, tt := range []struct {
		name string
		do   func(c *Client) error
		want string
	}{
		{"WatchConns", func(c *Client) error { return c.WatchConnectionChanges() }, "session:watch_not_mesh"},
		{"ClosePeer", func(c *Client) error { return c.ClosePeer(c.PublicKey()) }, "session:close_peer_not_mesh"},
		{"ForwardPacket", func(c *Client) error { return c.ForwardPacket(c.PublicKey(), c.PublicKey(), []byte("x")) }, "session:forward_not_mesh"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestServer(t)
			c := pipeClient(t, s)
			tt.do(c)
			if _, err := recvUntilErr(t, c); err == nil {
				t.Fatal("not disconnected")
			}
			waitFor(t, func() bool { return s.Stats().Errors[tt.want] == 1 })
		})
	}
}

func TestMeshWatchAndClosePeer(t *testing.T) {
	const mk = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	s := newTestServer(t, WithMeshKey(mk))
	a := pipeClient(t, s)
	w := pipeClient(t, s, MeshKey(mk))
	if err := w.WatchConnectionChanges(); err != nil {
		t.Fatal(err)
	}
	seen := map[PublicKey]PeerPresentFlags{}
	for len(seen) < 2 {
		p, ok := recvMsg[PeerPresent](t, w)
		if !ok {
			t.FailNow()
		}
		seen[p.Key] = p.Flags
		if p.Addr.Addr().String() != "127.0.0.1" || p.Addr.Port() != 1234 {
			t.Errorf("addr %v", p.Addr)
		}
	}
	if seen[a.PublicKey()] != PeerIsRegular || seen[w.PublicKey()] != PeerIsMeshPeer {
		t.Fatalf("flags %v", seen)
	}
	b := pipeClient(t, s, IsProber(true), AppName("probe/1.0 (x)"))
	p, _ := recvMsg[PeerPresent](t, w)
	if p.Key != b.PublicKey() || p.Flags != PeerIsProber || p.AppName != "probe/1.0 (x)" {
		t.Fatalf("live present %+v", p)
	}
	// Forwarded packets reach the local client with the original source.
	src := mustKey(t).Public()
	w.ForwardPacket(src, a.PublicKey(), []byte("fwd"))
	got, _ := recvMsg[*ReceivedPacket](t, a)
	if got.Source != src || string(got.Data) != "fwd" {
		t.Fatalf("forwarded %+v", got)
	}
	w.ClosePeer(b.PublicKey())
	g, _ := recvMsg[PeerGone](t, w)
	if g.Peer != b.PublicKey() {
		t.Fatalf("gone %+v", g)
	}
	if _, err := recvUntilErr(t, b); err == nil {
		t.Fatal("b not closed")
	}
}

// TestTCPUserTimeout checks that sessions on TCP get TCP_USER_TIMEOUT: 15 s
// by default, the option's value, or the kernel's default (0) when it is
// zero; through TLS too.
func TestTCPUserTimeout(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("TCP_USER_TIMEOUT is Linux's")
	}
	for _, tc := range []struct {
		name string
		opts []ServerOption
		tls  bool
		want time.Duration
	}{
		{"default", nil, false, 15 * time.Second},
		{"set", []ServerOption{WithTCPUserTimeout(1234 * time.Millisecond)}, false, 1234 * time.Millisecond},
		{"tls", []ServerOption{WithTCPUserTimeout(2 * time.Second)}, true, 2 * time.Second},
		{"off", []ServerOption{WithTCPUserTimeout(0)}, false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestServer(t, tc.opts...)
			cc, sc := tcpPair(t)
			tcp := sc.(*net.TCPConn)
			var nc, sn net.Conn = cc, sc
			if tc.tls {
				cert, _ := testCert(t, "derp.test")
				sn = tls.Server(sc, &tls.Config{Certificates: []tls.Certificate{cert}})
				nc = tls.Client(cc, &tls.Config{InsecureSkipVerify: true})
			}
			go s.Accept(context.Background(), sn, nil, sc.RemoteAddr().String())
			c := loginClient(t, nc, mustKey(t))
			defer c.Close()
			got, err := tcpUserTimeoutOf(tcp)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("TCP_USER_TIMEOUT %v, want %v", got, tc.want)
			}
		})
	}
}

func TestWritePrometheus(t *testing.T) {
	s := newTestServer(t)
	a := pipeClient(t, s)
	a.Send(mustKey(t).Public(), []byte("x")) // unknown_dest/other
	a.SendPing([8]byte{})
	recvMsg[Pong](t, a)
	var buf bytes.Buffer
	if err := s.WritePrometheus(&buf); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, want := range []string{
		"# TYPE derp_current_connections gauge\nderp_current_connections 1\n",
		"derp_packets_dropped{reason=\"unknown_dest\",kind=\"other\"} 1\n",
		"derp_packets_dropped{reason=\"queue_head\",kind=\"disco\"} 0\n",
		"derp_got_ping 1\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in:\n%s", want, out)
		}
	}
	if strings.Contains(out, "rtt") { // a pipe has no TCP RTT
		t.Errorf("RTT histogram of sessions over pipes:\n%s", out)
	}

	// Every number in Stats is exported: one unlabelled metric per int64
	// field.
	var fields []string
	st := reflect.TypeOf(Stats{})
	for i := range st.NumField() {
		if st.Field(i).Type.Kind() == reflect.Int64 {
			fields = append(fields, st.Field(i).Name)
		}
	}
	var scalars []string
	for line := range strings.Lines(out) {
		name, _, ok := strings.Cut(strings.TrimSpace(line), " ")
		histogram := strings.HasSuffix(name, "_sum") || strings.HasSuffix(name, "_count")
		if ok && strings.HasPrefix(name, "derp_") && !strings.Contains(name, "{") && !histogram {
			scalars = append(scalars, name)
		}
	}
	if len(scalars) != len(fields) {
		t.Errorf("%d unlabelled metrics for %d int64 fields of Stats\nmetrics: %q\nfields: %q", len(scalars), len(fields), scalars, fields)
	}
}

func TestConnReader(t *testing.T) {
	t.Run("pipe", func(t *testing.T) {
		cc, sc := net.Pipe()
		testConnReader(t, cc, sc, false)
	})
	t.Run("tcp-raw", func(t *testing.T) {
		cc, sc := tcpPair(t)
		if rawReader(sc) == nil {
			t.Skip("no raw reads on " + runtime.GOOS)
		}
		testConnReader(t, cc, sc, true)
	})
}

// testConnReader reads a stream that cc writes in odd-sized pieces through
// a connReader on sc, mixing every way of reading, and checks every byte.
func testConnReader(t *testing.T, cc, sc net.Conn, raw bool) {
	data := make([]byte, 3*readBufSize+17)
	for i := range data {
		data[i] = byte(i * 7)
	}
	go func() {
		// Dribble the data in odd-sized writes, then close.
		for rest := data; len(rest) > 0; {
			n := min(len(rest), 1+len(rest)%1000)
			cc.Write(rest[:n])
			rest = rest[n:]
		}
		cc.Close()
	}()
	br := bufio.NewReader(sc)
	br.Peek(1) // the caller's reader already holds bytes
	cr := newConnReader(sc, br)
	if raw {
		cr.raw = rawReader(sc)
		cr.rawFn = cr.rawRead
	}
	var got []byte
	if p, err := cr.Peek(0); p != nil || err != nil {
		t.Fatalf("Peek(0) = %v, %v", p, err)
	}
	for step := 0; ; step++ {
		var err error
		switch step % 4 {
		case 0:
			var p []byte
			if p, err = cr.Peek(5); err == nil {
				got = append(got, p...)
				cr.Discard(5)
			}
		case 1:
			var b byte
			if b, err = cr.ReadByte(); err == nil {
				got = append(got, b)
			}
		case 2:
			buf := make([]byte, 1+step%3000)
			var n int
			n, err = io.ReadFull(cr, buf)
			got = append(got, buf[:n]...)
		case 3:
			// (A raw reader keeps its buffer until a read finds the
			// socket empty; TestConnReaderRawBatchesReads checks that.)
			if cr.Buffered() == 0 && cr.buf != nil && !cr.hot && !raw {
				t.Fatal("empty reader holds a buffer though the socket looked drained")
			}
			var p []byte
			if p, err = cr.Peek(40); err == nil {
				got = append(got, p...)
				cr.Discard(40)
			}
		}
		if err != nil {
			if len(got) < len(data) {
				// The tail shorter than the request: read what is left.
				rest, _ := io.ReadAll(cr)
				got = append(got, rest...)
			}
			break
		}
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("read %d bytes, mismatch (want %d)", len(got), len(data))
	}
	if cr.buf != nil {
		t.Fatal("drained reader holds a buffer")
	}
}

// A client that keeps the socket full is read 64 KiB at a time, whatever
// the packet size: not one system call for each header and payload.
func TestConnReaderBatchesReads(t *testing.T) {
	for _, size := range []int{100, 1200, 5000, 10000} {
		var stream []byte
		const frames = 100
		for i := range frames {
			pkt := bytes.Repeat([]byte{byte(i)}, size)
			stream = appendFrame(stream, FrameSendPacket, append(make([]byte, KeyLen), pkt...))
		}
		cn := &countingConn{r: bytes.NewReader(stream)}
		cr := newConnReader(cn, nil)
		payload := make([]byte, size)
		for i := range frames {
			typ, n, err := readFrameHeader(cr)
			if err != nil || typ != FrameSendPacket || int(n) != KeyLen+size {
				t.Fatalf("%d B, frame %d: %v %v %v", size, i, typ, n, err)
			}
			if _, err := cr.Discard(KeyLen); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(cr, payload); err != nil || payload[0] != byte(i) || payload[size-1] != byte(i) {
				t.Fatalf("%d B, frame %d: payload %v", size, i, err)
			}
		}
		// A little slack over the ideal for the first small read and
		// for payloads read around the buffer's end.
		if ideal := len(stream)/bigReadBufSize + 1; cn.reads > 2*ideal+2 {
			t.Errorf("%d B packets: %d reads for %d bytes, want about %d", size, cn.reads, len(stream), ideal)
		}
	}
}

// The same over TCP with raw reads (Linux): the stream sits in the socket
// before the reader starts, and each system call takes up to 64 KiB of it.
func TestConnReaderRawBatchesReads(t *testing.T) {
	cc, sc := tcpPair(t)
	raw := rawReader(sc)
	if raw == nil {
		t.Skip("no raw reads on " + runtime.GOOS)
	}
	const frames, size = 60, 1200
	var stream []byte
	for i := range frames {
		stream = appendFrame(stream, FrameSendPacket, append(make([]byte, KeyLen), bytes.Repeat([]byte{byte(i)}, size)...))
	}
	if _, err := cc.Write(stream); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // let loopback deliver it all
	cr := newConnReader(sc, nil)
	var calls, waits int
	cr.raw = raw
	cr.rawFn = func(fd uintptr) bool {
		calls++
		ok := cr.rawRead(fd)
		if !ok {
			waits++
			if cr.buf != nil {
				t.Error("a raw read waiting for the socket holds a buffer")
			}
		}
		return ok
	}
	payload := make([]byte, size)
	for i := range frames {
		if _, n, err := readFrameHeader(cr); err != nil || int(n) != KeyLen+size {
			t.Fatalf("frame %d: %v %v", i, n, err)
		}
		cr.Discard(KeyLen)
		if _, err := io.ReadFull(cr, payload); err != nil || payload[0] != byte(i) {
			t.Fatalf("frame %d: %v", i, err)
		}
	}
	if ideal := len(stream)/bigReadBufSize + 1; calls-waits > ideal+1 {
		t.Errorf("%d reads for %d bytes, want about %d", calls-waits, len(stream), ideal)
	}
	// Nothing more is coming: the next read waits, without a buffer,
	// until the peer closes.
	time.AfterFunc(20*time.Millisecond, func() { cc.Close() })
	if _, err := cr.ReadByte(); err != io.EOF {
		t.Fatalf("after the peer closed: %v, want EOF", err)
	}
	if waits == 0 {
		t.Error("the last read did not wait for the socket")
	}
	if cr.buf != nil {
		t.Error("reader at EOF holds a buffer")
	}
}

// countingConn is a net.Conn reading from r that counts Read calls.
type countingConn struct {
	net.Conn
	r     io.Reader
	reads int
}

func (c *countingConn) Read(p []byte) (int, error) {
	c.reads++
	return c.r.Read(p)
}

func TestAdmissionURL(t *testing.T) {
	allowed := mustKey(t).Public()
	var mu sync.Mutex
	var sources []string
	svc := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req struct{ NodePublic, Source string }
		json.NewDecoder(r.Body).Decode(&req)
		mu.Lock()
		sources = append(sources, req.Source)
		mu.Unlock()
		switch req.NodePublic {
		case "nodekey:" + allowed.String():
			fmt.Fprint(w, `{"Allow":true}`)
		default:
			fmt.Fprint(w, `{"Allow":false}`)
		}
	}))
	defer svc.Close()
	ctx := context.Background()
	hook := AdmissionURL(svc.URL, false, nil)
	if err := hook(ctx, Admission{Key: allowed, RemoteAddr: "[::ffff:192.0.2.7]:1234"}); err != nil {
		t.Fatalf("allowed key refused: %v", err)
	}
	if err := hook(ctx, Admission{Key: mustKey(t).Public(), RemoteAddr: "192.0.2.8:1"}); err == nil {
		t.Fatal("denied key admitted")
	}
	mu.Lock()
	if sources[0] != "192.0.2.7" || sources[1] != "192.0.2.8" {
		t.Errorf("sources %q", sources)
	}
	mu.Unlock()

	bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "nope", http.StatusInternalServerError)
	}))
	defer bad.Close()
	if err := AdmissionURL(bad.URL, true, nil)(ctx, Admission{Key: allowed}); err == nil {
		t.Fatal("non-200 admitted (fail-open applies only to unreachable services)")
	}
	bad.Close()
	if err := AdmissionURL(bad.URL, true, nil)(ctx, Admission{Key: allowed}); err != nil {
		t.Fatalf("fail-open refused: %v", err)
	}
	if err := AdmissionURL(bad.URL, false, nil)(ctx, Admission{Key: allowed}); err == nil {
		t.Fatal("fail-closed admitted")
	}

	// End to end through a server.
	wantLoginRefused(t, newTestServer(t, WithAdmission(AdmissionURL(svc.URL, false, nil))), 1)
}

// TestAdmissionServiceCache checks CacheFor: verdicts to admit and to
// refuse are remembered per key and address until they expire; concurrent
// logins of one key share one request; what the service did not decide
// (an error status) is asked again.
func TestAdmissionServiceCache(t *testing.T) {
	allowed, denied := mustKey(t).Public(), mustKey(t).Public()
	var requests atomic.Int64
	var failing atomic.Bool
	release := make(chan struct{})
	var slow atomic.Bool
	svc := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		if slow.Load() {
			<-release
		}
		if failing.Load() {
			http.Error(w, "overloaded", http.StatusServiceUnavailable)
			return
		}
		var req struct{ NodePublic string }
		json.NewDecoder(r.Body).Decode(&req)
		fmt.Fprintf(w, `{"Allow":%v}`, req.NodePublic == "nodekey:"+allowed.String())
	}))
	defer svc.Close()
	unblock := sync.OnceFunc(func() { close(release) })
	defer unblock() // before svc.Close, which waits for handlers
	as := &AdmissionService{URL: svc.URL, Client: svc.Client(), CacheFor: 200 * time.Millisecond}
	ctx := context.Background()
	admit := func(k PublicKey, addr string) error { return as.Admit(ctx, Admission{Key: k, RemoteAddr: addr}) }
	want := func(n int64) {
		t.Helper()
		if got := requests.Load(); got != n {
			t.Errorf("%d requests, want %d", got, n)
		}
	}

	for range 3 {
		if err := admit(allowed, "192.0.2.1:1"); err != nil {
			t.Fatalf("allowed key: %v", err)
		}
		if err := admit(denied, "192.0.2.1:2"); err == nil {
			t.Fatal("denied key admitted")
		}
	}
	want(2) // one request per key; the port does not matter
	if err := admit(allowed, "192.0.2.9:1"); err != nil {
		t.Fatal(err)
	}
	want(3) // another address is asked about

	// Expired verdicts are asked again; an error status is not remembered
	// (and not forgiven: the service is reachable).
	time.Sleep(250 * time.Millisecond)
	failing.Store(true)
	for range 2 {
		if err := admit(allowed, "192.0.2.1:1"); err == nil || !strings.Contains(err.Error(), "503") {
			t.Fatalf("while failing: %v", err)
		}
	}
	want(5)
	failing.Store(false)

	// Concurrent logins of one key wait for one request.
	time.Sleep(250 * time.Millisecond)
	slow.Store(true)
	errs := make(chan error, 10)
	for range 10 {
		go func() { errs <- admit(allowed, "192.0.2.1:1") }()
	}
	waitFor(t, func() bool { return requests.Load() == 6 })
	time.Sleep(20 * time.Millisecond) // let the others find it in flight
	unblock()
	for range 10 {
		if err := <-errs; err != nil {
			t.Errorf("concurrent login: %v", err)
		}
	}
	want(6)
}

// A flood of logins with new keys fills the cache of verdicts; it must not
// keep every later verdict out of it (each login of a flapping client would
// then ask the service again) while costing a walk over the whole cache per
// login.
func TestAdmissionServiceCacheFull(t *testing.T) {
	var requests atomic.Int64
	svc := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		fmt.Fprint(w, `{"Allow":true}`)
	}))
	defer svc.Close()
	as := &AdmissionService{URL: svc.URL, Client: svc.Client(), CacheFor: time.Hour}
	as.mu.Lock()
	for i := range maxAdmissionVerdicts {
		var k PublicKey
		binary.BigEndian.PutUint32(k[:], uint32(i))
		as.rememberLocked(admissionKey{k, "192.0.2.1"}, false) // the flood's
	}
	as.mu.Unlock()
	flapping := mustKey(t).Public()
	for range 3 {
		if err := as.Admit(context.Background(), Admission{Key: flapping, RemoteAddr: "192.0.2.7:1"}); err != nil {
			t.Fatal(err)
		}
	}
	if got := requests.Load(); got != 1 {
		t.Errorf("the service was asked %d times for one key, want 1", got)
	}
	if n := len(as.verdicts); n > maxAdmissionVerdicts {
		t.Errorf("%d verdicts kept, want at most %d", n, maxAdmissionVerdicts)
	}
}

// TestAdmissionURLBounded checks that each AdmissionURL hook has at most
// maxAdmissionRequests requests in flight, that the rest wait for a slot
// and then get their answers, and that a login whose deadline passes while
// it waits is refused (fail-closed) or admitted (fail-open).
func TestAdmissionURLBounded(t *testing.T) {
	release := make(chan struct{})
	var inFlight, most atomic.Int64
	svc := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := inFlight.Add(1)
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
		<-release
		inFlight.Add(-1)
		fmt.Fprint(w, `{"Allow":true}`)
	}))
	defer svc.Close()
	hook := AdmissionURL(svc.URL, false, svc.Client())
	hookOpen := AdmissionURL(svc.URL, true, svc.Client())
	const logins = maxAdmissionRequests + 36
	errs := make(chan error, 2*logins)
	for range logins {
		go func() { errs <- hook(context.Background(), Admission{Key: mustKey(t).Public()}) }()
		go func() { errs <- hookOpen(context.Background(), Admission{Key: mustKey(t).Public()}) }()
	}
	waitFor(t, func() bool { return inFlight.Load() == 2*maxAdmissionRequests })
	// Late logins time out waiting for a slot: refused, or admitted
	// without asking when the hook fails open.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	if err := hook(ctx, Admission{Key: mustKey(t).Public()}); err == nil || !strings.Contains(err.Error(), "busy") {
		t.Errorf("fail-closed login waiting past its deadline: %v, want a busy error", err)
	}
	if err := hookOpen(ctx, Admission{Key: mustKey(t).Public()}); err != nil {
		t.Errorf("fail-open login waiting past its deadline: %v, want admitted", err)
	}
	cancel()
	close(release)
	for range 2 * logins {
		if err := <-errs; err != nil {
			t.Errorf("queued login: %v", err)
		}
	}
	if m := most.Load(); m != 2*maxAdmissionRequests {
		t.Errorf("%d requests in flight at most, want %d (two hooks)", m, 2*maxAdmissionRequests)
	}
}

// TestBatchStats checks PacketsPerBatch and QueueWait: a receiver that does
// not read holds its writer in the pipe with the first packet while nine
// more queue for 30 ms; then they go out in one batch.
func TestBatchStats(t *testing.T) {
	s := newTestServer(t, WithWriteTimeout(0))
	cc, sc := net.Pipe()
	go s.Accept(context.Background(), sc, nil, "127.0.0.1:9")
	r := loginClient(t, cc, mustKey(t))
	sender := pipeClient(t, s)
	var rc *sconn
	for _, c := range s.snapshotConns() {
		if c.key == r.PublicKey() {
			rc = c
		}
	}
	sender.Send(r.PublicKey(), []byte{0})
	// The writer takes it (it was queued, and the queue is empty again)
	// and blocks in the pipe; the next nine wait in the queue for one
	// batch.
	waitFor(t, func() bool {
		if s.Stats().PacketsReceived != 1 {
			return false
		}
		rc.mu.Lock()
		defer rc.mu.Unlock()
		return rc.flushing && rc.other.n == 0
	})
	for i := 1; i < 10; i++ {
		sender.Send(r.PublicKey(), []byte{byte(i)})
	}
	sender.SendPing([8]byte{})
	recvMsg[Pong](t, sender) // all ten are queued
	time.Sleep(30 * time.Millisecond)
	for i := range 10 {
		if p, _ := recvMsg[*ReceivedPacket](t, r); p == nil || p.Data[0] != byte(i) {
			t.Fatalf("packet %d: %+v", i, p)
		}
	}
	// The writer counts a batch after its write returns, which may be
	// after the reader has it all.
	waitFor(t, func() bool { return s.Stats().PacketsSent == 10 })
	st := s.Stats()
	var batches int64
	for _, n := range st.PacketsPerBatch {
		batches += n
	}
	// One batch of 9 (8–15), after one of 1.
	if st.PacketsSent != 10 || st.PacketsPerBatch[3] != 1 || batches > 2 {
		t.Errorf("%d packets in batches %v, want 10 with one batch of 8–15", st.PacketsSent, st.PacketsPerBatch)
	}
	if st.QueueWait < 30*time.Millisecond {
		t.Errorf("QueueWait %v, want at least the 30 ms the batch waited", st.QueueWait)
	}
	var buf bytes.Buffer
	s.WritePrometheus(&buf)
	for _, want := range []string{
		"derp_packets_per_batch_bucket{le=\"7\"} " + strconv.FormatInt(batches-1, 10) + "\n",
		"derp_packets_per_batch_bucket{le=\"15\"} " + strconv.FormatInt(batches, 10) + "\n",
		"derp_packets_per_batch_bucket{le=\"+Inf\"} " + strconv.FormatInt(batches, 10) + "\n",
		"derp_packets_per_batch_sum 10\n",
		"derp_queue_wait_seconds 0.",
	} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

func TestQueueByteCap(t *testing.T) {
	s := newTestServer(t, WithWriteTimeout(0))
	// A receiver that does not read: its writer blocks in the pipe with
	// the first batch, and the rest waits in its queue.
	cc, sc := net.Pipe()
	go s.Accept(context.Background(), sc, nil, "127.0.0.1:9")
	stuck := loginClient(t, cc, mustKey(t))
	sender := pipeClient(t, s)
	big := make([]byte, MaxPacketSize)
	for i := range 30 {
		big[0] = byte(i)
		if err := sender.Send(stuck.PublicKey(), big); err != nil {
			t.Fatal(err)
		}
	}
	sender.SendPing([8]byte{})
	recvMsg[Pong](t, sender)
	// 30 packets of 64 KiB fit the 32-packet count but not the byte cap:
	// at most 512 KiB (8 packets) may wait, plus what the writer took.
	waitFor(t, func() bool { return s.Stats().PacketsDropped["queue_head/other"] >= 30-8-8 })
	for _, c := range s.snapshotConns() {
		c.mu.Lock()
		b := c.other.bytes
		c.mu.Unlock()
		if b > maxQueueBytes {
			t.Fatalf("%d bytes queued, cap %d", b, maxQueueBytes)
		}
	}
	// The newest packet is still delivered last.
	if last := lastPacketByte(stuck, 29, 2*time.Second); last != 29 {
		t.Errorf("last packet delivered %d, want 29", last)
	}
}

// snapshotConns returns the server's sessions.
func (s *Server) snapshotConns() []*sconn {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*sconn
	for c := range s.conns {
		out = append(out, c)
	}
	return out
}

// lastPacketByte receives until c has got the packet whose first byte is
// want (or been silent for 5 s), then until it has been silent for quiet,
// and returns the first byte of the last packet it got. Only the silence
// after want counts as the end: the server's writer may pause longer than
// quiet between batches on a busy machine.
func lastPacketByte(c *Client, want byte, quiet time.Duration) byte {
	c.opts.recvTimeout = 5 * time.Second
	var last byte
	for {
		m, err := c.recv()
		if err != nil {
			return last
		}
		if p, ok := m.(*ReceivedPacket); ok {
			last = p.Data[0]
			if last == want {
				c.opts.recvTimeout = quiet
			}
		}
	}
}

// The writev path puts on the wire exactly the bytes of the buffered path,
// for batches that mix control frames, payloads copied next to their header
// and payloads written from their own buffers, with and without a source
// key, and a Restarting notice that must stay last.
func TestWriteVecMatchesBuffered(t *testing.T) {
	s := NewServer(mustKey(t))
	defer s.Close()
	src := mustKey(t).Public()
	sizes := []int{0, 1, vecCopyMax, vecCopyMax + 1, 1200, 10000, MaxPacketSize, 7, vecCopyMax + 1}
	for _, restart := range []bool{false, true} {
		for _, ctlFirst := range []bool{false, true} {
			ws := &writerState{bw: bufio.NewWriterSize(nil, 32<<10)}
			if ctlFirst {
				ws.control = appendFrame(ws.control, FramePong, []byte("12345678"))
				ws.control = appendFrame(ws.control, FrameKeepAlive, nil)
			}
			if restart {
				ws.control = appendFrame(ws.control, FrameRestarting, appendRestarting(nil, time.Second, time.Minute))
			}
			sizes := sizes
			if restart && ctlFirst {
				// More pieces than one writev takes (IOV_MAX, 1024).
				sizes = nil
				for i := range 1500 {
					sizes = append(sizes, []int{vecCopyMax + 1, 40, 1200}[i%3])
				}
			}
			for i, n := range sizes {
				p := getPacket(n)
				p.n = n
				for j := range n {
					p.buf[j] = byte(i + j*3)
				}
				if i%2 == 0 {
					p.src = src
				} else {
					p.src = PublicKey{} // no source: forwarded without one
				}
				ws.pkts = append(ws.pkts, p)
			}

			var want bytes.Buffer
			cb := &sconn{s: s, nc: nopWriteConn{&want}}
			ws.bw.Reset(&want)
			if err := cb.writeBatch(ws); err != nil {
				t.Fatal(err)
			}

			client, server := tcpPair(t)
			cv := &sconn{s: s, nc: server, vectored: true}
			got := make(chan []byte, 1)
			go func() {
				b, _ := io.ReadAll(client)
				got <- b
			}()
			if err := cv.writeBatch(ws); err != nil {
				t.Fatal(err)
			}
			server.Close()
			if g := <-got; !bytes.Equal(g, want.Bytes()) {
				t.Errorf("restart=%v ctl=%v: writev wrote %d bytes, the buffered path %d; first difference at %d",
					restart, ctlFirst, len(g), want.Len(), firstDiff(g, want.Bytes()))
			}
			if len(ws.vec) == 0 || ws.vec[0] != nil {
				t.Errorf("vec not cleared after the write: %d entries", len(ws.vec))
			}
			for _, p := range ws.pkts {
				putPacket(p)
			}
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// nopWriteConn is a net.Conn that only writes, into w.
type nopWriteConn struct{ w io.Writer }

func (c nopWriteConn) Read([]byte) (int, error)         { return 0, io.EOF }
func (c nopWriteConn) Write(b []byte) (int, error)      { return c.w.Write(b) }
func (c nopWriteConn) Close() error                     { return nil }
func (c nopWriteConn) LocalAddr() net.Addr              { return nil }
func (c nopWriteConn) RemoteAddr() net.Addr             { return nil }
func (c nopWriteConn) SetDeadline(time.Time) error      { return nil }
func (c nopWriteConn) SetReadDeadline(time.Time) error  { return nil }
func (c nopWriteConn) SetWriteDeadline(time.Time) error { return nil }

// A batch whose write fails is counted lost, every packet of it, as
// write_error.
func TestWriteErrorCountsBatch(t *testing.T) {
	s := NewServer(mustKey(t))
	defer s.Close()
	for _, vectored := range []bool{false, true} {
		client, server := tcpPair(t)
		client.Close()
		server.Close() // writes now fail with net.ErrClosed
		c := &sconn{s: s, nc: server, vectored: vectored}
		ws := &writerState{bw: bufio.NewWriterSize(server, 32<<10)}
		for _, n := range []int{100, 1200, 5000} {
			p := getPacket(n)
			p.n = n
			ws.pkts = append(ws.pkts, p)
		}
		before := s.Stats().PacketsDropped["write_error/other"]
		if err := c.writeBatch(ws); err == nil {
			t.Fatalf("vectored=%v: write to a closed conn succeeded", vectored)
		}
		if got := s.Stats().PacketsDropped["write_error/other"] - before; got != 3 {
			t.Errorf("vectored=%v: write_error drops = %d, want 3", vectored, got)
		}
		for _, p := range ws.pkts {
			putPacket(p)
		}
	}
}

// Big read buffers go to at most maxBigReadBufs readers at once; beyond
// that readers get small ones, and still read every frame right.
func TestReadBufBudget(t *testing.T) {
	var held [][]byte
	defer func() {
		for _, b := range held {
			putReadBuf(b)
		}
	}()
	big := 0
	for range maxBigReadBufs + 1 {
		b := getReadBuf()
		held = append(held, b)
		if len(b) != bigReadBufSize {
			break
		}
		big++
	}
	if big > maxBigReadBufs || len(held[len(held)-1]) != readBufSize {
		t.Fatalf("took %d big buffers (at most %d allowed), then one of %d bytes", big, maxBigReadBufs, len(held[len(held)-1]))
	}

	const frames, size = 50, 1200
	var stream []byte
	for i := range frames {
		stream = appendFrame(stream, FrameSendPacket, append(make([]byte, KeyLen), bytes.Repeat([]byte{byte(i)}, size)...))
	}
	cn := &countingConn{r: bytes.NewReader(stream)}
	cr := newConnReader(cn, nil)
	payload := make([]byte, size)
	for i := range frames {
		if _, n, err := readFrameHeader(cr); err != nil || int(n) != KeyLen+size {
			t.Fatalf("frame %d: %v %v", i, n, err)
		}
		if cr.buf != nil && len(cr.buf) != readBufSize {
			t.Fatalf("frame %d: reader has a %d-byte buffer with the budget spent", i, len(cr.buf))
		}
		cr.Discard(KeyLen)
		if _, err := io.ReadFull(cr, payload); err != nil || payload[0] != byte(i) || payload[size-1] != byte(i) {
			t.Fatalf("frame %d: %v", i, err)
		}
	}
	if ideal := len(stream)/readBufSize + 1; cn.reads > 2*ideal+2 {
		t.Errorf("%d reads for %d bytes through small buffers, want about %d", cn.reads, len(stream), ideal)
	}
	cr.drop()

	for _, b := range held {
		putReadBuf(b)
	}
	held = nil
	b := getReadBuf()
	held = append(held, b)
	if len(b) != bigReadBufSize {
		t.Errorf("with the buffers given back: a %d-byte buffer, want %d", len(b), bigReadBufSize)
	}
}

// A watcher that starts watching while clients log in and out learns of
// each login exactly once, of no logout before its login, and ends with the
// server's true set of connected keys.
func TestWatcherSeesConsistentPresence(t *testing.T) {
	const mk = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	for round := range 10 {
		s := newTestServer(t, WithMeshKey(mk))
		const n = 16
		start := make(chan struct{})
		stay := make(chan PublicKey, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				<-start
				cc, sc := net.Pipe()
				go s.Accept(context.Background(), sc, nil, "127.0.0.1:1234")
				c, err := NewClient(mustKey(t), cc, nil)
				if err != nil {
					t.Errorf("login: %v", err)
					return
				}
				if i%2 == 0 {
					c.Close()
					return
				}
				t.Cleanup(func() { c.Close() })
				stay <- c.PublicKey()
			})
		}
		w := pipeClient(t, s, MeshKey(mk))
		close(start)
		if err := w.WatchConnectionChanges(); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		close(stay)
		want := map[PublicKey]bool{w.PublicKey(): true}
		for k := range stay {
			want[k] = true
		}
		waitFor(t, func() bool { return s.Stats().CurrentConnections == int64(len(want)) })

		present := map[PublicKey]bool{}
		apply := func(m Message) {
			switch m := m.(type) {
			case PeerPresent:
				if present[m.Key] {
					t.Fatalf("round %d: %s announced twice", round, m.Key.ShortString())
				}
				present[m.Key] = true
			case PeerGone:
				if !present[m.Peer] {
					t.Fatalf("round %d: %s gone before it was present", round, m.Peer.ShortString())
				}
				delete(present, m.Peer)
			}
		}
		// Read until the watcher sees the server's set (a hang guard of
		// 5 s, not a quiet spell, ends the wait: the watcher's writer
		// may be held up longer than a short quiet spell on a busy
		// machine), then for a quiet spell: whatever more arrives must
		// keep the set.
		w.opts.recvTimeout = 5 * time.Second
		for !maps.Equal(present, want) {
			m, err := w.recv()
			if err != nil {
				t.Fatalf("round %d: watcher sees %d keys present, the server has %d: %v", round, len(present), len(want), err)
			}
			apply(m)
		}
		w.opts.recvTimeout = 100 * time.Millisecond
		for {
			m, err := w.recv()
			if err != nil {
				break // quiet
			}
			apply(m)
		}
		if len(present) != len(want) {
			t.Fatalf("round %d: watcher sees %d keys present, the server has %d", round, len(present), len(want))
		}
		for k := range want {
			if !present[k] {
				t.Fatalf("round %d: %s connected but not seen", round, k.ShortString())
			}
		}
	}
}

// A receiver whose writer is still running (lingering after a write) holds
// little: plain-socket writers use writev and no bufio.Writer.
func TestBusyReceiverMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("1000 connections")
	}
	s := newTestServer(t)
	addr := tcpServer(t, s)
	const n = 1000
	rcvs := make([]*Client, n)
	for i := range rcvs {
		rcvs[i] = tcpClient(t, addr)
	}
	snd := tcpClient(t, addr)
	time.Sleep(writerLinger + 100*time.Millisecond) // the login writers are gone
	var m0, m1 runtime.MemStats
	runtime.GC()
	runtime.GC() // empty the pools' victim caches too
	runtime.ReadMemStats(&m0)
	for _, c := range rcvs {
		if err := snd.Send(c.PublicKey(), []byte("hello")); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range rcvs {
		recvMsg[*ReceivedPacket](t, c)
	}
	runtime.GC()
	runtime.ReadMemStats(&m1)
	writing := 0
	s.mu.Lock()
	for c := range s.conns {
		c.mu.Lock()
		if c.writing {
			writing++
		}
		c.mu.Unlock()
	}
	s.mu.Unlock()
	if writing < n {
		t.Fatalf("only %d writers still running: the measurement missed them", writing)
	}
	kib := float64(int64(m1.HeapAlloc)-int64(m0.HeapAlloc)) / n / 1024
	t.Logf("%.1f KiB of heap per receiver while its writer lingers", kib)
	if kib > 8 {
		t.Errorf("%.1f KiB of heap per receiver while its writer lingers, want at most 8", kib)
	}
}

// A sender's packets follow a destination that disconnected and came back
// with the same key (a new routing entry), although the sender's reader
// remembers the entry it last sent to.
func TestRouteFollowsReconnect(t *testing.T) {
	s := newTestServer(t)
	addr := tcpServer(t, s)
	a := tcpClient(t, addr)
	bKey := mustKey(t)
	dialB := func() *Client {
		nc, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		return loginClient(t, nc, bKey)
	}
	b := dialB()
	for round := range 3 {
		for i := range 3 {
			msg := fmt.Sprintf("round %d packet %d", round, i)
			if err := a.Send(b.PublicKey(), []byte(msg)); err != nil {
				t.Fatal(err)
			}
			if got, ok := recvMsg[*ReceivedPacket](t, b); !ok || string(got.Data) != msg {
				t.Fatalf("%s: got %q", msg, got.Data)
			}
		}
		b.Close()
		waitFor(t, func() bool { return !s.IsClientConnected(bKey.Public()) })
		// Sent while b is away: dropped as unknown, not queued anywhere.
		a.Send(bKey.Public(), []byte("lost"))
		waitFor(t, func() bool { return s.Stats().PacketsDropped["unknown_dest/other"] == int64(round+1) })
		b = dialB()
	}
}

func TestValidAppName(t *testing.T) {
	for name, want := range map[string]bool{
		"": true, "tailscaled": true, " ~": true, strings.Repeat("x", MaxAppNameLen): true,
		strings.Repeat("x", MaxAppNameLen+1): false, "a\x00": false, "tab\t": false, "é": false, "\x7f": false,
	} {
		if got := ValidAppName(name); got != want {
			t.Errorf("ValidAppName(%q) = %v", name, got)
		}
	}
	// A client refuses to send a name servers would refuse.
	cc, sc := net.Pipe()
	defer cc.Close()
	defer sc.Close()
	if c, err := NewClient(mustKey(t), cc, nil, AppName("bad\nname")); err == nil {
		c.Close()
		t.Fatal("NewClient accepted an invalid app name")
	}
}

// fakeTailscaled serves the part of tailscaled's LocalAPI that
// AdmissionTailscaled uses, on a Unix socket, with tailscaled's checks:
// the Host must be its own, browsers (Origin, Referer) are refused.
type fakeTailscaled struct {
	sock  string
	self  PublicKey       // the machine's own node
	known map[string]bool // "nodekey:<hex>"
	mode  atomic.Value    // "", "denied", "old", "liar"

	mu       sync.Mutex
	requests []*http.Request
}

func newFakeTailscaled(t *testing.T, known ...PublicKey) *fakeTailscaled {
	t.Helper()
	f := &fakeTailscaled{sock: filepath.Join(t.TempDir(), "tailscaled.sock"), known: map[string]bool{}, self: mustKey(t).Public()}
	for _, k := range append(known, f.self) {
		f.known["nodekey:"+k.String()] = true
	}
	f.mode.Store("")
	ln, err := net.Listen("unix", f.sock)
	if err != nil {
		t.Skipf("unix socket: %v", err)
	}
	hs := &http.Server{Handler: f}
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close() })
	return f
}

func (f *fakeTailscaled) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.requests = append(f.requests, r.Clone(context.Background()))
	f.mu.Unlock()
	if r.Host != "local-tailscaled.sock" || r.Header.Get("Origin") != "" || r.Referer() != "" {
		http.Error(w, "invalid localapi request", http.StatusForbidden)
		return
	}
	if r.URL.Path == "/localapi/v0/status" && r.URL.RawQuery == "peers=false" {
		self, state := f.self, "Running"
		if f.mode.Load() == "loggedout" {
			self, state = PublicKey{}, "NeedsLogin"
		}
		fmt.Fprintf(w, `{"Version":"1.104.5","BackendState":%q,"Self":{"ID":"n1","PublicKey":"nodekey:%s"}}`, state, self)
		return
	}
	if r.URL.Path != "/localapi/v0/whois" || r.Method != http.MethodGet {
		http.NotFound(w, r)
		return
	}
	addr := r.FormValue("addr")
	switch f.mode.Load() {
	case "denied":
		http.Error(w, "whois access denied", http.StatusForbidden)
		return
	case "old":
		http.Error(w, "invalid 'addr' parameter", http.StatusBadRequest)
		return
	case "liar":
		addr = "nodekey:" + strings.Repeat("ab", 32)
	default:
		if !f.known[addr] {
			http.Error(w, "no match for IP:port", http.StatusNotFound)
			return
		}
	}
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, `{"Node":{"ID":7,"Name":"node.example.ts.net.","Key":%q},"UserProfile":{"ID":1}}`, addr)
}

// TestAdmissionTailscaled checks admission through the local tailscaled's
// LocalAPI: known nodes are admitted, others refused, and every unclear
// answer refuses too, with an error that says what was wrong.
func TestAdmissionTailscaled(t *testing.T) {
	node := mustKey(t)
	f := newFakeTailscaled(t, node.Public())
	ctx := context.Background()
	hook := AdmissionTailscaled(f.sock)
	if err := hook(ctx, Admission{Key: node.Public(), RemoteAddr: "192.0.2.1:1"}); err != nil {
		t.Fatalf("known node refused: %v", err)
	}
	stranger := mustKey(t).Public()
	if err := hook(ctx, Admission{Key: stranger}); !errors.Is(err, errTailscaledDenied) {
		t.Fatalf("unknown node: %v", err)
	}
	f.mu.Lock()
	if len(f.requests) != 2 {
		t.Fatalf("%d requests", len(f.requests))
	}
	r := f.requests[0]
	if r.Method != "GET" || r.URL.Path != "/localapi/v0/whois" || r.URL.RawQuery != "addr=nodekey%3A"+node.Public().String() {
		t.Errorf("request %s %s", r.Method, r.URL)
	}
	f.mu.Unlock()

	for _, tt := range []struct{ mode, want string }{
		{"denied", "403 Forbidden"},
		{"old", "too old"},
		{"liar", "not about the key asked"},
	} {
		f.mode.Store(tt.mode)
		err := hook(ctx, Admission{Key: node.Public()})
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: got %v, want an error with %q", tt.mode, err, tt.want)
		}
	}
	f.mode.Store("")

	// No tailscaled: refused, unless FailOpen.
	missing := filepath.Join(t.TempDir(), "none.sock")
	if err := AdmissionTailscaled(missing)(ctx, Admission{Key: node.Public()}); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("without tailscaled: %v", err)
	}
	if err := (&AdmissionService{Tailscaled: missing, FailOpen: true}).Admit(ctx, Admission{Key: node.Public()}); err != nil {
		t.Errorf("FailOpen without tailscaled: %v", err)
	}

	// A cache answers again for any address.
	f.mu.Lock()
	n0 := len(f.requests)
	f.mu.Unlock()
	as := &AdmissionService{Tailscaled: f.sock, CacheFor: time.Minute}
	for i := range 3 {
		if err := as.Admit(ctx, Admission{Key: node.Public(), RemoteAddr: fmt.Sprintf("192.0.2.%d:1", i+1)}); err != nil {
			t.Fatal(err)
		}
	}
	f.mu.Lock()
	if n := len(f.requests) - n0; n != 1 {
		t.Errorf("%d requests for 3 cached logins", n)
	}
	f.mu.Unlock()

	// Check, for health endpoints: tailscaled knows its own node.
	if err := (&AdmissionService{Tailscaled: f.sock}).Check(ctx); err != nil {
		t.Errorf("Check: %v", err)
	}
	for _, tt := range []struct{ mode, want string }{
		{"loggedout", `no node key (state "NeedsLogin")`},
		{"denied", "403 Forbidden"},
		{"liar", "not about the key asked"},
	} {
		f.mode.Store(tt.mode)
		err := (&AdmissionService{Tailscaled: f.sock}).Check(ctx)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Check, %s: got %v, want an error with %q", tt.mode, err, tt.want)
		}
	}
	f.mode.Store("")
	if err := (&AdmissionService{Tailscaled: missing}).Check(ctx); err == nil {
		t.Error("Check without tailscaled passed")
	}
	if err := (&AdmissionService{URL: "http://192.0.2.1/"}).Check(ctx); err != nil {
		t.Errorf("Check with a URL: %v", err)
	}

	// End to end through a server.
	s := newTestServer(t, WithAdmission(hook))
	pipeLogin(t, s, node)
	wantLoginRefused(t, s, 1)
}

// TestClientAfterClose: after Close, Recv and Send return ErrClosed, as
// ErrClosed's doc says: Recv does not go on returning the frames still
// buffered from the connection, and Send does not report ErrRateLimited
// (which says the connection stays usable) when the bucket is empty, nor
// ErrPacketTooLarge for a packet too large.
func TestClientAfterClose(t *testing.T) {
	srv, cli := fuzzKey(1), fuzzKey(2)
	peer := fuzzKey(3).Public()
	pkt := appendFrame(nil, FrameRecvPacket, append(peer[:len(peer):len(peer)], "buffered"...))
	stream := frames(appendFrame(nil, FrameServerKey, appendServerKey(nil, srv.Public())),
		serverInfoFrame(srv, cli.Public(), []byte(`{"version":2,"TokenBucketBytesPerSecond":1,"TokenBucketBytesBurst":100}`)),
		pkt, pkt, pkt)
	cc, sc := net.Pipe()
	defer sc.Close()
	go io.Copy(io.Discard, sc)
	go sc.Write(stream) // one write: the client's first read buffers it all
	c, err := NewClient(cli, cc, nil)
	if err != nil {
		t.Fatal(err)
	}
	if m, err := c.Recv(); err != nil {
		t.Fatalf("first Recv: %v", err)
	} else if _, ok := m.(ServerInfo); !ok {
		t.Fatalf("first Recv: %T, want ServerInfo", m)
	}
	if c.br.Buffered() == 0 {
		t.Fatal("the packets are not buffered yet")
	}
	// The announced limit's burst (raised to one maximal frame) is used
	// up: the next packet does not fit for hours.
	if err := c.Send(peer, make([]byte, MaxPacketSize)); err != nil {
		t.Fatalf("Send before Close: %v", err)
	}
	c.Close()
	for i := range 2 {
		if m, err := c.Recv(); !errors.Is(err, ErrClosed) {
			t.Fatalf("Recv %d after Close: %T, %v; want ErrClosed", i+1, m, err)
		}
	}
	for i := range 2 {
		if err := c.Send(peer, make([]byte, 200)); !errors.Is(err, ErrClosed) {
			t.Fatalf("Send %d (over the rate limit) after Close: %v; want ErrClosed", i+1, err)
		}
	}
	// Whatever the arguments: a packet too large is not ErrPacketTooLarge
	// (which says the connection stays usable) either.
	big := make([]byte, MaxPacketSize+1)
	if err := c.Send(peer, big); !errors.Is(err, ErrClosed) {
		t.Fatalf("Send of a packet too large after Close: %v; want ErrClosed", err)
	}
	if err := c.ForwardPacket(peer, peer, big); !errors.Is(err, ErrClosed) {
		t.Fatalf("ForwardPacket of a packet too large after Close: %v; want ErrClosed", err)
	}
}

// TestAdmissionServiceStatusQuoted: the status line of an admission
// service's refusal goes into the login's error (and log lines) quoted, as
// a DERP server's or proxy's does in a dial's: net/http keeps a carriage
// return inside it.
func TestAdmissionServiceStatusQuoted(t *testing.T) {
	const status = "503 Busy\rlevel=ERROR msg=forged"
	dial := scriptedPipeDialer(t, func(sc net.Conn, br *bufio.Reader) {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		io.Copy(io.Discard, req.Body)
		fmt.Fprintf(sc, "HTTP/1.1 %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", status)
	})
	as := &AdmissionService{
		URL:    "http://admission.invalid/check",
		Client: &http.Client{Transport: &http.Transport{DialContext: dial}},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := as.Admit(ctx, Admission{Key: mustKey(t).Public(), RemoteAddr: "192.0.2.1:1"})
	if err == nil {
		t.Fatal("admitted on a 503")
	}
	if msg := err.Error(); strings.ContainsAny(msg, "\r\n") || !strings.Contains(msg, strconv.Quote(status)) {
		t.Errorf("error %q, want the status quoted on one line", msg)
	}
}

// TestAdmissionServiceInflightShrinks checks that an AdmissionService's
// table of requests in flight gives back its memory after a flood of
// logins: it has an entry for every distinct key and address waiting,
// not only for the requests sent (those wait for a slot), and kept the
// flood's size for the life of the service.
func TestAdmissionServiceInflightShrinks(t *testing.T) {
	release := make(chan struct{})
	svc := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release
		fmt.Fprint(w, `{"Allow":true}`)
	}))
	defer svc.Close()
	as := &AdmissionService{URL: svc.URL, Client: svc.Client(), CacheFor: time.Hour}
	const logins = 4 * maxAdmissionRequests
	errs := make(chan error, logins)
	for i := range logins {
		var k PublicKey
		binary.BigEndian.PutUint32(k[:], uint32(i+1))
		go func() { errs <- as.Admit(context.Background(), Admission{Key: k, RemoteAddr: "192.0.2.1:1"}) }()
	}
	inflight := func() (id uintptr, n int) {
		as.mu.Lock()
		defer as.mu.Unlock()
		return mapID(as.inflight), len(as.inflight)
	}
	waitForWithin(t, time.Minute, func() bool { _, n := inflight(); return n == logins })
	before, _ := inflight()
	close(release)
	for range logins {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if after, n := inflight(); after == before {
		t.Errorf("the requests in flight were not rebuilt when they went from %d to %d", logins, n)
	}
}

// TestAdmissionServiceForgetsExpiredVerdicts checks that the verdicts of
// a flood of logins are dropped, and their memory given back, once they
// have expired: they were dropped only when the cache filled up again, so
// a flood's 65536 verdicts stayed for the life of the service.
func TestAdmissionServiceForgetsExpiredVerdicts(t *testing.T) {
	svc := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, `{"Allow":true}`)
	}))
	defer svc.Close()
	const cacheFor = 20 * time.Millisecond
	as := &AdmissionService{URL: svc.URL, Client: svc.Client(), CacheFor: cacheFor}
	base := heapInUse()
	const flood = maxAdmissionVerdicts - 1 // a login more does not fill the cache
	as.mu.Lock()
	for i := range flood {
		var k PublicKey
		binary.BigEndian.PutUint32(k[:], uint32(i))
		as.rememberLocked(admissionKey{k, fmt.Sprintf("192.0.%d.%d", i>>8&255, i&255)}, false) // the flood's
	}
	before := mapID(as.verdicts)
	as.mu.Unlock()
	peak := heapInUse()
	time.Sleep(2 * cacheFor) // the flood's verdicts expire
	if err := as.Admit(context.Background(), Admission{Key: mustKey(t).Public(), RemoteAddr: "192.0.2.7:1"}); err != nil {
		t.Fatal(err)
	}
	after := heapInUse()
	t.Logf("%d verdicts took %d KiB; after they expired and one login, %d KiB were given back",
		flood, (int64(peak)-int64(base))>>10, (int64(peak)-int64(after))>>10)
	as.mu.Lock()
	n, id := len(as.verdicts), mapID(as.verdicts)
	as.mu.Unlock()
	if n != 1 {
		t.Errorf("%d verdicts kept after the flood's expired and one login, want 1", n)
	}
	if id == before {
		t.Error("the verdicts were not rebuilt after the flood's expired")
	}
}

// TestClientSkipsLateServerKey checks that a ServerKey frame after the
// first frame is skipped whatever it holds, as Tailscale's client skips
// it (PROTOCOL.md §11): in a classic login and in fast start, where only
// the first ServerKey frame is checked.
func TestClientSkipsLateServerKey(t *testing.T) {
	server := mustKey(t)
	late := [][]byte{
		appendFrame(nil, FrameServerKey, []byte("short")),
		appendFrame(nil, FrameServerKey, append([]byte("DERPXXXX"), make([]byte, 32)...)),
		appendFrame(nil, FrameServerKey, nil),
		appendFrame(nil, FrameServerKey, appendServerKey(nil, mustKey(t).Public())),
		appendFrame(nil, FrameServerKey, make([]byte, 2000)),
		appendFrame(nil, FrameServerKey, make([]byte, 5000)), // more than the read buffer holds
	}
	for _, fast := range []bool{false, true} {
		t.Run(fmt.Sprintf("fast=%v", fast), func(t *testing.T) {
			client := mustKey(t)
			stream := frames(appendFrame(nil, FrameServerKey, appendServerKey(nil, server.Public())),
				serverInfoFrame(server, client.Public(), []byte(`{"version":2}`)))
			for _, f := range late {
				stream = frames(stream, f)
			}
			stream = frames(stream, appendFrame(nil, FramePing, []byte("12345678")))
			cc, sc := net.Pipe()
			defer cc.Close()
			go io.Copy(io.Discard, sc)
			go sc.Write(stream)
			defer sc.Close()
			var opts []ClientOption
			if fast {
				opts = append(opts, ServerPublicKey(server.Public()))
			}
			c, err := NewClient(client, cc, nil, opts...)
			if err != nil {
				t.Fatal(err)
			}
			cc.SetReadDeadline(time.Now().Add(30 * time.Second))
			for _, want := range []string{"relay.ServerInfo", "relay.Ping"} {
				m, err := c.Recv()
				if err != nil {
					t.Fatalf("Recv, waiting for a %s: %v", want, err)
				}
				if got := fmt.Sprintf("%T", m); got != want {
					t.Fatalf("Recv: got %s, want %s", got, want)
				}
			}
		})
	}
}
