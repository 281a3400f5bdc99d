package relay

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"net/http/httptest"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func skipIfNoPark(t *testing.T) {
	t.Helper()
	if !parkSupported {
		t.Skip("sessions are not parked on " + runtime.GOOS)
	}
}

// readerGoroutines counts the goroutines running a session's reader.
func readerGoroutines() int {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Count(string(buf), "relay.(*sconn).serve(")
}

func TestIdlePark(t *testing.T) {
	skipIfNoPark(t)
	s := NewServer(mustKey(t), WithIdlePark(20*time.Millisecond))
	addr := tcpServer(t, s)
	a, b := tcpClient(t, addr), tcpClient(t, addr)
	parked := func(n int64) func() bool {
		return func() bool { return s.Stats().CurrentParked == n }
	}
	waitFor(t, parked(2))
	// A reader counts its session parked before its goroutine returns:
	// the goroutines end a moment after the count.
	waitForT(t, "no reader goroutine with both sessions parked", func() bool { return readerGoroutines() == 0 })
	for range 3 {
		// Every packet wakes a parked session; they park again between
		// rounds.
		exchange(t, a, b)
		a.SendPing([8]byte{1})
		if _, ok := recvMsg[Pong](t, a); !ok {
			t.FailNow()
		}
		waitFor(t, parked(2))
	}
	// A parked session whose client leaves ends, and its peer is told.
	a.Close()
	if g, ok := recvMsg[PeerGone](t, b); !ok || g.Peer != a.PublicKey() {
		t.Fatalf("b got %v, want PeerGone for a", g)
	}
	waitFor(t, func() bool { st := s.Stats(); return st.CurrentConnections == 1 && st.CurrentParked == 1 })
}

// A frame that arrives in pieces, with pauses longer than the park delay
// between them, must not park the reader in the middle of the frame.
func TestIdleParkSlowFrame(t *testing.T) {
	skipIfNoPark(t)
	s := NewServer(mustKey(t), WithIdlePark(10*time.Millisecond))
	addr := tcpServer(t, s)
	b := tcpClient(t, addr)
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	a := loginClient(t, &slowConn{Conn: nc}, mustKey(t))
	payload := bytes.Repeat([]byte("slow"), 300)
	frame := binary.BigEndian.AppendUint32([]byte{byte(FrameSendPacket)}, uint32(KeyLen+len(payload)))
	bk := b.PublicKey()
	frame = append(frame, bk[:]...)
	frame = append(frame, payload...)
	waitFor(t, func() bool { return s.Stats().CurrentParked == 2 })
	// Pieces: inside the header, inside the key, inside the payload.
	for _, piece := range [][]byte{frame[:2], frame[2:20], frame[20:600], frame[600:]} {
		if _, err := nc.Write(piece); err != nil {
			t.Fatal(err)
		}
		time.Sleep(40 * time.Millisecond)
	}
	got, ok := recvMsg[*ReceivedPacket](t, b)
	if !ok || got.Source != a.PublicKey() || !bytes.Equal(got.Data, payload) {
		t.Fatalf("b got %v, want the slow packet", got)
	}
	if err := a.Send(b.PublicKey(), []byte("after")); err != nil {
		t.Fatal(err)
	}
	if got, ok := recvMsg[*ReceivedPacket](t, b); !ok || string(got.Data) != "after" {
		t.Fatalf("b got %v after the slow frame", got)
	}
	if e := s.Stats().Errors; len(e) != 0 {
		t.Errorf("errors: %v", e)
	}
}

// slowConn is a net.Conn the test also writes to directly.
type slowConn struct{ net.Conn }

// Accept keeps its blocking contract with a parked session: it returns when
// the session ends (here, when its context is canceled), not when it parks.
func TestIdleParkEndedByContext(t *testing.T) {
	skipIfNoPark(t)
	s := newTestServer(t, WithIdlePark(10*time.Millisecond))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	acceptLoop(t, ln, func(nc net.Conn) {
		s.Accept(ctx, nc, nil, nc.RemoteAddr().String())
		close(done)
	})
	c := tcpClient(t, ln.Addr().String())
	waitFor(t, func() bool { return s.Stats().CurrentParked == 1 })
	select {
	case <-done:
		t.Fatal("Accept returned when its session parked")
	case <-time.After(50 * time.Millisecond):
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Accept did not return after its context was canceled")
	}
	if st := s.Stats(); st.CurrentParked != 0 || st.CurrentConnections != 0 {
		t.Errorf("after cancel: %d parked, %d connected", st.CurrentParked, st.CurrentConnections)
	}
	if _, err := recvUntilErr(t, c); err == nil {
		t.Error("client saw no error after its session was canceled")
	}
}

// Sessions served through ServeHTTP run on the server's goroutines, which
// exit when they park.
func TestIdleParkHTTP(t *testing.T) {
	skipIfNoPark(t)
	s := newTestServer(t, WithIdlePark(10*time.Millisecond))
	ts := httptest.NewServer(s)
	defer ts.Close()
	var cs []*Client
	for range 3 {
		c, _, err := (&FastStart{}).Dial(context.Background(), ts.URL+"/derp", mustKey(t))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		cs = append(cs, c)
	}
	waitFor(t, func() bool { return s.Stats().CurrentParked == 3 })
	// A reader counts its session parked before its goroutine (started
	// by ServeHTTP) returns: the goroutines end a moment after the count.
	waitForT(t, "no session goroutine with every session parked", func() bool {
		buf := make([]byte, 4<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		return strings.Count(stacks, "relay.(*Server).accept(") == 0
	})
	if err := cs[0].Send(cs[2].PublicKey(), []byte("wake")); err != nil {
		t.Fatal(err)
	}
	if got, ok := recvMsg[*ReceivedPacket](t, cs[2]); !ok || string(got.Data) != "wake" {
		t.Fatalf("got %v", got)
	}
}

// Close reaches parked sessions: they get the Restarting notice and end.
func TestIdleParkServerClose(t *testing.T) {
	skipIfNoPark(t)
	s := NewServer(mustKey(t), WithIdlePark(10*time.Millisecond), WithRestartNotice(time.Second, 5*time.Second))
	addr := tcpServer(t, s)
	clients := []*Client{tcpClient(t, addr), tcpClient(t, addr), tcpClient(t, addr)}
	waitFor(t, func() bool { return s.Stats().CurrentParked == 3 })
	s.Close()
	for _, c := range clients {
		if _, ok := recvMsg[ServerRestarting](t, c); !ok {
			t.Fatal("no ServerRestarting")
		}
	}
	if st := s.Stats(); st.CurrentParked != 0 || st.CurrentConnections != 0 {
		t.Errorf("after Close: %d parked, %d connected", st.CurrentParked, st.CurrentConnections)
	}
}

// Sessions over TLS park too: crypto/tls times out only when it needs more
// bytes from the socket. Packets of every size, split over many TLS
// records, must wake them and arrive intact, fast start or not.
func TestIdleParkTLS(t *testing.T) {
	skipIfNoPark(t)
	ts := StartTestServer(t, WithIdlePark(10*time.Millisecond))
	s := ts.Server
	dial := func(fast bool) *Client {
		f := &FastStart{TLSConfig: ts.TLSConfig, DisableFastStart: !fast}
		c, hs, err := f.Dial(context.Background(), ts.URL, mustKey(t))
		if err != nil {
			t.Fatal(err)
		}
		if want := map[bool]Path{true: FastPath, false: UpgradePath}[fast]; hs.Path != want {
			t.Fatalf("path %v, want %v (%s)", hs.Path, want, hs.Reason)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	a, b := dial(true), dial(false)
	waitFor(t, func() bool { return s.Stats().CurrentParked == 2 })
	for range 2 {
		exchange(t, a, b)
		waitFor(t, func() bool { return s.Stats().CurrentParked == 2 })
	}
	// The readers' goroutines end a moment after their sessions count
	// as parked.
	waitForT(t, "no reader goroutine with both sessions parked", func() bool { return readerGoroutines() == 0 })
}

// A TLS record that arrives in two pieces, with a pause longer than the
// park delay between them, parks the reader with half a record inside
// crypto/tls; the second half must wake it.
func TestIdleParkTLSSplitRecords(t *testing.T) {
	skipIfNoPark(t)
	ts := StartTestServer(t, WithIdlePark(5*time.Millisecond))
	s := ts.Server
	var split *splitConn
	f := &FastStart{TLSConfig: ts.TLSConfig, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		split = &splitConn{Conn: nc}
		return split, err
	}}
	a, _, err := f.Dial(context.Background(), ts.URL, mustKey(t))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, _, err := (&FastStart{TLSConfig: ts.TLSConfig}).Dial(context.Background(), ts.URL, mustKey(t))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	waitFor(t, func() bool { return s.Stats().CurrentParked == 2 })
	var midParked []int64
	split.mid = func() { midParked = append(midParked, s.Stats().CurrentParked) }
	split.on.Store(true)
	for i, size := range []int{1, 100, 3000, 20000} {
		first := len(midParked)
		pkt := bytes.Repeat([]byte{byte(i + 1)}, size)
		if err := a.Send(b.PublicKey(), pkt); err != nil {
			t.Fatal(err)
		}
		got, ok := recvMsg[*ReceivedPacket](t, b)
		if !ok || !bytes.Equal(got.Data, pkt) {
			t.Fatalf("packet %d (%d bytes) did not arrive intact", i, size)
		}
		// In the pause inside the packet's first TLS record, a's session
		// was parked with half a record read and no byte of the frame
		// decrypted (b's session is parked all along). Later records
		// of a large packet find the reader inside a frame, where it
		// does not park.
		if len(midParked) == first {
			t.Fatalf("packet %d: no write was split", i)
		}
		if n := midParked[first]; n != 2 {
			t.Errorf("packet %d: %d sessions parked in its first pause, want 2", i, n)
		}
	}
	if e := s.Stats().Errors; len(e) != 0 {
		t.Errorf("errors: %v", e)
	}
}

// splitConn, once on, writes each buffer in two halves with a pause
// between, and calls mid during the pause.
type splitConn struct {
	net.Conn
	on  atomic.Bool
	mid func()
}

func (c *splitConn) Write(p []byte) (int, error) {
	if !c.on.Load() || len(p) < 2 {
		return c.Conn.Write(p)
	}
	n, err := c.Conn.Write(p[:len(p)/2])
	if err != nil {
		return n, err
	}
	time.Sleep(100 * time.Millisecond) // 20 times the park delay
	c.mid()
	m, err := c.Conn.Write(p[len(p)/2:])
	return n + m, err
}

// Accept given a buffered reader that already holds more than the session's
// own buffer can take: the session must read through that reader (neither
// raw socket reads nor parking may skip its bytes).
func TestAcceptLargeBufferedReader(t *testing.T) {
	// The queue holds the whole burst: the test is about bytes, not drops.
	s := newTestServer(t, WithIdlePark(10*time.Millisecond), WithQueueDepth(128))
	b := tcpClient(t, tcpServer(t, s))
	cc, sc := tcpPair(t)
	bk := b.PublicKey()
	stream := rawLogin(t, s.PublicKey())
	const frames, size = 80, 1000
	for i := range frames {
		stream = appendFrame(stream, FrameSendPacket, append(bk[:len(bk):len(bk)], bytes.Repeat([]byte{byte(i)}, size)...))
	}
	if len(stream) <= bigReadBufSize {
		t.Fatalf("stream of %d bytes fits the session's buffer", len(stream))
	}
	go cc.Write(stream) // more than the socket buffers may hold at once
	br := bufio.NewReaderSize(sc, 128<<10)
	if _, err := br.Peek(len(stream)); err != nil { // all of it, more than bigReadBufSize
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		s.Accept(context.Background(), sc, bufio.NewReadWriter(br, bufio.NewWriter(sc)), sc.RemoteAddr().String())
		close(done)
	}()
	for i := range frames {
		got, ok := recvMsg[*ReceivedPacket](t, b)
		if !ok || len(got.Data) != size || got.Data[0] != byte(i) {
			t.Fatalf("packet %d: %v", i, got)
		}
	}
	cc.Close()
	<-done
}

// Sessions over Unix sockets relay through writev, read raw and park like
// TCP ones.
func TestUnixSocketSessions(t *testing.T) {
	s := newTestServer(t, WithIdlePark(5*time.Millisecond))
	path := filepath.Join(t.TempDir(), "relay.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Skip("no unix sockets: ", err)
	}
	acceptLoop(t, ln, func(nc net.Conn) {
		s.Accept(context.Background(), nc, nil, "127.0.0.1:1")
	})
	t.Cleanup(func() { s.Close() })
	dial := func() *Client {
		nc, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		return loginClient(t, nc, mustKey(t))
	}
	a, b := dial(), dial()
	for round := range 3 {
		// Both parked between rounds: no reader goroutine, no buffer.
		waitFor(t, func() bool { return s.Stats().CurrentParked == 2 })
		for i, n := range []int{1, 100, vecCopyMax + 1, 5000, 60000} {
			data := bytes.Repeat([]byte{byte(round*10 + i)}, n)
			if err := a.Send(b.PublicKey(), data); err != nil {
				t.Fatal(err)
			}
			got, ok := recvMsg[*ReceivedPacket](t, b)
			if !ok || got.Source != a.PublicKey() || !bytes.Equal(got.Data, data) {
				t.Fatalf("round %d, %d B: got %d B from %s", round, n, len(got.Data), got.Source.ShortString())
			}
			if err := b.Send(a.PublicKey(), data); err != nil { // and back
				t.Fatal(err)
			}
			if got, ok := recvMsg[*ReceivedPacket](t, a); !ok || !bytes.Equal(got.Data, data) {
				t.Fatalf("round %d, %d B back: got %d B", round, n, len(got.Data))
			}
		}
	}
	if p := s.Stats().Parks; p < 6 {
		t.Errorf("%d parks over 3 rounds of 2 sessions, want at least 6", p)
	}
}
