package relay

// Logging under attack: what anyone who can connect can make the server
// log at the default level (Info and above).

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// infoRecords returns h's records at Info and above.
func (h *recHandler) infoRecords() []slog.Record {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []slog.Record
	for _, r := range h.recs {
		if r.Level >= slog.LevelInfo {
			out = append(out, r)
		}
	}
	return out
}

// An Upgrade header is the client's to choose, up to net/http's 1 MiB of
// headers: the line that reports an unexpected one must not carry it whole.
func TestUnexpectedUpgradeLogBounded(t *testing.T) {
	h := &recHandler{}
	s := newTestServer(t, WithLogger(slog.New(h)))
	r := httptest.NewRequest("GET", "/derp", nil)
	r.Header.Set("Upgrade", strings.Repeat("x", 1<<20-100))
	w := httptest.NewRecorder()
	s.ServeHTTP(w, r)
	if w.Code != http.StatusUpgradeRequired {
		t.Fatalf("status %d", w.Code)
	}
	recs := h.infoRecords()
	if len(recs) != 1 {
		t.Fatalf("%d lines, want 1", len(recs))
	}
	size := len(recs[0].Message)
	recs[0].Attrs(func(a slog.Attr) bool {
		size += len(a.Key) + len(a.Value.String())
		return true
	})
	if size > 512 {
		t.Errorf("%q: a line of %d bytes for one request", recs[0].Message, size)
	}
}

// Each kind of connection that anyone can open at will, failing or
// misbehaving, must not make the server log a line at Info each: a flood
// of them would flood the log. The counters carry the totals; the log
// gets at most 20 lines at once and 10 a second after that.
func TestAttackerCannotFloodLog(t *testing.T) {
	const n = 200
	// accept runs a session over a pipe from remote; the returned
	// channel is closed when Accept returns.
	accept := func(s *Server, remote string) (net.Conn, chan struct{}) {
		cc, sc := net.Pipe()
		done := make(chan struct{})
		go func() { s.Accept(context.Background(), sc, nil, remote); close(done) }()
		t.Cleanup(func() { cc.Close(); <-done })
		return cc, done
	}
	cases := []struct {
		name    string
		opts    []ServerOption
		setup   func(t *testing.T, s *Server) func() // returns one attack
		counter string
	}{
		{"failed login", nil, func(t *testing.T, s *Server) func() {
			return func() {
				cc, done := accept(s, "192.0.2.1:1")
				cc.Close()
				<-done
			}
		}, "err:login:io_error"},
		{"too many connections from one IP", []ServerOption{WithMaxConnections(0, 1)}, func(t *testing.T, s *Server) func() {
			accept(s, "192.0.2.1:1") // holds the IP's one slot, logging in
			waitForT(t, "slot taken", func() bool { return s.stats.sessions.Load() == 1 })
			return func() {
				_, done := accept(s, "192.0.2.1:2")
				<-done
			}
		}, "rej:too_many_connections"},
		{"unexpected Upgrade", nil, func(t *testing.T, s *Server) func() {
			return func() {
				r := httptest.NewRequest("GET", "/derp", nil)
				r.Header.Set("Upgrade", "h2c")
				s.ServeHTTP(httptest.NewRecorder(), r)
			}
		}, "rej:no_upgrade"},
		{"upgrade the ResponseWriter cannot hijack", nil, func(t *testing.T, s *Server) func() {
			// A server deployed behind a wrapper that hides Hijack
			// (http.TimeoutHandler): every client's request fails.
			return func() {
				r := httptest.NewRequest("GET", "/derp", nil)
				r.Header.Set("Upgrade", "DERP")
				r.Header.Set("Connection", "Upgrade")
				s.ServeHTTP(httptest.NewRecorder(), r)
			}
		}, "rej:hijack_failed"},
		{"protocol error after login", nil, func(t *testing.T, s *Server) func() {
			return func() {
				cc, done := accept(s, "192.0.2.1:1")
				loginClient(t, cc, mustKey(t))
				cc.Write(mkFrame(FrameSendPacket, make([]byte, 5)))
				<-done
			}
		}, "err:session:short_send_packet"},
		{"duplicate key", nil, func(t *testing.T, s *Server) func() {
			priv := mustKey(t)
			cc, _ := accept(s, "192.0.2.1:1")
			first := loginClient(t, cc, priv)
			// The first session reads its Health notices: one that did
			// not would be dropped by the write timeout (2 s) on a slow
			// machine, and the later logins would no longer be
			// duplicates.
			go func() {
				for {
					if _, err := first.Recv(); err != nil {
						return
					}
				}
			}()
			return func() {
				cc, done := accept(s, "192.0.2.1:2")
				loginClient(t, cc, priv).Close()
				<-done
			}
		}, "TotalDupLogins"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := &recHandler{}
			s := newTestServer(t, append(tc.opts, WithLogger(slog.New(h)))...)
			attack := tc.setup(t, s)
			before := len(h.infoRecords())
			start := time.Now()
			for range n {
				attack()
			}
			elapsed := time.Since(start)
			lines := len(h.infoRecords()) - before
			if got := counter(s.Stats(), tc.counter); got < n {
				t.Errorf("%s = %d after %d attacks", tc.counter, got, n)
			}
			if limit := 21 + int(10*elapsed.Seconds()); lines > limit {
				t.Errorf("%d attacks in %v logged %d lines at Info or above, want at most %d", n, elapsed.Round(time.Millisecond), lines, limit)
			}
		})
	}
}

// ReconnectingClient.Logger gets one line per failure: a client whose
// servers all refuse every dial must not log a line per server tried on
// each attempt, forever.
func TestReconnectingClientLogsOneLinePerFailedDial(t *testing.T) {
	var urls []string
	for range 3 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		urls = append(urls, "http://"+ln.Addr().String()+"/derp")
		ln.Close() // connection refused from now on
	}
	h := &recHandler{}
	rc := &ReconnectingClient{URL: urls[0], Fallbacks: urls[1:], PrivateKey: mustKey(t),
		Logger: slog.New(h), MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond}
	defer rc.Close()
	const attempts = 5
	for range attempts {
		if err := rc.Connect(context.Background()); err == nil {
			t.Fatal("connected to a closed port")
		}
	}
	recs := h.infoRecords()
	if len(recs) != attempts {
		var msgs []string
		for _, r := range recs {
			msgs = append(msgs, r.Message)
		}
		t.Fatalf("%d failed dials of 3 servers each logged %d lines at Info: %q", attempts, len(recs), msgs)
	}
	// The line names every server's failure.
	for _, r := range recs {
		var err string
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "err" {
				err = a.Value.String()
			}
			return true
		})
		for _, u := range urls {
			if !strings.Contains(err, strings.TrimSuffix(strings.TrimPrefix(u, "http://"), "/derp")) {
				t.Errorf("%q: err %q does not name %s", r.Message, err, u)
			}
		}
	}
}

// A mesh peer that takes the link's watch and then drops it, again and
// again (crash-looping, or overloaded), must not be redialled every 100 ms
// for ever, each time with a "mesh link up" and a "mesh link down" line:
// a link that went down soon after it came up backs off as a failed dial
// does.
func TestMeshLinkFlapBacksOff(t *testing.T) {
	lns, urls := listenNodes(t, 2)
	h := &recHandler{}
	b := serveNode(t, lns[1], urls[1], WithMeshKey(testMeshKey))
	a := serveNode(t, lns[0], urls[0], WithMeshKey(testMeshKey), WithMeshPeers(urls[1]), WithLogger(slog.New(h)))
	y := dialNode(t, b, mustKey(t))
	const flaps = 5
	for range flaps {
		waitRoute(t, a.s, y.PublicKey(), b) // a's link watches b
		b.s.ClosePeer(a.s.pub)
		waitNoRoute(t, a.s, y.PublicKey())
	}
	var retries []time.Duration
	waitForT(t, "mesh link down lines", func() bool {
		retries = retries[:0]
		for _, r := range h.infoRecords() {
			if r.Message != "relay: mesh link down" {
				continue
			}
			r.Attrs(func(at slog.Attr) bool {
				if at.Key == "retryIn" {
					retries = append(retries, at.Value.Duration())
				}
				return true
			})
		}
		return len(retries) >= flaps
	})
	if longest := slices.Max(retries); longest < 4*meshMinBackoff {
		t.Errorf("after %d links that went down at once, a retries within %v at most (%v): no backoff", flaps, longest, retries)
	}
}

// ReconnectingClient.Logger's handler may call the client's methods (to
// add its generation or server key to a line, say), as OnConnect may: the
// client must not log while it holds its locks.
func TestReconnectingClientLogHandlerMayCallClient(t *testing.T) {
	s := newTestServer(t)
	_, url := serveHTTPWith(t, s, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := "http://" + ln.Addr().String() + "/derp"
	ln.Close()
	for _, tc := range []struct{ name, url string }{{"connected", url}, {"connect failed", refused}} {
		t.Run(tc.name, func(t *testing.T) {
			var rc *ReconnectingClient
			var mu sync.Mutex
			var stuck []string
			h := &recHandler{}
			h.hook = func(r slog.Record) {
				done := make(chan struct{})
				go func() {
					rc.Generation()
					rc.NotePreferred(true)
					close(done)
				}()
				select {
				case <-done:
				case <-time.After(2 * time.Second):
					mu.Lock()
					stuck = append(stuck, r.Message)
					mu.Unlock()
				}
			}
			rc = &ReconnectingClient{URL: tc.url, PrivateKey: mustKey(t), Logger: slog.New(h)}
			defer rc.Close()
			rc.Connect(context.Background())
			if len(h.infoRecords()) == 0 {
				t.Fatal("nothing logged")
			}
			mu.Lock()
			defer mu.Unlock()
			if len(stuck) > 0 {
				t.Errorf("the client's methods blocked while the log handler handled %q: it logs under its locks", stuck)
			}
		})
	}
}

// The log handler may call the client's methods even when they dial: the
// lines of a dial are logged once it is over. A handler that, on a failed
// connect, called Connect (or Send, Recv...) waited for the very dial that
// was logging: with context.Background(), forever.
func TestReconnectingClientLogHandlerMayDial(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := "http://" + ln.Addr().String() + "/derp"
	ln.Close()
	var rc *ReconnectingClient
	var called atomic.Bool
	inner := errors.New("handler not called")
	h := &recHandler{}
	h.hook = func(r slog.Record) {
		if r.Message != "relay: connect failed" || called.Swap(true) {
			return // the inner Connect's line too
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		inner = rc.Connect(ctx)
	}
	rc = &ReconnectingClient{URL: refused, PrivateKey: mustKey(t), Logger: slog.New(h)}
	defer rc.Close()
	if err := rc.Connect(context.Background()); err == nil {
		t.Fatal("Connect to a closed port succeeded")
	}
	if inner == nil || errors.Is(inner, context.DeadlineExceeded) || !strings.Contains(inner.Error(), "refused") {
		t.Fatalf("Connect from the log handler of a failed connect: %v, want the dial's own error (connection refused)", inner)
	}
}
