package relay

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// ticketHandshake runs one TLS handshake over an in-memory pipe and has the
// server write a byte after it, which the client reads, so that a TLS 1.3
// client has processed the server's NewSessionTicket by the time it
// returns. It reports whether the session was resumed.
func ticketHandshake(t *testing.T, server, client *tls.Config) (resumed bool) {
	t.Helper()
	sc, cc := net.Pipe()
	defer sc.Close()
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	serverDone := make(chan error, 1)
	go func() {
		ts := tls.Server(sc, server)
		if err := ts.HandshakeContext(ctx); err != nil {
			sc.Close()
			serverDone <- err
			return
		}
		_, err := ts.Write([]byte{1})
		serverDone <- err
	}()
	tc := tls.Client(cc, client)
	if err := tc.HandshakeContext(ctx); err != nil {
		t.Fatalf("client handshake: %v (server: %v)", err, <-serverDone)
	}
	if _, err := tc.Read(make([]byte, 1)); err != nil {
		t.Fatalf("client read: %v", err)
	}
	if err := <-serverDone; err != nil {
		t.Fatalf("server: %v", err)
	}
	return tc.ConnectionState().DidResume
}

// TestAppendMetaCertSessionTicketKeyRotation: a fleet that shares session
// ticket keys rotates them on the live config with SetSessionTicketKeys,
// which crypto/tls documents for exactly that. TLS 1.2 handshakes, and
// TLS 1.3 ones once the meta cert has been renewed, must follow the
// rotation: tickets sealed with the new key, so that the fleet's other
// servers resume them, and none accepted under the key that was retired.
// (AppendMetaCert once served them from clones of cfg, which kept the keys
// cfg had when they were made.)
func TestAppendMetaCertSessionTicketKeyRotation(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	pub := metaCertTestKey(t)
	start := time.Now()
	t.Cleanup(func() { metaCertNow = time.Now })
	const day = 24 * time.Hour
	for _, tc := range []struct {
		name    string
		version uint16
		at      time.Duration // the server's clock for the meta cert
	}{
		{"TLS1.2", tls.VersionTLS12, 0},
		{"TLS1.3/renewed", tls.VersionTLS13, 24 * day},
	} {
		t.Run(tc.name, func(t *testing.T) {
			metaCertNow = func() time.Time { return start.Add(tc.at) }
			var oldKey, newKey [32]byte
			oldKey[0], newKey[0] = 1, 2
			serverConfig := func(key [32]byte) *tls.Config {
				cfg := &tls.Config{Certificates: []tls.Certificate{pki.cert}}
				cfg.SetSessionTicketKeys([][32]byte{key})
				AppendMetaCert(cfg, metaCertTestMint(t, pub))
				return cfg
			}
			client := func() *tls.Config {
				c := pki.clientConfig()
				c.MinVersion, c.MaxVersion = tc.version, tc.version
				c.ClientSessionCache = tls.NewLRUClientSessionCache(4)
				return c
			}
			cfg := serverConfig(oldKey)
			before := client()
			ticketHandshake(t, cfg, before) // a ticket under the old key
			cfg.SetSessionTicketKeys([][32]byte{newKey})
			if ticketHandshake(t, cfg, before) {
				t.Errorf("a ticket sealed with the retired key was resumed after SetSessionTicketKeys")
			}
			after := client()
			ticketHandshake(t, cfg, after) // a ticket under the new key
			peer := serverConfig(newKey)   // another server of the fleet
			if !ticketHandshake(t, peer, after) {
				t.Errorf("a ticket issued after SetSessionTicketKeys was not resumed by a server with the new key: it was sealed with the old one")
			}
		})
	}
}

// statusRecorder is the usual access-log wrapper; with unwrap it exposes the
// ResponseWriter it wraps, as http.ResponseController expects.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) { r.status = code; r.ResponseWriter.WriteHeader(code) }

type unwrappingRecorder struct{ statusRecorder }

func (r *unwrappingRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// middlewareServer serves h over TLS with the meta cert (HTTP/1.1 only, as
// the README's snippet) and returns the https URL of its root and a client
// TLS config.
func middlewareServer(t *testing.T, s *Server, h http.Handler) (string, *tls.Config) {
	t.Helper()
	cert, pool, err := selfSignedCert("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
	AppendMetaCert(cfg, s.MetaCert())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ErrorLog: log.New(io.Discard, "", 0)}
	done := make(chan struct{})
	go func() { defer close(done); hs.Serve(tls.NewListener(ln, cfg)) }()
	t.Cleanup(func() { s.Close(); hs.Close(); <-done })
	return "https://" + ln.Addr().String(), &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}
}

// TestServerBehindMiddleware mounts the Server on a ServeMux behind the
// middleware services put in front of every handler, and dials it on each
// path. Those that keep Hijack reachable must work; those that hide it
// must fail the dial with an error that says so.
func TestServerBehindMiddleware(t *testing.T) {
	type ctxKey struct{}
	for _, tc := range []struct {
		name    string
		prefix  string // where the DERP path is mounted
		wrap    func(http.Handler) http.Handler
		wantErr string // "" if the dial must work
	}{
		{name: "plain"},
		{name: "logging/Unwrap", wrap: func(h http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				h.ServeHTTP(&unwrappingRecorder{statusRecorder{ResponseWriter: w}}, r)
			})
		}},
		{name: "logging/noUnwrap", wantErr: "Hijack", wrap: func(h http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				h.ServeHTTP(&statusRecorder{ResponseWriter: w}, r)
			})
		}},
		{name: "MaxBytesHandler", wrap: func(h http.Handler) http.Handler { return http.MaxBytesHandler(h, 1<<10) }},
		{name: "TimeoutHandler", wantErr: "Hijack", wrap: func(h http.Handler) http.Handler {
			return http.TimeoutHandler(h, 10*time.Second, "timeout")
		}},
		{name: "StripPrefix", prefix: "/relay", wrap: func(h http.Handler) http.Handler { return http.StripPrefix("/relay", h) }},
		{name: "requestContext", wrap: func(h http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				ctx, cancel := context.WithTimeout(context.WithValue(r.Context(), ctxKey{}, "v"), 10*time.Second)
				defer cancel() // ends when ServeHTTP returns, long before the session
				h.ServeHTTP(w, r.WithContext(ctx))
			})
		}},
	} {
		for _, mode := range []string{"fast", "upgrade", "websocket"} {
			t.Run(tc.name+"/"+mode, func(t *testing.T) {
				s := NewServer(mustKey(t))
				var h http.Handler = s
				if tc.wrap != nil {
					h = tc.wrap(s)
				}
				mux := http.NewServeMux()
				mux.Handle(tc.prefix+"/derp", h)
				mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "app") })
				base, tlsConfig := middlewareServer(t, s, mux)
				fs := &FastStart{TLSConfig: tlsConfig, WebSocket: mode == "websocket"}
				if mode == "upgrade" {
					fs.TLSConfig = tlsConfig.Clone()
					fs.TLSConfig.MaxVersion = tls.VersionTLS12 // no meta cert: the upgrade path
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				dial := func() *Client {
					t.Helper()
					c, hs, err := fs.Dial(ctx, base+tc.prefix+"/derp", mustKey(t))
					if tc.wantErr != "" {
						if err == nil && hs.Path == FastPath {
							// The fast path's Dial returns once the login
							// is written: the answer is the first Recv's.
							_, err = c.Recv()
							c.Close()
						}
						if err == nil {
							c.Close()
							t.Fatalf("dial through %s worked", tc.name)
						}
						if !strings.Contains(err.Error(), tc.wantErr) {
							t.Fatalf("dial error does not say why: %v", err)
						}
						return nil
					}
					if err != nil {
						t.Fatalf("dial: %v", err)
					}
					if wantFast := mode == "fast"; (hs.Path == FastPath) != wantFast {
						t.Errorf("path %v (%s), fast wanted: %v", hs.Path, hs.Reason, wantFast)
					}
					t.Cleanup(func() { c.Close() })
					if _, ok := recvMsg[ServerInfo](t, c); !ok {
						t.FailNow()
					}
					return c
				}
				a := dial()
				if a == nil {
					return
				}
				b := dial()
				if err := a.Send(b.PublicKey(), []byte("hello")); err != nil {
					t.Fatal(err)
				}
				if p, ok := recvMsg[*ReceivedPacket](t, b); !ok || string(p.Data) != "hello" {
					t.Fatalf("got %v", p)
				}
			})
		}
	}
}

// TestAppendMetaCertServeTLSCertFiles: a service that loads its certificate
// from files with http.Server.ServeTLS(ln, certFile, keyFile), its TLSConfig
// given the meta cert first. The README advises against it (ServeTLS loads
// the pair into its own copy of the config, so no meta cert is served), but
// the service itself must keep working: TLS 1.2 and TLS 1.3 clients, also
// once the meta cert is due for renewal, must get the loaded certificate.
func TestAppendMetaCertServeTLSCertFiles(t *testing.T) {
	s := NewServer(mustKey(t))
	cert, pool, err := selfSignedCert("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	AppendMetaCert(cfg, s.MetaCert())
	mux := http.NewServeMux()
	mux.Handle("/derp", s)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "app") })
	hs := &http.Server{Handler: mux, TLSConfig: cfg, ReadHeaderTimeout: 10 * time.Second, ErrorLog: log.New(io.Discard, "", 0)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); hs.ServeTLS(ln, certFile, keyFile) }()
	t.Cleanup(func() { s.Close(); hs.Close(); <-done })
	t.Cleanup(func() { metaCertNow = time.Now })
	base := "https://" + ln.Addr().String()
	for _, at := range []time.Duration{0, 24 * 24 * time.Hour} { // the meta cert due for renewal
		metaCertNow = func() time.Time { return time.Now().Add(at) }
		for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
			tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MaxVersion: v}}
			hc := &http.Client{Timeout: 30 * time.Second, Transport: tr}
			resp, err := hc.Get(base + "/")
			if err != nil {
				t.Errorf("TLS %x, meta cert clock +%v: %v", v&0xff, at, err)
				continue
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			tr.CloseIdleConnections()
			if string(body) != "app" {
				t.Errorf("TLS %x: got %q", v&0xff, body)
			}
			// DERP works too, on the upgrade path: no meta cert here.
			fs := &FastStart{TLSConfig: &tls.Config{RootCAs: pool, MaxVersion: v}}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			c, h, err := fs.Dial(ctx, base+"/derp", mustKey(t))
			cancel()
			if err != nil {
				t.Errorf("TLS %x, meta cert clock +%v: DERP dial: %v", v&0xff, at, err)
				continue
			}
			if _, err := c.Recv(); err != nil {
				t.Errorf("TLS %x: DERP login (%v path): %v", v&0xff, h.Path, err)
			}
			c.Close()
		}
	}
}

// TestServerBehindRealIPMiddleware: services behind a load balancer put
// the client's address from X-Forwarded-For into r.RemoteAddr before any
// handler runs (chi's middleware.RealIP, gorilla's handlers.ProxyHeaders),
// as a bare IP without a port. The per-IP limit, the admission service's
// Source and the session's address must use it, not silently drop it.
func TestServerBehindRealIPMiddleware(t *testing.T) {
	var sources []string
	var mu sync.Mutex
	verify := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req struct{ NodePublic, Source string }
		json.NewDecoder(r.Body).Decode(&req)
		mu.Lock()
		sources = append(sources, req.Source)
		mu.Unlock()
		io.WriteString(w, `{"Allow":true}`)
	}))
	defer verify.Close()
	s := NewServer(mustKey(t), WithMaxConnections(0, 1), WithAdmission(AdmissionURL(verify.URL, false, verify.Client())))
	realIP := func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if ip := r.Header.Get("X-Forwarded-For"); ip != "" {
				r.RemoteAddr = ip
			}
			h.ServeHTTP(w, r)
		})
	}
	checkForwardedClient(t, s, realIP, http.Header{"X-Forwarded-For": {"203.0.113.7"}}, "203.0.113.7", func() {
		mu.Lock()
		if len(sources) != 1 || sources[0] != "203.0.113.7" {
			t.Errorf("admission service was told Source %q, want the forwarded client's 203.0.113.7", sources)
		}
		mu.Unlock()
	})
}

// checkForwardedClient dials s mounted behind middleware mw, with header
// naming the client's address, want: the session must have that address,
// then between runs, and a second session from that address must be over
// s's limit of one per IP.
func checkForwardedClient(t *testing.T, s *Server, mw func(http.Handler) http.Handler, header http.Header, want string, between func()) {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle("/derp", mw(s))
	base, tlsConfig := middlewareServer(t, s, mux)
	fs := &FastStart{TLSConfig: tlsConfig, Header: header}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, _, err := fs.Dial(ctx, base+"/derp", mustKey(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, ok := recvMsg[ServerInfo](t, c); !ok {
		t.FailNow()
	}
	for si := range s.Sessions() {
		if got := si.RemoteAddr.Addr().String(); got != want {
			t.Errorf("session's RemoteAddr %v, want the forwarded client's %s", si.RemoteAddr, want)
		}
	}
	if between != nil {
		between()
	}
	c2, _, err := fs.Dial(ctx, base+"/derp", mustKey(t))
	if err == nil {
		_, err = c2.Recv()
		c2.Close()
	}
	if !errors.Is(err, ErrTooManyConnections) {
		t.Errorf("second session from one forwarded address (%s) with a per-IP limit of 1: %v", want, err)
	}
}

// TestServerBehindForwardedMiddleware: middleware that takes the client's
// address from an RFC 7239 Forwarded header (gorilla's
// handlers.ProxyHeaders) strips the quotes and leaves the rest: an IPv6
// node without a port is "[2001:db8::7]", brackets and all (RFC 7239
// writes IPv6 nodes in brackets, a port optional). That address must
// count as the client's IP, as the bare IP of X-Forwarded-For does, or the
// per-IP limit silently stops applying to every IPv6 client.
func TestServerBehindForwardedMiddleware(t *testing.T) {
	s := NewServer(mustKey(t), WithMaxConnections(0, 1))
	proxyHeaders := func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if fwd := r.Header.Get("Forwarded"); strings.HasPrefix(fwd, "for=") {
				r.RemoteAddr = strings.Trim(strings.TrimPrefix(fwd, "for="), `"`)
			}
			h.ServeHTTP(w, r)
		})
	}
	checkForwardedClient(t, s, proxyHeaders, http.Header{"Forwarded": {`for="[2001:db8::7]"`}}, "2001:db8::7", nil)
}
