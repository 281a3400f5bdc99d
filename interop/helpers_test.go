package interop

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"go4.org/mem"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/derp/derpserver"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"

	"github.com/fastderp/relay"
)

// recvTimeout bounds every wait for a message in these tests.
const recvTimeout = 5 * time.Second

// checkNoLeaks must be the first thing a test calls: the cleanup it
// registers runs last, after every server, listener and client the test
// created has been closed, and fails the test if goroutines of package relay,
// of Tailscale's DERP packages or of this package are still running.
func checkNoLeaks(t *testing.T) {
	t.Helper()
	checkNoGoroutines(t, 3*time.Second, "", func(g string) bool {
		switch {
		case strings.Contains(g, "testing.(*T).Run"),
			strings.Contains(g, "testing.tRunner.func"),
			strings.Contains(g, "testing.runTests"):
			return false // the test framework itself
		}
		return strings.Contains(g, "github.com/fastderp/relay") ||
			strings.Contains(g, "command-line-arguments.") ||
			strings.Contains(g, "tailscale.com/derp") ||
			strings.Contains(g, "net/http.(*conn).serve") ||
			strings.Contains(g, "net/http.(*persistConn)")
	})
}

// checkNoGoroutines registers a cleanup that waits up to wait for every
// goroutine but its own that leaked accepts to end, and fails the test,
// listing them (as what's), if some are still running.
func checkNoGoroutines(t *testing.T, wait time.Duration, what string, leaked func(stack string) bool) {
	t.Helper()
	t.Cleanup(func() {
		deadline := time.Now().Add(wait)
		for {
			var left []string
			for _, g := range allGoroutines() {
				if leaked(g) {
					left = append(left, g)
				}
			}
			if len(left) == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("%d goroutine(s)%s still running after cleanup:\n\n%s", len(left), what, strings.Join(left, "\n\n"))
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// allGoroutines returns the stacks of all goroutines but the caller's.
func allGoroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	return strings.Split(string(buf), "\n\n")[1:]
}

// recvMatch calls recv until match accepts a message, recv fails, or
// recvTimeout passes. On timeout it calls abort (which must make a pending
// recv return, typically by closing the connection) and waits for the
// receiving goroutine to end before failing the test, so nothing leaks.
// Failure messages list the messages that were skipped.
func recvMatch[M any](t *testing.T, what string, recv func() (M, error), abort func(), match func(M) bool) M {
	t.Helper()
	type result struct {
		m       M
		skipped []string
		err     error
	}
	done := make(chan result, 1)
	stop := make(chan struct{})
	go func() {
		var r result
		for {
			m, err := recv()
			if err != nil {
				r.err = err
				break
			}
			if match(m) {
				r.m = m
				break
			}
			r.skipped = append(r.skipped, describe(m))
			select {
			case <-stop:
				r.err = errors.New("stopped")
				done <- r
				return
			default:
			}
		}
		done <- r
	}()
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatalf("%s: receive failed after skipping %v: %v", what, r.skipped, r.err)
		}
		return r.m
	case <-time.After(recvTimeout):
		close(stop)
		abort()
		r := <-done
		t.Fatalf("%s: nothing matching within %v; skipped %v (then: %v)", what, recvTimeout, r.skipped, r.err)
		panic("unreachable")
	}
}

// describe summarizes a skipped message for failure output.
func describe(m any) string {
	switch m := m.(type) {
	case derp.ReceivedPacket:
		return fmt.Sprintf("derp.ReceivedPacket{Source:%v, %d bytes}", m.Source.ShortString(), len(m.Data))
	case *relay.ReceivedPacket:
		return fmt.Sprintf("relay.ReceivedPacket{Source:%v, %d bytes}", m.Source.ShortString(), len(m.Data))
	}
	s := fmt.Sprintf("%T%+v", m, m)
	if len(s) > 120 {
		s = s[:120] + "..."
	}
	return s
}

// tsPeer is a Tailscale client, either a raw derp.Client over TCP or a
// derphttp.Client, reduced to what the tests use.
type tsPeer struct {
	name  string
	pub   key.NodePublic
	send  func(dst key.NodePublic, pkt []byte) error
	ping  func(data [8]byte) error
	recv  func() (derp.ReceivedMessage, error)
	close func() // closes the connection; makes a pending recv return
	// serverKey returns the server key the client learned.
	serverKey func() key.NodePublic

	info derp.ServerInfoMessage // the first ServerInfo received

	raw *derp.Client // for raw clients (dialTS) only
	nc  net.Conn     // for raw clients (dialTS) only
}

func (p *tsPeer) relayPub() relay.PublicKey { return relayKey(p.pub) }

// recvTS returns the first message of a Tailscale client that match accepts.
func recvTS(t *testing.T, what string, p *tsPeer, match func(derp.ReceivedMessage) bool) derp.ReceivedMessage {
	t.Helper()
	return recvMatch(t, p.name+": "+what, p.recv, p.close, match)
}

// recvTSPacket returns the next packet a Tailscale client receives,
// skipping every other message.
func recvTSPacket(t *testing.T, p *tsPeer) derp.ReceivedPacket {
	t.Helper()
	m := recvTS(t, "recvPacket", p, func(m derp.ReceivedMessage) bool {
		_, ok := m.(derp.ReceivedPacket)
		return ok
	})
	rp := m.(derp.ReceivedPacket)
	rp.Data = append([]byte(nil), rp.Data...)
	return rp
}

func isTSServerInfo(m derp.ReceivedMessage) bool {
	_, ok := m.(derp.ServerInfoMessage)
	return ok
}

// dialTS connects a raw Tailscale derp.Client over TCP to addr, where the
// listener hands connections to a server's Accept, and waits for its
// ServerInfo.
func dialTS(t *testing.T, name, addr string, opts ...derp.ClientOpt) *tsPeer {
	t.Helper()
	return dialTSKey(t, name, addr, key.NewNode(), opts...)
}

// dialTSKey is dialTS with a given private key.
func dialTSKey(t *testing.T, name, addr string, priv key.NodePrivate, opts ...derp.ClientOpt) *tsPeer {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, recvTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	// derp.NewClient reads the ServerKey frame; do not wait forever.
	nc.SetDeadline(time.Now().Add(recvTimeout))
	brw := bufio.NewReadWriter(bufio.NewReader(nc), bufio.NewWriter(nc))
	c, err := derp.NewClient(priv, nc, brw, t.Logf, opts...)
	if err != nil {
		t.Fatalf("%s: derp.NewClient: %v", name, err)
	}
	nc.SetDeadline(time.Time{})
	return rawTSPeer(t, name, priv, c, nc)
}

// rawTSPeer wraps a raw derp.Client over nc and waits for its ServerInfo.
func rawTSPeer(t *testing.T, name string, priv key.NodePrivate, c *derp.Client, nc net.Conn) *tsPeer {
	t.Helper()
	p := &tsPeer{
		name:      name,
		pub:       priv.Public(),
		send:      c.Send,
		ping:      c.SendPing,
		recv:      c.Recv,
		close:     func() { nc.Close() },
		serverKey: c.ServerPublicKey,
		raw:       c,
		nc:        nc,
	}
	tsWaitServerInfo(t, p)
	return p
}

// tsWaitServerInfo waits for a Tailscale client's ServerInfo and checks
// that it is the first message the client receives (the server's ServerKey
// frame is consumed by the login, or skipped as unknown in fast start).
// The server sends ServerInfo after it registered the client, so once it
// arrived packets sent to this client are routed to it. Receiving it also
// proves the box opened with the server key the client used.
func tsWaitServerInfo(t *testing.T, p *tsPeer) {
	t.Helper()
	first := true
	m := recvTS(t, "wait for ServerInfo", p, func(m derp.ReceivedMessage) bool {
		if first && !isTSServerInfo(m) {
			t.Errorf("%s: first message is %s, want ServerInfo before anything else", p.name, describe(m))
		}
		first = false
		return isTSServerInfo(m)
	})
	p.info = m.(derp.ServerInfoMessage)
}

// dialTSHTTP creates a Tailscale derphttp.Client for serverURL, connects it
// and waits for its ServerInfo.
func dialTSHTTP(t *testing.T, name, serverURL string, tlsConfig *tls.Config) (*tsPeer, *derphttp.Client) {
	t.Helper()
	return dialTSHTTPAs(t, name, serverURL, tlsConfig, key.NewNode())
}

// dialTSHTTPAs is dialTSHTTP with the client's key.
func dialTSHTTPAs(t *testing.T, name, serverURL string, tlsConfig *tls.Config, priv key.NodePrivate) (*tsPeer, *derphttp.Client) {
	t.Helper()
	c, err := derphttp.NewClient(priv, serverURL, t.Logf, netmon.NewStatic())
	if err != nil {
		t.Fatal(err)
	}
	c.TLSConfig = tlsConfig
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), recvTimeout)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		t.Fatalf("%s: derphttp Connect(%s): %v", name, serverURL, err)
	}
	p := &tsPeer{
		name: name,
		pub:  priv.Public(),
		send: c.Send,
		ping: c.SendPing,
		// derphttp.Client.Recv reconnects on the call after an error;
		// recvMatch stops at the first error, so that never happens.
		recv:      c.Recv,
		close:     func() { c.Close() },
		serverKey: c.ServerPublicKey,
	}
	tsWaitServerInfo(t, p)
	return p, c
}

// Key conversions between the two implementations: both are the raw 32 bytes.

func relayKey(k key.NodePublic) relay.PublicKey {
	return relay.PublicKey(k.Raw32())
}

func tsKey(k relay.PublicKey) key.NodePublic {
	return key.NodePublicFromRaw32(mem.B(k[:]))
}

// acceptLoop listens on 127.0.0.1:0 and hands every connection to accept
// (a server's Accept method) on its own goroutine, the way a program
// embedding a DERP server without net/http would. Its cleanup closes the
// listener, calls closeServer (the server's Close, which must end every
// session it accepted) and then waits for the accept loop and every Accept
// call to return; Accept calls still running a second later are a test
// failure, and their connections are closed so that nothing leaks.
func acceptLoop(t *testing.T, accept func(ctx context.Context, nc net.Conn, brw *bufio.ReadWriter, remoteAddr string), closeServer func() error) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[nc] = true
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				brw := bufio.NewReadWriter(bufio.NewReader(nc), bufio.NewWriter(nc))
				accept(ctx, nc, brw, nc.RemoteAddr().String())
				mu.Lock()
				delete(conns, nc)
				mu.Unlock()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		if err := closeServer(); err != nil {
			t.Logf("server Close: %v", err)
		}
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(time.Second):
			mu.Lock()
			n := len(conns)
			for nc := range conns {
				nc.Close()
			}
			mu.Unlock()
			t.Errorf("%d Accept call(s) still running 1s after the server's Close", n)
			cancel()
			<-done
		}
		cancel()
	})
	return ln.Addr().String()
}

// selfSignedCert returns a fresh ECDSA certificate for 127.0.0.1,
// localhost and moreNames, and a pool trusting it.
func selfSignedCert(t *testing.T, moreNames ...string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "interop test server"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:              append([]string{"localhost"}, moreNames...),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: priv, Leaf: leaf}, pool
}

// serveTLS serves h over TLS with cfg on 127.0.0.1:0 (with
// srv.Serve(tls.NewListener(ln, cfg)), which uses cfg as it is, and ALPN
// "http/1.1" unless cfg says otherwise) and returns the https URL of /derp.
// Cleanup closes the HTTP server; hijacked DERP connections are ended by
// closing the DERP server, whose cleanup the caller registered before.
func serveTLS(t *testing.T, h http.Handler, cfg *tls.Config) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return serveTLSOn(t, ln, h, cfg)
}

// serveTLSOn is serveTLS on a listener the caller opened.
func serveTLSOn(t *testing.T, ln net.Listener, h http.Handler, cfg *tls.Config) string {
	t.Helper()
	cfg = cfg.Clone()
	if len(cfg.NextProtos) == 0 {
		cfg.NextProtos = []string{"http/1.1"} // never h2: DERP hijacks HTTP/1.1
	}
	srv := &http.Server{Handler: h}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(tls.NewListener(ln, cfg))
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return "https://" + ln.Addr().String() + "/derp"
}

// servePlain serves h over plain HTTP and returns the http URL of /derp.
func servePlain(t *testing.T, h http.Handler) string {
	t.Helper()
	ts := httptest.NewServer(h)
	t.Cleanup(ts.Close)
	return ts.URL + "/derp"
}

// derpMux mounts h at /derp.
func derpMux(h http.Handler) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/derp", h)
	return mux
}

// headerRecorder wraps a handler and records the Derp-Fast-Start header of
// every request it sees.
type headerRecorder struct {
	next http.Handler
	mu   sync.Mutex
	seen []string
}

func (h *headerRecorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h.mu.Lock()
	h.seen = append(h.seen, r.Header.Get("Derp-Fast-Start"))
	h.mu.Unlock()
	h.next.ServeHTTP(w, r)
}

func (h *headerRecorder) values() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.seen...)
}

// payload returns distinct test bytes.
func payload(tag string) []byte {
	b := make([]byte, 0, 64+len(tag))
	b = append(b, tag...)
	for i := 0; len(b) < cap(b); i++ {
		b = append(b, byte(i*7+len(tag)))
	}
	return b
}

// tsAccept adapts Tailscale's Server.Accept to acceptLoop.
func tsAccept(s *derpserver.Server) func(context.Context, net.Conn, *bufio.ReadWriter, string) {
	return func(ctx context.Context, nc net.Conn, brw *bufio.ReadWriter, remoteAddr string) {
		s.Accept(ctx, nc, brw, remoteAddr)
	}
}

// tsAcceptLoop serves Tailscale's s.Accept on a TCP listener.
func tsAcceptLoop(t *testing.T, s *derpserver.Server) string {
	t.Helper()
	return acceptLoop(t, tsAccept(s), s.Close)
}

// tsToTS sends pkts between two Tailscale clients.
func tsToTS(t *testing.T, from, to *tsPeer, pkts ...[]byte) {
	t.Helper()
	for _, pkt := range pkts {
		if err := from.send(to.pub, pkt); err != nil {
			t.Fatalf("%s: Send %d bytes to %s: %v", from.name, len(pkt), to.name, err)
		}
		got := recvTSPacket(t, to)
		if got.Source != from.pub {
			t.Fatalf("%s got a packet from %v, want from %s %v", to.name, got.Source, from.name, from.pub)
		}
		if !bytes.Equal(got.Data, pkt) {
			t.Fatalf("%s got %d bytes %.40x..., want %d bytes %.40x... from %s", to.name, len(got.Data), got.Data, len(pkt), pkt, from.name)
		}
	}
}

// tsPingPong sends a Ping from a Tailscale client and expects the Pong.
func tsPingPong(t *testing.T, p *tsPeer, data [8]byte) {
	t.Helper()
	if err := p.ping(data); err != nil {
		t.Fatalf("%s: SendPing: %v", p.name, err)
	}
	m := recvTS(t, "wait for Pong", p, func(m derp.ReceivedMessage) bool {
		_, ok := m.(derp.PongMessage)
		return ok
	})
	if got := m.(derp.PongMessage); got != derp.PongMessage(data) {
		t.Fatalf("%s: Pong %x, want %x", p.name, got, data)
	}
}

// tsWaitPeerGone waits until a Tailscale client is told that peer left.
func tsWaitPeerGone(t *testing.T, p *tsPeer, peer relay.PublicKey, want derp.PeerGoneReasonType) {
	t.Helper()
	m := recvTS(t, "wait for PeerGone", p, func(m derp.ReceivedMessage) bool {
		pg, ok := m.(derp.PeerGoneMessage)
		return ok && pg.Peer == tsKey(peer)
	})
	if got := m.(derp.PeerGoneMessage).Reason; got != want {
		t.Fatalf("%s: PeerGone reason %v, want %v", p.name, got, want)
	}
}
