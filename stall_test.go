package relay

// A reconnecting client against servers that stall, stop reading, or send
// notices that would keep it away for weeks: ctx, RecvTimeout and Close
// must still end every call.

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// scriptedServer is a scripted DERP server at the far end of a net.Pipe
// that FastStart dials through DialContext. script runs once per dial.
type scriptedServer struct {
	priv   PrivateKey
	dials  atomic.Int32
	script func(n int, sc net.Conn, br *bufio.Reader, clientPub PublicKey)
	early  []byte // frames refuseLogin sends with the ServerKey

	mu     sync.Mutex
	conns  []net.Conn
	wg     sync.WaitGroup
	once   sync.Once
	closed chan struct{}
}

func (s *scriptedServer) init() {
	s.once.Do(func() { s.closed = make(chan struct{}) })
}

// stall blocks until the test ends, reading nothing.
func (s *scriptedServer) stall() { s.init(); <-s.closed }

func (s *scriptedServer) close() {
	s.init()
	close(s.closed)
	s.mu.Lock()
	for _, c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

func (s *scriptedServer) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	s.init()
	cc, sc := net.Pipe()
	return s.start(cc, sc), nil
}

// start serves sc, the server's end of a connection whose client end is
// cc, and returns cc; close closes both.
func (s *scriptedServer) start(cc, sc net.Conn) net.Conn {
	s.mu.Lock()
	s.conns = append(s.conns, cc, sc)
	s.mu.Unlock()
	s.wg.Add(1)
	go s.serve(sc)
	return cc
}

// pipe serves a connection with script instead of the scripted login,
// and returns its client end; close closes both ends.
func (s *scriptedServer) pipe(script func(sc net.Conn, br *bufio.Reader)) net.Conn {
	s.init()
	cc, sc := net.Pipe()
	s.mu.Lock()
	s.conns = append(s.conns, cc, sc)
	s.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		script(sc, bufio.NewReader(sc))
	}()
	return cc
}

// silentAfterRequest is pipe with a script that reads the request, tells
// asked, and answers nothing.
func (s *scriptedServer) silentAfterRequest(asked chan<- struct{}) net.Conn {
	return s.pipe(func(_ net.Conn, br *bufio.Reader) {
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		asked <- struct{}{}
		io.Copy(io.Discard, br)
	})
}

// refuseLogin is a pipe script that takes an upgrade and the ClientInfo
// and hangs up, as a server refusing the login. The frames in early go
// out in the same write as the ServerKey: the client's dial, reading that,
// buffers them.
func (s *scriptedServer) refuseLogin(sc net.Conn, br *bufio.Reader) {
	defer sc.Close()
	if _, err := http.ReadRequest(br); err != nil {
		return
	}
	resp := []byte("HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
	if _, err := sc.Write(append(appendFrame(resp, FrameServerKey, appendServerKey(nil, s.priv.Public())), s.early...)); err != nil {
		return
	}
	readRawFrame(br) // the ClientInfo
}

// quietScriptedPair returns two scripted servers whose logins succeed
// and then read everything and answer nothing; the caller closes them.
func quietScriptedPair(t *testing.T) (a, b *scriptedServer) {
	serve := func(_ int, _ net.Conn, br *bufio.Reader, _ PublicKey) { io.Copy(io.Discard, br) }
	a = &scriptedServer{priv: mustKey(t), script: serve}
	b = &scriptedServer{priv: mustKey(t), script: serve}
	a.init()
	b.init()
	return a, b
}

// dialTCP is dial over a real loopback TCP connection.
func (s *scriptedServer) dialTCP(ctx context.Context, network, addr string) (net.Conn, error) {
	s.init()
	cc, sc, err := loopbackTCP()
	if err != nil {
		return nil, err
	}
	return s.start(cc, sc), nil
}

func (s *scriptedServer) serve(sc net.Conn) {
	n := int(s.dials.Add(1))
	defer s.wg.Done()
	defer sc.Close()
	br := bufio.NewReader(sc)
	// The upgrade request.
	req, err := http.ReadRequest(br)
	if err != nil {
		return
	}
	if req.Header.Get("Upgrade") != "DERP" {
		return
	}
	io.WriteString(sc, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
	sc.Write(appendFrame(nil, FrameServerKey, appendServerKey(nil, s.priv.Public())))
	_, p, err := readRawFrame(br) // the ClientInfo
	if err != nil {
		return
	}
	clientPub := PublicKey(p[:KeyLen])
	sc.Write(serverInfoFrame(s.priv, clientPub, []byte(`{"version":2}`)))
	s.script(n, sc, br, clientPub)
}

func newScriptedRC(t *testing.T, s *scriptedServer, opts ...ClientOption) *ReconnectingClient {
	rc := &ReconnectingClient{
		URL:        "http://derp.invalid/derp",
		PrivateKey: mustKey(t),
		Dialer:     &FastStart{DialContext: s.dial},
		MinBackoff: 10 * time.Millisecond,
		MaxBackoff: 20 * time.Millisecond,
		Options:    opts,
	}
	t.Cleanup(func() { rc.Close(); s.close() })
	return rc
}

// testBounds lowers a Client's bounds on Send (10 s) and on its other
// writes (5 s) to a fifth, keeping their ratio, for the tests that wait
// them out against a server that reads nothing: what they check is that
// the bound ends the write, and how the Client and a ReconnectingClient
// come out of it, not its length (TestClientDefaultBounds checks that).
func testBounds() ClientOption {
	return func(o *clientOptions) { o.sendBound, o.writeBound = sendBound/5, writeBound/5 }
}

// TestClientDefaultBounds: a Client's bounds are the documented ones, Send
// 10 s and the other writes 5 s, unless a test lowers them.
func TestClientDefaultBounds(t *testing.T) {
	c := pipeClient(t, newTestServer(t))
	if c.opts.sendBound != 10*time.Second || c.opts.writeBound != 5*time.Second {
		t.Fatalf("Send's bound %v, the other writes' %v; documented: 10s and 5s", c.opts.sendBound, c.opts.writeBound)
	}
}

// callWithin runs f and reports whether it returned within d. f keeps
// running in the background otherwise (the test's cleanup unblocks it).
func callWithin(d time.Duration, f func()) (time.Duration, bool) {
	done := make(chan struct{})
	start := time.Now()
	go func() { f(); close(done) }()
	select {
	case <-done:
		return time.Since(start), true
	case <-time.After(d):
		return d, false
	}
}

// The server pings and then stops reading, so the pong the reconnecting
// client answers with cannot be written: Recv(ctx) must still return when
// ctx ends.
func TestReconnectingRecvCtxEndsStuckPong(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(n int, sc net.Conn, br *bufio.Reader, _ PublicKey) {
		var ping [8]byte
		sc.Write(appendFrame(nil, FramePing, ping[:]))
		s.stall() // never reads again
	}
	rc := newScriptedRC(t, s)
	if _, err := rc.Recv(context.Background()); err != nil { // ServerInfo
		t.Fatal(err)
	}
	wantRecvEndsWithCtx(t, rc)
}

// The same over loopback TCP, where the pong waits behind a Send that the
// full socket buffers hold: Recv(ctx) must still return when ctx ends.
func TestReconnectingRecvCtxEndsPongBehindStuckSend(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	pingNow := make(chan struct{})
	s.script = func(n int, sc net.Conn, br *bufio.Reader, _ PublicKey) {
		<-pingNow // the client's sender is blocked by now; we read nothing
		var ping [8]byte
		sc.Write(appendFrame(nil, FramePing, ping[:]))
		s.stall()
	}
	rc := newScriptedRC(t, s)
	rc.Dialer = &FastStart{DialContext: s.dialTCP}
	if _, err := rc.Recv(context.Background()); err != nil { // ServerInfo
		t.Fatal(err)
	}
	go func() { // fill the socket buffers until Send blocks
		for rc.Send(context.Background(), PublicKey{1}, make([]byte, MaxPacketSize)) == nil {
		}
	}()
	time.Sleep(500 * time.Millisecond)
	close(pingNow)
	wantRecvEndsWithCtx(t, rc)
}

// wantRecvEndsWithCtx checks that rc.Recv returns, with ctx's error, soon
// after a 200 ms ctx ends.
func wantRecvEndsWithCtx(t *testing.T, rc *ReconnectingClient) {
	t.Helper()
	wantEndsWithCtx(t, "Recv", func(ctx context.Context) error {
		_, err := rc.Recv(ctx)
		return err
	})
}

// wantEndsWithCtx checks that call returns, with ctx's error, soon after a
// 200 ms ctx ends.
func wantEndsWithCtx(t *testing.T, what string, call func(context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	var err error
	took, ok := callWithin(3*time.Second, func() { err = call(ctx) })
	if !ok {
		t.Fatalf("%s(ctx with 200ms timeout) still blocked after %v", what, took)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("%s returned %v after %v, want the context's error", what, err, took)
	}
}

// Send(ctx) to a server that stopped reading returns when ctx ends.
func TestReconnectingSendCtxEndsStuckWrite(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(int, net.Conn, *bufio.Reader, PublicKey) { s.stall() }
	rc := newScriptedRC(t, s)
	if err := rc.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	wantEndsWithCtx(t, "Send", func(ctx context.Context) error {
		return rc.Send(ctx, PublicKey{1}, make([]byte, 1000))
	})
}

// Close wakes a Recv that waits out a restart notice's delay, and nothing
// dials after Close.
func TestReconnectingCloseDuringBackoff(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(n int, sc net.Conn, br *bufio.Reader, _ PublicKey) {
		if n == 1 {
			// Ask the client to come back in 30 s, then hang up.
			sc.Write(appendFrame(nil, FrameRestarting, appendRestarting(nil, 30*time.Second, time.Second)))
			return
		}
		io.Copy(io.Discard, br)
	}
	rc := newScriptedRC(t, s)
	rc.MaxBackoff = time.Minute // the notice's 30 s stands
	ctx := context.Background()
	if _, err := rc.Recv(ctx); err != nil { // ServerInfo
		t.Fatal(err)
	}
	if m, err := rc.Recv(ctx); err != nil {
		t.Fatal(err)
	} else if _, ok := m.(ServerRestarting); !ok {
		t.Fatalf("got %T", m)
	}
	errc := make(chan error, 1)
	go func() { _, err := rc.Recv(ctx); errc <- err }()
	time.Sleep(100 * time.Millisecond) // Recv is now waiting out the 30 s
	rc.Close()
	closedAt := time.Now()
	dialsAtClose := s.dials.Load()
	select {
	case err := <-errc:
		t.Logf("Recv returned %v after Close", err)
	case <-time.After(10 * time.Second): // a hang guard, far below the notice's 30 s
		err := <-errc
		t.Errorf("Recv still blocked 10s after Close (the notice asked for 30s); returned %v after %v", err, time.Since(closedAt).Round(10*time.Millisecond))
	}
	if d := s.dials.Load() - dialsAtClose; d > 0 {
		t.Errorf("%d new connection(s) dialled (and logged in) after Close", d)
	}
}

// A ctx that ends while Recv skips frames it ignores (unassigned types)
// stays ended: Recv returns, though a fresh read deadline is set per frame
// and the server never stops sending.
func TestReconnectingRecvCtxBetweenSkippedFrames(t *testing.T) {
	lost := 0
	const runs = 5
	for range runs {
		s := &scriptedServer{priv: mustKey(t)}
		s.script = func(_ int, sc net.Conn, _ *bufio.Reader, _ PublicKey) {
			f := appendFrame(nil, 0x40, make([]byte, 16)) // unassigned type: skipped
			for {
				select {
				case <-s.closed:
					return
				default:
				}
				if _, err := sc.Write(f); err != nil {
					return
				}
			}
		}
		rc := &ReconnectingClient{URL: "http://derp.invalid/derp", PrivateKey: mustKey(t),
			Dialer: &FastStart{DialContext: s.dial}, Options: []ClientOption{RecvTimeout(time.Second)}}
		if _, err := rc.Recv(context.Background()); err != nil { // ServerInfo
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		if _, ok := callWithin(3*time.Second, func() { rc.Recv(ctx) }); !ok {
			lost++
		}
		cancel()
		rc.Close()
		s.close()
	}
	if lost > 0 {
		t.Fatalf("in %d of %d runs Recv(ctx with a 20ms timeout) was still running 3s later", lost, runs)
	}
}

// A restart notice asking for 49 days, with TryFor to match, delays the
// next dial by at most MaxBackoff.
func TestReconnectingRestartNoticeBounded(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(n int, sc net.Conn, br *bufio.Reader, _ PublicKey) {
		if n == 1 {
			sc.Write(appendFrame(nil, FrameRestarting, []byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0x13, 0x88}))
			return
		}
		io.Copy(io.Discard, br)
	}
	rc := newScriptedRC(t, s)
	rc.Fallbacks = []string{"http://derp2.invalid/derp"}
	ctx := context.Background()
	for {
		m, err := rc.Recv(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := m.(ServerRestarting); ok {
			break
		}
	}
	// The server hung up: the next Recv reconnects (to URL or the fallback).
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	m, err := rc.Recv(cctx)
	rc.mu.Lock()
	wait := time.Until(rc.nextDial)
	rc.mu.Unlock()
	if err != nil {
		t.Fatalf("Recv (MaxBackoff 20ms, one fallback, 5s ctx): %v; next dial in %v (%d dials)", err, wait.Round(time.Hour), s.dials.Load())
	}
	t.Logf("reconnected: %T", m)
}

// A WebSocket client whose server pings and then stops reading returns
// from Recv at RecvTimeout: the pong is not written by the reader.
func TestWebSocketClientPongDoesNotBlockRecv(t *testing.T) {
	srvPriv := mustKey(t)
	var conns []net.Conn
	var mu sync.Mutex
	var wg sync.WaitGroup
	stop := make(chan struct{})
	t.Cleanup(func() {
		close(stop)
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		cc, sc := net.Pipe()
		mu.Lock()
		conns = append(conns, cc, sc)
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			if !scriptedWSLogin(sc, srvPriv) {
				return
			}
			sc.Write(wsFrame(0x80|wsPing, []byte("hi"), true))
			<-stop // stops reading
		}()
		return cc, nil
	}
	f := &FastStart{WebSocket: true, DialContext: dial}
	c, _, err := f.Dial(context.Background(), "http://derp.invalid/derp", mustKey(t), RecvTimeout(300*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if m, err := c.Recv(); err != nil {
		t.Fatal(err)
	} else if _, ok := m.(ServerInfo); !ok {
		t.Fatalf("got %T", m)
	}
	took, ok := callWithin(3*time.Second, func() { _, err = c.Recv() })
	if !ok {
		t.Fatalf("Recv with RecvTimeout(300ms) still blocked after %v: stuck writing the WebSocket pong", took)
	}
	t.Logf("Recv returned after %v: %v", took, err)
}

// A Ping waiting for its Pong when Close is called must return promptly,
// not at its ctx deadline.
func TestReconnectingPingEndsOnClose(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(n int, sc net.Conn, br *bufio.Reader, _ PublicKey) {
		io.Copy(io.Discard, br) // reads everything, answers no Ping
	}
	rc := newScriptedRC(t, s)
	connectWithRecvLoop(t, rc)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	errc := make(chan error, 1)
	go func() { _, err := rc.Ping(ctx); errc <- err }()
	time.Sleep(200 * time.Millisecond)
	rc.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("Ping returned %v after Close, want ErrClosed", err)
		}
	case <-time.After(2 * time.Second):
		cancel()
		err := <-errc
		t.Fatalf("Ping still waiting 2s after Close (its ctx had 30s); returned %v only when ctx was cancelled", err)
	}
}

// OnConnect calling a method of the ReconnectingClient (to log the
// generation, the local address, the server key) must not deadlock. The
// callback gives up after 2s so that the test ends.
func TestReconnectingOnConnectMayCallBack(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(n int, sc net.Conn, br *bufio.Reader, _ PublicKey) { io.Copy(io.Discard, br) }
	rc := newScriptedRC(t, s)
	var stuck atomic.Bool
	rc.OnConnect = func(hs Handshake) {
		done := make(chan struct{})
		go func() { rc.Generation(); close(done) }()
		select {
		case <-done:
		case <-time.After(2 * time.Second):
			stuck.Store(true)
		}
	}
	if err := rc.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	if stuck.Load() {
		t.Fatalf("rc.Generation() called from OnConnect blocked for 2s (a real callback would deadlock)")
	}
}

// After concurrent NotePreferred(true) and NotePreferred(false) return, the
// server's last-told value must be what the client recorded (rc.preferred),
// since later calls with that same value send nothing.
func TestReconnectingNotePreferredConcurrent(t *testing.T) {
	var last atomic.Int32 // 0 false, 1 true
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(n int, sc net.Conn, br *bufio.Reader, _ PublicKey) {
		var wmu sync.Mutex
		for {
			ft, p, err := readRawFrame(br)
			if err != nil {
				return
			}
			switch ft {
			case FrameNotePreferred:
				last.Store(int32(p[0]))
			case FramePing:
				wmu.Lock()
				sc.Write(appendFrame(nil, FramePong, p))
				wmu.Unlock()
			}
		}
	}
	rc := newScriptedRC(t, s)
	connectWithRecvLoop(t, rc)
	bad := 0
	const runs = 50000
	for i := range runs {
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); rc.NotePreferred(true) }()
		go func() { defer wg.Done(); rc.NotePreferred(false) }()
		wg.Wait()
		if _, err := rc.Ping(context.Background()); err != nil { // barrier: the server has read both
			t.Fatalf("run %d: ping: %v", i, err)
		}
		rc.mu.Lock()
		want := rc.preferred
		rc.mu.Unlock()
		if got := last.Load() == 1; got != want {
			bad++
			if bad == 1 {
				// Does a later call with the recorded value repair it?
				rc.NotePreferred(want)
				rc.Ping(context.Background())
				t.Logf("run %d: client recorded preferred=%v, server was last told %v; NotePreferred(%v) again leaves the server at %v",
					i, want, got, want, last.Load() == 1)
			}
			// Re-sync for the next run.
			rc.NotePreferred(!want)
			rc.NotePreferred(want)
			rc.Ping(context.Background())
		}
	}
	if bad > 0 {
		t.Fatalf("%d of %d runs: the server's preferred flag disagrees with the client's", bad, runs)
	}
}

// OnConnect may call methods that dial again: here, Sends until one fails
// (the server hangs up at once) and a Connect that dials the next
// connection, which calls OnConnect in turn.
func TestReconnectingOnConnectMayRedial(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(n int, sc net.Conn, br *bufio.Reader, _ PublicKey) {
		if n > 1 {
			io.Copy(io.Discard, br)
		}
	}
	rc := newScriptedRC(t, s)
	rc.Dialer = &FastStart{DialContext: s.dialTCP} // writes do not wait for the reader
	var calls atomic.Int32
	var cbErr atomic.Value
	rc.OnConnect = func(Handshake) {
		if calls.Add(1) > 1 {
			return
		}
		for rc.Generation() == 1 {
			rc.Send(context.Background(), PublicKey{1}, []byte("x")) // fails once the hang-up arrives
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			err := rc.Connect(ctx)
			cancel()
			if err != nil {
				cbErr.Store(err)
				return
			}
		}
	}
	if _, ok := callWithin(10*time.Second, func() { rc.Connect(context.Background()) }); !ok {
		t.Fatal("Connect with an OnConnect that dials again did not return")
	}
	if err := cbErr.Load(); err != nil {
		t.Fatalf("Connect from OnConnect: %v", err)
	}
	if calls.Load() != 2 || rc.Generation() != 2 {
		t.Fatalf("OnConnect called %d times, generation %d; want 2 and 2", calls.Load(), rc.Generation())
	}
}

// After Close every method that would talk to the server returns ErrClosed.
func TestReconnectingMethodsAfterClose(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(n int, sc net.Conn, br *bufio.Reader, _ PublicKey) { io.Copy(io.Discard, br) }
	rc := newScriptedRC(t, s)
	if err := rc.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	rc.Close()
	ctx := context.Background()
	for name, err := range map[string]error{
		"Send":                   rc.Send(ctx, PublicKey{1}, []byte("x")),
		"NotePreferred":          rc.NotePreferred(true),
		"WatchConnectionChanges": rc.WatchConnectionChanges(),
		"Connect":                rc.Connect(ctx),
	} {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", name, err)
		}
	}
	if _, err := rc.Ping(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("Ping after Close: %v, want ErrClosed", err)
	}
}

// connectWithRecvLoop connects rc and keeps a Recv loop running on it (for
// Ping's Pongs) until rc is closed.
func connectWithRecvLoop(t *testing.T, rc *ReconnectingClient) {
	t.Helper()
	go func() {
		for {
			if _, err := rc.Recv(context.Background()); err != nil {
				return
			}
		}
	}()
	if err := rc.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// readRawFrame reads one DERP frame, however long its length says it is.
func readRawFrame(r io.Reader) (FrameType, []byte, error) {
	var h [frameHeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, err
	}
	p := make([]byte, binary.BigEndian.Uint32(h[1:]))
	_, err := io.ReadFull(r, p)
	return FrameType(h[0]), p, err
}

// Ping to a server that stopped reading returns when ctx ends: its write
// must not hold it past the wait its doc promises.
func TestReconnectingPingCtxEndsStuckWrite(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(int, net.Conn, *bufio.Reader, PublicKey) { s.stall() }
	rc := newScriptedRC(t, s)
	if err := rc.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	wantEndsWithCtx(t, "Ping", func(ctx context.Context) error {
		_, err := rc.Ping(ctx)
		return err
	})
}

// TestReconnectingPingWriteTimeoutMarksSilent: a Ping whose write its
// deadline cuts short (the server, or the path, takes nothing more) timed
// out as much as one whose Pong does not come: it marks the server's path
// silent too, which a later dial's timeout must know (see dial), and its
// error says it was the ping.
func TestReconnectingPingWriteTimeoutMarksSilent(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(int, net.Conn, *bufio.Reader, PublicKey) { s.stall() }
	rc := newScriptedRC(t, s)
	if err := rc.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	rc.mu.Lock()
	keyID := rc.cKeyID
	rc.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := rc.Ping(ctx)
	t.Logf("Ping to a server that reads nothing: %v", err)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "ping") {
		t.Errorf("Ping: %v, want a ping error wrapping context.DeadlineExceeded", err)
	}
	rc.mu.Lock()
	silent := rc.silent[keyID]
	rc.mu.Unlock()
	if !silent {
		t.Errorf("a Ping whose write timed out did not mark %s's path silent", keyID)
	}
}

// ClosePeer(ctx) to a server that stopped reading returns when ctx ends,
// as Send and ForwardPacket do.
func TestReconnectingClosePeerCtxEndsStuckWrite(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(int, net.Conn, *bufio.Reader, PublicKey) { s.stall() }
	rc := newScriptedRC(t, s)
	if err := rc.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	wantEndsWithCtx(t, "ClosePeer", func(ctx context.Context) error {
		return rc.ClosePeer(ctx, PublicKey{1})
	})
}

// A server that takes every login and hangs up at once is redialled with
// backoff, not in a tight loop: a session that ends right after its
// ServerInfo counts as a failure.
func TestReconnectingBacksOffAfterShortSessions(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(int, net.Conn, *bufio.Reader, PublicKey) {} // hangs up after ServerInfo
	rc := newScriptedRC(t, s)
	rc.MinBackoff, rc.MaxBackoff = 100*time.Millisecond, time.Second
	infos := recvCounting[ServerInfo](rc, time.Second)
	// Waits of 50–100, 100–200, 200–400 and 400–800 ms allow at most 5
	// dials in the second; without backoff there are thousands.
	if n := s.dials.Load(); n > 10 || infos == 0 {
		t.Fatalf("%d dials (%d ServerInfo) in 1s against a server that hangs up after each login", n, infos)
	}
}

// A call that needs a connection while another call's dial is under way
// (here against a server that never answers the upgrade, so the dial runs
// until DialTimeout) waits for it only as long as its own ctx lasts.
func TestReconnectingSendCtxEndsWaitForOtherDial(t *testing.T) {
	var mu sync.Mutex
	var conns []net.Conn
	var dials atomic.Int32
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	silent := func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		cc, sc := net.Pipe()
		mu.Lock()
		conns = append(conns, cc, sc)
		mu.Unlock()
		go io.Copy(io.Discard, sc) // reads the upgrade request, never answers
		return cc, nil
	}
	rc := &ReconnectingClient{URL: "http://derp.invalid/derp", PrivateKey: mustKey(t),
		Dialer: &FastStart{DialContext: silent}, DialTimeout: 30 * time.Second}
	t.Cleanup(func() { rc.Close() })
	go rc.Connect(context.Background()) // dials until DialTimeout or Close
	waitForT(t, "the first dial", func() bool { return dials.Load() == 1 })
	wantEndsWithCtx(t, "Send", func(ctx context.Context) error {
		return rc.Send(ctx, PublicKey{1}, []byte("x"))
	})
	wantEndsWithCtx(t, "Connect", rc.Connect)
}

// A node that upgrades the connection, sends its ServerKey and then never
// confirms the login (no ServerInfo) is a node that accepted and stalled:
// while another node remains, it gets its share of DialTimeout, not
// RecvTimeout's 120 s, before the client moves on.
func TestReconnectingFailoverWhenLoginStalls(t *testing.T) {
	good := &scriptedServer{priv: mustKey(t)}
	good.script = func(_ int, _ net.Conn, br *bufio.Reader, _ PublicKey) { io.Copy(io.Discard, br) }
	stalled := &scriptedServer{priv: mustKey(t)}
	stalled.init()
	var stalledDials atomic.Int32
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		if addr != "stalled.invalid:80" {
			return good.dial(ctx, network, addr)
		}
		stalledDials.Add(1)
		return stalled.pipe(func(sc net.Conn, br *bufio.Reader) {
			if _, err := http.ReadRequest(br); err != nil {
				return
			}
			io.WriteString(sc, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
			sc.Write(appendFrame(nil, FrameServerKey, appendServerKey(nil, stalled.priv.Public())))
			io.Copy(io.Discard, br) // the ClientInfo, and no answer
		}), nil
	}
	rc := &ReconnectingClient{URL: "http://stalled.invalid/derp", Fallbacks: []string{"http://good.invalid/derp"},
		PrivateKey: mustKey(t), Dialer: &FastStart{DialContext: dial}, DialTimeout: 2 * time.Second}
	t.Cleanup(func() { rc.Close(); stalled.close(); good.close() })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second) // RecvTimeout is 120 s
	defer cancel()
	m, err := rc.Recv(ctx)
	if err != nil {
		t.Fatalf("Recv: %v (the stalled node was dialled %d times)", err, stalledDials.Load())
	}
	if _, ok := m.(ServerInfo); !ok || good.dials.Load() != 1 {
		t.Fatalf("got %T, %d dials of the good node, want its ServerInfo", m, good.dials.Load())
	}
}

// TestReconnectingDialWriteToStalledServer: the frames a new connection
// starts with (NotePreferred, WatchConns) are written before the dial
// returns. Over a transport with no buffer (a net.Pipe here; a socket whose
// buffer is full alike), a server that stops reading after the login (or,
// as Tailscale's does, writes its ServerInfo before reading on, which the
// client reads only later) holds that write. It must not hold the client's
// lock, so that Generation and Close return, nor outlast DialTimeout.
func TestReconnectingDialWriteToStalledServer(t *testing.T) {
	for _, tt := range []struct {
		name, write string
		set         func(*ReconnectingClient) error
	}{
		{"NotePreferred", "relay.(*Client).NotePreferred(", func(rc *ReconnectingClient) error { return rc.NotePreferred(true) }},
		{"WatchConns", "relay.(*Client).WatchConnectionChanges(", func(rc *ReconnectingClient) error { return rc.WatchConnectionChanges() }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := &scriptedServer{priv: mustKey(t)}
			s.script = func(int, net.Conn, *bufio.Reader, PublicKey) { s.stall() }
			rc := newScriptedRC(t, s)
			t.Cleanup(func() { // first, should a write still hold rc's lock
				s.mu.Lock()
				for _, c := range s.conns {
					c.Close()
				}
				s.mu.Unlock()
			})
			rc.DialTimeout = time.Second
			if err := tt.set(rc); err != nil { // not connected: for the dial to send
				t.Fatal(err)
			}
			stuck := func() bool { return strings.Contains(leakedGoroutines(), tt.write) }
			connect := func() chan error {
				ch := make(chan error, 1)
				go func() { ch <- rc.Connect(context.Background()) }()
				return ch
			}
			wantReturn := func(ch chan error, what string) error {
				t.Helper()
				select {
				case err := <-ch:
					return err
				case <-time.After(10 * time.Second):
					t.Fatalf("Connect still blocked 10 s after %s", what)
					return nil
				}
			}

			// DialTimeout bounds the write, and Generation does not wait.
			ch := connect()
			waitFor(t, stuck)
			if took, ok := callWithin(3*time.Second, func() { rc.Generation() }); !ok {
				t.Fatalf("Generation blocked for %v behind the dial's write", took)
			}
			if err := wantReturn(ch, "its 1 s DialTimeout"); err == nil {
				t.Fatal("Connect succeeded without its first frame written")
			}

			// Close ends the write, and returns.
			ch = connect()
			waitFor(t, stuck)
			if took, ok := callWithin(3*time.Second, func() { rc.Close() }); !ok {
				t.Fatalf("Close blocked for %v behind the dial's write", took)
			}
			if err := wantReturn(ch, "Close"); !errors.Is(err, ErrClosed) {
				t.Fatalf("Connect after Close: %v, want ErrClosed", err)
			}
		})
	}
}

// deadlineSpy is a net.Conn that notes when the past write deadline is
// set (a lockBy timer fired) and counts the writes started after that.
type deadlineSpy struct {
	net.Conn
	pastOnce  sync.Once
	past      chan struct{} // closed when the past deadline is first set
	pastSeen  atomic.Bool
	lateWrite atomic.Int32 // writes started after the past deadline was set
	writes    atomic.Int32 // writes started
}

func (c *deadlineSpy) SetWriteDeadline(t time.Time) error {
	if t.Equal(pastDeadline) {
		c.pastSeen.Store(true)
		c.pastOnce.Do(func() { close(c.past) })
	}
	return c.Conn.SetWriteDeadline(t)
}

func (c *deadlineSpy) Write(p []byte) (int, error) {
	c.writes.Add(1)
	if c.pastSeen.Load() {
		c.lateWrite.Add(1)
	}
	return c.Conn.Write(p)
}

// TestLockByBoundHoldsBehindRenewedSend: a write waiting for the Client
// (NotePreferred, 5 s bound: a fifth here) whose bound passes while a Send
// holds the Client gives the stream up. The Send that held it may still
// finish (its write was done just as the bound passed), but a Send that
// takes the Client next, before the waiter (the mutex is no queue), fails
// at once: it used to renew its own write deadline over the waiter's past
// one and write, holding the waiter up to Send's 10 s bound more. A hook
// holds the waiter between arming its timer and taking the lock, so that
// the second Send comes first.
func TestLockByBoundHoldsBehindRenewedSend(t *testing.T) {
	cc, sc := net.Pipe()
	t.Cleanup(func() { cc.Close(); sc.Close() })
	spy := &deadlineSpy{Conn: cc, past: make(chan struct{})}
	readFrame := func() error {
		var h [frameHeaderLen]byte
		if _, err := io.ReadFull(sc, h[:]); err != nil {
			return err
		}
		_, err := io.CopyN(io.Discard, sc, int64(binary.BigEndian.Uint32(h[1:])))
		return err
	}
	login := make(chan error, 1)
	go func() { login <- readFrame() }() // the ClientInfo
	waiting, proceed := make(chan struct{}), make(chan struct{})
	hook := func(o *clientOptions) {
		o.lockByWait = func() { close(waiting); <-proceed }
	}
	c, err := NewClient(mustKey(t), spy, nil, ServerPublicKey(mustKey(t).Public()), testBounds(), hook)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := <-login; err != nil {
		t.Fatal(err)
	}
	dst := mustKey(t).Public()
	result := func(f func() error) chan error {
		ch := make(chan error, 1)
		go func() { ch <- f() }()
		return ch
	}
	wait := func(ch chan error, what string) error {
		t.Helper()
		select {
		case err := <-ch:
			return err
		case <-time.After(20 * time.Second):
			t.Fatalf("%s still blocked after 20 s", what)
			return nil
		}
	}

	// The first Send holds the Client, its write stuck (nothing reads).
	send1 := result(func() error { return c.Send(dst, []byte("first")) })
	waitFor(t, func() bool { return spy.writes.Load() == 2 }) // the ClientInfo, then the Send's
	note := result(func() error { return c.NotePreferred(true) })
	<-waiting // NotePreferred's timer is armed
	// The peer reads the first Send's frame: it is done, and frees the
	// Client. Then NotePreferred's bound passes.
	if err := readFrame(); err != nil {
		t.Fatal(err)
	}
	if err := wait(send1, "the first Send"); err != nil {
		t.Fatalf("the first Send, read by the peer: %v", err)
	}
	<-spy.past
	// A second Send takes the Client before NotePreferred. More than
	// half Send's bound has passed since the first renewed its deadline
	// (the waiter's bound, half Send's, passed since), so it would renew.
	err2 := wait(result(func() error { return c.Send(dst, []byte("second")) }), "the second Send")
	close(proceed)
	errNote := wait(note, "NotePreferred")
	if n := spy.lateWrite.Load(); n != 0 {
		t.Errorf("%d writes started after NotePreferred's bound passed (the second Send held the Client past it)", n)
	}
	if err2 == nil || !errors.Is(err2, os.ErrDeadlineExceeded) {
		t.Errorf("the second Send: %v, want a deadline error", err2)
	}
	if errNote == nil {
		t.Error("NotePreferred succeeded past its bound")
	}
	if err := c.Send(dst, []byte("later")); err == nil {
		t.Error("a Send after the Client was given up succeeded")
	}
}

// TestForwardPacketBoundedBehindStuckWrite: ForwardPacket's 5 s bound (a
// fifth here: testBounds) holds
// when another write on the Client (a Pong, a WatchConns: one mesh client
// that both watches a peer and is its PacketForwarder) is stuck on a server
// that stopped reading: the forward does not wait for it past its bound but
// fails, and the connection with it.
func TestForwardPacketBoundedBehindStuckWrite(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(int, net.Conn, *bufio.Reader, PublicKey) { s.stall() }
	t.Cleanup(s.close)
	c, _ := dialFast(t, &FastStart{DialContext: s.dial}, "http://derp.invalid/derp", testBounds())
	pong := make(chan error, 1)
	go func() { pong <- c.SendPong([8]byte{}) }()
	waitFor(t, func() bool { return strings.Contains(leakedGoroutines(), "relay.(*Client).SendPong(") })
	var err error
	if took, ok := callWithin(20*time.Second, func() { err = c.ForwardPacket(PublicKey{1}, PublicKey{2}, []byte("x")) }); !ok {
		t.Fatalf("ForwardPacket still blocked after %v behind a stuck Pong (its bound is %v)", took, writeBound/5)
	}
	if err == nil {
		t.Fatal("ForwardPacket succeeded while the server reads nothing")
	}
	select {
	case err := <-pong:
		if err == nil {
			t.Fatal("the stuck Pong succeeded")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the stuck Pong still blocked after the forward gave up")
	}
}

// A ctx that ends just as a write finishes leaves the connection
// interrupted for good: the write stands, and the connection is dropped,
// so that the next call connects again rather than failing.
func TestReconnectingCtxEndingAsWriteFinishes(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(_ int, _ net.Conn, br *bufio.Reader, _ PublicKey) { io.Copy(io.Discard, br) }
	rc := newScriptedRC(t, s)
	if _, err := rc.Recv(context.Background()); err != nil { // ServerInfo
		t.Fatal(err)
	}
	rc.mu.Lock()
	c := rc.c
	rc.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	err := rc.writeUnder(ctx, c, func() error {
		err := c.Send(PublicKey{1}, []byte("x"))
		cancel() // ctx ends as the write returns
		for !c.interrupted.Load() {
			time.Sleep(time.Millisecond)
		}
		return err
	})
	if err != nil {
		t.Fatalf("the write itself: %v", err)
	}
	// The next connection's ServerInfo waits on the pipe for a reader.
	go rc.Recv(context.Background())
	if err := rc.Send(context.Background(), PublicKey{1}, []byte("y")); err != nil {
		t.Fatalf("Send after a ctx ended at the end of the previous write: %v", err)
	}
	if n := s.dials.Load(); n != 2 {
		t.Errorf("%d dials, want 2 (the interrupted connection replaced)", n)
	}
}

// TestClientWritesBoundedOnStalledServer: a Client's control frames, on a
// transport with no buffer (a net.Pipe; a full socket buffer alike) to a
// server that stops reading after the login, fail within their 5 s bound
// (a fifth here: testBounds) instead of blocking forever, whether they
// write themselves or wait behind a Send that the stalled server holds
// (which then fails too).
func TestClientWritesBoundedOnStalledServer(t *testing.T) {
	writes := []struct {
		name  string
		write func(c *Client) error
	}{
		{"NotePreferred", func(c *Client) error { return c.NotePreferred(true) }},
		{"SendPing", func(c *Client) error { return c.SendPing([8]byte{1}) }},
		{"SendPong", func(c *Client) error { return c.SendPong([8]byte{1}) }},
		{"WatchConnectionChanges", func(c *Client) error { return c.WatchConnectionChanges() }},
		{"ClosePeer", func(c *Client) error { return c.ClosePeer(PublicKey{1}) }},
	}
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(int, net.Conn, *bufio.Reader, PublicKey) { s.stall() }
	t.Cleanup(s.close)
	// All at once, each on its own Client, so that the test waits out
	// the bound once.
	type result struct {
		name      string
		err       error
		sendErr   error // the stuck Send's, for the cases behind one
		behind    bool
		sendEnded bool
	}
	var wg sync.WaitGroup
	results := make(chan result, 2*len(writes))
	for _, behind := range []bool{false, true} {
		for _, w := range writes {
			c, _ := dialFast(t, &FastStart{DialContext: s.dial}, "http://derp.invalid/derp", testBounds())
			send := make(chan error, 1)
			if behind {
				go func() { send <- c.Send(PublicKey{1}, []byte("x")) }()
				waitFor(t, func() bool { // Send holds the write lock
					if c.wmu.TryLock() {
						c.wmu.Unlock()
						return false
					}
					return true
				})
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := result{name: w.name, behind: behind, err: w.write(c)}
				if behind {
					select {
					case r.sendErr = <-send:
						r.sendEnded = true
					case <-time.After(10 * time.Second):
					}
				}
				results <- r
			}()
		}
	}
	if took, ok := callWithin(30*time.Second, wg.Wait); !ok {
		t.Errorf("after %v, %d of %d writes to a server that reads nothing still blocked (their bound is %v)", took, 2*len(writes)-len(results), 2*len(writes), writeBound/5)
	}
	for range len(results) { // (a write still blocked sends later, into the buffer)
		r := <-results
		name := r.name
		if r.behind {
			name += " behind a stuck Send"
		}
		t.Logf("%s: %v", name, r.err)
		switch {
		case r.err == nil:
			t.Errorf("%s succeeded while the server reads nothing", name)
		case r.behind && !r.sendEnded:
			t.Errorf("%s: the stuck Send still blocked 10 s after the write behind it gave up", name)
		case r.behind && r.sendErr == nil:
			t.Errorf("%s: the stuck Send succeeded", name)
		}
	}
}

// TestReconnectingWritesWithoutCtxBounded: the ReconnectingClient's writes
// that take no ctx (NotePreferred, WatchConnectionChanges, and the Pong
// with which Recv answers a server's Ping, under Recv(context.Background()))
// are bounded all the same: to a server that stops reading after the login
// (over a net.Pipe, which has no buffer) they fail within 5 s (a fifth
// here: testBounds), dropping the connection, and Recv connects again,
// instead of blocking until Close.
func TestReconnectingWritesWithoutCtxBounded(t *testing.T) {
	cases := []struct {
		name  string
		call  func(rc *ReconnectingClient) error // must fail
		recvd bool                               // call is a Recv that must reconnect
	}{
		{"NotePreferred", func(rc *ReconnectingClient) error { return rc.NotePreferred(true) }, false},
		{"WatchConnectionChanges", func(rc *ReconnectingClient) error { return rc.WatchConnectionChanges() }, false},
		{"Recv's Pong", func(rc *ReconnectingClient) error {
			m, gen, err := rc.RecvDetail(context.Background())
			if err != nil {
				return err
			}
			if _, ok := m.(ServerInfo); !ok || gen != 2 {
				return fmt.Errorf("Recv returned %T on connection %d, want the ServerInfo of connection 2", m, gen)
			}
			return nil
		}, true},
	}
	type result struct {
		name  string
		err   error
		dials int32
	}
	results := make(chan result, len(cases))
	var wg sync.WaitGroup
	for _, tc := range cases {
		s := &scriptedServer{priv: mustKey(t)}
		s.script = func(n int, sc net.Conn, br *bufio.Reader, _ PublicKey) {
			if n > 1 {
				io.Copy(io.Discard, br)
				return
			}
			if tc.recvd {
				var ping [8]byte
				sc.Write(appendFrame(nil, FramePing, ping[:]))
			}
			s.stall() // never reads again
		}
		rc := newScriptedRC(t, s, testBounds())
		if _, err := rc.Recv(context.Background()); err != nil { // ServerInfo
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := tc.call(rc)
			results <- result{tc.name, err, s.dials.Load()}
		}()
	}
	if took, ok := callWithin(30*time.Second, wg.Wait); !ok {
		t.Errorf("after %v, %d of %d calls writing to a server that reads nothing still blocked (the bound is %v)", took, len(cases)-len(results), len(cases), writeBound/5)
	}
	for range len(results) {
		r := <-results
		t.Logf("%s: %v (%d dials)", r.name, r.err, r.dials)
		if r.name == "Recv's Pong" {
			if r.err != nil {
				t.Errorf("%s: %v", r.name, r.err)
			}
		} else if r.err == nil {
			t.Errorf("%s succeeded while the server reads nothing", r.name)
		}
	}
}

// TestSendBoundedOnStalledServer: Send to a server that stops reading after
// the login fails within its bound (at most 10 s; a fifth here:
// testBounds) instead of blocking forever: Client.Send and
// ReconnectingClient.Send(context.Background()), over a net.Pipe (no
// buffer) and over loopback TCP (Sends fill the socket buffers first), and
// the ReconnectingClient's next call reconnects.
func TestSendBoundedOnStalledServer(t *testing.T) {
	type result struct {
		name string
		err  error
		rc   *ReconnectingClient
	}
	var wg sync.WaitGroup
	results := make(chan result, 4)
	start := func(name string, send func() error, rc *ReconnectingClient) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			for err == nil { // until the buffers are full and a Send blocks
				err = send()
			}
			results <- result{name, err, rc}
		}()
	}
	pkt := make([]byte, 1000)
	for _, tcp := range []bool{false, true} {
		s := &scriptedServer{priv: mustKey(t)}
		s.script = func(n int, sc net.Conn, br *bufio.Reader, _ PublicKey) {
			if n > 1 {
				io.Copy(io.Discard, br)
				return
			}
			s.stall() // never reads again
		}
		dial, via := s.dial, "pipe"
		if tcp {
			dial, via = s.dialTCP, "TCP"
		}
		c, _ := dialFast(t, &FastStart{DialContext: dial}, "http://derp.invalid/derp", testBounds())
		start("Client.Send over "+via, func() error { return c.Send(PublicKey{1}, pkt) }, nil)

		s2 := &scriptedServer{priv: mustKey(t), script: s.script}
		rc := newScriptedRC(t, s2, testBounds())
		rc.Dialer = &FastStart{DialContext: s2.dial}
		if tcp {
			rc.Dialer = &FastStart{DialContext: s2.dialTCP}
		}
		if _, err := rc.Recv(context.Background()); err != nil { // ServerInfo
			t.Fatal(err)
		}
		start("ReconnectingClient.Send over "+via, func() error { return rc.Send(context.Background(), PublicKey{1}, pkt) }, rc)
		t.Cleanup(s.close)
	}
	if took, ok := callWithin(40*time.Second, wg.Wait); !ok {
		t.Errorf("after %v, %d of 4 Send loops to a server that reads nothing still blocked (the bound is %v)", took, 4-len(results), sendBound/5)
	}
	for range len(results) { // (a Send still blocked sends later, into the buffer)
		r := <-results
		t.Logf("%s: %v", r.name, r.err)
		if r.rc == nil {
			continue
		}
		// The connection was dropped: the next Send connects again.
		go r.rc.Recv(context.Background()) // reads the next ServerInfo off the pipe
		if err := r.rc.Send(context.Background(), PublicKey{1}, pkt); err != nil {
			t.Errorf("%s after the failed one: %v", r.name, err)
		}
	}
}

// TestNewClientLoginTimeoutBoundsClientInfo: LoginTimeout bounds NewClient's
// write of the ClientInfo too: over a transport with no buffer (a net.Pipe)
// to a server that reads nothing, NewClient fails within it, with a key
// known in advance or one read from the server's ServerKey frame.
func TestNewClientLoginTimeoutBoundsClientInfo(t *testing.T) {
	for _, known := range []bool{true, false} {
		t.Run(fmt.Sprintf("known_key=%v", known), func(t *testing.T) {
			srv := mustKey(t)
			cc, sc := net.Pipe()
			t.Cleanup(func() { cc.Close(); sc.Close() })
			opts := []ClientOption{LoginTimeout(300 * time.Millisecond)}
			if known {
				opts = append(opts, ServerPublicKey(srv.Public()))
			} else {
				// The server sends its key, then reads nothing.
				go sc.Write(appendFrame(nil, FrameServerKey, appendServerKey(nil, srv.Public())))
			}
			var err error
			if took, ok := callWithin(10*time.Second, func() { _, err = NewClient(mustKey(t), cc, nil, opts...) }); !ok {
				t.Fatalf("NewClient with a 300 ms LoginTimeout still blocked after %v writing its ClientInfo to a server that reads nothing", took)
			}
			t.Logf("NewClient: %v", err)
			if err == nil || !strings.Contains(err.Error(), "client info") {
				t.Fatalf("NewClient: %v, want a failure to send the client info", err)
			}
		})
	}
}

// silentProxy forwards TCP connections to target; while silent is set it
// reads what either side sends and throws it away, and closes nothing: a
// path that has become a black hole (a NAT that dropped its mapping, a
// cable pulled, a peer paused), as both ends see it, with no FIN or RST.
// Connections made while it is silent are accepted and blackholed too.
// Setting silentTo to accepted's value blackholes the connections made so
// far and no later one: the old path of a client whose network changed.
type silentProxy struct {
	ln       net.Listener
	silent   atomic.Bool
	accepted atomic.Int64
	silentTo atomic.Int64 // connections numbered up to this one are silent

	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
}

func newSilentProxy(t *testing.T, target string) *silentProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &silentProxy{ln: ln}
	p.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n := p.accepted.Add(1)
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			p.wg.Go(func() { p.pipe(c, u, n) })
			p.wg.Go(func() { p.pipe(u, c, n) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

// pipe copies src to dst for the proxy's connection number id.
func (p *silentProxy) pipe(dst, src net.Conn, id int64) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !p.silent.Load() && id > p.silentTo.Load() {
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *silentProxy) url() string { return "http://" + p.ln.Addr().String() + "/derp" }

// TestReconnectingBlackholeKeepsFastStart: a path that goes silent for a
// while (no FIN, no RST) times out the session (RecvTimeout) and then every
// dial, the fast-start dials with the server's learned key among them.
// Such a timeout is no sign that something between does not pass fast
// start (the reverse proxy of TestFastStartThroughReverseProxy): the dials
// without the key time out just the same. Once the path is back, the
// client reconnects and delivery resumes, and later reconnects still take
// the fast path; it was given up for good after the first timed-out dial.
func TestReconnectingBlackholeKeepsFastStart(t *testing.T) {
	s := newTestServer(t, WithKeepAlive(100*time.Millisecond))
	backend := serveDERP(t, s, derpServeOpts{plain: true})
	p := newSilentProxy(t, backend.Addr)
	h := newRCHarness(t, &TestServer{URL: p.url()}, func(rc *ReconnectingClient) {
		rc.Options = []ClientOption{RecvTimeout(500 * time.Millisecond)}
		rc.DialTimeout = time.Second
	})
	self := h.rc.PrivateKey.Public()
	rcNext[ServerInfo](t, h) // upgrade: the key is learned
	s.closePeer(self)
	rcNext[ServerInfo](t, h) // fast start with the learned key
	h.mu.Lock()
	if n := len(h.connects); n != 2 || h.connects[1].Path != FastPath {
		h.mu.Unlock()
		t.Fatalf("connects %+v, want the second on the fast path", h.connects)
	}
	h.mu.Unlock()

	p.silent.Store(true)
	// The session times out, then three dials do (fast start with the
	// key, and after it at least one without).
	waitForWithin(t, 30*time.Second, func() bool { return p.accepted.Load() >= 2+4 })
	p.silent.Store(false)
	rcNext[ServerInfo](t, h) // back
	y := dialNode(t, &meshNode{url: backend.URL}, mustKey(t))
	for { // the first packets may go to the session that timed out
		if err := y.Send(self, []byte("after the outage")); err != nil {
			t.Fatal(err)
		}
		select {
		case m := <-h.msgs:
			if pkt, ok := m.(*ReceivedPacket); !ok || string(pkt.Data) != "after the outage" {
				continue
			}
		case <-time.After(100 * time.Millisecond):
			continue
		}
		break
	}

	s.closePeer(self)
	rcNext[ServerInfo](t, h)
	h.mu.Lock()
	defer h.mu.Unlock()
	if last := h.connects[len(h.connects)-1]; last.Path != FastPath {
		t.Errorf("after the outage a reconnect took the %s path (%s); want the fast path with the learned key", last.Path, last.Reason)
	}
}

// TestReconnectingClientReconnect: after a network change the old path is
// a black hole (no FIN, no RST) while new connections work. A Ping on the
// old connection times out; Reconnect drops it, and the Recv loop dials a
// new one at once: not after RecvTimeout (a minute here), nor after the
// backoff of a failure (a minute too), and delivery resumes on it.
func TestReconnectingClientReconnect(t *testing.T) {
	s := newTestServer(t)
	backend := serveDERP(t, s, derpServeOpts{plain: true})
	p := newSilentProxy(t, backend.Addr)
	h := newRCHarness(t, &TestServer{URL: p.url()}, func(rc *ReconnectingClient) {
		rc.Options = []ClientOption{RecvTimeout(time.Minute)}
		rc.MinBackoff, rc.MaxBackoff = time.Minute, time.Minute
	})
	self := h.rc.PrivateKey.Public()
	rcNext[ServerInfo](t, h)
	gen := h.rc.Generation()

	p.silentTo.Store(p.accepted.Load()) // the old path goes dark
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	_, err := h.rc.Ping(ctx)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Ping over a silent path: %v, want a timeout", err)
	}
	h.rc.Reconnect()
	rcNext[ServerInfo](t, h)
	if g := h.rc.Generation(); g != gen+1 {
		t.Fatalf("generation %d after Reconnect, want %d", g, gen+1)
	}
	if _, err := h.rc.Ping(context.Background()); err != nil {
		t.Fatalf("Ping on the new connection: %v", err)
	}
	y := dialNode(t, &meshNode{url: backend.URL}, mustKey(t))
	if err := y.Send(self, []byte("after Reconnect")); err != nil {
		t.Fatal(err)
	}
	if pkt := rcNext[*ReceivedPacket](t, h); string(pkt.Data) != "after Reconnect" {
		t.Fatalf("got %q", pkt.Data)
	}

	// Without a connection, and after Close, it does nothing harmful.
	h.rc.Reconnect()
	h.rc.Reconnect()
	rcNext[ServerInfo](t, h)
	h.rc.Close()
	h.rc.Reconnect()
	if err := h.rc.Send(context.Background(), self, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Send after Close and Reconnect: %v, want ErrClosed", err)
	}
}

// TestReconnectingWriteCutByReconnectIsNotErrClosed: a write under way when
// Reconnect drops its connection fails, but not with ErrClosed, which says
// the ReconnectingClient was closed: a send loop that stops on ErrClosed
// would stop for good. It fails with ErrNotConnected, and the client goes
// on.
func TestReconnectingWriteCutByReconnectIsNotErrClosed(t *testing.T) {
	for _, name := range []string{"Send", "ForwardPacket", "ClosePeer", "Ping", "NotePreferred"} {
		t.Run(name, func(t *testing.T) {
			s := &scriptedServer{priv: mustKey(t)}
			writing := make(chan struct{}, 1)
			s.script = func(n int, sc net.Conn, br *bufio.Reader, _ PublicKey) {
				if n == 1 {
					// The first byte of the call's frame, straight from
					// the pipe: the rest of its write waits.
					var b [1]byte
					if _, err := sc.Read(b[:]); err == nil {
						writing <- struct{}{}
					}
					s.stall()
					return
				}
				io.Copy(io.Discard, sc) // the next connection's first frames
			}
			rc := newScriptedRC(t, s)
			// The first connection over a pipe, whose writes wait for
			// the server; the next over TCP, where the new connection's
			// first frames do not wait for the server's ServerInfo to be
			// read.
			var dialled atomic.Bool
			rc.Dialer.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
				if dialled.Swap(true) {
					return s.dialTCP(ctx, network, addr)
				}
				return s.dial(ctx, network, addr)
			}
			connectWithRecvLoop(t, rc)
			gen := rc.Generation()
			errc := make(chan error, 1)
			go func() {
				ctx := context.Background()
				var err error
				switch name {
				case "Send":
					err = rc.Send(ctx, PublicKey{1}, []byte("cut short"))
				case "ForwardPacket":
					err = rc.ForwardPacket(ctx, PublicKey{1}, PublicKey{2}, []byte("cut short"))
				case "ClosePeer":
					err = rc.ClosePeer(ctx, PublicKey{1})
				case "Ping":
					_, err = rc.Ping(ctx)
				case "NotePreferred":
					err = rc.NotePreferred(true)
				}
				errc <- err
			}()
			select {
			case <-writing:
			case <-time.After(10 * time.Second):
				t.Fatalf("%s did not start writing", name)
			}
			rc.Reconnect()
			var err error
			select {
			case err = <-errc:
			case <-time.After(10 * time.Second):
				t.Fatalf("%s did not return after Reconnect", name)
			}
			waitFor(t, func() bool { return rc.Generation() > gen }) // the Recv loop reconnected
			t.Logf("%s cut by Reconnect: %v", name, err)
			if err == nil || errors.Is(err, ErrClosed) || !errors.Is(err, ErrNotConnected) {
				t.Fatalf("%s cut by Reconnect: %v; want ErrNotConnected, not ErrClosed (the client is not closed)", name, err)
			}
			rc.Close()
			if err := rc.Send(context.Background(), PublicKey{1}, nil); !errors.Is(err, ErrClosed) {
				t.Fatalf("Send after Close: %v, want ErrClosed", err)
			}
		})
	}
}

// TestReconnectEndsBackoffUnderWay: Reconnect after a network change makes
// the next dial start at once, also when a Recv loop is already waiting
// out the backoff of an earlier failure (a minute here): that wait ends,
// and a call that needs a connection (Connect, here) does not wait for it.
func TestReconnectEndsBackoffUnderWay(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(int, net.Conn, *bufio.Reader, PublicKey) { s.stall() }
	rc := newScriptedRC(t, s)
	rc.MinBackoff, rc.MaxBackoff = time.Minute, time.Minute
	var dials atomic.Int32
	rc.Dialer.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if dials.Add(1) == 1 {
			return nil, errors.New("network is unreachable (scripted)")
		}
		return s.dial(ctx, network, addr)
	}
	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		for {
			if _, err := rc.Recv(context.Background()); err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() { rc.Close(); <-recvDone })
	waitFor(t, func() bool { // the first dial failed: the Recv loop waits
		rc.mu.Lock()
		defer rc.mu.Unlock()
		return rc.failures == 1
	})
	rc.Reconnect() // the network changed
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := rc.Connect(ctx); err != nil {
		t.Fatalf("Connect after Reconnect: %v (%d dials); the backoff of the failure before Reconnect still held", err, dials.Load())
	}
	if n := dials.Load(); n != 2 {
		t.Fatalf("%d dials, want 2", n)
	}
}

// TestReconnectDropsOldClient: the connection Reconnect dropped is freed
// once a new one replaced it, also when no Recv was waiting on it to see
// it end (a client that only sends, or whose Recv loop was between calls).
// It was kept until the next Reconnect, which may come weeks later: its
// read and write buffers and its TLS state, per ReconnectingClient.
func TestReconnectDropsOldClient(t *testing.T) {
	s := newTestServer(t)
	srv := serveDERP(t, s, derpServeOpts{plain: true})
	rc := &ReconnectingClient{URL: srv.URL, PrivateKey: mustKey(t)}
	t.Cleanup(func() { rc.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	freed := make(chan struct{})
	func() {
		if err := rc.Connect(ctx); err != nil {
			t.Fatal(err)
		}
		rc.mu.Lock()
		c := rc.c
		rc.mu.Unlock()
		runtime.AddCleanup(c, func(ch chan struct{}) { close(ch) }, freed)
	}()
	rc.Reconnect()
	if err := rc.Send(ctx, mustKey(t).Public(), []byte("on the new connection")); err != nil {
		t.Fatal(err)
	}
	if g := rc.Generation(); g != 2 {
		t.Fatalf("generation %d, want 2", g)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		runtime.GC()
		select {
		case <-freed:
			return
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("the connection Reconnect dropped is still referenced 10 s after a new one replaced it")
		}
	}
}

// TestReconnectCutsDialShort: a dial under way when the network changes
// may be stuck on the old path (here its first connection went into a
// black hole) until DialTimeout, a minute here. Reconnect cuts it short
// and dials again at once, counting no failure, so the next connection
// comes now and not after the dial's timeout and a backoff.
func TestReconnectCutsDialShort(t *testing.T) {
	s := newTestServer(t)
	backend := serveDERP(t, s, derpServeOpts{plain: true})
	p := newSilentProxy(t, backend.Addr)
	p.silentTo.Store(1) // the first connection goes into a black hole
	h := newRCHarness(t, &TestServer{URL: p.url()}, func(rc *ReconnectingClient) {
		rc.DialTimeout = time.Minute
		rc.MinBackoff, rc.MaxBackoff = time.Minute, time.Minute
	})
	waitFor(t, func() bool { return p.accepted.Load() >= 1 })
	h.rc.Reconnect()
	rcNext[ServerInfo](t, h)
	if n := p.accepted.Load(); n != 2 {
		t.Errorf("%d connections made, want 2", n)
	}
	h.rc.mu.Lock()
	failures := h.rc.failures
	h.rc.mu.Unlock()
	if failures != 0 {
		t.Errorf("%d failures counted for a dial Reconnect cut short, want 0", failures)
	}
	if g := h.rc.Generation(); g != 1 {
		t.Errorf("generation %d, want 1", g)
	}
}

// scriptedWSLogin plays a WebSocket DERP server's side of a login on sc:
// the upgrade's 101, ServerKey, the client's ClientInfo read, ServerInfo.
// It reports whether the client got that far.
func scriptedWSLogin(sc net.Conn, srvPriv PrivateKey) bool {
	br := bufio.NewReader(sc)
	req, err := http.ReadRequest(br)
	if err != nil {
		return false
	}
	io.WriteString(sc, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Accept: "+wsAcceptKey(req.Header.Get("Sec-WebSocket-Key"))+"\r\n"+
		"Sec-WebSocket-Protocol: derp\r\n\r\n")
	sc.Write(wsFrame(0x82, appendFrame(nil, FrameServerKey, appendServerKey(nil, srvPriv.Public())), true))
	// The client's masked frame carrying the ClientInfo.
	_, p, err := readRawFrame(newWSConn(sc, br, false))
	if err != nil {
		return false
	}
	_, err = sc.Write(wsFrame(0x82, serverInfoFrame(srvPriv, PublicKey(p[:KeyLen]), []byte(`{"version":2}`)), true))
	return err == nil
}

// A server that takes every login, sends a Restarting notice and hangs up
// is redialled with backoff too: each notice opens a window of fast
// retries (for dials that fail while the server is away), but a server
// that came back, took the login and ended the session again right away
// is no restart in progress, or a notice on every session would keep the
// client redialling at MinBackoff for as long as the server likes.
func TestReconnectingBacksOffAfterShortSessionsWithRestartNotices(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(_ int, sc net.Conn, _ *bufio.Reader, _ PublicKey) {
		// Reconnect at once, retry quickly for a minute; then hang up.
		sc.Write(appendFrame(nil, FrameRestarting, appendRestarting(nil, 0, time.Minute)))
	}
	rc := newScriptedRC(t, s)
	rc.MinBackoff, rc.MaxBackoff = 100*time.Millisecond, time.Second
	notices := recvCounting[ServerRestarting](rc, 2*time.Second)
	// Waits of 50–100, 100–200, 200–400, 400–800 and 500–1000 ms allow at
	// most 7 dials in 2 s; at MinBackoff there are 20 to 40.
	if n := s.dials.Load(); n > 12 || notices == 0 {
		t.Fatalf("%d dials (%d Restarting notices) in 2s against a server that sends a restart notice and hangs up after each login", n, notices)
	}
}

// A Restarting notice that comes before the login is confirmed (no
// ServerInfo: the server has not shown that it owns its key) opens no
// window of fast retries: a server that answers every login with one and
// hangs up is redialled with the backoff of a refused login.
func TestReconnectingIgnoresRestartNoticeBeforeServerInfo(t *testing.T) {
	dial, dials := upgradeOnlyServer(t, func(sc net.Conn) {
		sc.Write(appendFrame(nil, FrameRestarting, appendRestarting(nil, 0, time.Minute)))
	})
	rc := &ReconnectingClient{URL: "http://derp.invalid/derp", PrivateKey: mustKey(t),
		Dialer: &FastStart{DialContext: dial}, MinBackoff: 100 * time.Millisecond, MaxBackoff: time.Second}
	t.Cleanup(func() { rc.Close() })
	notices := recvCounting[ServerRestarting](rc, 2*time.Second)
	// As in TestReconnectingBacksOffAfterShortSessionsWithRestartNotices:
	// at most 7 dials in 2 s with backoff, 20 to 40 without.
	if n := dials.Load(); n > 12 || notices == 0 {
		t.Fatalf("%d dials (%d Restarting notices) in 2s against a server that sends a restart notice instead of ServerInfo and hangs up", n, notices)
	}
}

// expiringCtx is a context whose deadline the test ends by calling expire,
// so that a test can end a call's ctx with context.DeadlineExceeded at a
// step of its choice rather than at a time.
type expiringCtx struct {
	context.Context // Background: no values
	done            chan struct{}
}

func newExpiringCtx() *expiringCtx {
	return &expiringCtx{Context: context.Background(), done: make(chan struct{})}
}

func (c *expiringCtx) expire()                     { close(c.done) }
func (c *expiringCtx) Done() <-chan struct{}       { return c.done }
func (c *expiringCtx) Deadline() (time.Time, bool) { return time.Now().Add(time.Hour), true }
func (c *expiringCtx) Err() error {
	select {
	case <-c.done:
		return context.DeadlineExceeded
	default:
		return nil
	}
}

// A caller's ctx whose deadline ends a dial (here while a fast start with
// the server's learned key waits for its ServerKey) is the caller's
// deadline, not the server's timeout: the server keeps its key, and the
// next dial takes the fast path again. Only DialTimeout (or a node's share
// of it) ending a fast start says that something between does not pass
// fast start through.
func TestReconnectingCallerDeadlineKeepsFastStart(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.init()
	fastAsked := make(chan struct{}, 1)
	var scripted atomic.Int32
	rc := newScriptedRC(t, s)
	var mu sync.Mutex
	var paths []Path
	rc.OnConnect = func(hs Handshake) {
		mu.Lock()
		paths = append(paths, hs.Path)
		mu.Unlock()
	}
	rc.Dialer.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if scripted.Add(1) != 2 {
			return s.dial(ctx, network, addr)
		}
		// The second connection: read the fast-start request and the
		// ClientInfo, then answer nothing until the test ends.
		return s.pipe(func(_ net.Conn, br *bufio.Reader) {
			req, err := http.ReadRequest(br)
			if err != nil || req.Header.Get(FastStartHeader) == "" {
				return
			}
			if _, _, err := readRawFrame(br); err != nil {
				return
			}
			fastAsked <- struct{}{}
			io.Copy(io.Discard, br)
		}), nil
	}
	s.script = func(_ int, _ net.Conn, br *bufio.Reader, _ PublicKey) { io.Copy(io.Discard, br) }
	// The first connection learns the key (upgrade path: plain HTTP).
	if err := rc.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	rc.Reconnect()
	ctx := newExpiringCtx()
	errc := make(chan error, 1)
	go func() { errc <- rc.Connect(ctx) }()
	select {
	case <-fastAsked:
	case <-time.After(10 * time.Second):
		t.Fatal("the second dial did not take the fast path with the learned key")
	}
	ctx.expire()
	if err := <-errc; !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Connect whose ctx expired during the fast start: %v", err)
	}
	if err := rc.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(paths) != 2 || paths[1] != FastPath {
		t.Fatalf("connections' paths %v: after a dial that the caller's deadline cut short, the server's key was not used (fast start given up for it)", paths)
	}
}

// A call whose ctx has already ended returns ctx's error at once and
// leaves the connection alone: it writes nothing, so nothing can hold it,
// and other callers' connection must not go down with it (nor a dial be
// started and cut short, counting against the server).
func TestReconnectingDoneCtxLeavesConnection(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(_ int, _ net.Conn, br *bufio.Reader, _ PublicKey) { io.Copy(io.Discard, br) }
	rc := newScriptedRC(t, s)
	rc.Dialer.DialContext = s.dialTCP // buffered: a Send need not wait for the server's reads
	if err := rc.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	done, cancel := context.WithCancel(context.Background())
	cancel()
	calls := []struct {
		name string
		call func(context.Context) error
	}{
		{"Send", func(ctx context.Context) error { return rc.Send(ctx, PublicKey{1}, []byte("x")) }},
		{"ForwardPacket", func(ctx context.Context) error { return rc.ForwardPacket(ctx, PublicKey{1}, PublicKey{2}, []byte("x")) }},
		{"ClosePeer", func(ctx context.Context) error { return rc.ClosePeer(ctx, PublicKey{1}) }},
		{"Ping", func(ctx context.Context) error { _, err := rc.Ping(ctx); return err }},
		{"Recv", func(ctx context.Context) error { _, err := rc.Recv(ctx); return err }},
	}
	for _, c := range calls {
		if err := c.call(done); !errors.Is(err, context.Canceled) {
			t.Errorf("%s with a cancelled ctx: %v, want context.Canceled", c.name, err)
		}
		if rc.LocalAddr() == nil {
			t.Errorf("%s with a cancelled ctx dropped the connection", c.name)
		}
		if err := rc.Send(context.Background(), PublicKey{1}, []byte("x")); err != nil {
			t.Fatalf("Send after %s with a cancelled ctx: %v", c.name, err)
		}
	}
	if g, n := rc.Generation(), s.dials.Load(); g != 1 || n != 1 {
		t.Errorf("generation %d after %d connections, want one connection throughout", g, n)
	}
	// Not connected: no dial either.
	rc.Reconnect()
	for _, c := range calls {
		if err := c.call(done); !errors.Is(err, context.Canceled) {
			t.Errorf("%s with a cancelled ctx, not connected: %v, want context.Canceled", c.name, err)
		}
	}
	rc.mu.Lock()
	failures := rc.failures
	rc.mu.Unlock()
	if n := s.dials.Load(); n != 1 || failures != 0 {
		t.Errorf("calls with a cancelled ctx while not connected: %d connections, %d failures; want 1 and 0", n, failures)
	}
}

// refusingServer returns a DialContext whose connections, over loopback
// TCP, play a server that takes the upgrade, sends its ServerKey, reads
// the ClientInfo and hangs up, as one refusing every login does, and a
// count of them.
func refusingServer(t *testing.T) (func(ctx context.Context, network, addr string) (net.Conn, error), *atomic.Int32) {
	return upgradeOnlyServer(t, nil)
}

// upgradeOnlyServer is refusingServer, whose connections call then (if not
// nil) after reading the ClientInfo, before they hang up.
func upgradeOnlyServer(t *testing.T, then func(sc net.Conn)) (func(ctx context.Context, network, addr string) (net.Conn, error), *atomic.Int32) {
	return upgradeOnlyServerOver(t, loopbackTCP, then)
}

// upgradeOnlyServerOver is upgradeOnlyServer over the connections (client
// end, server end) that conns makes.
func upgradeOnlyServerOver(t *testing.T, conns func() (net.Conn, net.Conn, error), then func(sc net.Conn)) (func(ctx context.Context, network, addr string) (net.Conn, error), *atomic.Int32) {
	priv := mustKey(t)
	dials := new(atomic.Int32)
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		cc, sc, err := conns()
		if err != nil {
			return nil, err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer sc.Close()
			br := bufio.NewReader(sc)
			if _, err := http.ReadRequest(br); err != nil {
				return
			}
			resp := []byte("HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
			if _, err := sc.Write(appendFrame(resp, FrameServerKey, appendServerKey(nil, priv.Public()))); err != nil {
				return
			}
			if _, _, err := readRawFrame(br); err == nil && then != nil { // the ClientInfo
				then(sc)
			}
		}()
		return cc, nil
	}, dials
}

// A client that only sends (no Recv loop, which counts a session that
// ends before or soon after its ServerInfo as a failure) backs off from a
// server that hangs up on every login too, instead of redialling it at
// the pace of its Sends: a write that finds a connection failed soon after
// it was made counts as a failure.
func TestReconnectingSendOnlyBacksOffFromRefusingServer(t *testing.T) {
	for _, recvLoop := range []bool{false, true} {
		t.Run(fmt.Sprintf("recvLoop=%v", recvLoop), func(t *testing.T) {
			dial, dials := refusingServer(t)
			rc := &ReconnectingClient{URL: "http://derp.invalid/derp", PrivateKey: mustKey(t),
				Dialer:     &FastStart{DialContext: dial},
				MinBackoff: 100 * time.Millisecond, MaxBackoff: time.Second}
			defer rc.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			var wg sync.WaitGroup
			defer wg.Wait()
			if recvLoop {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for ctx.Err() == nil {
						rc.Recv(ctx)
					}
				}()
			}
			sends := 0
			for ctx.Err() == nil {
				rc.Send(ctx, PublicKey{1}, []byte("x"))
				sends++
				time.Sleep(time.Millisecond) // a packet source, not an assertion
			}
			// Waits of 50–100, 100–200, 200–400, 400–800 and 500–1000 ms
			// allow at most 7 dials in 2 s; at the pace of the Sends
			// there are hundreds.
			t.Logf("%d dials in 2s (%d Sends)", dials.Load(), sends)
			if n := dials.Load(); n > 12 {
				t.Fatalf("%d dials in 2s (%d Sends) against a server that hangs up on every login", n, sends)
			}
		})
	}
}

// A write that finds a young connection failed is paced as the Recv loop
// paces the same failure: a login the server hung up on without a
// ServerInfo is a failed dial, retried at MinBackoff while a Restarting
// notice's window of quick retries is open (as when a restarted server
// behind a proxy is not taking logins yet), not after the backoff of the
// failures the restart's dials piled up.
func TestReconnectingWriteFailureKeepsRestartWindow(t *testing.T) {
	dial, _ := refusingServer(t)
	rc := &ReconnectingClient{URL: "http://derp.invalid/derp", PrivateKey: mustKey(t),
		Dialer:     &FastStart{DialContext: dial},
		MinBackoff: 100 * time.Millisecond, MaxBackoff: 5 * time.Second}
	defer rc.Close()
	// As after a notice and the dials that failed while the server was
	// away.
	rc.mu.Lock()
	rc.restartUntil = time.Now().Add(time.Minute)
	rc.failures = 20
	rc.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var err error
	for ctx.Err() == nil {
		if err = rc.Send(ctx, PublicKey{1}, []byte("x")); err != nil {
			break
		}
		time.Sleep(time.Millisecond) // a packet source, not an assertion
	}
	if ctx.Err() != nil {
		t.Fatal("no Send failed against a server that hangs up on every login")
	}
	rc.mu.Lock()
	wait := time.Until(rc.nextDial)
	if w := time.Until(rc.notBefore); w > wait {
		wait = w
	}
	rc.mu.Unlock()
	if wait > rc.MinBackoff {
		t.Fatalf("after a Send failed (%v) on a login the server hung up on, in a restart's window of quick retries: next dial in %v, want at most MinBackoff (%v)", err, wait.Round(time.Millisecond), rc.MinBackoff)
	}
}

// recvCounting calls rc.Recv for d (until its first error, which ends it)
// and returns how many of the messages were of type M.
func recvCounting[M Message](rc *ReconnectingClient, d time.Duration) int {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	n := 0
	for {
		m, err := rc.Recv(ctx)
		if err != nil {
			return n
		}
		if _, ok := m.(M); ok {
			n++
		}
	}
}

// A client that only sends moves on to its fallback when its ideal server
// refuses the login, as one with a Recv loop does: a write that finds a
// connection failed soon after its dial, before any ServerInfo, counts as
// a failed dial of that server, and the next dial starts with the server
// after it. It returned to the refusing server for good.
func TestReconnectingSendOnlyFailsOverAfterRefusedLogin(t *testing.T) {
	p := newRefusingPair(t)
	refused, sB, a, b := &p.refused, p.sB, p.a, p.b
	rc := &ReconnectingClient{URL: a.URL, Fallbacks: []string{b.URL}, PrivateKey: mustKey(t),
		MinBackoff: 10 * time.Millisecond, MaxBackoff: 10 * time.Second}
	defer rc.Close()
	self := rc.PrivateKey.Public()
	deadline := time.Now().Add(30 * time.Second)
	sends := 0
	for !sB.IsClientConnected(self) {
		if time.Now().After(deadline) {
			t.Fatalf("a client that only sends: %d logins refused by A, %d Sends in 30s, never connected to its fallback B", refused.Load(), sends)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		rc.Send(ctx, PublicKey{1}, []byte("x"))
		cancel()
		sends++
		time.Sleep(time.Millisecond) // a packet source, not an assertion
	}
	if refused.Load() == 0 {
		t.Fatal("connected to B without a login refused by A")
	}
}

// A client that only sends resets its count of failures after a session
// that lasted, as the Recv loop does: the first failure after a long
// session waits MinBackoff again, not the backoff of failures long past.
func TestReconnectingSendOnlyResetsFailuresAfterLongSession(t *testing.T) {
	for _, recvLoop := range []bool{false, true} {
		t.Run(fmt.Sprintf("recvLoop=%v", recvLoop), func(t *testing.T) {
			s := newTestServer(t)
			d := serveDERP(t, s, derpServeOpts{plain: true})
			rc := &ReconnectingClient{URL: d.URL, PrivateKey: mustKey(t),
				MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}
			defer rc.Close()
			self := rc.PrivateKey.Public()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var wg sync.WaitGroup
			defer wg.Wait()
			defer cancel()
			if recvLoop {
				info := make(chan struct{}, 1)
				wg.Add(1)
				go func() {
					defer wg.Done()
					for ctx.Err() == nil {
						if m, _ := rc.Recv(ctx); m != nil {
							if _, ok := m.(ServerInfo); ok {
								select {
								case info <- struct{}{}:
								default:
								}
							}
						}
					}
				}()
				select {
				case <-info:
				case <-ctx.Done():
					t.Fatal("no ServerInfo")
				}
			} else if err := rc.Connect(ctx); err != nil {
				t.Fatal(err)
			}
			// As after a run of failed dials before this session.
			rc.mu.Lock()
			rc.failures = 20
			rc.mu.Unlock()
			time.Sleep(200 * time.Millisecond) // a session longer than MaxBackoff, not an assertion
			if n := s.closePeer(self); n != 1 {
				t.Fatalf("closePeer ended %d sessions, want 1", n)
			}
			for {
				rc.mu.Lock()
				failures := rc.failures
				rc.mu.Unlock()
				if failures == 0 {
					break
				}
				if ctx.Err() != nil {
					t.Fatalf("after a session longer than MaxBackoff that the server ended: %d failures, want 0 (reset)", failures)
				}
				rc.Send(ctx, PublicKey{1}, []byte("x"))
				time.Sleep(time.Millisecond) // a packet source, not an assertion
			}
		})
	}
}

// A Reconnect that comes after the dial under way made its connection but
// before the dial kept it (testHookDialed runs in that window) is not
// lost: the connection, made on the path Reconnect says may be gone, is
// closed and the dial starts again at once, as for a Reconnect earlier in
// the dial. It was kept, and the Reconnect had done nothing.
func TestReconnectJustAfterDialIsNotLost(t *testing.T) {
	for _, pref := range []bool{false, true} {
		t.Run(fmt.Sprintf("NotePreferred=%v", pref), func(t *testing.T) {
			s := &scriptedServer{priv: mustKey(t)}
			s.script = func(_ int, _ net.Conn, br *bufio.Reader, _ PublicKey) { io.Copy(io.Discard, br) }
			rc := newScriptedRC(t, s)
			rc.Dialer.DialContext = s.dialTCP                   // buffered: NotePreferred's write need not wait for the server
			rc.MinBackoff, rc.MaxBackoff = time.Hour, time.Hour // a failure counted would show
			if pref {
				rc.NotePreferred(true) // the new connection's first frame, after the hook
			}
			var hooked atomic.Int32
			rc.testHookDialed = func() {
				if hooked.Add(1) == 1 {
					rc.Reconnect()
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := rc.Connect(ctx); err != nil {
				t.Fatal(err)
			}
			if n, g := s.dials.Load(), rc.Generation(); n != 2 || g != 1 {
				t.Fatalf("%d connections made, generation %d; want 2 and 1: the connection dialled before Reconnect was kept", n, g)
			}
			rc.mu.Lock()
			failures := rc.failures
			rc.mu.Unlock()
			if failures != 0 {
				t.Fatalf("%d failures counted, want 0", failures)
			}
		})
	}
}

// writeStartConn tells started when a Write begins while armed.
type writeStartConn struct {
	net.Conn
	armed   *atomic.Bool
	started chan struct{}
}

func (c *writeStartConn) Write(p []byte) (int, error) {
	if c.armed.Load() {
		select {
		case c.started <- struct{}{}:
		default:
		}
	}
	return c.Conn.Write(p)
}

// armedWritesRC is newScriptedRC for s with an hour's backoff, so that a
// failure counted would hold the next dial, whose connections tell
// started when a write begins while armed is set.
func armedWritesRC(t *testing.T, s *scriptedServer) (rc *ReconnectingClient, armed *atomic.Bool, started chan struct{}) {
	rc = newScriptedRC(t, s)
	rc.MinBackoff, rc.MaxBackoff = time.Hour, time.Hour
	armed, started = new(atomic.Bool), make(chan struct{}, 1)
	rc.Dialer.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := s.dial(ctx, network, addr)
		return &writeStartConn{Conn: nc, armed: armed, started: started}, err
	}
	return rc, armed, started
}

// A Send whose own ctx ends while a server that reads nothing holds its
// write drops the connection, and that is no failure of the server's
// (writeUnder says so, and counts none). The interrupt ends the Recv
// loop's read on the same connection too, and Recv counted the end of a
// session begun less than MaxBackoff before as a failure, holding the
// next dial for the backoff.
func TestReconnectingSendCtxDropIsNoFailureForRecv(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.init()
	s.script = func(n int, _ net.Conn, br *bufio.Reader, _ PublicKey) {
		if n == 1 {
			s.stall() // reads nothing: the Send's write blocks on the pipe
			return
		}
		io.Copy(io.Discard, br)
	}
	rc, armed, started := armedWritesRC(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	infos := make(chan int, 4)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			if m, gen, _ := rc.RecvDetail(ctx); m != nil {
				if _, ok := m.(ServerInfo); ok {
					infos <- gen
				}
			}
		}
	}()
	select {
	case <-infos:
	case <-ctx.Done():
		t.Fatal("no ServerInfo on the first connection")
	}
	armed.Store(true)
	sctx, scancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- rc.Send(sctx, PublicKey{1}, []byte("x")) }()
	select {
	case <-started:
	case <-ctx.Done():
		t.Fatal("the Send's write did not start")
	}
	scancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("Send whose ctx ended during its write: %v, want %v", err, context.Canceled)
	}
	select {
	case gen := <-infos:
		if gen != 2 {
			t.Fatalf("ServerInfo of generation %d, want 2", gen)
		}
	case <-ctx.Done():
		rc.mu.Lock()
		failures := rc.failures
		rc.mu.Unlock()
		t.Fatalf("no reconnect within 30 s after a Send's own ctx dropped the connection: %d failures counted, want 0", failures)
	}
}

// A Recv whose own ctx ends drops the connection, counting no failure of
// the server's; its interrupt also fails a Send on the same connection
// (here one that a server that reads nothing holds), and that Send must
// not count one either. When the Send got there first (held here by
// testHookRecvFailed, which runs before Recv drops the connection) it
// counted the end of a session less than MaxBackoff past its ServerInfo
// as the server's failure, and held the next dial for the backoff (or,
// before ServerInfo, sent it to the fallback).
func TestReconnectingRecvCtxDropIsNoFailureForSend(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.init()
	reading := make(chan struct{}, 1)
	s.script = func(n int, sc net.Conn, br *bufio.Reader, _ PublicKey) {
		if n != 1 {
			io.Copy(io.Discard, br)
			return
		}
		// The header of a packet frame whose body never comes: once
		// the pipe took it, the client's Recv is inside its read.
		hdr := []byte{byte(FrameRecvPacket), 0, 0, 0, 40}
		if _, err := sc.Write(hdr); err != nil {
			return
		}
		reading <- struct{}{}
		s.stall() // reads nothing: the Send's write blocks on the pipe
	}
	rc, armed, started := armedWritesRC(t, s)
	sendErr := make(chan error, 1)
	sent := make(chan struct{})
	var hooked atomic.Int32
	rc.testHookRecvFailed = func() {
		if hooked.Add(1) == 1 {
			select { // the Send sees the interrupt first
			case <-sent:
			case <-time.After(30 * time.Second):
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if m, err := rc.Recv(ctx); err != nil {
		t.Fatal(err)
	} else if _, ok := m.(ServerInfo); !ok {
		t.Fatalf("first message %T, want ServerInfo", m)
	}
	rctx, rcancel := context.WithCancel(ctx)
	recvDone := make(chan error, 1)
	go func() {
		_, err := rc.Recv(rctx)
		recvDone <- err
	}()
	select {
	case <-reading:
	case <-ctx.Done():
		t.Fatal("Recv did not start its read")
	}
	armed.Store(true)
	go func() {
		sendErr <- rc.Send(ctx, PublicKey{1}, []byte("x"))
		close(sent)
	}()
	select {
	case <-started:
	case <-ctx.Done():
		t.Fatal("the Send's write did not start")
	}
	rcancel() // interrupts the connection: Recv's read and the Send's write fail
	select {
	case err := <-recvDone:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Recv whose ctx ended: %v, want %v", err, context.Canceled)
		}
	case <-ctx.Done():
		t.Fatal("Recv did not return after its ctx ended")
	}
	if hooked.Load() == 0 {
		t.Fatal("Recv's read did not fail")
	}
	if err := <-sendErr; err == nil {
		t.Fatal("a Send on the interrupted connection succeeded")
	}
	rc.mu.Lock()
	failures, wait := rc.failures, max(time.Until(rc.nextDial), time.Until(rc.notBefore))
	rc.mu.Unlock()
	if failures != 0 || wait > 0 {
		t.Fatalf("after a Recv's own ctx dropped the connection under a Send: %d failures counted, next dial in %v; want 0 and none", failures, wait.Round(time.Second))
	}
}

// pipeRefusingServer is refusingServer over net.Pipe, which has no
// buffer: a write after the ClientInfo fails at once (the server reads
// nothing more and hangs up), so the first write to find the login
// refused is always the client's first after its dial.
func pipeRefusingServer(t *testing.T) (func(ctx context.Context, network, addr string) (net.Conn, error), *atomic.Int32) {
	return upgradeOnlyServerOver(t, func() (net.Conn, net.Conn, error) {
		cc, sc := net.Pipe()
		return cc, sc, nil
	}, nil)
}

// refusedThenFallback returns a ReconnectingClient whose URL's server
// refuses every login (pipeRefusingServer) and whose fallback takes them,
// with the count of dials of each.
func refusedThenFallback(t *testing.T) (rc *ReconnectingClient, dialsA, dialsB *atomic.Int32) {
	dialA, dialsA := pipeRefusingServer(t)
	b := &scriptedServer{priv: mustKey(t)}
	b.init()
	b.script = func(_ int, _ net.Conn, br *bufio.Reader, _ PublicKey) { io.Copy(io.Discard, br) }
	rc = &ReconnectingClient{URL: "http://a.invalid/derp", Fallbacks: []string{"http://b.invalid/derp"},
		PrivateKey: mustKey(t), MinBackoff: time.Millisecond, MaxBackoff: 10 * time.Millisecond,
		Dialer: &FastStart{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if strings.HasPrefix(addr, "a.invalid:") {
				return dialA(ctx, network, addr)
			}
			return b.dialTCP(ctx, network, addr)
		}}}
	t.Cleanup(func() { rc.Close(); b.close() })
	return rc, dialsA, &b.dials
}

// A client that only sends, with NotePreferred(true) or
// WatchConnectionChanges called before it connects, writes those frames
// first on every new connection: when the server refused the login, that
// write is the one to find it, and the dial failed as a failed dial of
// the server, but the next dial started with the same server again, not
// with its fallback.
func TestReconnectingSendOnlySetupWriteFailsOver(t *testing.T) {
	for _, setup := range []string{"NotePreferred", "WatchConnectionChanges"} {
		t.Run(setup, func(t *testing.T) {
			rc, dialsA, dialsB := refusedThenFallback(t)
			var err error
			if setup == "NotePreferred" {
				err = rc.NotePreferred(true)
			} else {
				err = rc.WatchConnectionChanges()
			}
			if err != nil {
				t.Fatalf("%s before connecting: %v", setup, err)
			}
			for sends := 0; dialsB.Load() == 0 && dialsA.Load() < 5; sends++ {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				rc.Send(ctx, PublicKey{1}, []byte("x"))
				cancel()
			}
			if a, b := dialsA.Load(), dialsB.Load(); a != 1 || b != 1 {
				t.Fatalf("%s set, a client that only sends: %d dials of the server that refused the login, %d of its fallback; want 1 and 1", setup, a, b)
			}
		})
	}
}

// The same when a NotePreferred or WatchConnectionChanges call after the
// dial is the first write to find the login refused: it dropped the
// connection with nothing counted, and the next dial went straight back to
// the server that refused it.
func TestReconnectingLaterSetupWriteFailsOver(t *testing.T) {
	for _, setup := range []string{"NotePreferred", "WatchConnectionChanges"} {
		t.Run(setup, func(t *testing.T) {
			rc, dialsA, dialsB := refusedThenFallback(t)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := rc.Connect(ctx); err != nil {
				t.Fatal(err)
			}
			var err error
			if setup == "NotePreferred" {
				err = rc.NotePreferred(true)
			} else {
				err = rc.WatchConnectionChanges()
			}
			if err == nil {
				t.Fatalf("%s on a connection whose server hung up: no error", setup)
			}
			checkRefusalCounted(t, ctx, rc, dialsA, dialsB, fmt.Sprintf("after %s found the login refused (%v)", setup, err))
		})
	}
}

// A Recv that finds its connection ended before ServerInfo (a login the
// server refused) moves the next dial to the server after it. It did so
// after dropping the connection, and a dial that another call began in
// between (a Send's, on a connection no longer there) had read where to
// start already: it went to the server that refused the login again, with
// no backoff either, and the move to the fallback came one dial late.
// testHookRecvDropped, which runs once Recv dropped the connection, is
// that other call here.
func TestReconnectingRecvRefusedLoginMovesTheDialUnderWay(t *testing.T) {
	rc, dialsA, dialsB := refusedThenFallback(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var once sync.Once
	connected := make(chan error, 1)
	rc.testHookRecvDropped = func() {
		once.Do(func() { connected <- rc.Connect(ctx) })
	}
	if m, err := rc.Recv(ctx); err != nil {
		t.Fatal(err)
	} else if _, ok := m.(ServerInfo); !ok {
		t.Fatalf("first message %T, want ServerInfo", m)
	}
	var err error
	select {
	case err = <-connected:
	default:
		t.Fatal("Recv got its ServerInfo without dropping a connection")
	}
	if a, b := dialsA.Load(), dialsB.Load(); a != 1 || b != 1 || err != nil {
		t.Fatalf("a dial begun as Recv dropped a connection whose login the server refused (Connect: %v): then %d dials of that server, %d of its fallback; want 1 and 1", err, a, b)
	}
}

// Two writes that find the same connection failed count one failure: the
// first accounts for its end, and the other, which had the connection
// from current before, finds it gone. The first dropped it only after
// releasing the lock it counted under, and a write that failed in
// between counted the same end again (with many senders, as many
// failures as writes: the backoff of a long run of failed dials after
// one refused login). testHookWriteFailed runs the second write there.
func TestReconnectingConcurrentWriteFailuresCountOnce(t *testing.T) {
	rc, _, _ := refusedThenFallback(t)
	rc.MaxBackoff = time.Hour // the connection stays young: its end is a failure
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := rc.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	rc.mu.Lock()
	c := rc.c
	rc.mu.Unlock()
	var hooked atomic.Int32
	var second error
	rc.testHookWriteFailed = func() {
		if hooked.Add(1) == 1 {
			// A Send that got c from current before the first failed.
			second = rc.writeUnder(ctx, c, func() error { return c.Send(PublicKey{2}, []byte("y")) })
		}
	}
	first := rc.Send(ctx, PublicKey{1}, []byte("x"))
	rc.mu.Lock()
	failures := rc.failures
	rc.mu.Unlock()
	if first == nil || second == nil {
		t.Fatalf("writes on a connection whose server hung up: %v and %v, want two errors", first, second)
	}
	if failures != 1 {
		t.Fatalf("two writes found the same connection failed (%v; %v): %d failures counted, want 1", first, second, failures)
	}
}

// A Recv that accounts for a connection ended before ServerInfo after a
// write dropped it (one older than MaxBackoff, which the write counts as
// a session that lasted) moves the next dial to the server after it. When
// a dial (another call's) was already under way, having read where to
// start, and connected, the move outlived it: the dial after that
// connection, which had taken the login on the ideal server, went to the
// fallback, not back to URL. testHookDialed lets that Recv account while
// the dial is under way.
func TestReconnectingStaleRefusalMovesNoLaterDial(t *testing.T) {
	a, b := quietScriptedPair(t)
	var dialsA, dialsB atomic.Int32
	const hi = 10 * time.Millisecond
	rc := &ReconnectingClient{URL: "http://a.invalid/derp", Fallbacks: []string{"http://b.invalid/derp"},
		PrivateKey: mustKey(t), MinBackoff: time.Millisecond, MaxBackoff: hi,
		Dialer: &FastStart{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if strings.HasPrefix(addr, "a.invalid:") {
				if dialsA.Add(1) == 1 {
					return a.pipe(a.refuseLogin), nil // A's first login
				}
				return a.dial(ctx, network, addr)
			}
			dialsB.Add(1)
			return b.dial(ctx, network, addr)
		}}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t.Cleanup(func() { rc.Close(); a.close(); b.close() })
	if err := rc.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	recvFailed, release, dropped := make(chan struct{}), make(chan struct{}), make(chan struct{})
	var failedOnce, droppedOnce, dialedOnce sync.Once
	rc.testHookRecvFailed = func() {
		failedOnce.Do(func() { close(recvFailed); <-release })
	}
	rc.testHookRecvDropped = func() { droppedOnce.Do(func() { close(dropped) }) }
	type recvd struct {
		m   Message
		gen int
		err error
	}
	msgs := make(chan recvd, 16)
	go func() {
		for {
			m, gen, err := rc.RecvDetail(ctx)
			msgs <- recvd{m, gen, err}
			if err != nil {
				return
			}
		}
	}()
	select {
	case <-recvFailed:
	case <-ctx.Done():
		t.Fatal("Recv's read on the refused login did not fail")
	}
	time.Sleep(2 * hi) // the connection is older than MaxBackoff now
	if err := rc.Send(ctx, PublicKey{1}, []byte("x")); err == nil {
		t.Fatal("a Send on a connection whose server hung up succeeded")
	}
	rc.testHookDialed = func() {
		dialedOnce.Do(func() { close(release); <-dropped })
	}
	if err := rc.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	waitInfo := func(gen int) {
		t.Helper()
		for {
			select {
			case r := <-msgs:
				if r.err != nil {
					t.Fatalf("Recv: %v", r.err)
				}
				if _, ok := r.m.(ServerInfo); ok && r.gen == gen {
					return
				}
			case <-ctx.Done():
				t.Fatalf("no ServerInfo on connection %d", gen)
			}
		}
	}
	waitInfo(2)
	a2, b2 := dialsA.Load(), dialsB.Load()
	rc.Reconnect() // the session on the ideal server took its login: start there again
	waitInfo(3)
	if a3, b3 := dialsA.Load(), dialsB.Load(); a2 != 2 || b2 != 0 || a3 != 3 || b3 != 0 {
		t.Fatalf("a refused login accounted for while a dial was under way, which connected to URL (%d dials of it, %d of the fallback); then, after Reconnect, %d and %d; want 2, 0, 3 and 0", a2, b2, a3, b3)
	}
}

// A dial that Reconnect cut short leaves the server the next dial starts
// with, as one its caller's ctx cut short does: after a login the server
// refused, the dial went to the server after it, and Reconnect (the
// network changed under it) cut it short; the dial that followed at once
// went back to the server that had refused the login.
func TestReconnectingRedialKeepsTheStartPastARefusal(t *testing.T) {
	rc, dialsA, dialsB := refusedThenFallback(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var dials atomic.Int32
	rc.testHookDialed = func() {
		if dials.Add(1) == 2 { // the dial after the refused login
			rc.Reconnect()
		}
	}
	if m, err := rc.Recv(ctx); err != nil {
		t.Fatal(err)
	} else if _, ok := m.(ServerInfo); !ok {
		t.Fatalf("first message %T, want ServerInfo", m)
	}
	if n, a, b := dials.Load(), dialsA.Load(), dialsB.Load(); n != 3 || a != 1 || b != 2 {
		t.Fatalf("a dial past a refused login, cut short by Reconnect, then the next: %d dials, %d of the server that refused the login, %d of its fallback; want 3, 1 and 2", n, a, b)
	}
}

// A Recv that accounts late for a connection that ended before its
// ServerInfo moves the next dial past that connection's server only while
// it is the last connection made: it computed the move from the server of
// the current one, and after a newer connection (to the ideal server,
// dropped by a write once it was older than MaxBackoff, as a session that
// lasted) it sent the next dial to the fallback whose login it was
// accounting for, not to URL.
func TestReconnectingStaleRefusalMovesPastItsOwnServer(t *testing.T) {
	a, b := quietScriptedPair(t)
	var dialsA, dialsB atomic.Int32
	const hi = 10 * time.Millisecond
	rc := &ReconnectingClient{URL: "http://a.invalid/derp", Fallbacks: []string{"http://b.invalid/derp"},
		PrivateKey: mustKey(t), MinBackoff: time.Millisecond, MaxBackoff: hi,
		Dialer: &FastStart{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if strings.HasPrefix(addr, "a.invalid:") {
				switch dialsA.Add(1) {
				case 1:
					return nil, errors.New("unreachable")
				case 2:
					return a.pipe(a.refuseLogin), nil
				}
				return a.dial(ctx, network, addr)
			}
			if dialsB.Add(1) == 1 {
				return b.pipe(b.refuseLogin), nil
			}
			return b.dial(ctx, network, addr)
		}}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t.Cleanup(func() { rc.Close(); a.close(); b.close() })
	if err := rc.Connect(ctx); err != nil { // URL unreachable: the fallback
		t.Fatal(err)
	}
	recvFailed, release := make(chan struct{}), make(chan struct{})
	var failedOnce sync.Once
	rc.testHookRecvFailed = func() {
		failedOnce.Do(func() { close(recvFailed); <-release })
	}
	type recvd struct {
		m   Message
		gen int
		err error
	}
	msgs := make(chan recvd, 16)
	go func() {
		for {
			m, gen, err := rc.RecvDetail(ctx)
			msgs <- recvd{m, gen, err}
			if err != nil {
				return
			}
		}
	}()
	select {
	case <-recvFailed:
	case <-ctx.Done():
		t.Fatal("Recv's read on the refused login did not fail")
	}
	for gen := 1; gen <= 2; gen++ {
		if gen == 2 {
			if err := rc.Connect(ctx); err != nil { // URL, which takes the connection
				t.Fatal(err)
			}
		}
		time.Sleep(2 * hi) // older than MaxBackoff: its end is no failure of the write's
		if err := rc.Send(ctx, PublicKey{1}, []byte("x")); err == nil {
			t.Fatalf("a Send on connection %d, whose server hung up, succeeded", gen)
		}
	}
	a2, b2 := dialsA.Load(), dialsB.Load()
	close(release) // Recv accounts for the first connection's end
	for {
		select {
		case r := <-msgs:
			if r.err != nil {
				t.Fatalf("Recv: %v", r.err)
			}
			if _, ok := r.m.(ServerInfo); !ok || r.gen != 3 {
				continue
			}
		case <-ctx.Done():
			t.Fatal("no ServerInfo on a third connection")
		}
		break
	}
	if a3, b3 := dialsA.Load(), dialsB.Load(); a2 != 2 || b2 != 1 || a3 != 3 || b3 != 1 {
		t.Fatalf("the fallback refused a login that a Recv accounted for after a newer connection to URL (%d dials of URL, %d of the fallback): then %d and %d; want 2, 1, 3 and 1", a2, b2, a3, b3)
	}
}

// lateRecvAfterNewerWriteCount has a Recv account late for a connection
// whose login the server refused, after a write accounted for a newer
// one: a write finds the first connection failed when it is older than
// MaxBackoff (no failure of the write's: a Recv that later finds no
// ServerInfo on it counts it), and a write on the second, young, counts
// that one; then the Recv, held in testHookRecvFailed until then,
// accounts for the first. It returns the failures counted and the next
// dial's time before that Recv accounted and after. MinBackoff and
// MaxBackoff are an hour: every wait is uniform in [30 min, 1 h].
func lateRecvAfterNewerWriteCount(t *testing.T) (failures [2]int, nextDial [2]time.Time) {
	t.Helper()
	rc, ctx, finish := heldLateRecv(t, func(rc *ReconnectingClient) {
		rc.mu.Lock()
		failures[1], nextDial[1] = rc.failures, rc.nextDial
		rc.mu.Unlock()
	})
	if err := rc.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	if err := rc.Send(ctx, PublicKey{1}, []byte("x")); err == nil {
		t.Fatal("a Send on the second connection, whose server hung up, succeeded")
	}
	rc.mu.Lock()
	failures[0], nextDial[0] = rc.failures, rc.nextDial
	rc.mu.Unlock()
	finish()
	return failures, nextDial
}

// heldLateRecv connects a client to a server that refuses every login
// (MinBackoff and MaxBackoff an hour: every wait is uniform in [30 min,
// 1 h]) and starts a Recv loop on it, whose read's failure it holds in
// testHookRecvFailed; it then ages the connection past MaxBackoff and has
// a Send find it failed, which leaves its end to the Recv. finish lets the
// Recv go on: it accounts for the end, drops the connection, runs atDrop
// (if not nil) and ends its loop, which finish waits for.
func heldLateRecv(t *testing.T, atDrop func(rc *ReconnectingClient)) (rc *ReconnectingClient, ctx context.Context, finish func()) {
	t.Helper()
	s := &scriptedServer{priv: mustKey(t)}
	s.init()
	rc = newScriptedRC(t, s)
	rc.MinBackoff, rc.MaxBackoff = time.Hour, time.Hour
	rc.Dialer.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		s.dials.Add(1)
		return s.pipe(s.refuseLogin), nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	if err := rc.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	recvFailed, release, dropped := make(chan struct{}), make(chan struct{}), make(chan struct{})
	var failedOnce, droppedOnce sync.Once
	rc.testHookRecvFailed = func() {
		failedOnce.Do(func() { close(recvFailed); <-release })
	}
	rctx, rcancel := context.WithCancel(ctx)
	t.Cleanup(rcancel)
	rc.testHookRecvDropped = func() {
		droppedOnce.Do(func() {
			if atDrop != nil {
				atDrop(rc)
			}
			rcancel() // the Recv loop ends here
			close(dropped)
		})
	}
	recvDone := make(chan error, 1)
	go func() {
		for {
			if _, err := rc.Recv(rctx); err != nil {
				recvDone <- err
				return
			}
		}
	}()
	select {
	case <-recvFailed:
	case <-ctx.Done():
		t.Fatal("Recv's read on the refused login did not fail")
	}
	rc.mu.Lock()
	rc.connAt = rc.connAt.Add(-2 * rc.MaxBackoff) // older than MaxBackoff
	rc.mu.Unlock()
	if err := rc.Send(ctx, PublicKey{1}, []byte("x")); err == nil {
		t.Fatal("a Send on the first connection, whose server hung up, succeeded")
	}
	return rc, ctx, func() {
		close(release) // Recv accounts for the first connection's end
		select {
		case <-dropped:
		case <-ctx.Done():
			t.Fatal("Recv did not drop the first connection")
		}
		<-recvDone
	}
}

// A Recv that accounts late for a connection that ended before its
// ServerInfo counts it even when a write has accounted for a newer
// connection meanwhile (see lateRecvAfterNewerWriteCount). The Recv
// compared generations with the last one a write accounted for and
// skipped the first connection's end, whose failure was lost.
func TestReconnectingLateRecvCountsPastANewerWriteCount(t *testing.T) {
	failures, _ := lateRecvAfterNewerWriteCount(t)
	if failures[0] != 1 || failures[1] != 2 {
		t.Fatalf("two logins refused, the first's end accounted for by a late Recv after a write counted the second's: %d failures before that Recv, %d after; want 1 and 2", failures[0], failures[1])
	}
}

// Such a late Recv keeps the next dial's time if it is later than the
// one it computes, as a write does: it set its own, and half the time
// (both are uniform in [30 min, 1 h]) the next dial came sooner than the
// wait the write had set. Ten rounds: an earlier time shows in all but
// one run in a thousand.
func TestReconnectingLateRecvKeepsTheLaterNextDial(t *testing.T) {
	for i := range 10 {
		_, nextDial := lateRecvAfterNewerWriteCount(t)
		if nextDial[1].Before(nextDial[0]) {
			t.Fatalf("round %d: a late Recv's count moved the next dial from %v to %v, sooner", i, nextDial[0].Format(time.TimeOnly), nextDial[1].Format(time.TimeOnly))
		}
	}
}

// endsOnErrCtx is a ctx whose deadline passes when its Err is first
// asked for: it ends after whatever the call did before asking, at a step
// of the test's choice rather than at a time.
type endsOnErrCtx struct {
	*expiringCtx
	once sync.Once
}

func (c *endsOnErrCtx) Err() error {
	c.once.Do(c.expire)
	return c.expiringCtx.Err()
}

// A write that the server failed (a login it refused) is the server's
// failure even if the caller's ctx ends just after, before the write is
// looked at: only a write that ctx's interrupt ended is the caller's. It
// was dropped with nothing counted, as if ctx had cut it short, and the
// next dial went back to the server that refused the login. Here ctx ends
// when writeUnder first asks it whether it ended.
func TestReconnectingWriteFailedJustBeforeCtxEndedCounts(t *testing.T) {
	rc, dialsA, dialsB := refusedThenFallback(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := rc.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	late := &endsOnErrCtx{expiringCtx: newExpiringCtx()}
	err := rc.Send(late, PublicKey{1}, []byte("x"))
	if err == nil {
		t.Fatal("a Send on a connection whose server hung up succeeded")
	}
	checkRefusalCounted(t, ctx, rc, dialsA, dialsB, fmt.Sprintf("a Send the server failed (%v), its ctx ending just after", err))
}

// The same for a Recv whose read the server failed (a login it refused)
// just before its ctx ended: it returns ctx's error, and the refusal
// counts. testHookRecvFailed, which runs once the read failed, ends ctx.
func TestReconnectingRecvFailedJustBeforeCtxEndedCounts(t *testing.T) {
	checkRecvCtxEndingCounts(t, func(rc *ReconnectingClient) *func() { return &rc.testHookRecvFailed },
		"a Recv the server failed, its ctx ending just after")
}

// A new connection whose first frames (NotePreferred, WatchConns) the
// server does not take within DialTimeout is a dial that timed out: its
// server's path is marked silent, as after a dial that timed out before
// the connection was made (see Dialer), so that a fast start with a known
// key timing out on the next dial is taken for the black hole it likely
// is, not for a proxy that does not pass fast start through. It counted
// as a failed dial but left the path as the dial had found it, not
// silent.
func TestReconnectingSetupWriteTimeoutMarksSilent(t *testing.T) {
	for _, setup := range []string{"NotePreferred", "WatchConnectionChanges"} {
		t.Run(setup, func(t *testing.T) {
			s := &scriptedServer{priv: mustKey(t)}
			s.script = func(int, net.Conn, *bufio.Reader, PublicKey) { s.stall() } // over a pipe: reads nothing, buffers nothing
			rc := newScriptedRC(t, s)
			rc.DialTimeout = 300 * time.Millisecond
			var err error
			if setup == "NotePreferred" {
				err = rc.NotePreferred(true)
			} else {
				err = rc.WatchConnectionChanges()
			}
			if err != nil {
				t.Fatalf("%s before connecting: %v", setup, err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			err = rc.Connect(ctx)
			if err == nil {
				t.Fatal("Connect succeeded without its first frame written")
			}
			rc.mu.Lock()
			silent, failures := rc.silent[rc.URL], rc.failures
			rc.mu.Unlock()
			if !silent || failures != 1 {
				t.Fatalf("a dial whose %s the server did not take within DialTimeout (%v): path silent %v, %d failures; want true and 1", setup, err, silent, failures)
			}
		})
	}
}

// Reconnect leaves the server the next dial starts with as it is: after
// a login the ideal server refused, that is the server after it, whether
// Reconnect comes between dials (here) or cuts the next dial short (see
// TestReconnectingRedialKeepsTheStartPastARefusal). A refusal is the
// server's answer, not the path's; the dial after a connection starts
// with URL again.
func TestReconnectKeepsTheStartPastARefusal(t *testing.T) {
	rc, dialsA, dialsB := refusedThenFallback(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := rc.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	if err := rc.Send(ctx, PublicKey{1}, []byte("x")); err == nil {
		t.Fatal("a Send on a connection whose server hung up succeeded")
	}
	rc.Reconnect() // the network changed
	if err := rc.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	if a, b := dialsA.Load(), dialsB.Load(); a != 1 || b != 1 {
		t.Fatalf("a login refused, Reconnect, then a dial: %d dials of the server that refused the login, %d of its fallback; want 1 and 1", a, b)
	}
}

// A Reconnect starts the count of failures again, and the next dial
// goes at once: what the old path met says nothing of the new one. A
// Recv that accounts late for a connection made before the Reconnect
// counts nothing either, though Reconnect did not drop it (a write
// dropped it first, leaving its end to Recv: older than MaxBackoff, no
// ServerInfo). Reconnect marked only the connection it dropped; the late
// Recv counted a failure after the Reconnect, and the next dial waited
// out its backoff.
func TestReconnectingLateRecvCountsNothingAfterReconnect(t *testing.T) {
	rc, _, finish := heldLateRecv(t, nil)
	rc.Reconnect() // the network changed
	finish()
	rc.mu.Lock()
	failures, wait := rc.failures, time.Until(rc.nextDial)
	rc.mu.Unlock()
	if failures != 0 || wait > 0 {
		t.Fatalf("a Recv accounting after Reconnect for a connection made before it: %d failures counted, next dial in %v; want 0 and none", failures, wait.Round(time.Second))
	}
}

// A write that refuses its packet before writing it (ErrPacketTooLarge,
// ErrRateLimited) while ctx's interrupt fires leaves the connection
// interrupted for good, so it is dropped, as after a write that succeeded
// as ctx ended (TestReconnectingCtxEndingAsWriteFinishes). It was kept:
// every later write failed at once, and a client that only sends (no Recv
// to drop it) never reconnected, each failure taken for another call's
// interrupt that would drop it.
func TestReconnectingCtxEndingAsPacketRefusedDrops(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.script = func(_ int, _ net.Conn, br *bufio.Reader, _ PublicKey) { io.Copy(io.Discard, br) }
	rc := newScriptedRC(t, s)
	rc.Dialer.DialContext = s.dialTCP // socket buffers: no Recv needed for the login
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := rc.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	rc.mu.Lock()
	c := rc.c
	rc.mu.Unlock()
	wctx, wcancel := context.WithCancel(ctx)
	err := rc.writeUnder(wctx, c, func() error {
		err := c.Send(PublicKey{1}, make([]byte, MaxPacketSize+1))
		wcancel() // ctx ends as the write returns
		for !c.interrupted.Load() {
			time.Sleep(time.Millisecond)
		}
		return err
	})
	if !errors.Is(err, ErrPacketTooLarge) {
		t.Fatalf("the write itself: %v, want %v", err, ErrPacketTooLarge)
	}
	for i := range 2 {
		if err := rc.Send(ctx, PublicKey{1}, []byte("y")); err != nil {
			t.Fatalf("Send %d of a client that only sends, after a ctx ended as a packet was refused: %v", i+1, err)
		}
	}
	if n := s.dials.Load(); n != 2 {
		t.Errorf("%d dials, want 2 (the interrupted connection replaced)", n)
	}
}

// The same for a new connection's first frame (NotePreferred here) that
// the server failed (a login it refused) just before the ctx of the call
// that dialled ended: the dial failed on the server's answer, not by ctx,
// and counts as a failed dial of that server. It was taken for a dial
// that ctx cut short: nothing counted, and the next dial went back to the
// server that refused the login. Here ctx ends when dial first asks it
// whether it ended, once the frame failed.
func TestReconnectingSetupWriteFailedJustBeforeCtxEndedCounts(t *testing.T) {
	rc, dialsA, dialsB := refusedThenFallback(t)
	if err := rc.NotePreferred(true); err != nil {
		t.Fatal(err)
	}
	late := &endsOnErrCtx{expiringCtx: newExpiringCtx()}
	err := rc.Connect(late)
	if err == nil {
		t.Fatal("Connect succeeded though the server refused the login")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	checkRefusalCounted(t, ctx, rc, dialsA, dialsB, fmt.Sprintf("a dial whose first frame the server failed (%v), its caller's ctx ending just after", err))
}

// A Recv whose read the server failed (a login it refused) before another
// call's interrupt fired on the connection (a Send whose ctx ended, which
// drops it) counts the refusal: only a read that an interrupt ended is
// the caller's. The Send's drop decided the connection's end for good,
// with nothing counted, and the Recv, finding the connection interrupted
// by then, took its own failure for the Send's: the next dial went back
// to the server that refused the login. testHookRecvFailed, which runs
// once the read failed, runs that Send.
func TestReconnectingRecvFailedBeforeAnotherCallsInterruptCounts(t *testing.T) {
	rc, dialsA, dialsB := refusedThenFallback(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := rc.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	rc.mu.Lock()
	c := rc.c
	rc.mu.Unlock()
	var once sync.Once
	sendErr := make(chan error, 1)
	rc.testHookRecvFailed = func() {
		once.Do(func() {
			sendErr <- writeUnderEndingCtx(ctx, rc, c, func() error { return c.Send(PublicKey{1}, []byte("x")) })
		})
	}
	rctx, rcancel := context.WithCancel(ctx)
	defer rcancel()
	rc.testHookRecvDropped = rcancel // no dial by Recv: Connect below dials
	if _, err := rc.Recv(rctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Recv: %v, want %v", err, context.Canceled)
	}
	if err := <-sendErr; !errors.Is(err, context.Canceled) {
		t.Fatalf("the Send whose ctx ended under it: %v, want %v", err, context.Canceled)
	}
	checkRefusalCounted(t, ctx, rc, dialsA, dialsB, "a Recv the server failed before a Send's ctx ended under its write")
}

// A write that another call's interrupt fails (here a write whose ctx
// ended while a Send was held by a server that reads nothing) returns
// ErrNotConnected, as one whose connection another call dropped under it
// does: the other call drops the connection, and the next call connects
// again. It returned the write's timeout, which says that the server
// stopped reading or the connection stalled.
func TestReconnectingWriteFailedByAnotherCallsInterruptIsNotConnected(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.init()
	s.script = func(int, net.Conn, *bufio.Reader, PublicKey) { s.stall() }
	rc, armed, started := armedWritesRC(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := rc.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	rc.mu.Lock()
	c := rc.c
	rc.mu.Unlock()
	armed.Store(true)
	sendErr := make(chan error, 1)
	go func() { sendErr <- rc.Send(ctx, PublicKey{1}, []byte("x")) }()
	select {
	case <-started:
	case <-ctx.Done():
		t.Fatal("the Send's write did not start")
	}
	if err := writeUnderEndingCtx(ctx, rc, c, nil); err != nil {
		t.Fatalf("the interrupting write: %v", err)
	}
	if err := <-sendErr; !errors.Is(err, ErrNotConnected) {
		t.Fatalf("a Send that another call's interrupt failed: %v, want %v", err, ErrNotConnected)
	}
}

// checkRefusalCounted checks that the login the server behind dialsA
// refused counted as one failure, after what, and that the next dial goes
// to its fallback (dialsB) and connects.
func checkRefusalCounted(t *testing.T, ctx context.Context, rc *ReconnectingClient, dialsA, dialsB *atomic.Int32, what string) {
	t.Helper()
	rc.mu.Lock()
	failures := rc.failures
	rc.mu.Unlock()
	cerr := rc.Connect(ctx)
	if a, b := dialsA.Load(), dialsB.Load(); failures != 1 || a != 1 || b != 1 || cerr != nil {
		t.Fatalf("%s: %d failures counted; then %d dials of the server that refused the login, %d of its fallback, Connect: %v; want 1, 1, 1 and nil", what, failures, a, b, cerr)
	}
}

// A Recv whose read the server failed (a login it refused) counts the
// refusal even if its own ctx ends after the read failed but before Recv
// stops ctx's interrupt, which then fires: only a read that an interrupt
// ended is the caller's. Recv took the interrupt's firing for the cause,
// dropped the connection with nothing counted, and the next dial went
// back to the server that refused the login. testHookIOEnded, which runs
// once the read failed, ends ctx.
func TestReconnectingRecvFailedBeforeItsCtxsInterruptCounts(t *testing.T) {
	checkRecvCtxEndingCounts(t, func(rc *ReconnectingClient) *func() { return &rc.testHookIOEnded },
		"a Recv the server failed, its ctx's interrupt firing before Recv stopped it")
}

// writeUnderEndingCtx runs writeUnder on c, as another call would, with
// a ctx (made from ctx) that ends during the write: once its interrupt
// has fired on c, write runs (nil: a write that succeeds).
func writeUnderEndingCtx(ctx context.Context, rc *ReconnectingClient, c *Client, write func() error) error {
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	return rc.writeUnder(wctx, c, func() error {
		wcancel() // ctx ends under the write
		for !c.interrupted.Load() {
			time.Sleep(time.Millisecond)
		}
		if write == nil {
			return nil
		}
		return write()
	})
}

// A write that the server failed (a login it refused) counts the refusal
// even if another call's interrupt fires on the connection after the
// write failed and drops it (here a write whose ctx ended during its own
// I/O), before the failed write is looked at. The write took the
// interrupt it found for the cause, returned ErrNotConnected and counted
// nothing; for a client that only sends, whose Recv never accounts for
// the end, the refusal was lost, and the next dial went back to the
// server that refused the login. testHookIOEnded, which runs once the
// write failed, runs the other call.
func TestReconnectingWriteFailedBeforeAnotherCallsInterruptCounts(t *testing.T) {
	rc, dialsA, dialsB := refusedThenFallback(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := rc.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	rc.mu.Lock()
	c := rc.c
	rc.mu.Unlock()
	var hooked atomic.Bool
	rc.testHookIOEnded = func() {
		if !hooked.Swap(true) { // not again for the other call's own write
			writeUnderEndingCtx(ctx, rc, c, nil) // drops c: its ctx's interrupt fired
		}
	}
	err := rc.Send(ctx, PublicKey{1}, []byte("x"))
	rc.testHookIOEnded = nil
	if err == nil {
		t.Fatal("a Send on a connection whose server hung up succeeded")
	}
	checkRefusalCounted(t, ctx, rc, dialsA, dialsB, fmt.Sprintf("a Send the server failed (%v), another call's interrupt firing after", err))
}

// A dial that the server refused (here its TCP connection) just before
// the caller's ctx ended is a failed dial of that server: only a dial that
// ctx's end cut short is the caller's. It was taken for one cut short:
// nothing counted, and the next call dialled again at once. Here
// testHookDialed, which runs once the servers were tried, ends ctx.
func TestReconnectingDialRefusedJustBeforeCtxEndedCounts(t *testing.T) {
	sw := &nodeSwitch{}
	sw.set("a.invalid:80", "refuse")
	rc := &ReconnectingClient{URL: "http://a.invalid/derp", PrivateKey: mustKey(t),
		MinBackoff: time.Hour, MaxBackoff: time.Hour, Dialer: &FastStart{DialContext: sw.dial}}
	t.Cleanup(func() { rc.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rc.testHookDialed = cancel // the caller's ctx ends once the dial failed
	err := rc.Connect(ctx)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("Connect to a server that refuses TCP: %v, want %v", err, syscall.ECONNREFUSED)
	}
	rc.mu.Lock()
	failures, waits := rc.failures, rc.nextDial.After(time.Now())
	rc.mu.Unlock()
	if failures != 1 || !waits {
		t.Fatalf("a dial the server refused (%v), the caller's ctx ending just after: %d failures counted, the next dial waits: %v; want 1 and true", err, failures, waits)
	}
}

// A Recv whose login bound (its wait for the ServerInfo) fires as its read
// returns a frame other than ServerInfo (a KeepAlive here, which the dial
// had buffered) counts the end as a login the server did not confirm in
// time, as when the bound fails the read. Recv dropped the connection as
// if a caller's ctx had ended it, counted nothing, and returned the
// KeepAlive. testHookIOEnded, which runs once the read returned, waits for
// the bound to fire.
func TestReconnectingLoginBoundFiringAsOtherFrameArrivesCounts(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t), early: appendFrame(nil, FrameKeepAlive, nil)}
	s.init()
	rc := newScriptedRC(t, s)
	rc.MinBackoff, rc.MaxBackoff = time.Hour, time.Hour
	rc.Dialer.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		return s.pipe(s.refuseLogin), nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := rc.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	rc.mu.Lock()
	c := rc.c
	rc.loginWait = time.Nanosecond // the bound fires at once
	rc.mu.Unlock()
	rc.testHookIOEnded = func() {
		for !c.interrupted.Load() && ctx.Err() == nil {
			time.Sleep(time.Millisecond)
		}
	}
	rctx, rcancel := context.WithCancel(ctx)
	defer rcancel()
	rc.testHookRecvDropped = rcancel // no dial by Recv
	m, err := rc.Recv(rctx)
	rc.mu.Lock()
	failures, waits := rc.failures, rc.nextDial.After(time.Now())
	rc.mu.Unlock()
	if err == nil || failures != 1 || !waits {
		t.Fatalf("the login's bound fired as a KeepAlive arrived before ServerInfo: Recv returned %T, %v; %d failures counted, the next dial waits: %v; want ctx's error, 1 and true", m, err, failures, waits)
	}
}

// A restart notice that a Recv returns while a dial is under way (the
// connection it came on having been dropped by a write that found the
// server's hang-up) sets the wait before the next dial even when that
// dial fails: the dial's failure keeps a later wait, as endLocked does.
// It set its own backoff over the notice's wait, and that in the notice's
// window of quick retries: a dial a few milliseconds on instead of the
// half hour the server asked for. testHookIOEnded, which runs once the
// notice was read, has the Send drop the connection and holds a dial,
// which fails, in testHookDialed until the notice is applied.
func TestReconnectingRestartNoticeOutlivesADialUnderWay(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.init()
	hungUp := make(chan struct{})
	s.script = func(_ int, sc net.Conn, _ *bufio.Reader, _ PublicKey) {
		sc.Write(appendFrame(nil, FrameRestarting, appendRestarting(nil, 30*time.Minute, time.Minute)))
		sc.Close()
		close(hungUp)
	}
	rc := newScriptedRC(t, s)
	rc.MinBackoff, rc.MaxBackoff = time.Millisecond, time.Hour
	var dials atomic.Int32
	rc.Dialer.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if dials.Add(1) == 1 {
			return s.dial(ctx, network, addr)
		}
		return nil, &net.OpError{Op: "dial", Net: network, Err: syscall.ECONNREFUSED}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if m, err := rc.Recv(ctx); err != nil {
		t.Fatal(err)
	} else if _, ok := m.(ServerInfo); !ok {
		t.Fatalf("first message %T, want ServerInfo", m)
	}
	dialFailed, release, connected := make(chan struct{}), make(chan struct{}), make(chan error, 1)
	rc.testHookDialed = func() { close(dialFailed); <-release }
	var hooked atomic.Bool
	rc.testHookIOEnded = func() {
		if hooked.Swap(true) { // not for the Send's write
			return
		}
		select {
		case <-hungUp:
		case <-ctx.Done():
			return
		}
		if err := rc.Send(ctx, PublicKey{1}, []byte("x")); err == nil {
			t.Error("a Send on a connection whose server hung up succeeded")
		}
		go func() { connected <- rc.Connect(ctx) }()
		select {
		case <-dialFailed:
		case <-ctx.Done():
		}
	}
	m, err := rc.Recv(ctx)
	if _, ok := m.(ServerRestarting); !ok || err != nil {
		t.Fatalf("second message %T, %v; want ServerRestarting", m, err)
	}
	close(release)
	if err := <-connected; err == nil {
		t.Fatal("a dial of a server that refuses TCP succeeded")
	}
	rc.mu.Lock()
	wait := time.Until(rc.nextDial)
	rc.mu.Unlock()
	if wait < 29*time.Minute {
		t.Fatalf("a restart notice asking for 30 minutes, applied while a dial was under way, which then failed: next dial in %v, want about 30m", wait.Round(time.Millisecond))
	}
}

// The same for a new connection's first frame (NotePreferred here) that
// the server failed (a login it refused) before the caller's ctx ended
// and its interrupt fired, before dial stopped it: the dial failed on the
// server's answer. It was taken for a dial that ctx cut short: nothing
// counted, and the next dial went back to the server that refused the
// login. testHookIOEnded, which runs once the frame failed, ends ctx.
func TestReconnectingSetupWriteFailedBeforeCtxsInterruptCounts(t *testing.T) {
	rc, dialsA, dialsB := refusedThenFallback(t)
	if err := rc.NotePreferred(true); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cctx, ccancel := context.WithCancel(ctx)
	defer ccancel()
	rc.testHookIOEnded = ccancel
	err := rc.Connect(cctx)
	rc.testHookIOEnded = nil
	if err == nil {
		t.Fatal("Connect succeeded though the server refused the login")
	}
	checkRefusalCounted(t, ctx, rc, dialsA, dialsB, fmt.Sprintf("a dial whose first frame the server failed (%v), its caller's ctx's interrupt firing after", err))
}

// A restart notice that a Recv returns from a connection older than the
// current one (dropped by a write that found the server's hang-up, and
// replaced by a new connection before the Recv applied the notice) sets
// no wait and no window of quick retries: the new connection is up, and
// its own end owes nothing to the old notice. It set both, and the end of
// the new session would wait the half hour the old notice asked for.
// testHookIOEnded, which runs once the notice was read, has the Send drop
// the old connection and Connect make the new one.
func TestReconnectingStaleRestartNoticeSetsNoWait(t *testing.T) {
	s := &scriptedServer{priv: mustKey(t)}
	s.init()
	hungUp := make(chan struct{})
	s.script = func(n int, sc net.Conn, br *bufio.Reader, _ PublicKey) {
		if n > 1 {
			io.Copy(io.Discard, br)
			return
		}
		sc.Write(appendFrame(nil, FrameRestarting, appendRestarting(nil, 30*time.Minute, time.Minute)))
		sc.Close()
		close(hungUp)
	}
	rc := newScriptedRC(t, s)
	rc.MinBackoff, rc.MaxBackoff = time.Millisecond, time.Hour
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if m, err := rc.Recv(ctx); err != nil {
		t.Fatal(err)
	} else if _, ok := m.(ServerInfo); !ok {
		t.Fatalf("first message %T, want ServerInfo", m)
	}
	var hooked atomic.Bool
	rc.testHookIOEnded = func() {
		if hooked.Swap(true) { // not for the Send's write
			return
		}
		select {
		case <-hungUp:
		case <-ctx.Done():
			return
		}
		if err := rc.Send(ctx, PublicKey{1}, []byte("x")); err == nil {
			t.Error("a Send on a connection whose server hung up succeeded")
		}
		if err := rc.Connect(ctx); err != nil {
			t.Error(err)
		}
	}
	m, gen, err := rc.RecvDetail(ctx)
	if _, ok := m.(ServerRestarting); !ok || err != nil || gen != 1 {
		t.Fatalf("second message %T of generation %d, %v; want ServerRestarting of 1", m, gen, err)
	}
	rc.mu.Lock()
	wait, window, cur := time.Until(rc.nextDial), time.Until(rc.restartUntil), rc.gen
	rc.mu.Unlock()
	if cur != 2 || wait > 0 || window > 0 {
		t.Fatalf("a restart notice from generation 1 applied once generation %d was up: next dial in %v, quick retries for %v; want generation 2, no wait and none", cur, wait.Round(time.Minute), window.Round(time.Minute))
	}
}

// checkRecvCtxEndingCounts runs a Recv on a connection whose server
// refused the login, whose ctx the test hook that hook returns ends, and
// checks that Recv returns ctx's error and that the refusal counted
// (checkRefusalCounted, after what).
func checkRecvCtxEndingCounts(t *testing.T, hook func(rc *ReconnectingClient) *func(), what string) {
	t.Helper()
	rc, dialsA, dialsB := refusedThenFallback(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := rc.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	rctx, rcancel := context.WithCancel(ctx)
	defer rcancel()
	*hook(rc) = rcancel
	_, err := rc.Recv(rctx)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Recv whose ctx ended: %v, want %v", err, context.Canceled)
	}
	*hook(rc) = nil
	checkRefusalCounted(t, ctx, rc, dialsA, dialsB, what)
}
