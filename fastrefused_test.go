package relay

import (
	"context"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"
)

// fastStartFront is what a reverse proxy in front of s that does not pass
// fast start through looks like to a client: a fast-start request gets
// answer (a 502, say) and the upgrade reaches s.
func fastStartFront(s *Server, answer func(w http.ResponseWriter, r *http.Request)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get(FastStartHeader) != "" {
			answer(w, r)
			return
		}
		s.ServeHTTP(w, r)
	})
}

// answer502 answers as nginx does when the server's answer to fast start
// is not HTTP; the DERP frames after the request must not be read as the
// next one.
func answer502(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Connection", "close")
	http.Error(w, "bad gateway", http.StatusBadGateway)
}

// countDials returns a configuration for newRCHarness that makes its
// Dialer count the TCP connections it makes, and the count.
func countDials() (func(*ReconnectingClient), *atomic.Int32) {
	n := new(atomic.Int32)
	var d net.Dialer
	return func(rc *ReconnectingClient) {
		rc.Dialer.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
			n.Add(1)
			return d.DialContext(ctx, network, addr)
		}
	}, n
}

// TestReconnectRemembersFastStartAnswered: behind a front that answers
// fast start with an HTTP error (a reverse proxy's 502) and passes the
// upgrade, a ReconnectingClient, which learns the server's key, must not
// pay two connections (the fast start that fails, then the upgrade) on
// every reconnect: once the upgrade got through after such an answer, its
// reconnects to that server take the upgrade path at once.
func TestReconnectRemembersFastStartAnswered(t *testing.T) {
	for _, tt := range []struct {
		name string
		opts derpServeOpts
	}{
		{"plain HTTP", derpServeOpts{plain: true}},
		// A TLS-terminating proxy presents its own chain: no meta cert.
		{"TLS without meta cert", derpServeOpts{noMetaCert: true}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestServer(t)
			o := tt.opts
			o.handler = fastStartFront(s, answer502)
			d := serveDERP(t, s, o)
			counting, dials := countDials()
			h := newRCHarness(t, &TestServer{URL: d.URL, TLSConfig: d.ClientTLS}, counting)
			rcNext[ServerInfo](t, h)
			const reconnects = 4
			for range reconnects {
				s.closePeer(h.rc.PrivateKey.Public())
				rcNext[ServerInfo](t, h)
			}
			logConnects := func() {
				h.mu.Lock()
				defer h.mu.Unlock()
				for i, hs := range h.connects {
					t.Logf("connection %d: %s path, %d attempts (%s)", i+1, hs.Path, hs.Attempts, hs.Reason)
				}
			}
			h.mu.Lock()
			logins := len(h.connects)
			h.mu.Unlock()
			if logins != reconnects+1 {
				t.Fatalf("%d connections, want %d", logins, reconnects+1)
			}
			// The first reconnect, with the learned key, finds out.
			if n := int(dials.Load()); n != reconnects+2 {
				logConnects()
				t.Fatalf("%d TCP connections for %d logins, want %d: every reconnect tries fast start again", n, reconnects+1, reconnects+2)
			}
			// A fixed front is found: fast start is tried again once the
			// memory expires, and after a Reconnect (a new path).
			h.rc.mu.Lock()
			for id := range h.rc.fastRefused {
				h.rc.fastRefused[id] = time.Now().Add(-time.Second)
			}
			h.rc.mu.Unlock()
			s.closePeer(h.rc.PrivateKey.Public())
			rcNext[ServerInfo](t, h)
			h.rc.Reconnect()
			rcNext[ServerInfo](t, h)
			s.closePeer(h.rc.PrivateKey.Public())
			rcNext[ServerInfo](t, h)
			if n, want := int(dials.Load()), reconnects+2+2+2+1; n != want {
				logConnects()
				t.Errorf("%d TCP connections, want %d: fast start tried again after the memory expired and after Reconnect, and remembered again", n, want)
			}
		})
	}
}

// TestReconnectFastStartHungUp: behind a front that hangs up on a
// fast-start request (a reset, or a close, with no HTTP answer) and passes
// the upgrade, a ReconnectingClient that learned the server's key must
// still reconnect, and not try fast start there again on every reconnect:
// one failed fast start, then the upgrade, which is remembered as a
// fast start answered by HTTP is.
func TestReconnectFastStartHungUp(t *testing.T) {
	for _, tt := range []struct {
		name  string
		reset bool
	}{{"reset", true}, {"close", false}} {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestServer(t)
			d := serveDERP(t, s, derpServeOpts{plain: true, handler: fastStartFront(s, func(w http.ResponseWriter, r *http.Request) {
				nc, _, err := http.NewResponseController(w).Hijack()
				if err != nil {
					return
				}
				if tc, ok := nc.(*net.TCPConn); ok && tt.reset {
					tc.SetLinger(0)
				}
				nc.Close()
			})})
			counting, dials := countDials()
			h := newRCHarness(t, &TestServer{URL: d.URL}, counting)
			rcNext[ServerInfo](t, h)
			const reconnects = 4
			for i := range reconnects {
				s.closePeer(h.rc.PrivateKey.Public())
				select {
				case m := <-h.msgs:
					if _, ok := m.(ServerInfo); !ok {
						t.Fatalf("reconnect %d: got %T, want ServerInfo", i+1, m)
					}
				case <-time.After(10 * time.Second):
					t.Fatalf("reconnect %d: no ServerInfo in 10s (%d TCP connections so far): the learned key's fast start fails every dial", i+1, dials.Load())
				}
			}
			if n, want := int(dials.Load()), reconnects+2; n != want {
				h.mu.Lock()
				for i, hs := range h.connects {
					t.Logf("connection %d: %s path, %d attempts (%s)", i+1, hs.Path, hs.Attempts, hs.Reason)
				}
				h.mu.Unlock()
				t.Errorf("%d TCP connections for %d logins, want %d", n, reconnects+1, want)
			}
		})
	}
}
