package relay

// How the package fits net/http, context and log/slog as an embedder uses
// them.

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	neturl "net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// serveHTTPWith serves h on plain HTTP with the given http.Server settings.
func serveHTTPWith(t *testing.T, h http.Handler, cfg func(*http.Server)) (*http.Server, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, ErrorLog: quietLog}
	if cfg != nil {
		cfg(srv)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return srv, "http://" + ln.Addr().String() + "/derp"
}

// Sessions hijacked from an http.Server with every timeout set must not
// inherit deadlines that kill them later.
func TestHTTPServerTimeoutsDoNotKillSessions(t *testing.T) {
	for _, name := range []string{"default", "loginTimeout0", "noPark"} {
		t.Run(name, func(t *testing.T) {
			var opts []ServerOption
			switch name {
			case "loginTimeout0":
				opts = append(opts, WithLoginTimeout(0))
			case "noPark":
				opts = append(opts, WithIdlePark(0))
			}
			s := newTestServer(t, opts...)
			_, url := serveHTTPWith(t, s, func(h *http.Server) {
				h.ReadHeaderTimeout = 100 * time.Millisecond
				h.ReadTimeout = 200 * time.Millisecond
				h.WriteTimeout = 200 * time.Millisecond
				h.IdleTimeout = 200 * time.Millisecond
			})
			for _, fs := range []*FastStart{{}, {WebSocket: true}} {
				a, _ := dialFast(t, fs, url)
				b, _ := dialFast(t, fs, url)
				time.Sleep(600 * time.Millisecond)
				relayBothWays(t, a, b)
			}
		})
	}
}

// A request that reaches ServeHTTP after Server.Close should get an HTTP
// answer (503), not a hijacked connection closed without a word, and must
// not be counted as "too_many_connections".
func TestServeHTTPAfterClose(t *testing.T) {
	s := NewServer(mustKey(t))
	_, url := serveHTTPWith(t, s, nil)
	s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, _, err := (&FastStart{}).Dial(ctx, url, mustKey(t))
	if err == nil {
		t.Fatal("dial after Close succeeded")
	}
	t.Logf("dial after Close: %v", err)
	var bad []string
	if !strings.Contains(err.Error(), "503") && !strings.Contains(err.Error(), "refused") {
		bad = append(bad, "client got no HTTP status: "+err.Error())
	}
	if n := s.Stats().Rejected["too_many_connections"]; n != 0 {
		bad = append(bad, "Stats.Rejected[too_many_connections] counted a request after Close")
	}
	if len(bad) > 0 {
		t.Error(strings.Join(bad, "; "))
	}
}

// recHandler records log records.
type recHandler struct {
	mu   sync.Mutex
	recs []slog.Record
	hook func(slog.Record)
}

func (h *recHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *recHandler) Handle(_ context.Context, r slog.Record) error {
	if h.hook != nil {
		h.hook(r)
	}
	h.mu.Lock()
	h.recs = append(h.recs, r.Clone())
	h.mu.Unlock()
	return nil
}
func (h *recHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *recHandler) WithGroup(string) slog.Handler      { return h }

// Accept with a context the caller already cancelled is the caller ending
// the session: it should not be logged and counted as a failed login.
func TestAcceptCancelledCtxIsNotALoginFailure(t *testing.T) {
	h := &recHandler{}
	s := newTestServer(t, WithLogger(slog.New(h)))
	cc, sc := tcpPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	done := make(chan struct{})
	go func() { s.Accept(ctx, sc, nil, sc.RemoteAddr().String()); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Accept with a cancelled ctx did not return")
	}
	cc.Close()
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, r := range h.recs {
		if r.Level >= slog.LevelInfo {
			t.Errorf("logged at %v: %s", r.Level, r.Message)
		}
	}
	if e := s.Stats().Errors; len(e) > 0 {
		t.Errorf("Stats.Errors after a cancelled Accept: %v", e)
	}
}

// A slog handler that calls back into the server (here: Sessions, e.g. to
// add context to a line) must not deadlock it.
func TestLogHandlerMayCallServer(t *testing.T) {
	var s *Server
	var mu sync.Mutex
	stuck := 0
	h := &recHandler{}
	h.hook = func(r slog.Record) {
		mu.Lock()
		n := stuck
		mu.Unlock()
		if n > 0 {
			return
		}
		done := make(chan struct{})
		go func() {
			for range s.Sessions() {
			}
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(2 * time.Second):
			mu.Lock()
			stuck++
			mu.Unlock()
			t.Logf("Sessions blocked while the handler handled %q", r.Message)
		}
	}
	s = NewServer(mustKey(t), WithLogger(slog.New(h)), WithQueueDepth(1), WithWriteTimeout(30*time.Second))
	defer s.Close()
	addr := tcpServer(t, s)
	a := tcpClient(t, addr)
	// b logs in, then stops reading: its queue overflows.
	b := tcpClient(t, addr)
	s.SetDebugKeys(b.PublicKey())
	pkt := make([]byte, 60000)
	deadline := time.Now().Add(1500 * time.Millisecond)
	for time.Now().Before(deadline) {
		mu.Lock()
		n := stuck
		mu.Unlock()
		if n > 0 {
			break
		}
		a.Send(b.PublicKey(), pkt)
	}
	b.Close()
	waitFor(t, func() bool { // the drops were logged (the handler ran)
		h.mu.Lock()
		defer h.mu.Unlock()
		for _, r := range h.recs {
			if r.Message == "relay: debug key: packet dropped" {
				return true
			}
		}
		return false
	})
	mu.Lock()
	defer mu.Unlock()
	if stuck > 0 {
		t.Errorf("the server held a lock while calling the log handler: Server.Sessions from the handler blocked %d time(s)", stuck)
	}
}

// Shutdown of the http.Server, then Close of the relay, and the other
// order; and a handler wrapped by http.TimeoutHandler.
func TestHTTPShutdownOrders(t *testing.T) {
	for _, relayFirst := range []bool{false, true} {
		s := NewServer(mustKey(t))
		hs, url := serveHTTPWith(t, s, nil)
		a, _ := dialFast(t, &FastStart{}, url)
		b, _ := dialFast(t, &FastStart{}, url)
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		if relayFirst {
			s.Close()
			if err := hs.Shutdown(ctx); err != nil {
				t.Errorf("Shutdown after relay Close: %v", err)
			}
		} else {
			if err := hs.Shutdown(ctx); err != nil {
				t.Errorf("Shutdown: %v", err)
			}
			relayBothWays(t, a, b)
			s.Close()
		}
		cancel()
		if _, ok := recvMsg[ServerRestarting](t, a); !ok {
			t.Error("no Restarting")
		}
		t.Logf("relayFirst=%v took %v", relayFirst, time.Since(start))
	}
}

// Behind a wrapper that cannot hijack, a client is refused with a 500 that
// says what is wrong with the deployment.
func TestBehindTimeoutHandler(t *testing.T) {
	s := newTestServer(t)
	_, url := serveHTTPWith(t, http.TimeoutHandler(s, time.Second, "timeout"), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, _, err := (&FastStart{}).Dial(ctx, url, mustKey(t))
	if err == nil || !strings.Contains(err.Error(), "500") || !strings.Contains(err.Error(), "Hijack") {
		t.Fatalf("dial through http.TimeoutHandler (which cannot hijack): %v, want the 500 refusal naming Hijack", err)
	}
}

// TestFastStartRefusalCloses: a fast-start request that the server answers
// without the upgrade (behind a wrapper that cannot hijack: 500; without an
// Upgrade header: 426; on a probe path: 200 or 204) is answered with
// "Connection: close" and the connection ends. The client's DERP frames
// follow its request; these answers kept the connection open, and net/http
// went on reading those frames as the start of the next request.
func TestFastStartRefusalCloses(t *testing.T) {
	s := newTestServer(t)
	_, timeoutURL := serveHTTPWith(t, http.TimeoutHandler(s, 5*time.Second, "timeout"), nil)
	_, plainURL := serveHTTPWith(t, s, nil)
	// A ClientInfo-sized frame, as a fast-start client sends it at once.
	frames := string(append([]byte{byte(FrameClientInfo), 0, 0, 0, 48}, make([]byte, 48)...))
	for _, tt := range []struct {
		name, url, req string
		status         int
	}{
		{"cannot hijack", timeoutURL, "GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n", http.StatusInternalServerError},
		{"no Upgrade", plainURL, "GET /derp HTTP/1.1\r\nHost: x\r\nDerp-Fast-Start: 1\r\n\r\n", http.StatusUpgradeRequired},
		{"probe", plainURL, "GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n", http.StatusOK},
		{"generate_204", plainURL, "GET /generate_204 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n", http.StatusNoContent},
	} {
		t.Run(tt.name, func(t *testing.T) {
			addr := strings.TrimSuffix(strings.TrimPrefix(tt.url, "http://"), "/derp")
			nc, br := httpDial(t, addr, tt.req+frames)
			nc.SetReadDeadline(time.Now().Add(10 * time.Second))
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("reading the response: %v", err)
			}
			io.Copy(io.Discard, resp.Body)
			if resp.StatusCode != tt.status || !resp.Close {
				t.Errorf("%s, Connection %q; want %d with Connection: close", resp.Status, resp.Header.Get("Connection"), tt.status)
			}
			if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
				t.Errorf("after the %d: read %q, %v; want the connection closed with nothing more: the frames must not be read as a request", tt.status, clip(string(rest), 40), err)
			}
		})
	}
}

// Dials to a peer that accepts TCP and then says nothing end promptly when
// ctx is cancelled, at every step.
func TestDialCancelSilentPeer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	acceptLoop(t, ln, func(nc net.Conn) {
		b := make([]byte, 1<<16)
		for {
			if _, err := nc.Read(b); err != nil {
				return
			}
		}
	})
	addr := ln.Addr().String()
	purl, _ := neturl.Parse("http://" + addr)
	cases := map[string]*FastStart{
		"upgrade": {},
		"fast":    {ServerKey: mustKey(t).Public()},
		"ws":      {WebSocket: true},
		"proxy":   {Proxy: func(*http.Request) (*neturl.URL, error) { return purl, nil }},
	}
	for name, fs := range cases {
		for _, scheme := range []string{"http", "https"} {
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			start := time.Now()
			_, _, err := fs.Dial(ctx, scheme+"://"+addr+"/derp", mustKey(t))
			cancel()
			if d := time.Since(start); d > 2*time.Second || err == nil {
				t.Errorf("%s %s: err %v after %v", name, scheme, err, d)
			} else if !strings.Contains(err.Error(), "deadline") {
				t.Logf("%s %s: %v", name, scheme, err)
			}
		}
	}
}

// Accept with a nil ctx is a programming error: it must panic at once on
// the caller's goroutine (with a message that says so), not on one of the
// server's own, where it kills the process, and it must take nothing from
// the server, whose Close would otherwise wait for that session forever.
func TestAcceptNilContext(t *testing.T) {
	s := NewServer(mustKey(t))
	for _, name := range []string{"pipe", "tcp"} {
		var cc, sc net.Conn
		if name == "pipe" {
			cc, sc = net.Pipe()
			defer cc.Close()
		} else {
			cc, sc = tcpPair(t) // parkable: the session would run on a goroutine of the server's
		}
		var nilCtx context.Context
		got := make(chan any, 1)
		go func() {
			defer func() { got <- recover() }()
			s.Accept(nilCtx, sc, nil, "192.0.2.1:1")
		}()
		select {
		case r := <-got:
			if msg, _ := r.(string); !strings.Contains(msg, "nil Context") {
				t.Errorf("%s: Accept(nil ctx) panicked with %v, want a panic naming the nil Context", name, r)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: Accept(nil ctx) neither returned nor panicked", name)
		}
		cc.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := cc.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("%s: Accept(nil ctx) left the connection open", name)
		}
	}
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Server.Close hangs after Accept(nil ctx): a session was counted that never ends")
	}
}

// A client over a connection limit (WithMaxConnections) that comes through
// ServeHTTP is told so with an HTTP 503 that names the limit, on every
// path, instead of being hijacked and hung up on without a word; the refusals
// are counted and take no slot.
func TestServeHTTPConnectionLimit503(t *testing.T) {
	for _, limit := range []ServerOption{WithMaxConnections(1, 0), WithMaxConnections(0, 1)} {
		s := newTestServer(t, limit)
		tlsd := serveDERP(t, s, derpServeOpts{})
		plain := serveDERP(t, s, derpServeOpts{plain: true})
		first, _ := dialFast(t, &FastStart{TLSConfig: tlsd.ClientTLS}, tlsd.URL)
		cases := []struct {
			name string
			url  string
			fs   *FastStart
		}{
			{"fast start (meta cert)", tlsd.URL, &FastStart{TLSConfig: tlsd.ClientTLS}},
			{"upgrade", tlsd.URL, &FastStart{TLSConfig: tlsd.ClientTLS, DisableFastStart: true}},
			{"websocket", tlsd.URL, &FastStart{TLSConfig: tlsd.ClientTLS, WebSocket: true}},
			{"fast start (known key, plain HTTP)", plain.URL, &FastStart{ServerKey: s.PublicKey()}},
		}
		for _, tc := range cases {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			c, hs, err := tc.fs.Dial(ctx, tc.url, mustKey(t))
			cancel()
			if err == nil {
				// The fast path returns once the login is written; the
				// answer comes with the first Recv.
				_, err = c.Recv()
				c.Close()
			}
			if err == nil || !strings.Contains(err.Error(), "503") || !strings.Contains(err.Error(), "too many connections") {
				t.Errorf("%s over the limit (%s): %v, want an HTTP 503 naming the connection limit", tc.name, hs.Path, err)
			}
		}
		if got := s.Stats().Rejected["too_many_connections"]; got < int64(len(cases)) {
			t.Errorf("Stats.Rejected[too_many_connections] = %d, want at least %d", got, len(cases))
		}
		if n := s.stats.sessions.Load(); n != 1 {
			t.Errorf("%d connection slots taken after the refusals, want 1", n)
		}
		first.Close()
		waitForT(t, "slot freed", func() bool { return s.stats.sessions.Load() == 0 })
		dialFast(t, &FastStart{TLSConfig: tlsd.ClientTLS}, tlsd.URL)
	}
}

// The way Server.Close's doc ends DERP sessions with http.Server.Shutdown:
// RegisterOnShutdown. Without it, Shutdown leaves hijacked sessions alone.
func TestHTTPShutdownWithRegisterOnShutdown(t *testing.T) {
	s := NewServer(mustKey(t))
	defer s.Close()
	hs, url := serveHTTPWith(t, s, nil)
	hs.RegisterOnShutdown(func() { s.Close() })
	a, _ := dialFast(t, &FastStart{}, url)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := hs.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if _, ok := recvMsg[ServerRestarting](t, a); !ok {
		t.Fatal("Shutdown with Server.Close registered: no ServerRestarting")
	}
	waitForT(t, "sessions ended", func() bool { return s.Stats().CurrentConnections == 0 })
}
