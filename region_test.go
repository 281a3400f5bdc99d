package relay

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Tests of DERP-map nodes: Node, Region, FastStart.DialNode and
// ReconnectingClient.Region.

// serveRegionNode serves s (through h, if not nil) over TLS on 127.0.0.1 with a
// self-signed certificate for certNames and the meta cert, and records the
// server names clients sent.
type nodeServer struct {
	port  int
	cert  tls.Certificate
	roots *tls.Config // a client config trusting the certificate
	mu    sync.Mutex
	snis  []string
}

func serveRegionNode(t *testing.T, s *Server, h http.Handler, certNames ...string) *nodeServer {
	t.Helper()
	if h == nil {
		h = s
	}
	cert, pool, err := selfSignedCert(certNames...)
	if err != nil {
		t.Fatal(err)
	}
	ns := &nodeServer{cert: cert, roots: &tls.Config{RootCAs: pool}}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
	AppendMetaCert(cfg, s.MetaCert())
	inner := cfg.GetConfigForClient
	cfg.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		ns.mu.Lock()
		ns.snis = append(ns.snis, hello.ServerName)
		ns.mu.Unlock()
		return inner(hello)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ns.port = ln.Addr().(*net.TCPAddr).Port
	hs := &http.Server{Handler: h, ErrorLog: quietLog}
	go hs.Serve(tls.NewListener(ln, cfg))
	t.Cleanup(func() { hs.Close() })
	t.Cleanup(func() { s.Close() }) // runs first: hijacked sessions end
	return ns
}

func (ns *nodeServer) lastSNI() string {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	if len(ns.snis) == 0 {
		return ""
	}
	return ns.snis[len(ns.snis)-1]
}

// TestCertCheckUsesConfigTime: however a node's certificate is checked
// (crypto/tls against RootCAs, or this package against the fallback roots,
// CertName or a pin), it is checked at the time TLSConfig.Time gives, as
// crypto/tls documents, not at the machine's clock.
func TestCertCheckUsesConfigTime(t *testing.T) {
	s := newTestServer(t)
	ns := serveRegionNode(t, s, nil, "cert.test") // valid from an hour ago for a day
	pool := ns.roots.RootCAs
	sum := sha256.Sum256(ns.cert.Certificate[0])
	pin := "sha256-raw:" + hex.EncodeToString(sum[:])
	saved := fallbackRoots
	t.Cleanup(func() { fallbackRoots = saved })
	fallbackRoots = func() *x509.CertPool { return pool }

	expired := func() time.Time { return time.Now().Add(48 * time.Hour) }
	for _, tc := range []struct {
		name     string
		certName string
		roots    *x509.CertPool
	}{
		{"roots", "", pool},
		{"fallback roots", "", nil},
		{"CertName", "cert.test", pool},
		{"CertName, fallback roots", "cert.test", nil},
		{"pin", pin, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dial := func(now func() time.Time) error {
				f := FastStart{TLSConfig: &tls.Config{RootCAs: tc.roots, Time: now}}
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				c, _, err := f.DialRegionTLS(ctx, &Region{RegionID: 1, Nodes: []*Node{
					{Name: "1a", HostName: "cert.test", IPv4: "127.0.0.1", IPv6: "none", DERPPort: ns.port, CertName: tc.certName},
				}})
				if err == nil {
					c.Close()
				}
				return err
			}
			if err := dial(nil); err != nil {
				t.Fatalf("at the machine's time: %v", err)
			}
			if err := dial(expired); err == nil {
				t.Fatal("accepted a certificate that has expired at TLSConfig.Time")
			}
		})
	}
}

func TestRegionJSON(t *testing.T) {
	// A region as a DERP map serves it (field names as Tailscale writes
	// them, and one in another case, which encoding/json accepts).
	const js = `{"RegionID": 900, "RegionCode": "home", "RegionName": "Home lab",
		"Avoid": false, "Latitude": 1.5,
		"Nodes": [
			{"Name": "900a", "RegionID": 900, "HostName": "derp.example", "CertName": "sha256-raw:00ff",
			 "IPv4": "192.0.2.1", "IPv6": "none", "STUNPort": -1, "DERPPort": 8443, "CanPort80": true},
			{"Name": "900s", "RegionID": 900, "HostName": "stun.example", "STUNOnly": true, "stuntestip": "192.0.2.9"}
		]}`
	var r Region
	if err := json.Unmarshal([]byte(js), &r); err != nil {
		t.Fatal(err)
	}
	a, s := r.Nodes[0], r.Nodes[1]
	if r.RegionID != 900 || r.RegionCode != "home" || len(r.Nodes) != 2 {
		t.Fatalf("region %+v", r)
	}
	if a.Name != "900a" || a.HostName != "derp.example" || a.CertName != "sha256-raw:00ff" || a.IPv4 != "192.0.2.1" ||
		a.IPv6 != "none" || a.STUNPort != -1 || a.DERPPort != 8443 || !a.CanPort80 {
		t.Errorf("node %+v", a)
	}
	if !s.STUNOnly || s.STUNTestIP != "192.0.2.9" {
		t.Errorf("STUN node %+v", s)
	}
	for _, tt := range []struct {
		n    Node
		want string
	}{
		{Node{HostName: "derp.example"}, "https://derp.example/derp"},
		{Node{HostName: "derp.example", DERPPort: 8443}, "https://derp.example:8443/derp"},
		{Node{HostName: "2001:db8::1"}, "https://[2001:db8::1]/derp"},
		{Node{HostName: "2001:db8::1", DERPPort: 8443}, "https://[2001:db8::1]:8443/derp"},
	} {
		if got := tt.n.URL(); got != tt.want {
			t.Errorf("URL of %+v = %q, want %q", tt.n, got, tt.want)
		}
	}
}

func TestDialNode(t *testing.T) {
	s := newTestServer(t)
	// The certificate names only cert.test; the node is dialled as
	// derp.test, which DNS does not know: the IPv4 field must be used.
	ns := serveRegionNode(t, s, nil, "cert.test")
	sum := sha256.Sum256(ns.cert.Certificate[0])
	pin := "sha256-raw:" + hex.EncodeToString(sum[:])
	node := func(mod func(*Node)) *Node {
		n := &Node{Name: "1a", HostName: "derp.test", IPv4: "127.0.0.1", IPv6: "none", DERPPort: ns.port, CertName: "cert.test"}
		if mod != nil {
			mod(n)
		}
		return n
	}
	trusting := &FastStart{TLSConfig: ns.roots}
	ctx := context.Background()

	good := []struct {
		name string
		fs   *FastStart
		n    *Node
	}{
		{"CertName", trusting, node(nil)},
		// A pinned certificate must also name HostName, unless that is
		// an IP address (then no server name is sent).
		{"pin, no roots", &FastStart{}, node(func(n *Node) { n.CertName, n.HostName = pin, "cert.test" })},
		{"pin in capitals", &FastStart{}, node(func(n *Node) {
			n.CertName, n.HostName = "sha256-raw:"+strings.ToUpper(pin[len("sha256-raw:"):]), "cert.test"
		})},
		{"pin, IP address as HostName", &FastStart{}, node(func(n *Node) { n.CertName, n.HostName, n.IPv4, n.IPv6 = pin, "127.0.0.1", "", "" })},
		{"InsecureForTests", &FastStart{}, node(func(n *Node) { n.CertName, n.InsecureForTests = "", true })},
		{"IPv4 only, IPv6 not an address", trusting, node(func(n *Node) { n.IPv6 = "not-an-ip" })},
	}
	for _, tt := range good {
		t.Run(tt.name, func(t *testing.T) {
			c, hs, err := tt.fs.DialNode(ctx, tt.n, mustKey(t))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if hs.Path != FastPath || hs.KeySource != "meta-cert" || hs.ServerKey != s.PublicKey() || hs.URL != tt.n.URL() {
				t.Errorf("handshake %+v", hs)
			}
			want := tt.n.HostName
			if want == "127.0.0.1" {
				want = "" // no SNI for an IP address
			}
			if sni := ns.lastSNI(); sni != want {
				t.Errorf("server name sent %q, want %q", sni, want)
			}
			if _, ok := recvMsg[ServerInfo](t, c); !ok {
				t.Fatal("no ServerInfo")
			}
		})
	}

	bad := []struct {
		name, want string
		fs         *FastStart
		n          *Node
	}{
		{"certificate not for HostName", "derp.test", trusting, node(func(n *Node) { n.CertName = "" })},
		{"certificate not for CertName", "other.test", trusting, node(func(n *Node) { n.CertName = "other.test" })},
		{"CertName without the roots", "certificate", &FastStart{}, node(nil)},
		{"wrong pin", "not the pinned", &FastStart{}, node(func(n *Node) { n.CertName = "sha256-raw:" + strings.Repeat("ab", 32) })},
		{"pinned certificate not for HostName", "derp.test", &FastStart{}, node(func(n *Node) { n.CertName = pin })},
		{"no family", "neither IPv4", trusting, node(func(n *Node) { n.IPv4 = "none" })},
		{"STUN only", "STUN only", trusting, node(func(n *Node) { n.STUNOnly = true })},
		{"no host name", "no host name", trusting, node(func(n *Node) { n.HostName = "" })},
		{"URL in the host name", "not a host name", trusting, node(func(n *Node) { n.HostName = "evil.test/x?@derp.test" })},
		{"port in the host name", "not a host name", trusting, node(func(n *Node) { n.HostName = "derp.test:443" })},
		{"IPv6 zone in the host name", "not a host name", trusting, node(func(n *Node) { n.HostName = "fe80::1%eth0" })},
		{"control character in the host name", "not a host name", trusting, node(func(n *Node) { n.HostName = "derp\x00.test" })},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			c, _, err := tt.fs.DialNode(ctx, tt.n, mustKey(t))
			if err == nil {
				c.Close()
				t.Fatal("dialled")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q, want it to mention %q", err, tt.want)
			}
		})
	}
	if _, _, err := trusting.DialNode(ctx, nil, mustKey(t)); err == nil {
		t.Error("dialled a nil node")
	}
}

// TestDialNodeBothFamilies gives a node an IPv6 address that fails and an
// IPv4 address that works: the working one is used, and with both working
// IPv6 wins its head start. A negative head start runs both at once.
func TestDialNodeBothFamilies(t *testing.T) {
	ln6, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	ln6.Close()
	s := newTestServer(t)
	ns := serveRegionNode(t, s, nil, "derp.test")
	var mu sync.Mutex
	var dialled []string
	v4started := make(chan struct{})
	fs := &FastStart{TLSConfig: ns.roots, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		mu.Lock()
		dialled = append(dialled, network+" "+addr)
		mu.Unlock()
		if strings.HasPrefix(addr, "[::1]") {
			// The "IPv6 address" is the IPv4 listener, reached over
			// IPv4 by this dialer, so that both families can work.
			var d net.Dialer
			return d.DialContext(ctx, "tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(ns.port)))
		}
		if strings.HasPrefix(addr, "[::2]") {
			return nil, errors.New("connection refused")
		}
		if strings.HasPrefix(addr, "[100::1]") {
			<-ctx.Done() // black-holed
			return nil, ctx.Err()
		}
		if strings.HasPrefix(addr, "[100::2]") {
			// Black-holed until IPv4 has been tried: only a dial that
			// runs both at once connects.
			select {
			case <-v4started:
				return nil, errors.New("network unreachable")
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		if strings.HasPrefix(addr, "127.0.0.2") {
			close(v4started)
			addr = strings.Replace(addr, "127.0.0.2", "127.0.0.1", 1)
		}
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}}
	for _, tt := range []struct {
		name, ipv6, ipv4 string
		delay            time.Duration // IPv6's head start
		want             []string
	}{
		{"IPv6 works", "::1", "127.0.0.1", time.Hour, []string{"tcp6 [::1]:P"}},
		// IPv4 must start as soon as IPv6 fails, not after its head
		// start: with an hour of it, the dial would time out.
		{"IPv6 refused", "::2", "127.0.0.1", time.Hour, []string{"tcp6 [::2]:P", "tcp4 127.0.0.1:P"}},
		{"IPv6 black-holed", "100::1", "127.0.0.1", 200 * time.Millisecond, []string{"tcp6 [100::1]:P", "tcp4 127.0.0.1:P"}},
		// Both at once: the IPv6 attempt is still pending when IPv4
		// starts (it fails only then), so both were in flight together.
		{"both at once", "100::2", "127.0.0.2", -1, []string{"tcp4 127.0.0.2:P", "tcp6 [100::2]:P"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			fs.IPv6HeadStart = tt.delay
			mu.Lock()
			dialled = nil
			mu.Unlock()
			n := &Node{Name: "1a", HostName: "derp.test", IPv4: tt.ipv4, IPv6: tt.ipv6, DERPPort: ns.port}
			start := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, _, err := fs.DialNode(ctx, n, mustKey(t))
			if err != nil {
				t.Fatal(err)
			}
			c.Close()
			mu.Lock()
			if tt.delay < 0 {
				slices.Sort(dialled) // started together: any order
			}
			got := strings.ReplaceAll(strings.Join(dialled, ", "), strconv.Itoa(ns.port), "P")
			mu.Unlock()
			if want := strings.Join(tt.want, ", "); got != want {
				t.Errorf("dialled %s, want %s", got, want)
			}
			if tt.ipv6 == "100::1" && time.Since(start) < tt.delay {
				t.Errorf("IPv4 started before IPv6 had its %v", tt.delay)
			}
		})
	}
}

// TestReconnectingClientRegion fails over from a region's first node to
// the second, skipping a STUN-only node, and sends the first node's name
// as Ideal-Node.
func TestReconnectingClientRegion(t *testing.T) {
	a, b := newTestServer(t), newTestServer(t)
	nsA := serveRegionNode(t, a, nil, "a.test")
	hl := &headerLog{header: IdealNodeHeader, next: b}
	nsB := serveRegionNode(t, b, hl, "b.test")

	// Node A is down: its port refuses. Both certificates are pinned, so
	// no roots are needed.
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadPort := closed.Addr().(*net.TCPAddr).Port
	closed.Close()
	pinOf := func(c tls.Certificate) string {
		sum := sha256.Sum256(c.Certificate[0])
		return "sha256-raw:" + hex.EncodeToString(sum[:])
	}
	region := &Region{RegionID: 7, RegionCode: "test", Nodes: []*Node{
		{Name: "7a", HostName: "a.test", IPv4: "127.0.0.1", IPv6: "none", DERPPort: deadPort, CertName: pinOf(nsA.cert)},
		{Name: "7s", HostName: "stun.test", STUNOnly: true},
		{Name: "7b", HostName: "b.test", IPv4: "127.0.0.1", IPv6: "none", DERPPort: nsB.port, CertName: pinOf(nsB.cert)},
	}}
	var hss []Handshake
	rc := &ReconnectingClient{Region: region, PrivateKey: mustKey(t), OnConnect: func(h Handshake) { hss = append(hss, h) }}
	t.Cleanup(func() { rc.Close() })
	peer := pipeClient(t, b)
	if err := rc.Send(context.Background(), peer.PublicKey(), []byte("via 7b")); err != nil {
		t.Fatal(err)
	}
	if p, _ := recvMsg[*ReceivedPacket](t, peer); string(p.Data) != "via 7b" {
		t.Fatalf("got %q", p.Data)
	}
	if len(hss) != 1 || hss[0].URL != region.Nodes[2].URL() || hss[0].ServerKey != b.PublicKey() || hss[0].Path != FastPath {
		t.Fatalf("handshakes %+v", hss)
	}
	if got := hl.values(); len(got) != 1 || got[0] != "7a" {
		t.Errorf("Ideal-Node headers %q, want [7a]", got)
	}

	// A region with no DERP node is an error, not a hang.
	rc2 := &ReconnectingClient{Region: &Region{RegionID: 8, Nodes: []*Node{{Name: "8s", HostName: "s", STUNOnly: true}}}, PrivateKey: mustKey(t)}
	t.Cleanup(func() { rc2.Close() })
	err = rc2.Send(context.Background(), peer.PublicKey(), []byte("x"))
	if err == nil || !strings.Contains(err.Error(), "no DERP node") {
		t.Fatalf("empty region: %v", err)
	}
}

// TestDialRegionTLS connects to a region's first node that passes TLS,
// skipping a node whose certificate does not match its pin and a STUN-only
// node, and sends nothing: the connection carries one HTTP request
// afterwards, the first its server sees.
func TestDialRegionTLS(t *testing.T) {
	a, b := newTestServer(t), newTestServer(t)
	hlA, hlB := &headerLog{header: "X-Probe", next: a}, &headerLog{header: "X-Probe", next: http.HandlerFunc(ServeProbe)}
	nsA := serveRegionNode(t, a, hlA, "a.test")
	nsB := serveRegionNode(t, b, hlB, "b.test")
	pinOf := func(c tls.Certificate) string {
		sum := sha256.Sum256(c.Certificate[0])
		return "sha256-raw:" + hex.EncodeToString(sum[:])
	}
	region := &Region{RegionID: 7, RegionCode: "test", Nodes: []*Node{
		// A serves its own certificate, not the one pinned.
		{Name: "7a", HostName: "a.test", IPv4: "127.0.0.1", IPv6: "none", DERPPort: nsA.port, CertName: pinOf(nsB.cert)},
		{Name: "7s", HostName: "stun.test", STUNOnly: true},
		{Name: "7b", HostName: "b.test", IPv4: "127.0.0.1", IPv6: "none", DERPPort: nsB.port, CertName: pinOf(nsB.cert)},
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var fs FastStart
	conn, node, err := fs.DialRegionTLS(ctx, region)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if node != region.Nodes[2] {
		t.Fatalf("connected to node %q, want 7b", node.Name)
	}
	cs := conn.ConnectionState()
	if !cs.HandshakeComplete || cs.ServerName != "b.test" || cs.NegotiatedProtocol != "" {
		t.Errorf("TLS state: complete %v, server name %q, ALPN %q", cs.HandshakeComplete, cs.ServerName, cs.NegotiatedProtocol)
	}
	if k, _, ok := ParseMetaCert(cs.PeerCertificates); !ok || k != b.PublicKey() {
		t.Errorf("meta cert key %v (found %v), want %v", k.ShortString(), ok, b.PublicKey().ShortString())
	}
	if got := nsA.lastSNI(); got != "a.test" {
		t.Errorf("node 7a was not tried first (SNI %q)", got)
	}

	// Nothing was sent yet: one request now is the first B sees.
	req, _ := http.NewRequest("GET", "https://b.test/derp/latency-check", nil)
	req.Header.Set("X-Probe", "1")
	if err := req.Write(conn); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("latency check: %s", resp.Status)
	}
	if got := hlB.values(); !slices.Equal(got, []string{"1"}) {
		t.Errorf("B saw requests with X-Probe %q, want only the test's", got)
	}
	if got := hlA.values(); len(got) != 0 {
		t.Errorf("A saw requests %q", got)
	}

	// Failures name every node tried.
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadPort := dead.Addr().(*net.TCPAddr).Port
	dead.Close()
	_, _, err = fs.DialRegionTLS(ctx, &Region{RegionID: 8, Nodes: []*Node{
		{Name: "8a", HostName: "127.0.0.1", DERPPort: deadPort},
		{Name: "8b", HostName: "a.test", IPv4: "127.0.0.1", IPv6: "none", DERPPort: nsA.port, CertName: pinOf(nsB.cert)},
	}})
	if err == nil || !strings.Contains(err.Error(), `"8a"`) || !strings.Contains(err.Error(), `"8b"`) || !strings.Contains(err.Error(), "pinned") {
		t.Errorf("dead region: %v", err)
	}
	if _, _, err := fs.DialRegionTLS(ctx, &Region{RegionID: 9, Nodes: []*Node{{Name: "9s", HostName: "s", STUNOnly: true}}}); err == nil || !strings.Contains(err.Error(), "no DERP node") {
		t.Errorf("STUN-only region: %v", err)
	}
	if _, _, err := fs.DialRegionTLS(ctx, nil); err == nil {
		t.Error("dialled a nil region")
	}

	// A node that accepts TCP and never answers TLS holds the dial only
	// as long as ctx.
	mute, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer mute.Close()
	go func() {
		for {
			c, err := mute.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	sctx, scancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer scancel()
	_, _, err = fs.DialRegionTLS(sctx, &Region{RegionID: 10, Nodes: []*Node{{Name: "10a", HostName: "127.0.0.1", DERPPort: mute.Addr().(*net.TCPAddr).Port}}})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("mute node: %v, want the context's deadline", err)
	}

	// Before another node, the mute one gets only its share of ctx (half
	// of it here), and the next node is still reached.
	sctx, scancel = context.WithTimeout(ctx, 2*time.Second)
	defer scancel()
	conn, node, err = fs.DialRegionTLS(sctx, &Region{RegionID: 11, Nodes: []*Node{
		{Name: "11a", HostName: "127.0.0.1", DERPPort: mute.Addr().(*net.TCPAddr).Port},
		{Name: "11b", HostName: "b.test", IPv4: "127.0.0.1", IPv6: "none", DERPPort: nsB.port, CertName: pinOf(nsB.cert)},
	}})
	if err != nil {
		t.Fatalf("mute node first: %v", err)
	}
	conn.Close()
	if node.Name != "11b" {
		t.Errorf("connected to %q, want 11b", node.Name)
	}
}

// TestDialErrorsOneLine: when a region's nodes, or a node's two address
// families, all fail, the error names every failure on one line (as every
// error of this package holds no line break, so that a log line stays
// one), and errors.Is and errors.As still find each of them.
func TestDialErrorsOneLine(t *testing.T) {
	fail := map[string]error{
		"[::2]:443":     errors.New("a6 refused"),
		"127.0.0.2:443": errors.New("a4 refused"),
		"127.0.0.3:443": errors.New("b refused"),
		"[::4]:443":     errors.New("c6 refused"),
		"127.0.0.4:443": errors.New("c4 refused"),
	}
	fs := &FastStart{IPv6HeadStart: -1, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		if err, ok := fail[addr]; ok {
			return nil, &net.OpError{Op: "dial", Net: network, Err: err}
		}
		return nil, errors.New("unexpected dial of " + addr)
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	check := func(what string, err error, want ...error) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s: no error", what)
		}
		if strings.ContainsAny(err.Error(), "\r\n") {
			t.Errorf("%s: error holds a line break: %q", what, err)
		}
		for _, w := range want {
			if !errors.Is(err, w) {
				t.Errorf("%s: error %q is not %q", what, err, w)
			}
		}
		var oe *net.OpError
		if !errors.As(err, &oe) {
			t.Errorf("%s: errors.As finds no *net.OpError in %q", what, err)
		}
	}
	_, _, err := fs.DialNode(ctx, &Node{Name: "a", HostName: "a.test", IPv4: "127.0.0.2", IPv6: "::2", DERPPort: 443}, mustKey(t))
	check("DialNode", err, fail["[::2]:443"], fail["127.0.0.2:443"])
	_, _, err = fs.DialRegionTLS(ctx, &Region{RegionID: 1, RegionCode: "r", Nodes: []*Node{
		{Name: "a", HostName: "a.test", IPv4: "127.0.0.2", IPv6: "::2", DERPPort: 443},
		{Name: "b", HostName: "127.0.0.3", DERPPort: 443},
		{Name: "bad", HostName: "x/y"},
		{Name: "c", HostName: "c.test", IPv4: "127.0.0.4", IPv6: "::4", DERPPort: 443},
	}})
	check("DialRegionTLS", err, fail["[::2]:443"], fail["127.0.0.2:443"], fail["127.0.0.3:443"], fail["[::4]:443"], fail["127.0.0.4:443"])
	if err != nil && !strings.Contains(err.Error(), `"bad"`) {
		t.Errorf("DialRegionTLS: error %q does not name node \"bad\"", err)
	}
}

// The errors of DialNode, DialRegionTLS and a ReconnectingClient's failed
// dial of a region name each node once, however many wrappers they pass
// through: `node "a": relay: dial a.test:443: relay: node "a": …` said it
// twice.
func TestDialErrorsNameNodeOnce(t *testing.T) {
	fail := map[string]error{
		"[::2]:443":     errors.New("a6 refused"),
		"127.0.0.2:443": errors.New("a4 refused"),
		"127.0.0.3:443": errors.New("b refused"),
	}
	// IPv4 starts only when IPv6 has failed: the order is fixed.
	fs := &FastStart{IPv6HeadStart: time.Hour, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		if err, ok := fail[addr]; ok {
			return nil, &net.OpError{Op: "dial", Net: network, Err: err}
		}
		return nil, errors.New("unexpected dial of " + addr)
	}}
	nodes := []*Node{
		{Name: "a", HostName: "a.test", IPv4: "127.0.0.2", IPv6: "::2", DERPPort: 443},
		{Name: "b", HostName: "127.0.0.3", DERPPort: 443},
		{Name: "bad", HostName: "x/y"},
		{Name: "d", HostName: "d.test", IPv4: "none", IPv6: "none", DERPPort: 443},
	}
	const (
		a   = `relay: node "a": relay: dial a.test:443: dial tcp6: a6 refused; dial tcp4: a4 refused`
		b   = `relay: node "b": relay: dial 127.0.0.3:443: dial tcp: b refused`
		bad = `relay: node "bad": host name "x/y" is not a host name`
		d   = `relay: node "d": relay: dial d.test:443: relay: neither IPv4 ("none") nor IPv6 ("none") is an address to dial`
	)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i, want := range []string{a, b, bad, d} {
		_, _, err := fs.DialNode(ctx, nodes[i], mustKey(t))
		if err == nil || err.Error() != want {
			t.Errorf("DialNode(%q):\n got %v\nwant %s", nodes[i].Name, err, want)
		}
	}
	r := &Region{RegionID: 1, RegionCode: "r", Nodes: nodes}
	_, _, err := fs.DialRegionTLS(ctx, r)
	want := `relay: dial region 1 (r): ` + strings.Join([]string{a, b, bad, d}, "; ")
	if err == nil || err.Error() != want {
		t.Errorf("DialRegionTLS:\n got %v\nwant %s", err, want)
	}
	h := &recHandler{}
	rc := &ReconnectingClient{Region: r, PrivateKey: mustKey(t), Dialer: fs, Logger: slog.New(h), MinBackoff: time.Hour}
	defer rc.Close()
	if err := rc.Connect(ctx); err == nil || err.Error() != d {
		t.Errorf("ReconnectingClient.Connect:\n got %v\nwant %s (the last node's)", err, d)
	}
	var got []string
	for _, rec := range h.infoRecords() {
		rec.Attrs(func(at slog.Attr) bool {
			if at.Key == "err" {
				got = append(got, at.Value.String())
			}
			return true
		})
	}
	want = strings.Join([]string{a, b, bad, d}, "; ")
	if len(got) != 1 || got[0] != want {
		t.Errorf("ReconnectingClient's line for the failed dial: err\n got %q\nwant [%q]", got, want)
	}
}
