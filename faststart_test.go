package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log"
	"maps"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// testCert returns a fresh self-signed certificate for 127.0.0.1 and a pool
// that trusts it; cn only documents the caller's purpose.
func testCert(t testing.TB, cn string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	cert, pool, err := selfSignedCert("127.0.0.1")
	if err != nil {
		t.Fatalf("%s: %v", cn, err)
	}
	return cert, pool
}

// derpServeOpts are the knobs of serveDERP.
type derpServeOpts struct {
	plain      bool         // plain HTTP instead of TLS
	tls12      bool         // the server speaks at most TLS 1.2
	noMetaCert bool         // the chain lacks the meta cert (an old server)
	handler    http.Handler // default: the Server itself
	tlsConfig  *tls.Config  // the server's own config instead of a test certificate's (the meta cert appended unless noMetaCert)
}

// derpHTTP is a DERP server reachable over HTTP(S).
type derpHTTP struct {
	URL       string      // "https://127.0.0.1:port/derp" (or http)
	Addr      string      // "127.0.0.1:port"
	ClientTLS *tls.Config // trusts the server's certificate
}

// quietLog keeps net/http's log lines about handshakes the tests break on
// purpose out of the output.
var quietLog = log.New(io.Discard, "", 0)

// serveDERP serves s (or o.handler) with net/http, HTTP/1.1 only, over TLS
// with a self-signed certificate for 127.0.0.1 and, unless o.noMetaCert,
// s's meta cert appended with AppendMetaCert. Cleanup closes the HTTP server
// and waits for it; hijacked DERP sessions end with s, whose cleanup the
// caller registered first (newTestServer) and which therefore runs later.
func serveDERP(t testing.TB, s *Server, o derpServeOpts) derpHTTP {
	t.Helper()
	h := o.handler
	if h == nil {
		h = s
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var http1 http.Protocols
	http1.SetHTTP1(true)
	srv := &http.Server{Handler: h, ErrorLog: quietLog, Protocols: &http1}
	d := derpHTTP{Addr: ln.Addr().String(), URL: "http://" + ln.Addr().String() + "/derp"}
	var served net.Listener = ln
	if cfg := o.tlsConfig; cfg != nil {
		if !o.noMetaCert {
			AppendMetaCert(cfg, s.MetaCert())
		}
		served = tls.NewListener(ln, cfg)
		d.URL = "https://" + d.Addr + "/derp"
	} else if !o.plain {
		cert, pool := testCert(t, "relay test server")
		// As autocert's config would: AppendMetaCert must take h2 out.
		cfg := &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}}
		if o.tls12 {
			cfg.MaxVersion = tls.VersionTLS12
		}
		if o.noMetaCert {
			cfg.NextProtos = []string{"http/1.1"}
		} else {
			AppendMetaCert(cfg, s.MetaCert())
		}
		served = tls.NewListener(ln, cfg)
		d.URL = "https://" + d.Addr + "/derp"
		// Plain X25519: the post-quantum hybrid adds nothing here but
		// time under the race detector.
		d.ClientTLS = &tls.Config{RootCAs: pool, CurvePreferences: []tls.CurveID{tls.X25519}}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(served)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return d
}

// dialFast dials url with fs, fails t on error, and waits for the ServerInfo
// (after which the server has registered the client).
func dialFast(t testing.TB, fs *FastStart, url string, opts ...ClientOption) (*Client, Handshake) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, hs, err := fs.Dial(ctx, url, mustKey(t), opts...)
	if err != nil {
		t.Fatalf("Dial %s: %v (handshake %+v)", url, err, hs)
	}
	t.Cleanup(func() { c.Close() })
	if _, ok := recvMsg[ServerInfo](t, c); !ok {
		t.Fatalf("no ServerInfo after a %s dial", hs.Path)
	}
	return c, hs
}

// relayBothWays sends a packet from a to b and one from b to a through the
// server and checks that each arrives with the right source.
func relayBothWays(t testing.TB, a, b *Client) {
	t.Helper()
	for _, p := range [][2]*Client{{a, b}, {b, a}} {
		from, to := p[0], p[1]
		msg := []byte("hello from " + from.PublicKey().ShortString())
		if err := from.Send(to.PublicKey(), msg); err != nil {
			t.Fatal(err)
		}
		got, ok := recvMsg[*ReceivedPacket](t, to)
		if !ok {
			t.FailNow()
		}
		if got.Source != from.PublicKey() || !bytes.Equal(got.Data, msg) {
			t.Fatalf("received %q from %s, want %q from %s", got.Data, got.Source.ShortString(), msg, from.PublicKey().ShortString())
		}
	}
}

// headerLog records one header (Derp-Fast-Start unless header says
// otherwise) of each request before passing it on.
type headerLog struct {
	next   http.Handler
	header string // default FastStartHeader
	mu     sync.Mutex
	seen   []string
}

func (h *headerLog) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	name := h.header
	if name == "" {
		name = FastStartHeader
	}
	h.mu.Lock()
	h.seen = append(h.seen, r.Header.Get(name))
	h.mu.Unlock()
	h.next.ServeHTTP(w, r)
}

func (h *headerLog) values() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.seen)
}

// keyChoice says which ServerKey a FastStart is configured with.
type keyChoice int

const (
	noKey    keyChoice = iota
	rightKey           // the server's key
	staleKey           // some other key
)

func (k keyChoice) key(t testing.TB, s *Server) PublicKey {
	switch k {
	case rightKey:
		return s.PublicKey()
	case staleKey:
		return mustKey(t).Public()
	}
	return PublicKey{}
}

func TestDialPaths(t *testing.T) {
	tests := []struct {
		name       string
		serve      derpServeOpts
		key        keyChoice
		disable    bool
		wantPath   Path
		wantSource string
		wantReason string // substring; "" means Reason must be empty
		wantTries  int
		wantTLS    uint16
	}{
		{"TLS 1.3 with meta cert", derpServeOpts{}, noKey, false,
			FastPath, "meta-cert", "", 1, tls.VersionTLS13},
		{"TLS 1.3 without meta cert", derpServeOpts{noMetaCert: true}, noKey, false,
			UpgradePath, "http-header", "no meta cert", 1, tls.VersionTLS13},
		{"TLS 1.2 with meta cert", derpServeOpts{tls12: true}, noKey, false,
			UpgradePath, "http-header", "TLS 1.2 below 1.3", 1, tls.VersionTLS12},
		{"plain HTTP", derpServeOpts{plain: true}, noKey, false,
			UpgradePath, "http-header", "plain HTTP", 1, 0},
		{"plain HTTP with key", derpServeOpts{plain: true}, rightKey, false,
			FastPath, "configured", "", 1, 0},
		{"TLS 1.2 with key", derpServeOpts{tls12: true}, rightKey, false,
			FastPath, "configured", "TLS 1.2 below 1.3", 1, tls.VersionTLS12},
		{"TLS 1.3 without meta cert with key", derpServeOpts{noMetaCert: true}, rightKey, false,
			FastPath, "configured", "no meta cert", 1, tls.VersionTLS13},
		{"meta cert beats stale key", derpServeOpts{}, staleKey, false,
			FastPath, "meta-cert", "stale", 1, tls.VersionTLS13},
		{"plain HTTP with stale key", derpServeOpts{plain: true}, staleKey, false,
			UpgradePath, "http-header", "stale", 2, 0},
		{"TLS 1.2 with stale key", derpServeOpts{tls12: true}, staleKey, false,
			UpgradePath, "http-header", "stale", 2, tls.VersionTLS12},
		{"disabled", derpServeOpts{}, noKey, true,
			UpgradePath, "http-header", "disabled", 1, tls.VersionTLS13},
		{"disabled with key", derpServeOpts{plain: true}, rightKey, true,
			UpgradePath, "http-header", "disabled", 1, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestServer(t)
			hl := &headerLog{next: s}
			tt.serve.handler = hl
			srv := serveDERP(t, s, tt.serve)
			fs := &FastStart{TLSConfig: srv.ClientTLS, ServerKey: tt.key.key(t, s), DisableFastStart: tt.disable}

			var clients []*Client
			for range 2 {
				c, hs := dialFast(t, fs, srv.URL)
				clients = append(clients, c)
				if hs.Path != tt.wantPath || hs.KeySource != tt.wantSource || hs.Attempts != tt.wantTries ||
					hs.TLSVersion != tt.wantTLS || hs.ServerKey != s.PublicKey() {
					t.Errorf("handshake %+v\nwant path %s, key source %q, %d attempts, TLS %#x, key %s",
						hs, tt.wantPath, tt.wantSource, tt.wantTries, tt.wantTLS, s.PublicKey().ShortString())
				}
				if (hs.TLS != nil) != (tt.wantTLS != 0) || hs.TLS != nil && hs.TLS.Version != hs.TLSVersion {
					t.Errorf("TLS state %v with TLS version %#x", hs.TLS != nil, hs.TLSVersion)
				}
				if hs.KeySource == "meta-cert" {
					if k, _, ok := ParseMetaCert(hs.TLS.PeerCertificates); !ok || k != s.PublicKey() {
						t.Errorf("key from the meta cert, but the chain in Handshake.TLS names %v (%v)", k, ok)
					}
				}
				if tt.wantReason == "" && hs.Reason != "" {
					t.Errorf("Reason = %q, want none", hs.Reason)
				}
				if !strings.Contains(hs.Reason, tt.wantReason) {
					t.Errorf("Reason = %q, want it to mention %q", hs.Reason, tt.wantReason)
				}
				if c.ServerPublicKey() != s.PublicKey() {
					t.Errorf("client's server key %s, want %s", c.ServerPublicKey().ShortString(), s.PublicKey().ShortString())
				}
			}
			relayBothWays(t, clients[0], clients[1])

			// The server saw Derp-Fast-Start: 1 exactly on fast-path
			// connections (and on the stale first attempts).
			perDial := []string{""}
			if tt.wantPath == FastPath {
				perDial = []string{"1"}
			}
			if tt.wantTries == 2 {
				perDial = []string{"1", ""}
			}
			want := slices.Concat(perDial, perDial)
			if got := hl.values(); !slices.Equal(got, want) {
				t.Errorf("server saw %s headers %q, want %q", FastStartHeader, got, want)
			}
			st := s.Stats()
			wantFast, wantUpgrade := int64(0), int64(2)
			if tt.wantPath == FastPath {
				wantFast, wantUpgrade = 2, 0
			}
			if st.FastStartLogins != wantFast || st.UpgradeLogins != wantUpgrade {
				t.Errorf("server counted %d fast-start and %d upgrade logins, want %d and %d",
					st.FastStartLogins, st.UpgradeLogins, wantFast, wantUpgrade)
			}
			if tt.wantTries == 2 {
				// The first attempts sealed ClientInfo to the stale key.
				waitFor(t, func() bool { return s.Stats().Errors["login:bad_client_info_box"] == 2 })
			}
		})
	}
}

// flightConn records the order of the Read and Write calls a client makes on
// its connection, and which Write carried the ClientInfo frame.
type flightConn struct {
	net.Conn
	mu  sync.Mutex
	ops []connOp
}

type connOp struct {
	write      bool
	data       []byte    // what a Write wrote
	handshake  bool      // a Write made by the TLS handshake
	clientInfo bool      // the Write that flushed the ClientInfo frame
	at         time.Time // when the call started
}

func (c *flightConn) Read(p []byte) (int, error) {
	c.add(connOp{at: time.Now()})
	return c.Conn.Read(p)
}

func (c *flightConn) Write(p []byte) (int, error) {
	c.add(connOp{
		write:      true,
		at:         time.Now(),
		data:       bytes.Clone(p),
		handshake:  calledFrom("github.com/fastderp/relay.(*FastStart).tlsHandshake"),
		clientInfo: calledFrom("github.com/fastderp/relay.(*Client).sendClientInfo"),
	})
	return c.Conn.Write(p)
}

func (c *flightConn) add(op connOp) {
	c.mu.Lock()
	c.ops = append(c.ops, op)
	c.mu.Unlock()
}

// calledFrom reports whether fn (a fully qualified function name) is on the
// calling goroutine's stack. Frames of inlined calls are reported too.
func calledFrom(fn string) bool {
	pcs := make([]uintptr, 100)
	frames := runtime.CallersFrames(pcs[:runtime.Callers(2, pcs)])
	for {
		f, more := frames.Next()
		if f.Function == fn {
			return true
		}
		if !more {
			return false
		}
	}
}

// flights summarises a connection up to the Write of the ClientInfo frame.
type flights struct {
	// waits counts the times the client had to wait for the server: a Read
	// that follows a Write. Several Reads or Writes in a row (a TLS flight
	// read in pieces, a flight written record by record) count once.
	waits int
	// appWrites counts Writes outside the TLS handshake before the one of
	// the ClientInfo frame: 0 means the upgrade request left with it.
	appWrites int
	// handshakeWrites counts the Writes of the TLS handshake.
	handshakeWrites int
	clientInfo      connOp
}

func (c *flightConn) flights() (flights, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var f flights
	wrote := false
	for _, op := range c.ops {
		switch {
		case op.write && op.clientInfo:
			f.clientInfo = op
			return f, true
		case op.write:
			wrote = true
			if op.handshake {
				f.handshakeWrites++
			} else {
				f.appWrites++
			}
		case wrote:
			f.waits++
			wrote = false
		}
	}
	return f, false
}

// flightDialer returns a DialContext for FastStart that wraps the TCP
// connection in a flightConn, and a function returning that conn.
func flightDialer() (func(ctx context.Context, network, addr string) (net.Conn, error), func() *flightConn) {
	var mu sync.Mutex
	var last *flightConn
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		nc, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		fc := &flightConn{Conn: nc}
		mu.Lock()
		last = fc
		mu.Unlock()
		return fc, nil
	}
	return dial, func() *flightConn {
		mu.Lock()
		defer mu.Unlock()
		return last
	}
}

// TestFlightCounting proves the round trips of each path, deterministically:
// it counts how many times the client waits for the server between the TCP
// connection being up and its first DERP frame (ClientInfo) leaving. Add one
// for the TCP handshake to get the round trips of the benchmark below.
func TestFlightCounting(t *testing.T) {
	tests := []struct {
		name     string
		serve    derpServeOpts
		key      keyChoice
		wantPath Path
		// Waits before the ClientInfo Write, and whether the upgrade
		// request left in that same Write.
		wantWaits    int
		wantTogether bool
	}{
		// TLS 1.3: ServerHello…Finished is the only flight the client
		// waits for; its Finished, the request and ClientInfo follow.
		{"fast path TLS 1.3", derpServeOpts{}, noKey, FastPath, 1, true},
		// TLS 1.3, then the 101.
		{"upgrade path TLS 1.3", derpServeOpts{noMetaCert: true}, noKey, UpgradePath, 2, false},
		{"fast path TLS 1.3 with key", derpServeOpts{noMetaCert: true}, rightKey, FastPath, 1, true},
		// The 101 only.
		{"plain HTTP", derpServeOpts{plain: true}, noKey, UpgradePath, 1, false},
		// Nothing: the request and ClientInfo ride right behind the SYN's
		// ACK.
		{"plain HTTP with key", derpServeOpts{plain: true}, rightKey, FastPath, 0, true},
		// A full TLS 1.2 handshake makes the client wait twice: for
		// ServerHello…ServerHelloDone, and (after sending its key
		// exchange and Finished) for the server's ChangeCipherSpec and
		// Finished; crypto/tls does no False Start. A known key saves
		// the 101.
		{"TLS 1.2 with key", derpServeOpts{tls12: true}, rightKey, FastPath, 2, true},
		{"TLS 1.2", derpServeOpts{tls12: true}, noKey, UpgradePath, 3, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestServer(t)
			srv := serveDERP(t, s, tt.serve)
			dial, conn := flightDialer()
			fs := &FastStart{TLSConfig: srv.ClientTLS, ServerKey: tt.key.key(t, s), DialContext: dial}
			_, hs := dialFast(t, fs, srv.URL)
			if hs.Path != tt.wantPath {
				t.Fatalf("took the %s path (%s), want %s", hs.Path, hs.Reason, tt.wantPath)
			}
			f, ok := conn().flights()
			if !ok {
				t.Fatal("no Write of the ClientInfo frame recorded")
			}
			if tls := !tt.serve.plain; tls != (f.handshakeWrites > 0) {
				t.Fatalf("%d Writes recognised as the TLS handshake's over TLS=%v (was FastStart.tlsHandshake renamed?)", f.handshakeWrites, tls)
			}
			if f.waits != tt.wantWaits {
				t.Errorf("client waited for the server %d times before its first DERP frame, want %d", f.waits, tt.wantWaits)
			}
			if together := f.appWrites == 0; together != tt.wantTogether {
				t.Errorf("upgrade request and ClientInfo in one Write: %v, want %v (%d writes before)", together, tt.wantTogether, f.appWrites)
			}
			if !tt.serve.plain {
				return
			}
			// Without TLS the bytes themselves can be checked: the request,
			// then at once a ClientInfo frame.
			w := f.clientInfo.data
			if tt.wantTogether {
				i := bytes.Index(w, []byte("\r\n\r\n"))
				if !bytes.HasPrefix(w, []byte("GET /derp HTTP/1.1\r\n")) || i < 0 {
					t.Fatalf("fast-path write does not start with the upgrade request: %q", w)
				}
				if !bytes.Contains(w[:i+2], []byte("\r\n"+FastStartHeader+": 1\r\n")) {
					t.Errorf("fast-path request lacks %s: 1: %q", FastStartHeader, w[:i])
				}
				w = w[i+4:]
			}
			if len(w) < frameHeaderLen || FrameType(w[0]) != FrameClientInfo ||
				int(binary.BigEndian.Uint32(w[1:5])) != len(w)-frameHeaderLen {
				t.Errorf("write does not hold exactly one ClientInfo frame: %x", w)
			}
		})
	}
}

// TestFastStartAnswered101: a server (or proxy) that drops Derp-Fast-Start
// answers with a 101; the client skips it and carries on.
func TestFastStartAnswered101(t *testing.T) {
	for _, tt := range []struct {
		name  string
		serve derpServeOpts
		key   keyChoice
	}{
		{"meta cert", derpServeOpts{}, noKey},
		// The configured key is confirmed by reading the server's first
		// bytes, which are now the 101.
		{"plain HTTP with key", derpServeOpts{plain: true}, rightKey},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestServer(t)
			tt.serve.handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				r.Header.Del(FastStartHeader)
				s.ServeHTTP(w, r)
			})
			srv := serveDERP(t, s, tt.serve)
			fs := &FastStart{TLSConfig: srv.ClientTLS, ServerKey: tt.key.key(t, s)}
			a, hs := dialFast(t, fs, srv.URL)
			b, _ := dialFast(t, fs, srv.URL)
			if hs.Path != FastPath || hs.Attempts != 1 {
				t.Errorf("handshake %+v, want the fast path in one attempt", hs)
			}
			relayBothWays(t, a, b)
			if st := s.Stats(); st.UpgradeLogins != 2 || st.FastStartLogins != 0 {
				t.Errorf("server counted %d upgrade and %d fast-start logins, want 2 and 0", st.UpgradeLogins, st.FastStartLogins)
			}
		})
	}

	// A stale key is noticed in the 101's Derp-Public-Key header.
	t.Run("stale key", func(t *testing.T) {
		s := newTestServer(t)
		srv := serveDERP(t, s, derpServeOpts{plain: true, handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			r.Header.Del(FastStartHeader)
			s.ServeHTTP(w, r)
		})})
		fs := &FastStart{ServerKey: staleKey.key(t, s)}
		a, hs := dialFast(t, fs, srv.URL)
		b, _ := dialFast(t, fs, srv.URL)
		if hs.Path != UpgradePath || hs.Attempts != 2 || !strings.Contains(hs.Reason, "stale") {
			t.Errorf("handshake %+v, want the upgrade path after a stale-key attempt", hs)
		}
		relayBothWays(t, a, b)
	})
}

// interceptingProxy terminates TLS with its own certificate and opens a new
// TLS connection to upstream for each client, as corporate middleboxes do. It
// returns its address, a client config trusting it, and a channel that
// reports whether upstream's chain had a meta cert.
func interceptingProxy(t testing.TB, upstream string, upstreamTLS *tls.Config) (string, *tls.Config, <-chan bool) {
	t.Helper()
	cert, pool := testCert(t, "intercepting proxy")
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	sawMeta := make(chan bool, 10)
	acceptLoop(t, ln, func(down net.Conn) {
		defer down.Close()
		up, err := tls.Dial("tcp", upstream, upstreamTLS)
		if err != nil {
			t.Errorf("proxy: %v", err)
			return
		}
		defer up.Close()
		_, _, ok := ParseMetaCert(up.ConnectionState().PeerCertificates)
		sawMeta <- ok
		pipeBoth(down, down, up)
	})
	return ln.Addr().String(), &tls.Config{RootCAs: pool, CurvePreferences: []tls.CurveID{tls.X25519}}, sawMeta
}

func TestTLSInterceptingProxy(t *testing.T) {
	s := newTestServer(t)
	srv := serveDERP(t, s, derpServeOpts{})
	addr, clientTLS, sawMeta := interceptingProxy(t, srv.Addr, srv.ClientTLS)
	fs := &FastStart{TLSConfig: clientTLS}
	url := "https://" + addr + "/derp"
	a, hs := dialFast(t, fs, url)
	b, _ := dialFast(t, fs, url)
	if hs.Path != UpgradePath || hs.TLSVersion != tls.VersionTLS13 || hs.KeySource != "http-header" ||
		hs.ServerKey != s.PublicKey() || !strings.Contains(hs.Reason, "no meta cert") {
		t.Errorf("handshake %+v, want the upgrade path over TLS 1.3 because there is no meta cert", hs)
	}
	// The chain the client saw is the proxy's: Handshake.TLS shows it.
	if _, _, ok := ParseMetaCert(hs.TLS.PeerCertificates); ok || len(hs.TLS.PeerCertificates) == 0 {
		t.Errorf("Handshake.TLS shows %d certificates, meta cert %v", len(hs.TLS.PeerCertificates), ok)
	}
	if !<-sawMeta {
		t.Error("the server did not show the proxy its meta cert")
	}
	relayBothWays(t, a, b)
}

// h2Frame writes one HTTP/2 frame.
func h2Frame(w io.Writer, typ, flags byte, stream uint32, payload []byte) error {
	var h [9]byte
	h[0], h[1], h[2] = byte(len(payload)>>16), byte(len(payload)>>8), byte(len(payload))
	h[3], h[4] = typ, flags
	binary.BigEndian.PutUint32(h[5:], stream)
	_, err := w.Write(append(h[:], payload...))
	return err
}

// hpackLiteral encodes a header field as a literal without indexing, with a
// new name, no Huffman coding (RFC 7541 6.2.2); name and value must be short.
func hpackLiteral(name, value string) []byte {
	b := []byte{0x00, byte(len(name))}
	b = append(b, name...)
	b = append(b, byte(len(value)))
	return append(b, value...)
}

func TestHTTP2Refused(t *testing.T) {
	// ServeHTTP itself answers an upgrade that arrived over HTTP/2 (a
	// server other than net/http's may pass the header through) with 505,
	// before it tries to hijack.
	t.Run("ServeHTTP", func(t *testing.T) {
		s := newTestServer(t)
		r := httptest.NewRequest("GET", "https://example.com/derp", nil)
		r.Proto, r.ProtoMajor, r.ProtoMinor = "HTTP/2.0", 2, 0
		r.Header.Set("Upgrade", "DERP")
		r.Header.Set(FastStartHeader, "1")
		w := httptest.NewRecorder()
		s.ServeHTTP(w, r)
		if w.Code != http.StatusHTTPVersionNotSupported || !strings.Contains(w.Body.String(), "HTTP/1.1") {
			t.Errorf("got %d %q, want 505 naming HTTP/1.1", w.Code, w.Body)
		}
		if st := s.Stats(); st.Accepts != 0 || st.Rejected["not_http1"] != 1 {
			t.Errorf("accepts %d, rejected %v", st.Accepts, st.Rejected)
		}
	})

	// A net/http server with HTTP/2 on (ServeTLS): over h2 the Upgrade
	// header is illegal, so net/http answers 400 before any handler runs; a
	// request without it reaches ServeHTTP and gets 426. Either way a clear
	// status, never a hang.
	t.Run("net/http h2 server", func(t *testing.T) {
		s := newTestServer(t)
		var mu sync.Mutex
		var reached []string
		h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			reached = append(reached, r.Proto+" Upgrade="+r.Header.Get("Upgrade"))
			mu.Unlock()
			s.ServeHTTP(w, r)
		})
		cert, pool := testCert(t, "h2 server")
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: h, ErrorLog: quietLog, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}}
		done := make(chan struct{})
		go func() { defer close(done); srv.ServeTLS(ln, "", "") }()
		t.Cleanup(func() { srv.Close(); <-done })
		addr := ln.Addr().String()

		status, body := h2UpgradeRequest(t, addr, &tls.Config{RootCAs: pool})
		// 0x8c is the HPACK static table's ":status: 400".
		if status != 0x8c || !strings.Contains(body, `"Upgrade"`) {
			t.Errorf("h2 upgrade request: status field %#x, body %q; want 0x8c (400) naming Upgrade", status, body)
		}

		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("https://" + addr + "/derp")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.ProtoMajor != 2 || resp.StatusCode != http.StatusUpgradeRequired || string(b) != "DERP requires connection upgrade\n" {
			t.Errorf("h2 GET /derp: %s %s %q, want HTTP/2.0 426", resp.Proto, resp.Status, b)
		}
		mu.Lock()
		if want := []string{"HTTP/2.0 Upgrade="}; !slices.Equal(reached, want) {
			t.Errorf("handler reached by %q, want %q", reached, want)
		}
		mu.Unlock()
		if st := s.Stats(); st.Accepts != 0 {
			t.Errorf("%d sessions accepted over h2", st.Accepts)
		}

		// FastStart offers no ALPN, whatever its TLSConfig says, so
		// the same server gives it HTTP/1.1; and it leaves the config
		// as it was.
		cfg := &tls.Config{RootCAs: pool, NextProtos: []string{"h2"}}
		fs := &FastStart{TLSConfig: cfg}
		c1, hs := dialFast(t, fs, "https://"+addr+"/derp")
		c2, _ := dialFast(t, fs, "https://"+addr+"/derp")
		relayBothWays(t, c1, c2)
		if hs.Path != UpgradePath || !slices.Equal(cfg.NextProtos, []string{"h2"}) || cfg.ServerName != "" {
			t.Errorf("handshake %+v; caller's config now has NextProtos %q, ServerName %q", hs, cfg.NextProtos, cfg.ServerName)
		}
	})

	// A config prepared by AppendMetaCert never negotiates h2, even with
	// a client that prefers it.
	t.Run("AppendMetaCert", func(t *testing.T) {
		s := newTestServer(t)
		srv := serveDERP(t, s, derpServeOpts{})
		cfg := srv.ClientTLS.Clone()
		cfg.NextProtos = []string{"h2", "http/1.1"}
		conn, err := tls.Dial("tcp", srv.Addr, cfg)
		if err != nil {
			t.Fatal(err)
		}
		conn.Close()
		if p := conn.ConnectionState().NegotiatedProtocol; p != "http/1.1" {
			t.Errorf("negotiated %q, want http/1.1", p)
		}
		tr := &http.Transport{TLSClientConfig: srv.ClientTLS, ForceAttemptHTTP2: true}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("https://" + srv.Addr + "/derp/probe")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.ProtoMajor != 1 || resp.StatusCode != http.StatusOK {
			t.Errorf("probe: %s %s, want HTTP/1.1 200", resp.Proto, resp.Status)
		}
	})
}

// h2UpgradeRequest sends "GET /derp" with "upgrade: derp" over HTTP/2,
// written by hand because Go's HTTP/2 client refuses to, and returns the
// first byte of the response's header block (its :status field) and its
// body.
func h2UpgradeRequest(t *testing.T, addr string, cfg *tls.Config) (status byte, body string) {
	t.Helper()
	cfg = cfg.Clone()
	cfg.NextProtos = []string{"h2"}
	conn, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if p := conn.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("negotiated %q, want h2", p)
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second)) // a hang fails the test
	const (
		frameData, frameHeaders, frameRST, frameSettings, frameGoAway = 0x0, 0x1, 0x3, 0x4, 0x7
		flagEndStream, flagAck, flagEndHeaders                        = 0x1, 0x1, 0x4
	)
	block := []byte{0x82, 0x87} // :method GET, :scheme https (static table)
	block = append(block, hpackLiteral(":path", "/derp")...)
	block = append(block, hpackLiteral(":authority", addr)...)
	block = append(block, hpackLiteral("upgrade", "derp")...)
	block = append(block, hpackLiteral("derp-fast-start", "1")...)
	io.WriteString(conn, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
	h2Frame(conn, frameSettings, 0, 0, nil)
	h2Frame(conn, frameHeaders, flagEndStream|flagEndHeaders, 1, block)

	br := bufio.NewReader(conn)
	var b strings.Builder
	for {
		var h [9]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			t.Fatalf("reading h2 response: %v", err)
		}
		n := int(h[0])<<16 | int(h[1])<<8 | int(h[2])
		typ, flags, stream := h[3], h[4], binary.BigEndian.Uint32(h[5:])&(1<<31-1)
		p := make([]byte, n)
		if _, err := io.ReadFull(br, p); err != nil {
			t.Fatalf("reading h2 response: %v", err)
		}
		switch {
		case typ == frameSettings && flags&flagAck == 0:
			h2Frame(conn, frameSettings, flagAck, 0, nil)
		case typ == frameGoAway:
			t.Fatalf("h2 server sent GOAWAY %x", p)
		case stream != 1:
		case typ == frameRST:
			t.Fatalf("h2 server reset the stream: %x", p)
		case typ == frameHeaders && n > 0:
			status = p[0]
		case typ == frameData:
			b.Write(p)
		}
		if stream == 1 && flags&flagEndStream != 0 && (typ == frameHeaders || typ == frameData) {
			return status, b.String()
		}
	}
}

// stallServer accepts connections on 127.0.0.1 (through TLS with cert if
// not nil) and never answers. Each connection reads until it has seen
// waitFor in the client's bytes (any bytes if empty), reports that on
// stalled, then reads to the end and reports on closed that the client
// closed its side.
func stallServer(t testing.TB, cert *tls.Certificate, waitFor string) (addr string, stalled, closed <-chan struct{}) {
	t.Helper()
	var ln net.Listener
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if cert != nil {
		ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{*cert}, NextProtos: []string{"http/1.1"}})
	}
	stall, close1 := make(chan struct{}, 10), make(chan struct{}, 10)
	acceptLoop(t, ln, func(nc net.Conn) {
		defer nc.Close()
		var got []byte
		buf := make([]byte, 4096)
		for {
			n, err := nc.Read(buf)
			got = append(got, buf[:n]...)
			if err != nil {
				return
			}
			if bytes.Contains(got, []byte(waitFor)) {
				break
			}
		}
		stall <- struct{}{}
		io.Copy(io.Discard, nc)
		close1 <- struct{}{}
	})
	return ln.Addr().String(), stall, close1
}

// TestDialContextCancel cancels the context at each step of Dial: the dial
// returns at once with an error wrapping the context's, and the connection
// is closed.
func TestDialContextCancel(t *testing.T) {
	cert, pool := testCert(t, "stalling server")
	clientTLS := &tls.Config{RootCAs: pool, CurvePreferences: []tls.CurveID{tls.X25519}}
	someKey := mustKey(t).Public()
	tests := []struct {
		name     string
		tls      bool   // the stalling server completes TLS handshakes
		scheme   string // of the URL
		waitFor  string // the server stalls once it has read this
		key      bool   // FastStart.ServerKey is set
		deadline bool   // a deadline expires instead of a cancel
		wantErr  error  // what the error wraps
		blockTCP bool   // DialContext blocks until ctx is done
		ws       bool   // FastStart.WebSocket is set
		proxy    bool   // the stalling server is an HTTP proxy to the URL's host
		wantStep string // the step the error names
		ownErr   bool   // with blockTCP: DialContext returns an error of its own, not ctx's
	}{
		{name: "TCP connect", scheme: "https", blockTCP: true, wantErr: context.Canceled, wantStep: stepTCP},
		{name: "TLS handshake", scheme: "https", wantErr: context.Canceled, wantStep: "TLS handshake"},
		{name: "TLS handshake deadline", scheme: "https", deadline: true, wantErr: context.DeadlineExceeded, wantStep: "TLS handshake"},
		{name: "101 over plain HTTP", scheme: "http", waitFor: "\r\n\r\n", wantErr: context.Canceled, wantStep: step101},
		{name: "101 over TLS", scheme: "https", tls: true, waitFor: "\r\n\r\n", wantErr: context.Canceled, wantStep: step101},
		{name: "101 over TLS deadline", scheme: "https", tls: true, waitFor: "\r\n\r\n", deadline: true, wantErr: context.DeadlineExceeded, wantStep: step101},
		// With a configured key the client wrote its ClientInfo and waits
		// for the ServerKey frame to confirm the key.
		{name: "key confirmation over plain HTTP", scheme: "http", waitFor: "\r\n\r\n", key: true, wantErr: context.Canceled, wantStep: stepConfirm},
		{name: "key confirmation over TLS", scheme: "https", tls: true, waitFor: "\r\n\r\n", key: true, wantErr: context.Canceled, wantStep: stepConfirm},
		{name: "WebSocket 101", scheme: "http", ws: true, waitFor: "\r\n\r\n", wantErr: context.Canceled, wantStep: stepWS101},
		{name: "WebSocket 101 over TLS", scheme: "https", tls: true, ws: true, waitFor: "\r\n\r\n", wantErr: context.Canceled, wantStep: stepWS101},
		{name: "proxy CONNECT", scheme: "https", proxy: true, waitFor: "\r\n\r\n", wantErr: context.Canceled, wantStep: stepConnect},
		{name: "proxy CONNECT deadline", scheme: "https", proxy: true, waitFor: "\r\n\r\n", deadline: true, wantErr: context.DeadlineExceeded, wantStep: stepConnect},
		{name: "TLS handshake with the proxy", scheme: "https", proxy: true, tls: false, wantErr: context.Canceled, wantStep: stepProxyTLS},
		// A DialContext of the caller's that reports the abort in its own
		// words: the error still wraps ctx's, as Dial's doc says.
		{name: "TCP connect, dialer's own error", scheme: "https", blockTCP: true, ownErr: true, wantErr: context.Canceled, wantStep: stepTCP},
		{name: "TCP connect deadline, dialer's own error", scheme: "https", blockTCP: true, ownErr: true, deadline: true, wantErr: context.DeadlineExceeded, wantStep: stepTCP},
		{name: "proxy TCP connect, dialer's own error", scheme: "https", proxy: true, blockTCP: true, ownErr: true, wantErr: context.Canceled, wantStep: stepTCP},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var srvCert *tls.Certificate
			if tt.tls {
				srvCert = &cert
			}
			addr, stalled, closed := stallServer(t, srvCert, tt.waitFor)
			fs := &FastStart{TLSConfig: clientTLS, WebSocket: tt.ws}
			if tt.key {
				fs.ServerKey = someKey
			}
			dialAddr := addr
			if tt.proxy {
				// The stalling server is the proxy; the DERP server's
				// address is never dialled.
				scheme := "http"
				if tt.wantStep == stepProxyTLS {
					scheme = "https"
				}
				fs.Proxy = http.ProxyURL(&url.URL{Scheme: scheme, Host: addr})
				dialAddr = "derp.invalid:443"
			}
			dialing := make(chan struct{})
			if tt.blockTCP {
				fs.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
					close(dialing)
					<-ctx.Done()
					if tt.ownErr {
						return nil, errors.New("test dialer: connect aborted")
					}
					return nil, ctx.Err()
				}
				stalled = dialing
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tt.deadline {
				// Not a timing assertion: the deadline only has to
				// expire while the server stalls, which is forever.
				ctx, cancel = context.WithTimeout(ctx, 200*time.Millisecond)
				defer cancel()
			}
			type result struct {
				c   *Client
				hs  Handshake
				err error
			}
			res := make(chan result, 1)
			go func() {
				c, hs, err := fs.Dial(ctx, tt.scheme+"://"+dialAddr+"/derp", mustKey(t))
				res <- result{c, hs, err}
			}()
			wait := func(what string, ch <-chan struct{}) {
				t.Helper()
				select {
				case <-ch:
				case <-time.After(10 * time.Second):
					t.Fatalf("%s: not within 10 s", what)
				}
			}
			if !tt.deadline {
				wait("server got the client's bytes", stalled)
				cancel()
			}
			var r result
			select {
			case r = <-res:
			case <-time.After(10 * time.Second):
				t.Fatal("Dial did not return after the context ended")
			}
			if r.err == nil {
				r.c.Close()
				t.Fatalf("Dial succeeded (%+v)", r.hs)
			}
			if r.c != nil {
				t.Errorf("Dial returned a client with error %v", r.err)
			}
			t.Logf("Dial: %v", r.err)
			if !errors.Is(r.err, tt.wantErr) {
				t.Errorf("error %v does not wrap %v", r.err, tt.wantErr)
			}
			if !strings.Contains(r.err.Error(), tt.wantStep) {
				t.Errorf("error %q does not name the step it was cut short at: %q", r.err, tt.wantStep)
			}
			if tt.deadline {
				// Not waited for above: a very slow machine may miss the
				// deadline before the bytes reach the server.
				select {
				case <-stalled:
				default:
					t.Logf("the deadline expired before the server got the client's bytes")
					return
				}
			}
			if !tt.blockTCP {
				wait("client closed the connection", closed)
			}
		})
	}
}

// TestServeHTTPExact101 checks ServeHTTP's bytes on the wire: the 101
// response of PROTOCOL.md 7.3 followed at once by the ServerKey frame, or
// with Derp-Fast-Start: 1 the ServerKey frame and no HTTP at all.
func TestServeHTTPExact101(t *testing.T) {
	for _, tt := range []struct {
		upgrade, fastStart string
		wantFast           bool
	}{
		{"DERP", "", false},
		{"derp", "1", true},
		{"DERP", "1", true},
		// Very old clients sent "Upgrade: WebSocket" and spoke DERP.
		{"WebSocket", "", false},
		// Only exactly "1" asks for fast start.
		{"DERP", "true", false},
		{"DERP", "0", false},
	} {
		t.Run(fmt.Sprintf("Upgrade=%s,Derp-Fast-Start=%s", tt.upgrade, tt.fastStart), func(t *testing.T) {
			s := newTestServer(t)
			ts := httptest.NewServer(s)
			t.Cleanup(ts.Close)
			k := s.PublicKey()
			want := "\x01\x00\x00\x00\x28" + "DERP\xf0\x9f\x94\x91" + string(k[:]) // ServerKey frame
			if !tt.wantFast {
				want = "HTTP/1.1 101 Switching Protocols\r\n" +
					"Upgrade: DERP\r\n" +
					"Connection: Upgrade\r\n" +
					"Derp-Version: 2\r\n" +
					"Derp-Public-Key: " + k.String() + "\r\n" +
					"\r\n" + want
			}
			nc, err := net.Dial("tcp", ts.Listener.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			nc.SetDeadline(time.Now().Add(10 * time.Second))
			req := "GET /derp HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: " + tt.upgrade + "\r\n"
			if tt.fastStart != "" {
				req += FastStartHeader + ": " + tt.fastStart + "\r\n"
			}
			if _, err := io.WriteString(nc, req+"\r\n"); err != nil {
				t.Fatal(err)
			}
			// Read until want, failing at the first wrong byte. The server
			// then waits for ClientInfo, so nothing else may follow.
			var got []byte
			buf := make([]byte, 1024)
			for len(got) < len(want) {
				n, err := nc.Read(buf)
				got = append(got, buf[:n]...)
				if !strings.HasPrefix(want, string(got)) && !strings.HasPrefix(string(got), want) || err != nil {
					t.Fatalf("server wrote\n%q (%v)\nwant\n%q", got, err, want)
				}
			}
			if len(got) > len(want) {
				t.Fatalf("server wrote %q after the expected bytes", got[len(want):])
			}
			// The DERP session carries on right after those bytes.
			c, err := NewClient(mustKey(t), nc, nil, ServerPublicKey(k))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, ok := recvMsg[ServerInfo](t, c); !ok {
				t.FailNow()
			}
			wantFast, wantUpgrade := int64(0), int64(1)
			if tt.wantFast {
				wantFast, wantUpgrade = 1, 0
			}
			if st := s.Stats(); st.FastStartLogins != wantFast || st.UpgradeLogins != wantUpgrade {
				t.Errorf("server counted %d fast-start and %d upgrade logins, want %d and %d",
					st.FastStartLogins, st.UpgradeLogins, wantFast, wantUpgrade)
			}
		})
	}
}

// TestServeHTTPResponses checks ServeHTTP's plain HTTP answers.
func TestServeHTTPResponses(t *testing.T) {
	s := newTestServer(t)
	ts := httptest.NewServer(s)
	t.Cleanup(ts.Close)
	const noCache = "no-cache, no-store, must-revalidate, no-transform, max-age=0"
	for _, tt := range []struct {
		method, path string
		header       http.Header
		wantStatus   int
		wantBody     string
		wantHeader   http.Header // "" means must be absent
	}{
		{"GET", "/derp", nil, 426, "DERP requires connection upgrade\n", nil},
		{"GET", "/derp/anything", nil, 426, "DERP requires connection upgrade\n", nil},
		{"GET", "/derp", http.Header{"Upgrade": {"h2c"}, "Connection": {"Upgrade"}}, 426, "DERP requires connection upgrade\n", nil},
		{"GET", "/derp/probe", nil, 200, "", http.Header{"Access-Control-Allow-Origin": {"*"}}},
		{"HEAD", "/derp/probe", nil, 200, "", http.Header{"Access-Control-Allow-Origin": {"*"}}},
		{"GET", "/derp/latency-check", nil, 200, "", http.Header{"Access-Control-Allow-Origin": {"*"}}},
		{"HEAD", "/derp/latency-check", nil, 200, "", http.Header{"Access-Control-Allow-Origin": {"*"}}},
		{"POST", "/derp/probe", nil, 405, "bogus probe method\n", http.Header{"Access-Control-Allow-Origin": {""}}},
		{"GET", "/generate_204", http.Header{"X-Tailscale-Challenge": {"ts_127.0.0.1"}}, 204, "",
			http.Header{"X-Tailscale-Response": {"response ts_127.0.0.1"}, "Cache-Control": {noCache}}},
		{"POST", "/generate_204", http.Header{"X-Tailscale-Challenge": {"a-Z_0.9:x"}}, 204, "",
			http.Header{"X-Tailscale-Response": {"response a-Z_0.9:x"}, "Cache-Control": {noCache}}},
		{"GET", "/generate_204", nil, 204, "",
			http.Header{"X-Tailscale-Response": {""}, "Cache-Control": {noCache}}},
		{"GET", "/generate_204", http.Header{"X-Tailscale-Challenge": {"bad challenge"}}, 204, "",
			http.Header{"X-Tailscale-Response": {""}, "Cache-Control": {noCache}}},
		{"GET", "/generate_204", http.Header{"X-Tailscale-Challenge": {strings.Repeat("a", 64)}}, 204, "",
			http.Header{"X-Tailscale-Response": {"response " + strings.Repeat("a", 64)}}},
		{"GET", "/generate_204", http.Header{"X-Tailscale-Challenge": {strings.Repeat("a", 65)}}, 204, "",
			http.Header{"X-Tailscale-Response": {""}}},
	} {
		req, err := http.NewRequest(tt.method, ts.URL+tt.path, nil)
		if err != nil {
			t.Fatal(err)
		}
		maps.Copy(req.Header, tt.header)
		resp, err := ts.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		what := tt.method + " " + tt.path + " " + fmt.Sprint(tt.header)
		if resp.StatusCode != tt.wantStatus || string(body) != tt.wantBody {
			t.Errorf("%s: %d %q, want %d %q", what, resp.StatusCode, body, tt.wantStatus, tt.wantBody)
		}
		for k, v := range tt.wantHeader {
			if got := resp.Header.Get(k); got != v[0] {
				t.Errorf("%s: %s: %q, want %q", what, k, got, v[0])
			}
		}
	}
	if st := s.Stats(); st.Accepts != 0 || st.Rejected["no_upgrade"] != 3 {
		t.Errorf("accepts %d, rejected %v; want 0 and 3 no_upgrade", st.Accepts, st.Rejected)
	}
}

// TestUpgradeWithBodyRefused: an upgrade request with a body (DERP or
// WebSocket, Content-Length or chunked) is answered 400 saying so, and the
// connection is closed. It was upgraded, and the login read the body as the
// client's first frames: the client's own ClientInfo then came after
// garbage, and the server hung up on it with no word of why. A POST with
// "Content-Length: 0" (no body) is still upgraded.
func TestUpgradeWithBodyRefused(t *testing.T) {
	s := newTestServer(t)
	d := serveDERP(t, s, derpServeOpts{plain: true})
	const ws = "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: derp\r\n"
	for _, tt := range []struct{ name, req string }{
		{"Content-Length", "POST /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nContent-Length: 5\r\n\r\nhello"},
		{"chunked", "POST /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"},
		{"fast start, Expect: 100-continue", "POST /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello"},
		{"WebSocket", "GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n" + ws + "Content-Length: 5\r\n\r\nhello"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			nc, br := httpDial(t, d.Addr, tt.req)
			nc.SetReadDeadline(time.Now().Add(10 * time.Second))
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("reading the response: %v", err)
			}
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "must not have a body") {
				t.Fatalf("%s %q, want 400 saying the request must not have a body", resp.Status, body)
			}
			if n, err := br.Read(make([]byte, 1)); err != io.EOF {
				t.Errorf("after the 400: read %d bytes, %v; want the connection closed (EOF)", n, err)
			}
		})
	}
	if st := s.Stats(); st.Accepts != 0 || st.Rejected["upgrade_body"] != 4 {
		t.Errorf("accepts %d, rejected %v; want 0 and 4 upgrade_body", st.Accepts, st.Rejected)
	}
	// No body: upgraded.
	nc, br := httpDial(t, d.Addr, "POST /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nContent-Length: 0\r\n\r\n")
	nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if resp, err := http.ReadResponse(br, nil); err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("POST with Content-Length: 0: %v %v, want 101", resp, err)
	}
	c, err := NewClient(mustKey(t), nc, bufio.NewReadWriter(br, bufio.NewWriter(nc)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	recvMsg[ServerInfo](t, c)
}

// delayLink is a TCP proxy on 127.0.0.1 in front of upstream that holds
// every chunk of bytes, in each direction, for oneWay before passing it on,
// so that the link has a round trip time of 2*oneWay (plus loopback's few
// microseconds). Chunks are delayed independently, so a flight of several
// writes arrives together, as on a real link with ample bandwidth.
func delayLink(tb testing.TB, upstream string, oneWay time.Duration) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns []net.Conn
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			down, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", upstream)
			if err != nil {
				down.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, down, up)
			mu.Unlock()
			wg.Add(2)
			go func() { defer wg.Done(); delayCopy(up, down, oneWay) }()
			go func() { defer wg.Done(); delayCopy(down, up, oneWay) }()
		}
	}()
	tb.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// delayCopy copies src to dst, writing each chunk oneWay after it was read.
// When either side ends it closes both.
func delayCopy(dst, src net.Conn, oneWay time.Duration) {
	type chunk struct {
		b   []byte
		due time.Time
	}
	ch := make(chan chunk, 1024)
	go func() {
		defer close(ch)
		for {
			buf := make([]byte, 32<<10)
			n, err := src.Read(buf)
			if n > 0 {
				ch <- chunk{buf[:n], time.Now().Add(oneWay)}
			}
			if err != nil {
				return
			}
		}
	}()
	for c := range ch {
		time.Sleep(time.Until(c.due))
		if _, err := dst.Write(c.b); err != nil {
			break
		}
	}
	src.Close()
	dst.Close()
	for range ch {
		// Let the reader see the close and finish.
	}
}

// BenchmarkTimeToFirstFrame measures, over an emulated link with 50 ms of
// delay each way (100 ms RTT), how long after Dial starts the client writes
// its first DERP frame (ClientInfo), in round trips ("RTT-first-frame"),
// and when Dial returns ("RTT-dial"; later than the first frame only when
// a configured key is confirmed by reading the server's first bytes). It
// is not run by go test without -bench, so not in CI; run it with
//
//	go test -run '^$' -bench TimeToFirstFrame -benchtime 5x .
//
// What is emulated: tc netem is not available, so the delay comes from a
// user-space proxy on loopback (delayLink) that holds each chunk of bytes
// for 50 ms in each direction. The proxy cannot delay the kernel's TCP
// handshake with it, so the dialer given to FastStart connects to the proxy
// and then sleeps one RTT before returning the connection: on a real link
// the SYN and SYN-ACK take that round trip, and the client's first bytes
// leave with the ACK. A 10 ms scheduling hiccup shows as 0.1 RTT.
//
// Expected: TCP 1 + TLS 1.3 1 = 2 on the fast path, +1 for the 101 without
// the meta cert; TLS 1.2 costs 2 round trips, so 3 with a known key and 4
// without; plain HTTP is 1 with a known key and 2 without. Tailscale's own
// client, measured the same way, writes its first frame at 2.04 (fast
// start), 3.05 (no meta cert), 4.05 (TLS 1.2) and 2.02 (plain HTTP).
func BenchmarkTimeToFirstFrame(b *testing.B) {
	const oneWay = 50 * time.Millisecond
	const rtt = 2 * oneWay
	for _, tt := range []struct {
		name  string
		serve derpServeOpts
	}{
		{"fast", derpServeOpts{}},
		{"no-meta-cert", derpServeOpts{noMetaCert: true}},
		{"tls12", derpServeOpts{tls12: true}},
		{"plain-http", derpServeOpts{plain: true}},
	} {
		for _, key := range []bool{false, true} {
			name := tt.name
			if key {
				name += "+key"
			}
			b.Run(name, func(b *testing.B) {
				s := newTestServer(b)
				srv := serveDERP(b, s, tt.serve)
				link := delayLink(b, srv.Addr, oneWay)
				url := strings.Replace(srv.URL, srv.Addr, link, 1)
				dial, conn := flightDialer()
				fs := &FastStart{
					DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
						nc, err := dial(ctx, network, addr)
						if err != nil {
							return nil, err
						}
						select { // the emulated SYN, SYN-ACK round trip
						case <-time.After(rtt):
							return nc, nil
						case <-ctx.Done():
							nc.Close()
							return nil, ctx.Err()
						}
					},
				}
				if srv.ClientTLS != nil {
					fs.TLSConfig = srv.ClientTLS.Clone()
					fs.TLSConfig.CurvePreferences = nil // as a real client: X25519MLKEM768 too
				}
				if key {
					fs.ServerKey = s.PublicKey()
				}
				var first, dialed time.Duration
				var n int
				var path Path
				for b.Loop() {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					start := time.Now()
					c, hs, err := fs.Dial(ctx, url, mustKey(b))
					dialed += time.Since(start)
					cancel()
					if err != nil {
						b.Fatal(err)
					}
					f, ok := conn().flights()
					if !ok {
						b.Fatal("no ClientInfo write recorded")
					}
					first += f.clientInfo.at.Sub(start)
					path = hs.Path
					n++
					c.Close()
				}
				b.ReportMetric(float64(first)/float64(n)/float64(rtt), "RTT-first-frame")
				b.ReportMetric(float64(dialed)/float64(n)/float64(rtt), "RTT-dial")
				b.Logf("%s: %s path, first frame at %.2f RTT, Dial returned at %.2f RTT (mean of %d)",
					name, path, float64(first)/float64(n)/float64(rtt), float64(dialed)/float64(n)/float64(rtt), n)
			})
		}
	}
}

// TestHugeUpgradeResponseHeader: a server that answers with an endless HTTP
// header makes Dial fail once the header outgrows the client's buffer,
// instead of buffering it without limit.
func TestHugeUpgradeResponseHeader(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		defer nc.Close()
		bufio.NewReader(nc).ReadString('\n')
		nc.Write([]byte("HTTP/1.1 101 Switching Protocols\r\n"))
		line := []byte("X-Filler: " + strings.Repeat("a", 1000) + "\r\n")
		for range 1000 { // 1 MB of header, never ending it
			if _, err := nc.Write(line); err != nil {
				return
			}
		}
	}()
	_, _, err = (&FastStart{}).Dial(context.Background(), "http://"+ln.Addr().String()+"/derp", mustKey(t))
	if !errors.Is(err, errHeaderTooLarge) {
		t.Fatalf("Dial: %v, want errHeaderTooLarge", err)
	}
	ln.Close()
	<-done
}

// connectProxy is an HTTP CONNECT proxy for tests. It records each CONNECT
// target and Proxy-Authorization header, answers with status (200 unless
// set), and, on 2xx, pipes bytes both ways. stall makes it read the
// request and then say nothing.
type connectProxy struct {
	URL    *url.URL
	status int
	stall  bool
	extra  string // sent right after a 2xx response

	mu      sync.Mutex
	targets []string
	auths   []string
}

// startConnectProxy serves a connectProxy on 127.0.0.1, over TLS if
// tlsCert is not nil. Cleanup (acceptLoop's) closes the listener and every
// client connection, which ends each tunnel, and waits for them.
func startConnectProxy(t testing.TB, p *connectProxy, tlsCert *tls.Certificate) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.URL = &url.URL{Scheme: "http", Host: ln.Addr().String()}
	if tlsCert != nil {
		ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{*tlsCert}})
		p.URL.Scheme = "https"
	}
	acceptLoop(t, ln, p.serve)
}

// serve proxies one client connection; closing c ends the tunnel (the
// copy from c fails and closes the upstream connection).
func (p *connectProxy) serve(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil || req.Method != http.MethodConnect {
		return
	}
	p.mu.Lock()
	p.targets = append(p.targets, req.Host)
	p.auths = append(p.auths, req.Header.Get("Proxy-Authorization"))
	p.mu.Unlock()
	if p.stall {
		io.Copy(io.Discard, c)
		return
	}
	if p.status != 0 && p.status/100 != 2 {
		fmt.Fprintf(c, "HTTP/1.1 %d %s\r\nContent-Length: 0\r\n\r\n", p.status, http.StatusText(p.status))
		return
	}
	up, err := net.Dial("tcp", req.Host)
	if err != nil {
		fmt.Fprintf(c, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
		return
	}
	defer up.Close()
	fmt.Fprintf(c, "HTTP/1.1 200 Connection established\r\n\r\n%s", p.extra)
	pipeBoth(c, br, up)
}

// pipeBoth copies client bytes (read from fromClient, which may hold some
// already) to up and up's bytes to client until either side ends, closing
// both, and returns when both copies have.
func pipeBoth(client net.Conn, fromClient io.Reader, up net.Conn) {
	done := make(chan struct{})
	go func() {
		io.Copy(up, fromClient)
		up.Close()
		close(done)
	}()
	io.Copy(client, up)
	client.Close()
	<-done
}

func (p *connectProxy) seen() (targets, auths []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.targets), slices.Clone(p.auths)
}

// TestDialThroughProxy checks that FastStart tunnels through HTTP and HTTPS
// CONNECT proxies to the URL's host and port, with Basic credentials from
// the proxy URL or headers from ProxyConnectHeader, and that the fast path
// still works inside the tunnel.
func TestDialThroughProxy(t *testing.T) {
	tests := []struct {
		name       string
		httpsProxy bool
		user       *url.Userinfo
		header     http.Header
		plain      bool // the DERP server speaks plain HTTP
		wantAuth   string
		wantPath   Path
	}{
		{name: "http proxy", wantPath: FastPath},
		{name: "https proxy", httpsProxy: true, wantPath: FastPath},
		{name: "basic auth", user: url.UserPassword("user", "pa:ss"), wantAuth: "Basic dXNlcjpwYTpzcw==", wantPath: FastPath},
		{name: "header wins", user: url.UserPassword("user", "pass"), header: http.Header{"Proxy-Authorization": {"Negotiate abc"}}, wantAuth: "Negotiate abc", wantPath: FastPath},
		{name: "plain HTTP server", plain: true, wantPath: UpgradePath},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestServer(t)
			srv := serveDERP(t, s, derpServeOpts{plain: tt.plain})
			p := &connectProxy{}
			clientTLS := srv.ClientTLS
			if tt.httpsProxy {
				cert, _ := testCert(t, "proxy")
				startConnectProxy(t, p, &cert)
				// Trust both the proxy and the server.
				leaf, err := x509.ParseCertificate(cert.Certificate[0])
				if err != nil {
					t.Fatal(err)
				}
				clientTLS = clientTLS.Clone()
				clientTLS.RootCAs = clientTLS.RootCAs.Clone()
				clientTLS.RootCAs.AddCert(leaf)
			} else {
				startConnectProxy(t, p, nil)
			}
			pu := *p.URL
			pu.User = tt.user
			fs := &FastStart{TLSConfig: clientTLS, Proxy: http.ProxyURL(&pu), ProxyConnectHeader: tt.header}
			a, hs := dialFast(t, fs, srv.URL)
			b, _ := dialFast(t, fs, srv.URL)
			if hs.Path != tt.wantPath {
				t.Errorf("path %s (%s), want %s", hs.Path, hs.Reason, tt.wantPath)
			}
			relayBothWays(t, a, b)
			targets, auths := p.seen()
			if want := []string{srv.Addr, srv.Addr}; !slices.Equal(targets, want) {
				t.Errorf("proxy saw CONNECT to %q, want %q", targets, want)
			}
			if want := []string{tt.wantAuth, tt.wantAuth}; !slices.Equal(auths, want) {
				t.Errorf("proxy saw Proxy-Authorization %q, want %q", auths, want)
			}
		})
	}
}

// TestDialNodeThroughProxyNamesHost pins what FastStart.Proxy documents: a
// node dialled through a proxy is tunnelled to by HostName, which the proxy
// resolves; the node's IPv4 and IPv6 (here both "none", which would fail a
// direct dial) are not used.
func TestDialNodeThroughProxyNamesHost(t *testing.T) {
	s := newTestServer(t)
	srv := serveDERP(t, s, derpServeOpts{})
	_, port, _ := net.SplitHostPort(srv.Addr)
	p := &connectProxy{}
	startConnectProxy(t, p, nil)
	n := &Node{Name: "1a", HostName: "localhost", IPv4: "none", IPv6: "none", InsecureForTests: true}
	n.DERPPort, _ = strconv.Atoi(port)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, _, err := (&FastStart{}).DialNode(ctx, n, mustKey(t)); err == nil || !strings.Contains(err.Error(), "neither IPv4") {
		t.Fatalf("direct DialNode with both families disabled: %v, want the error naming neither IPv4 nor IPv6", err)
	}
	c, hs, err := (&FastStart{Proxy: http.ProxyURL(p.URL)}).DialNode(ctx, n, mustKey(t))
	if err != nil {
		t.Fatalf("DialNode through the proxy: %v", err)
	}
	c.Close()
	if hs.Path != FastPath {
		t.Errorf("path %s (%s), want %s", hs.Path, hs.Reason, FastPath)
	}
	if targets, _ := p.seen(); !slices.Equal(targets, []string{"localhost:" + port}) {
		t.Errorf("proxy saw CONNECT to %q, want [localhost:%s]", targets, port)
	}
}

// TestDialProxyErrors checks that every way a proxy can fail ends the dial
// with an error that says which, and that a Proxy that returns nil means a
// direct connection.
func TestDialProxyErrors(t *testing.T) {
	errChoose := errors.New("no proxy for you")
	tests := []struct {
		name    string
		proxy   *connectProxy
		choose  func(p *connectProxy) func(*http.Request) (*url.URL, error)
		timeout time.Duration
		wantErr string
		wantIs  error
	}{
		{name: "refused", proxy: &connectProxy{status: http.StatusProxyAuthRequired},
			wantErr: "refused CONNECT 127.0.0.1:"},
		{name: "refused status", proxy: &connectProxy{status: http.StatusForbidden}, wantErr: "403 Forbidden"},
		{name: "Proxy error", choose: func(*connectProxy) func(*http.Request) (*url.URL, error) {
			return func(*http.Request) (*url.URL, error) { return nil, errChoose }
		}, wantIs: errChoose, wantErr: "choose proxy"},
		{name: "socks5", choose: func(p *connectProxy) func(*http.Request) (*url.URL, error) {
			return http.ProxyURL(&url.URL{Scheme: "socks5", Host: p.URL.Host})
		}, wantErr: `unsupported scheme "socks5"`},
		{name: "stalls", proxy: &connectProxy{stall: true}, timeout: 200 * time.Millisecond,
			wantIs: context.DeadlineExceeded, wantErr: "relay: proxy 127.0.0.1:"},
		{name: "extra bytes", proxy: &connectProxy{extra: "surprise"}, wantErr: "8 unexpected bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestServer(t)
			srv := serveDERP(t, s, derpServeOpts{})
			p := tt.proxy
			if p == nil {
				p = &connectProxy{}
			}
			startConnectProxy(t, p, nil)
			choose := http.ProxyURL(p.URL)
			if tt.choose != nil {
				choose = tt.choose(p)
			}
			fs := &FastStart{TLSConfig: srv.ClientTLS, Proxy: choose}
			timeout := tt.timeout
			if timeout == 0 {
				timeout = 10 * time.Second
			}
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			c, _, err := fs.Dial(ctx, srv.URL, mustKey(t))
			if err == nil {
				c.Close()
				t.Fatal("Dial succeeded")
			}
			if !strings.Contains(err.Error(), tt.wantErr) || (tt.wantIs != nil && !errors.Is(err, tt.wantIs)) {
				t.Errorf("Dial error %q, want it to contain %q and wrap %v", err, tt.wantErr, tt.wantIs)
			}
		})
	}

	t.Run("nil proxy is direct", func(t *testing.T) {
		s := newTestServer(t)
		srv := serveDERP(t, s, derpServeOpts{})
		p := &connectProxy{}
		startConnectProxy(t, p, nil)
		var asked []string
		fs := &FastStart{TLSConfig: srv.ClientTLS, Proxy: func(r *http.Request) (*url.URL, error) {
			asked = append(asked, r.URL.String())
			return nil, nil
		}}
		a, hs := dialFast(t, fs, srv.URL)
		b, _ := dialFast(t, fs, srv.URL)
		relayBothWays(t, a, b)
		if hs.Path != FastPath {
			t.Errorf("path %s (%s), want fast", hs.Path, hs.Reason)
		}
		if want := []string{srv.URL, srv.URL}; !slices.Equal(asked, want) {
			t.Errorf("Proxy asked about %q, want %q", asked, want)
		}
		if targets, _ := p.seen(); len(targets) != 0 {
			t.Errorf("proxy saw %q, want nothing", targets)
		}
	})
}

func TestHostPort(t *testing.T) {
	for in, want := range map[string]string{
		"https://derp.example.com/derp": "derp.example.com:443",
		"http://derp.example.com/derp":  "derp.example.com:80",
		"https://derp.example.com:8443": "derp.example.com:8443",
		"http://[::1]/derp":             "[::1]:80",
		"https://[2001:db8::1]:444/":    "[2001:db8::1]:444",
	} {
		u, err := url.Parse(in)
		if err != nil {
			t.Fatal(err)
		}
		if got := hostPort(u); got != want {
			t.Errorf("hostPort(%s) = %q, want %q", in, got, want)
		}
	}
}

// TestChainMustStartWithTheLeaf plays a server that signs the TLS handshake
// with the key of a meta cert it made itself, and presents another server's
// (public) certificate after it. crypto/tls checks the handshake's
// signature against the first certificate only, so every way this package
// verifies a chain must verify that first one: by name against roots, by
// CertName, by pin, and with the built-in fallback roots. The same server
// with its own chain (leaf first, meta cert last) is accepted each way.
func TestChainMustStartWithTheLeaf(t *testing.T) {
	real, pool, err := selfSignedCert("b.test")
	if err != nil {
		t.Fatal(err)
	}
	_, evilKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(int64(ProtocolVersion)),
		Subject:      pkix.Name{CommonName: MetaCertCommonNamePrefix + mustKey(t).Public().String()},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	evilMeta, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, evilKey.Public(), evilKey)
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := x509.ParseCertificate(evilMeta); c == nil {
		t.Fatal("meta cert does not parse")
	} else if _, _, ok := parseMetaCertCandidate(c); !ok {
		t.Fatal("the forged meta cert is not one")
	}
	sum := sha256.Sum256(real.Certificate[0])
	pin := "sha256-raw:" + hex.EncodeToString(sum[:])

	serve := func(cert tls.Certificate) int {
		ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					c.(*tls.Conn).Handshake()
					c.Close()
				}()
			}
		}()
		return ln.Addr().(*net.TCPAddr).Port
	}
	goodPort := serve(tls.Certificate{Certificate: [][]byte{real.Certificate[0], evilMeta}, PrivateKey: real.PrivateKey})
	evilPort := serve(tls.Certificate{Certificate: [][]byte{evilMeta, real.Certificate[0]}, PrivateKey: evilKey})

	saved := fallbackRoots
	t.Cleanup(func() { fallbackRoots = saved })
	var names []string
	for _, der := range saved().Subjects() { //lint:ignore SA1019 not a system pool
		var n pkix.RDNSequence
		if _, err := asn1.Unmarshal(der, &n); err != nil {
			t.Fatal(err)
		}
		var name pkix.Name
		name.FillFromRDNSequence(&n)
		names = append(names, name.CommonName)
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"ISRG Root X1", "ISRG Root X2"}) {
		t.Errorf("built-in roots %q, want ISRG Root X1 and X2", names)
	}
	fallbackRoots = func() *x509.CertPool { return pool }

	for _, tc := range []struct {
		name     string
		certName string
		roots    *x509.CertPool
	}{
		{"roots", "", pool},
		{"fallback roots", "", nil},
		{"CertName", "b.test", pool},
		{"CertName, fallback roots", "b.test", nil},
		{"pin", pin, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := FastStart{TLSConfig: &tls.Config{RootCAs: tc.roots}}
			dial := func(port int) error {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				c, _, err := f.DialRegionTLS(ctx, &Region{RegionID: 1, Nodes: []*Node{
					{Name: "1a", HostName: "b.test", IPv4: "127.0.0.1", IPv6: "none", DERPPort: port, CertName: tc.certName},
				}})
				if err == nil {
					c.Close()
				}
				return err
			}
			if err := dial(goodPort); err != nil {
				t.Fatalf("the real server: %v", err)
			}
			if err := dial(evilPort); err == nil {
				t.Fatal("accepted a server whose handshake key is its own meta cert's, in front of another server's certificate")
			}
		})
	}
}

// TestBareLFResponses: HTTP responses whose lines end in a bare LF, which
// Go's parser (and so Tailscale's client) accepts, from a DERP server (101
// on the upgrade and the fast path) or a CONNECT proxy, must not leave Dial
// or Recv waiting for a CRLF CRLF that never comes.
func TestBareLFResponses(t *testing.T) {
	srvPriv := mustKey(t)
	// serve answers a CONNECT (if proxy) and then the upgrade with bare
	// LFs, then logs the client in and reads until the client hangs up.
	serve := func(proxy bool) func(ctx context.Context, network, addr string) (net.Conn, error) {
		return scriptedPipeDialer(t, func(sc net.Conn, br *bufio.Reader) {
			if proxy {
				if _, err := http.ReadRequest(br); err != nil {
					return
				}
				io.WriteString(sc, "HTTP/1.1 200 Connection established\n\n")
			}
			if _, err := http.ReadRequest(br); err != nil {
				return
			}
			io.WriteString(sc, "HTTP/1.1 101 Switching Protocols\nUpgrade: DERP\nConnection: Upgrade\n\n")
			finishUpgradeLogin(sc, br, srvPriv)
		})
	}
	for _, tt := range []struct {
		name string
		fs   *FastStart
	}{
		{"upgrade", &FastStart{DialContext: serve(false)}},
		{"fast start answered with 101", &FastStart{DialContext: serve(false), ServerKey: srvPriv.Public()}},
		{"proxy", &FastStart{DialContext: serve(true), Proxy: http.ProxyURL(&url.URL{Scheme: "http", Host: "proxy.invalid:3128"})}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, _, err := tt.fs.Dial(ctx, "http://derp.invalid/derp", mustKey(t), RecvTimeout(5*time.Second))
			if err != nil {
				t.Fatalf("Dial: %v", err)
			}
			defer c.Close()
			if m, err := c.Recv(); err != nil {
				t.Fatalf("Recv: %v", err)
			} else if _, ok := m.(ServerInfo); !ok {
				t.Fatalf("Recv: %T, want ServerInfo", m)
			}
		})
	}
}

// interimConn is a connection whose reads start with interim: the 1xx
// responses that a server or proxy between sent before its own answer.
type interimConn struct {
	net.Conn
	interim []byte
}

func (c *interimConn) Read(p []byte) (int, error) {
	if len(c.interim) > 0 {
		n := copy(p, c.interim)
		c.interim = c.interim[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// TestInterimResponsesSkipped: interim responses (100 Continue, 103 Early
// Hints), which RFC 9110 lets a server or proxy send before any final
// response and obliges clients to parse, are skipped before the 101 of the
// upgrade and WebSocket paths, before a 101 answering fast start, before
// the DERP stream of fast start, and before a proxy's 200 to CONNECT. They
// were taken for the answer ("upgrade refused: 100 Continue") and every
// dial failed. A server that sends nothing but interim responses fails the
// dial with an error that says so.
func TestInterimResponsesSkipped(t *testing.T) {
	s := newTestServer(t)
	plain := serveDERP(t, s, derpServeOpts{plain: true})
	// A server that ignores fast start: it answers 101, and then reads
	// the ClientInfo the client has sent already.
	ignoring := serveDERP(t, s, derpServeOpts{plain: true, handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Header.Del(FastStartHeader)
		s.ServeHTTP(w, r)
	})})
	proxy := &connectProxy{}
	startConnectProxy(t, proxy, nil)
	for _, interim := range []string{
		"HTTP/1.1 100 Continue\r\n\r\n",
		"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n",
	} {
		// dial prepends interim to what the connection to addr reads.
		dial := func(addr string) func(ctx context.Context, network, a string) (net.Conn, error) {
			return func(ctx context.Context, network, a string) (net.Conn, error) {
				var d net.Dialer
				nc, err := d.DialContext(ctx, network, a)
				if err != nil || a != addr {
					return nc, err
				}
				return &interimConn{Conn: nc, interim: []byte(interim)}, nil
			}
		}
		for _, tt := range []struct {
			name     string
			url      string
			fs       *FastStart
			wantPath Path
		}{
			{"upgrade", plain.URL, &FastStart{DialContext: dial(plain.Addr)}, UpgradePath},
			{"websocket", plain.URL, &FastStart{DialContext: dial(plain.Addr), WebSocket: true}, UpgradePath},
			{"fast start", plain.URL, &FastStart{DialContext: dial(plain.Addr), ServerKey: s.PublicKey()}, FastPath},
			{"fast start answered with 101", ignoring.URL, &FastStart{DialContext: dial(ignoring.Addr), ServerKey: s.PublicKey()}, FastPath},
			{"proxy", plain.URL, &FastStart{DialContext: dial(proxy.URL.Host), Proxy: http.ProxyURL(proxy.URL), ServerKey: s.PublicKey()}, FastPath},
		} {
			t.Run(fmt.Sprintf("%s/%q", tt.name, interim), func(t *testing.T) {
				_, hs := dialFast(t, tt.fs, tt.url)
				if hs.Path != tt.wantPath || hs.Attempts != 1 {
					t.Errorf("%s path in %d attempts (%s), want the %s path at once", hs.Path, hs.Attempts, hs.Reason, tt.wantPath)
				}
			})
		}
	}
	t.Run("only interim responses", func(t *testing.T) {
		endless := strings.Repeat("HTTP/1.1 100 Continue\r\n\r\n", maxInterimResponses+1)
		dial := scriptedPipeDialer(t, func(sc net.Conn, br *bufio.Reader) {
			if _, err := http.ReadRequest(br); err != nil {
				return
			}
			io.WriteString(sc, endless)
			io.Copy(io.Discard, br)
		})
		for _, fs := range []*FastStart{{DialContext: dial}, {DialContext: dial, WebSocket: true}, {DialContext: dial, ServerKey: mustKey(t).Public()}} {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, _, err := fs.Dial(ctx, "http://derp.invalid/derp", mustKey(t))
			cancel()
			if err == nil || !strings.Contains(err.Error(), "interim responses") {
				t.Errorf("websocket %v, key %v: Dial: %v, want an error about too many interim responses", fs.WebSocket, !fs.ServerKey.IsZero(), err)
			}
		}
	})
}

// TestFastStartThroughReverseProxy: a reverse proxy in front of the server
// (here net/http/httputil's; nginx and Caddy behave alike) passes the
// upgrade but not fast start, whose answer is not HTTP: a fast-start dial
// through it fails. A ReconnectingClient, which learns the server's key on
// its first connection and then takes the fast path with it, must still
// reconnect.
func TestFastStartThroughReverseProxy(t *testing.T) {
	s := newTestServer(t)
	backend := serveDERP(t, s, derpServeOpts{plain: true})
	bu, err := url.Parse(backend.URL)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: bu.Host})
	rp.ErrorLog = quietLog
	proxy := httptest.NewServer(rp)
	t.Cleanup(proxy.Close)
	h := newRCHarness(t, &TestServer{URL: proxy.URL + "/derp"}, func(rc *ReconnectingClient) {
		rc.DialTimeout = 2 * time.Second // a fast-start attempt fails only at the end of it
	})
	rcNext[ServerInfo](t, h)
	if h.rc.ServerPublicKey() != s.PublicKey() {
		t.Fatal("the reconnecting client did not learn the server's key")
	}
	for range 2 {
		s.closePeer(h.rc.PrivateKey.Public())
		rcNext[ServerInfo](t, h) // reconnected
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, hs := range h.connects {
		if hs.Path != UpgradePath {
			t.Errorf("connection %d took the %s path through the proxy", i+1, hs.Path)
		}
	}
}

// TestFastStartAnswered502: a dial with a configured key whose fast-start
// request gets an HTTP error at once (a reverse proxy that tried to read the
// server's answer as HTTP) is retried on the upgrade path, as a stale key is.
func TestFastStartAnswered502(t *testing.T) {
	srvPriv := mustKey(t)
	dial := scriptedPipeDialer(t, func(sc net.Conn, br *bufio.Reader) {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		if req.Header.Get(FastStartHeader) != "" {
			io.WriteString(sc, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
			return
		}
		io.WriteString(sc, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
		finishUpgradeLogin(sc, br, srvPriv)
	})
	c, hs := dialFast(t, &FastStart{DialContext: dial, ServerKey: srvPriv.Public()}, "http://derp.invalid/derp")
	c.Close()
	if hs.Path != UpgradePath || hs.Attempts != 2 || !strings.Contains(hs.Reason, "502") {
		t.Errorf("handshake %+v, want the upgrade path after a fast start answered with 502", hs)
	}
}

// scriptedPipeDialer returns a DialContext whose every connection is one
// end of a pipe; script plays the server on the other end, which is closed
// when script returns. The test waits for the scripts at cleanup.
func scriptedPipeDialer(t *testing.T, script func(sc net.Conn, br *bufio.Reader)) func(ctx context.Context, network, addr string) (net.Conn, error) {
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		cc, sc := net.Pipe()
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer sc.Close()
			script(sc, bufio.NewReader(sc))
		}()
		return cc, nil
	}
}

// finishUpgradeLogin plays a DERP server's side of a login after its 101
// on the upgrade path: ServerKey, the client's ClientInfo, ServerInfo.
// Then it discards whatever the client sends.
func finishUpgradeLogin(sc net.Conn, br *bufio.Reader, srvPriv PrivateKey) {
	sc.Write(appendFrame(nil, FrameServerKey, appendServerKey(nil, srvPriv.Public())))
	_, p, err := readRawFrame(br)
	if err != nil || len(p) < KeyLen {
		return
	}
	sc.Write(serverInfoFrame(srvPriv, PublicKey(p[:KeyLen]), []byte(`{"version":2}`)))
	io.Copy(io.Discard, br)
}

// TestServerKeyCutShort: a server that hangs up inside its ServerKey frame
// (after its header, or part of its payload) is reported as having done so
// (io.ErrUnexpectedEOF), not as a clean close before it, and the fast
// path's check of an assumed key says that it was the server key it was
// reading.
func TestServerKeyCutShort(t *testing.T) {
	server, client := fuzzKey(3), fuzzKey(4)
	frame := appendFrame(nil, FrameServerKey, appendServerKey(nil, server.Public()))
	for _, cut := range []int{frameHeaderLen, frameHeaderLen + 10} {
		if _, err := NewClient(client, &dialFuzzConn{script: frame[:cut], chunk: 64}, nil); !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("NewClient, server sent %d bytes: %v, want io.ErrUnexpectedEOF", cut, err)
		}
	}
	var fs FastStart
	u := &url.URL{Scheme: "http", Host: "derp.example", Path: "/derp"}
	for _, cut := range []int{0, frameHeaderLen, frameHeaderLen + 10} {
		nc := &dialFuzzConn{script: frame[:cut], chunk: 64}
		_, _, err := fs.fastStart(nc, u, client, Handshake{ServerKey: server.Public()}, true, nil, nil)
		if err == nil || !strings.Contains(err.Error(), "receive server key") || (cut != 0) != errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("fast start, server sent %d bytes: %v", cut, err)
		}
	}
}

// TestHTTPResponseCutShort: a server (or proxy) that hangs up in the middle
// of its HTTP answer to a dial is reported as having done so
// (io.ErrUnexpectedEOF) on every path, and one that hangs up before
// answering as a clean io.EOF.
func TestHTTPResponseCutShort(t *testing.T) {
	server, client := fuzzKey(3), fuzzKey(4)
	u := &url.URL{Scheme: "http", Host: "derp.example", Path: "/derp"}
	for _, script := range []string{"", "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n", "HTTP/1.1 200 Connection established\r\n"} {
		for _, path := range []string{"upgrade", "websocket", "proxy", "fast start"} {
			nc := &dialFuzzConn{script: []byte(script), chunk: 64}
			var fs FastStart
			var err error
			switch path {
			case "upgrade":
				_, _, err = fs.upgrade(nc, u, client, Handshake{}, nil, nil)
			case "websocket":
				_, _, err = fs.webSocket(nc, u, client, Handshake{}, nil, nil)
			case "proxy":
				dial := func(context.Context, string, string) (net.Conn, error) { return nc, nil }
				_, err = fs.dialProxy(context.Background(), dial, &url.URL{Scheme: "http", Host: "proxy.example:3128"}, "derp.example:443", nil)
			case "fast start":
				if script == "" {
					continue // nothing to tell from a missing ServerKey (TestServerKeyCutShort)
				}
				_, _, err = fs.fastStart(nc, u, client, Handshake{ServerKey: server.Public()}, true, nil, nil)
			}
			want := io.ErrUnexpectedEOF
			if script == "" {
				want = io.EOF
			}
			if !errors.Is(err, want) || want == io.EOF && errors.Is(err, io.ErrUnexpectedEOF) {
				t.Errorf("%s, answer %q: %v, want %v", path, script, err, want)
			}
		}
	}
}

// TestRefusalBodyQuotedInError: the start of a refusal's body goes into the
// dial's error quoted, so that a server cannot put line breaks (fake log
// lines) into whatever logs the error. On the fast path too: there the
// refusal's error is the Handshake's Reason for the retry on the upgrade
// path, or what Recv returns if the dial did not wait for the server (a
// key from the meta cert); it had the body as it came.
func TestRefusalBodyQuotedInError(t *testing.T) {
	const body = "go away\nlevel=ERROR msg=\"forged line\""
	dial := scriptedPipeDialer(t, func(sc net.Conn, br *bufio.Reader) {
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		fmt.Fprintf(sc, "HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	})
	for _, ws := range []bool{false, true} {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, _, err := (&FastStart{DialContext: dial, WebSocket: ws}).Dial(ctx, "http://derp.invalid/derp", mustKey(t))
		cancel()
		if err == nil {
			t.Fatalf("websocket %v: Dial succeeded against a 403", ws)
		}
		if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, "403") || !strings.Contains(msg, `go away\n`) {
			t.Errorf("websocket %v: error %q, want the 403 and the body quoted on one line", ws, msg)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, hs, err := (&FastStart{DialContext: dial, ServerKey: mustKey(t).Public()}).Dial(ctx, "http://derp.invalid/derp", mustKey(t))
	if err == nil {
		t.Fatal("fast start: Dial succeeded against a 403")
	}
	if strings.Contains(hs.Reason, "\n") || !strings.Contains(hs.Reason, `go away\n`) {
		t.Errorf("fast start: handshake reason %q, want the body quoted on one line", hs.Reason)
	}
	// Fast start with a key that is not confirmed: Recv reads the answer.
	nc, sc := net.Pipe()
	go func() {
		defer sc.Close()
		br := bufio.NewReader(sc)
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		fmt.Fprintf(sc, "HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		io.Copy(io.Discard, br)
	}()
	u := &url.URL{Scheme: "http", Host: "derp.invalid", Path: "/derp"}
	c, _, err := (&FastStart{}).fastStart(nc, u, mustKey(t), Handshake{ServerKey: mustKey(t).Public()}, false, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err = c.Recv(); err == nil {
		t.Fatal("fast start: Recv succeeded after a 403")
	}
	if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, "403") || !strings.Contains(msg, `go away\n`) {
		t.Errorf("fast start: Recv: error %q, want the 403 and the body quoted on one line", msg)
	}
}

// TestRefusalStatusQuotedInError: the status line of a refusal goes into
// the error quoted, on the upgrade and WebSocket paths and from a proxy
// refusing CONNECT, as fast start's did. It went in as sent, and net/http
// keeps a carriage return inside the line, so a server (or proxy) could
// put a line break (a fake log line, or text that hides the start of the
// line on a terminal) into the dial's error. FuzzDialResponse found it.
func TestRefusalStatusQuotedInError(t *testing.T) {
	const status = "403 Forbidden\rlevel=ERROR msg=forged"
	dial := scriptedPipeDialer(t, func(sc net.Conn, br *bufio.Reader) {
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		fmt.Fprintf(sc, "HTTP/1.1 %s\r\nContent-Length: 0\r\n\r\n", status)
	})
	proxy := &url.URL{Scheme: "http", Host: "proxy.invalid:3128"}
	for _, tt := range []struct {
		name string
		fs   *FastStart
	}{
		{"upgrade", &FastStart{DialContext: dial, DisableFastStart: true}},
		{"WebSocket", &FastStart{DialContext: dial, WebSocket: true}},
		{"proxy", &FastStart{DialContext: dial, Proxy: http.ProxyURL(proxy)}},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, _, err := tt.fs.Dial(ctx, "http://derp.invalid/derp", mustKey(t))
		cancel()
		if err == nil {
			t.Fatalf("%s: Dial succeeded against a 403", tt.name)
		}
		if msg := err.Error(); strings.ContainsAny(msg, "\r\n") || !strings.Contains(msg, strconv.Quote(status)) {
			t.Errorf("%s: error %q, want the status quoted on one line", tt.name, msg)
		}
	}
}

// TestRedirectNamedInError: a dial answered with a redirect (a server that
// sends port 80 to HTTPS, a ServeMux that adds the slash of a "/derp/"
// pattern) fails, on every path, with an error that says where to: its body
// often does not (nginx's names only the status), and the error named only
// the status.
func TestRedirectNamedInError(t *testing.T) {
	const to = "https://derp.example.com/derp"
	dial := scriptedPipeDialer(t, func(sc net.Conn, br *bufio.Reader) {
		for {
			if _, err := http.ReadRequest(br); err != nil {
				return
			}
			const body = "<html><center><h1>301 Moved Permanently</h1></center></html>"
			fmt.Fprintf(sc, "HTTP/1.1 301 Moved Permanently\r\nLocation: %s\r\nContent-Length: %d\r\n\r\n%s", to, len(body), body)
		}
	})
	for _, fs := range []*FastStart{{DialContext: dial}, {DialContext: dial, WebSocket: true}, {DialContext: dial, ServerKey: mustKey(t).Public()}} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, hs, err := fs.Dial(ctx, "http://derp.example.com/derp", mustKey(t))
		cancel()
		if err == nil || !strings.Contains(err.Error(), "301") || !strings.Contains(err.Error(), "redirected to \""+to+"\"") {
			t.Errorf("websocket %v, key %v: Dial: %v; want the 301 and where it redirects to", fs.WebSocket, !fs.ServerKey.IsZero(), err)
		}
		if !fs.ServerKey.IsZero() && !strings.Contains(hs.Reason, "redirected to") {
			t.Errorf("fast start: handshake reason %q, want where the answer redirected to", hs.Reason)
		}
	}
}

// serveDERPWith serves s over TLS with cfg (to which it appends s's meta
// cert unless noMeta) on 127.0.0.1, HTTP/1.1 only, until the test ends, and
// returns the DERP URL.
func serveDERPWith(t testing.TB, s *Server, cfg *tls.Config, noMeta bool) string {
	t.Helper()
	return serveDERP(t, s, derpServeOpts{tlsConfig: cfg, noMetaCert: noMeta}).URL
}

// TestFastStartResumedSessionStaleKey: with a ClientSessionCache, a TLS 1.3
// resumption carries no Certificate message and crypto/tls restores the
// chain, meta cert included, from the cached session. A server that accepts
// a ticket another DERP key's server issued (servers sharing session ticket
// keys, or a server restarted with a new DERP key and persisted ticket
// keys) thus seems to name a stale key. Dial must still connect, and evict
// the stale session so that the next dial is fast again; with a cache that
// keeps it anyway, it connects on the upgrade path.
func TestFastStartResumedSessionStaleKey(t *testing.T) {
	t.Run("LRU cache", func(t *testing.T) {
		testResumedSessionStaleKey(t, tls.NewLRUClientSessionCache(8), FastPath)
	})
	t.Run("cache keeping evicted sessions", func(t *testing.T) {
		testResumedSessionStaleKey(t, keepingCache{tls.NewLRUClientSessionCache(8)}, UpgradePath)
	})
}

// keepingCache is a ClientSessionCache that ignores removals.
type keepingCache struct{ tls.ClientSessionCache }

func (c keepingCache) Put(key string, cs *tls.ClientSessionState) {
	if cs != nil {
		c.ClientSessionCache.Put(key, cs)
	}
}

func testResumedSessionStaleKey(t *testing.T, cache tls.ClientSessionCache, retryPath Path) {
	cert, pool := testCert(t, "resumption")
	var ticketKey [32]byte
	rand.Read(ticketKey[:])
	newCfg := func() *tls.Config {
		cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
		cfg.SetSessionTicketKeys([][32]byte{ticketKey})
		return cfg
	}
	sa, sb := newTestServer(t), newTestServer(t)
	urlA := serveDERPWith(t, sa, newCfg(), false)
	urlB := serveDERPWith(t, sb, newCfg(), false)
	fs := &FastStart{TLSConfig: &tls.Config{RootCAs: pool, ServerName: "127.0.0.1",
		CurvePreferences: []tls.CurveID{tls.X25519}, ClientSessionCache: cache}}

	// A full handshake with A caches a session whose chain has A's meta cert.
	_, hs := dialFast(t, fs, urlA)
	if hs.Path != FastPath || hs.TLS.DidResume || hs.ServerKey != sa.PublicKey() {
		t.Fatalf("first dial of A: path %v, resumed %v, key %v (want fast, full handshake, %v)",
			hs.Path, hs.TLS.DidResume, hs.ServerKey.ShortString(), sa.PublicKey().ShortString())
	}
	// A resumption with A itself: the cached meta cert is right.
	_, hs = dialFast(t, fs, urlA)
	if !hs.TLS.DidResume || hs.ServerKey != sa.PublicKey() || hs.Path != FastPath || hs.KeySource != "meta-cert" {
		t.Fatalf("second dial of A: resumed %v, %v path, key %v from %s", hs.TLS.DidResume, hs.Path, hs.ServerKey.ShortString(), hs.KeySource)
	}

	// B takes A's ticket: the restored chain names A's key.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i := range 2 {
		c, hs, err := fs.Dial(ctx, urlB, mustKey(t))
		if err != nil {
			t.Fatalf("dial %d of B: %v (handshake %+v)", i+1, err, hs)
		}
		t.Cleanup(func() { c.Close() })
		t.Logf("dial %d of B: %v path, %d attempts, resumed %v, reason %q", i+1, hs.Path, hs.Attempts, hs.TLS.DidResume, hs.Reason)
		if _, ok := recvMsg[ServerInfo](t, c); !ok {
			t.Fatalf("dial %d of B: no ServerInfo (handshake %+v)", i+1, hs)
		}
		if hs.ServerKey != sb.PublicKey() {
			t.Fatalf("dial %d of B: handshake names key %v, want %v", i+1, hs.ServerKey.ShortString(), sb.PublicKey().ShortString())
		}
		if i == 0 || retryPath == UpgradePath {
			if hs.Attempts != 2 || hs.Path != retryPath || !strings.Contains(hs.Reason, "resumed TLS session") {
				t.Errorf("dial %d of B with A's session: %v path, %d attempts, reason %q; want %v, 2 and a reason naming the resumed session",
					i+1, hs.Path, hs.Attempts, hs.Reason, retryPath)
			}
			continue
		}
		// The stale session was evicted; the retry's full handshake
		// cached B's chain.
		if hs.Path != FastPath || hs.Attempts != 1 || hs.KeySource != "meta-cert" || !hs.TLS.DidResume {
			t.Errorf("next dial of B: %v path, %d attempts, key from %s, resumed %v; want fast, 1, meta-cert, resumed",
				hs.Path, hs.Attempts, hs.KeySource, hs.TLS.DidResume)
		}
	}
}

// TestFastStartResumedSessionWithoutMetaCert: a resumed TLS 1.3 session
// shows the chain cached with it, and crypto/tls stores the tickets of a
// resumed connection with that same chain, so a client that keeps
// resuming never sees a chain newer than its last full handshake. A
// server that started serving a meta cert (an old server upgraded, keeping
// its session ticket keys) was then never dialled fast by such a client.
// The upgrade path must say why, and the next dial must see the current
// chain.
func TestFastStartResumedSessionWithoutMetaCert(t *testing.T) {
	cert, pool := testCert(t, "resumption")
	var ticketKey [32]byte
	rand.Read(ticketKey[:])
	newCfg := func() *tls.Config {
		cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
		cfg.SetSessionTicketKeys([][32]byte{ticketKey})
		return cfg
	}
	s := newTestServer(t)
	oldURL := serveDERPWith(t, s, newCfg(), true)
	newURL := serveDERPWith(t, s, newCfg(), false)
	fs := &FastStart{TLSConfig: &tls.Config{RootCAs: pool, ServerName: "127.0.0.1",
		CurvePreferences: []tls.CurveID{tls.X25519}, ClientSessionCache: tls.NewLRUClientSessionCache(8)}}

	// The server before it served the meta cert: a full handshake caches
	// a chain without one.
	_, hs := dialFast(t, fs, oldURL)
	if hs.Path != UpgradePath || hs.TLS.DidResume {
		t.Fatalf("dial of the old server: %v path, resumed %v", hs.Path, hs.TLS.DidResume)
	}
	// The same server now serves a meta cert; the client resumes the
	// session from before.
	var paths []string
	fast := false
	for i := 0; i < 3 && !fast; i++ {
		_, hs := dialFast(t, fs, newURL)
		paths = append(paths, fmt.Sprintf("%v (resumed %v, reason %q)", hs.Path, hs.TLS.DidResume, hs.Reason))
		if hs.Path == FastPath {
			fast = true
			continue
		}
		if hs.TLS.DidResume && !strings.Contains(hs.Reason, "resumed TLS session") {
			t.Errorf("dial %d: upgrade path over a resumed session, reason %q does not say so", i+1, hs.Reason)
		}
	}
	t.Logf("dials of the upgraded server: %s", strings.Join(paths, "; "))
	if !fast {
		t.Fatalf("3 dials of a server that serves a meta cert, none fast")
	}
	if len(paths) != 2 {
		t.Errorf("fast at dial %d, want 2 (after one resumed dial that drops the session)", len(paths))
	}
	// A server that has no meta cert (in the chain cached or now) gets
	// full handshakes and resumed ones in turn, each taking the upgrade
	// path.
	fs.TLSConfig.ClientSessionCache = tls.NewLRUClientSessionCache(8)
	for i := range 4 {
		_, hs := dialFast(t, fs, oldURL)
		if hs.Path != UpgradePath || hs.TLS.DidResume != (i%2 == 1) {
			t.Errorf("dial %d of the old server: %v path, resumed %v", i+1, hs.Path, hs.TLS.DidResume)
		}
	}
}

// TestDialUpgradeAnswerWithinLoginTimeout: a server that takes the upgrade
// request and then never answers it, or drips its answer, or never answers
// the ClientHello, fails the dial after LoginTimeout, as one that does not
// answer a fast start does, whatever ctx allows (here: no deadline at all).
func TestDialUpgradeAnswerWithinLoginTimeout(t *testing.T) {
	cert, pool := testCert(t, "stalling server")
	tests := []struct {
		name string
		tls  bool
		ws   bool
		drip bool
		mute bool // takes the connection and reads, never writes
	}{
		{name: "101 over plain HTTP"},
		{name: "101 over TLS", tls: true},
		{name: "WebSocket 101", ws: true},
		{name: "101 dripped a byte at a time", drip: true},
		{name: "ClientHello never answered", tls: true, mute: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var addr string
			if tc.mute || tc.drip {
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				addr = ln.Addr().String()
				acceptLoop(t, ln, func(nc net.Conn) {
					defer nc.Close()
					if tc.mute {
						io.Copy(io.Discard, nc)
						return
					}
					br := bufio.NewReader(nc)
					if _, err := http.ReadRequest(br); err != nil {
						return
					}
					ans := "HTTP/1.1 101 Switching Protocols\r\nX-Drip: " + strings.Repeat("a", 1<<20)
					for i := range len(ans) {
						if _, err := nc.Write([]byte{ans[i]}); err != nil {
							return
						}
						time.Sleep(20 * time.Millisecond)
					}
				})
			} else {
				var c *tls.Certificate
				if tc.tls {
					c = &cert
				}
				addr, _, _ = stallServer(t, c, "\r\n\r\n")
			}
			f := &FastStart{WebSocket: tc.ws, DisableFastStart: tc.tls, TLSConfig: &tls.Config{RootCAs: pool}}
			url := "http://" + addr + "/derp"
			if tc.tls {
				url = "https://" + addr + "/derp"
			}
			type result struct {
				c   *Client
				err error
			}
			done := make(chan result, 1)
			go func() {
				c, _, err := f.Dial(context.Background(), url, mustKey(t), LoginTimeout(300*time.Millisecond))
				done <- result{c, err}
			}()
			select {
			case r := <-done:
				if r.err == nil {
					r.c.Close()
					t.Fatal("dial succeeded")
				}
				if !errors.Is(r.err, os.ErrDeadlineExceeded) || !strings.Contains(r.err.Error(), "LoginTimeout") {
					t.Fatalf("dial failed with %v, want an error that names LoginTimeout and wraps os.ErrDeadlineExceeded", r.err)
				}
				t.Log(r.err)
			case <-time.After(time.Minute):
				t.Fatal("Dial still waiting for the answer a minute after LoginTimeout (300ms)")
			}
		})
	}
}

// TestFastStartMetaCertUnusableKey: a meta cert that names a key no server
// can own (zero, non-canonical, small-order) is as good as none: Dial takes
// the upgrade path, learns the key from the ServerKey frame, and its
// Handshake says why, rather than sealing the login to that key.
func TestFastStartMetaCertUnusableKey(t *testing.T) {
	cert, pool := testCert(t, "unusable meta cert")
	var nonCanonical PublicKey
	for i := range nonCanonical {
		nonCanonical[i] = 0xff
	}
	for _, tc := range []struct {
		name string
		key  PublicKey
	}{
		{"zero", PublicKey{}},
		{"small-order", PublicKey{1}},
		{"non-canonical", nonCanonical},
	} {
		t.Run(tc.name, func(t *testing.T) {
			der, err := MintMetaCert(tc.key, ProtocolVersion)
			if err != nil {
				t.Fatal(err)
			}
			cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
			AppendMetaCert(cfg, der)
			s := newTestServer(t)
			url := serveDERPWith(t, s, cfg, true)
			fs := &FastStart{TLSConfig: &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}}
			c, hs, err := fs.Dial(context.Background(), url, mustKey(t))
			if err != nil {
				t.Fatalf("Dial: %v", err)
			}
			defer c.Close()
			if hs.Path != UpgradePath || hs.ServerKey != s.PublicKey() || !strings.Contains(hs.Reason, "meta cert") {
				t.Fatalf("%v path, key %s from %s, reason %q; want the upgrade path, the server's key %s, and a reason that names the meta cert",
					hs.Path, hs.ServerKey.ShortString(), hs.KeySource, hs.Reason, s.PublicKey().ShortString())
			}
			if _, ok := recvMsg[ServerInfo](t, c); !ok {
				t.Fatal("no ServerInfo")
			}
		})
	}
}

// An HTTP answer other than 101 to a dial must be told apart by its status,
// on every path, not by parsing a message: the errors wrap an *HTTPError,
// and a server's "too many connections" 503 also matches
// ErrTooManyConnections. They were strings ("relay: upgrade refused: ...").
func TestDialRefusalIsHTTPError(t *testing.T) {
	s := newTestServer(t)
	full := newTestServer(t, WithMaxConnections(1, 0))
	pipeClient(t, full) // takes the only slot: ServeHTTP answers 503
	for _, h := range []struct {
		name    string
		handler http.Handler
		code    int
		tooMany bool
	}{
		{"404", http.NotFoundHandler(), http.StatusNotFound, false},
		{"503 too many connections", full, http.StatusServiceUnavailable, true},
		{"503 other", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "relay: too many connections elsewhere", http.StatusServiceUnavailable)
		}), http.StatusServiceUnavailable, false},
		{"307", http.RedirectHandler("https://elsewhere.example/derp", http.StatusTemporaryRedirect), http.StatusTemporaryRedirect, false},
	} {
		plain := serveDERP(t, s, derpServeOpts{plain: true, handler: h.handler})
		tlsd := serveDERP(t, s, derpServeOpts{handler: h.handler})
		noMeta := serveDERP(t, s, derpServeOpts{handler: h.handler, noMetaCert: true})
		for _, p := range []struct {
			name string
			fs   *FastStart
			url  string
			fast bool // Dial returns on the fast path; Recv sees the answer
			rc   bool // through ReconnectingClient.Connect
		}{
			{"plain upgrade", &FastStart{}, plain.URL, false, false},
			{"TLS upgrade", &FastStart{TLSConfig: tlsd.ClientTLS, DisableFastStart: true}, tlsd.URL, false, false},
			{"TLS 1.3 fast path", &FastStart{TLSConfig: tlsd.ClientTLS}, tlsd.URL, true, false},
			// The answer to the confirmed fast path, then the upgrade's.
			{"TLS fast path, key configured", &FastStart{TLSConfig: noMeta.ClientTLS, ServerKey: s.PublicKey()}, noMeta.URL, false, false},
			{"WebSocket", &FastStart{TLSConfig: tlsd.ClientTLS, WebSocket: true}, tlsd.URL, false, false},
			{"ReconnectingClient", &FastStart{TLSConfig: tlsd.ClientTLS, DisableFastStart: true}, tlsd.URL, false, true},
		} {
			t.Run(h.name+"/"+p.name, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				var err error
				if p.rc {
					rc := &ReconnectingClient{URL: p.url, PrivateKey: mustKey(t), Dialer: p.fs}
					defer rc.Close()
					err = rc.Connect(ctx)
				} else {
					var c *Client
					var hs Handshake
					c, hs, err = p.fs.Dial(ctx, p.url, mustKey(t))
					if p.fast {
						if err != nil || hs.Path != FastPath {
							t.Fatalf("Dial = %v on %v, want the fast path", err, hs.Path)
						}
						defer c.Close()
						c.nc.SetReadDeadline(time.Now().Add(20 * time.Second))
						_, err = c.Recv()
					} else if c != nil {
						c.Close()
					}
				}
				if err == nil {
					t.Fatal("dial answered with an error status succeeded")
				}
				var he *HTTPError
				if !errors.As(err, &he) {
					t.Fatalf("errors.As(%q, *HTTPError) = false", err)
				}
				if he.StatusCode != h.code || !strings.HasPrefix(he.Status, strconv.Itoa(h.code)+" ") || he.Body == "" {
					t.Errorf("HTTPError = %+v, want status %d and the body", he, h.code)
				}
				if want := map[bool]string{true: "https://elsewhere.example/derp"}[h.code == http.StatusTemporaryRedirect]; he.Location != want {
					t.Errorf("HTTPError.Location = %q, want %q", he.Location, want)
				}
				if got := errors.Is(err, ErrTooManyConnections); got != h.tooMany {
					t.Errorf("errors.Is(%q, ErrTooManyConnections) = %v, want %v", err, got, h.tooMany)
				}
			})
		}
	}
}
