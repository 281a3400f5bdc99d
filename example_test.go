package relay_test

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"log"
	"math/big"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fastderp/relay"
)

// A relay server on net/http with TLS and the meta cert, and two clients
// that connect with fast start and relay packets through it.
func Example() {
	// The server: its DERP key, a TLS certificate (here self-signed; in
	// production from a CA or autocert), and the meta cert appended.
	serverKey, _ := relay.GeneratePrivateKey()
	srv := relay.NewServer(serverKey)
	defer srv.Close()

	cert, roots := exampleCert()
	tlsConfig := &tls.Config{Certificates: []tls.Certificate{cert}}
	relay.AppendMetaCert(tlsConfig, srv.MetaCert()) // also keeps ALPN on HTTP/1.1

	mux := http.NewServeMux()
	mux.Handle("/derp", srv)
	mux.HandleFunc("/derp/probe", relay.ServeProbe)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go hs.Serve(tls.NewListener(ln, tlsConfig))
	defer hs.Close()
	url := "https://" + ln.Addr().String() + "/derp"

	// Two clients. FastStart finds the meta cert in the TLS 1.3 handshake
	// and sends its login with the HTTP request: 2 round trips, not 3.
	dialer := &relay.FastStart{TLSConfig: &tls.Config{RootCAs: roots}}
	ctx := context.Background()
	connect := func(name string) *relay.Client {
		priv, _ := relay.GeneratePrivateKey()
		c, h, err := dialer.Dial(ctx, url, priv)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Printf("%s: %s path, server key from %s\n", name, h.Path, h.KeySource)
		return c
	}
	alice, bob := connect("alice"), connect("bob")
	defer alice.Close()
	defer bob.Close()

	// On the fast path Dial returns before the server has answered. The
	// server's ServerInfo, the first message, says the login is done and
	// the client is reachable.
	for _, c := range []*relay.Client{alice, bob} {
		m, err := c.Recv()
		if err != nil {
			log.Fatal(err)
		}
		fmt.Printf("logged in: %T, protocol version %d\n", m, m.(relay.ServerInfo).Version)
	}

	if err := alice.Send(bob.PublicKey(), []byte("hello bob")); err != nil {
		log.Fatal(err)
	}
	for {
		m, err := bob.Recv()
		if err != nil {
			log.Fatal(err)
		}
		if p, ok := m.(*relay.ReceivedPacket); ok {
			fmt.Printf("bob got %q from alice: %v\n", p.Data, p.Source == alice.PublicKey())
			return
		}
	}
	// Output:
	// alice: fast path, server key from meta-cert
	// bob: fast path, server key from meta-cert
	// logged in: relay.ServerInfo, protocol version 2
	// logged in: relay.ServerInfo, protocol version 2
	// bob got "hello bob" from alice: true
}

// DERP runs over any net.Conn: here an in-memory pipe, as in tests or custom
// transports.
func ExampleNewClient() {
	serverKey, _ := relay.GeneratePrivateKey()
	srv := relay.NewServer(serverKey)
	defer srv.Close()

	clientSide, serverSide := net.Pipe()
	go srv.Accept(context.Background(), serverSide, nil, "127.0.0.1:1")

	priv, _ := relay.GeneratePrivateKey()
	c, err := relay.NewClient(priv, clientSide,
		bufio.NewReadWriter(bufio.NewReader(clientSide), bufio.NewWriter(clientSide)))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	fmt.Println("server key matches:", c.ServerPublicKey() == srv.PublicKey())

	c.Send(c.PublicKey(), []byte("note to self"))
	for {
		m, err := c.Recv()
		if err != nil {
			log.Fatal(err)
		}
		if p, ok := m.(*relay.ReceivedPacket); ok {
			fmt.Printf("got %q\n", p.Data)
			return
		}
	}
	// Output:
	// server key matches: true
	// got "note to self"
}

// A ReconnectingClient connects on first use, survives reconnects, remembers
// the server's key and measures round trips.
func ExampleReconnectingClient() {
	serverKey, _ := relay.GeneratePrivateKey()
	srv := relay.NewServer(serverKey)
	defer srv.Close()
	var current atomic.Pointer[relay.Server] // swapped below to simulate a restart
	current.Store(srv)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	hs := &http.Server{ReadHeaderTimeout: 10 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { current.Load().ServeHTTP(w, r) })}
	go hs.Serve(ln)
	defer hs.Close()

	priv, _ := relay.GeneratePrivateKey()
	rc := &relay.ReconnectingClient{
		URL:        "http://" + ln.Addr().String() + "/derp",
		PrivateKey: priv,
		OnConnect: func(h relay.Handshake) {
			fmt.Printf("connected: %s path (key from %s)\n", h.Path, h.KeySource)
		},
	}
	defer rc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// A Recv loop delivers packets and Pongs, reconnecting as needed.
	events := make(chan string, 4)
	go func() {
		for {
			m, err := rc.Recv(ctx)
			if err != nil {
				return
			}
			switch m := m.(type) {
			case relay.ServerInfo: // starts every connection
				events <- "logged in"
			case *relay.ReceivedPacket:
				events <- "received " + string(m.Data)
			}
		}
	}()
	if err := rc.Send(ctx, priv.Public(), []byte("note to self")); err != nil {
		log.Fatal(err)
	}
	fmt.Println(<-events)
	fmt.Println(<-events)
	if _, err := rc.Ping(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println("ping answered")

	// Restart the server. Clients are told ServerRestarting and come back
	// by themselves, now with fast start even over plain HTTP, because
	// the client remembers the server's key.
	srv2 := relay.NewServer(serverKey)
	defer srv2.Close()
	current.Store(srv2)
	srv.Close()
	fmt.Println(<-events)
	if err := rc.Send(ctx, priv.Public(), []byte("again")); err != nil {
		log.Fatal(err)
	}
	fmt.Println(<-events)

	// After a network change (a new route or local address), the old path
	// may be silently dead: Reconnect makes the client dial again at once.
	rc.Reconnect()
	fmt.Println(<-events)
	// Output:
	// connected: upgrade path (key from http-header)
	// logged in
	// received note to self
	// ping answered
	// connected: fast path (key from configured)
	// logged in
	// received again
	// connected: fast path (key from configured)
	// logged in
}

// Two servers of one region share a mesh key and watch each other: a client
// on one reaches a client on the other, forwarded one hop.
func ExampleWithMeshPeers() {
	const meshKey = "5ec7e7a1c0ffee0ddba11f00d5eed0000000000000000000000000000000c0de"
	// Listen first, so every server can be given the whole region's URLs
	// (each ignores its own).
	var lns []net.Listener
	var urls []string
	for range 2 {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		lns = append(lns, ln)
		urls = append(urls, "http://"+ln.Addr().String()+"/derp")
	}
	var servers []*relay.Server
	for _, ln := range lns {
		priv, _ := relay.GeneratePrivateKey()
		srv := relay.NewServer(priv, relay.WithMeshKey(meshKey), relay.WithMeshPeers(urls...))
		defer srv.Close()
		hs := &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second}
		go hs.Serve(ln)
		defer hs.Close()
		servers = append(servers, srv)
	}

	ctx := context.Background()
	connect := func(url string) *relay.Client {
		priv, _ := relay.GeneratePrivateKey()
		c, _, err := (&relay.FastStart{}).Dial(ctx, url, priv)
		if err != nil {
			log.Fatal(err)
		}
		if _, err := c.Recv(); err != nil { // ServerInfo: logged in
			log.Fatal(err)
		}
		return c
	}
	alice, bob := connect(urls[0]), connect(urls[1])
	defer alice.Close()
	defer bob.Close()

	// Wait until alice's server has learned, from its watch of the other
	// server, where bob is.
	for {
		if peer, ok := servers[0].MeshPeerFor(bob.PublicKey()); ok {
			fmt.Println("bob is reachable via the other server:", peer == urls[1])
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	alice.Send(bob.PublicKey(), []byte("across the region"))
	for {
		m, err := bob.Recv()
		if err != nil {
			log.Fatal(err)
		}
		if p, ok := m.(*relay.ReceivedPacket); ok {
			fmt.Printf("bob got %q from alice: %v\n", p.Data, p.Source == alice.PublicKey())
			return
		}
	}
	// Output:
	// bob is reachable via the other server: true
	// bob got "across the region" from alice: true
}

// exampleCert returns a self-signed certificate for 127.0.0.1 and a pool
// that trusts it.
func exampleCert() (tls.Certificate, *x509.CertPool) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "127.0.0.1"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	leaf, _ := x509.ParseCertificate(der)
	roots := x509.NewCertPool()
	roots.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, roots
}

// TestQuickStart is the README's first command: it shows, step by step, a
// server with TLS and the meta cert, and two clients relaying packets
// through it with fast start.
func TestQuickStart(t *testing.T) {
	ts := relay.StartTestServer(t)
	t.Logf("server %s listening at %s (TLS 1.3, meta cert in the chain)", ts.Server.PublicKey().ShortString(), ts.URL)

	ctx := context.Background()
	dialer := &relay.FastStart{TLSConfig: ts.TLSConfig}
	connect := func(name string) *relay.Client {
		priv, _ := relay.GeneratePrivateKey()
		c, h, err := dialer.Dial(ctx, ts.URL, priv)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if h.Path != relay.FastPath {
			t.Fatalf("%s: %s path (%s), want the fast path", name, h.Path, h.Reason)
		}
		t.Logf("%s %s: connected on the %s path (server key from the %s, %s)",
			name, c.PublicKey().ShortString(), h.Path, h.KeySource, tls.VersionName(h.TLSVersion))
		if m, err := c.Recv(); err != nil {
			t.Fatal(err)
		} else if info, ok := m.(relay.ServerInfo); ok {
			t.Logf("%s: logged in (ServerInfo, protocol version %d)", name, info.Version)
		}
		return c
	}
	alice, bob := connect("alice"), connect("bob")
	for i, pair := range [][2]*relay.Client{{alice, bob}, {bob, alice}, {alice, bob}} {
		from, to := pair[0], pair[1]
		msg := fmt.Sprintf("packet %d from %s", i+1, from.PublicKey().ShortString())
		if err := from.Send(to.PublicKey(), []byte(msg)); err != nil {
			t.Fatal(err)
		}
		for {
			m, err := to.Recv()
			if err != nil {
				t.Fatal(err)
			}
			if p, ok := m.(*relay.ReceivedPacket); ok {
				if string(p.Data) != msg || p.Source != from.PublicKey() {
					t.Fatalf("got %q from %s", p.Data, p.Source.ShortString())
				}
				t.Logf("%s received %q", to.PublicKey().ShortString(), p.Data)
				break
			}
		}
	}
	// The server counts a packet as sent once its write returns, which may
	// be just after the receiver has read it.
	st := ts.Server.Stats()
	for deadline := time.Now().Add(5 * time.Second); st.PacketsSent < 3 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
		st = ts.Server.Stats()
	}
	var dropped int64
	for _, n := range st.PacketsDropped {
		dropped += n
	}
	t.Logf("server stats: %d fast-start logins, %d packets relayed, %d dropped",
		st.FastStartLogins, st.PacketsSent, dropped)
	if st.FastStartLogins != 2 || st.PacketsSent != 3 {
		t.Fatalf("stats %+v", st)
	}
}

// FastStart can carry DERP over WebSocket, as browsers must, and tunnel
// through an HTTP CONNECT proxy; here a WebSocket client and a fast-start
// client relay through the same server.
func ExampleFastStart_webSocket() {
	serverKey, _ := relay.GeneratePrivateKey()
	srv := relay.NewServer(serverKey)
	defer srv.Close()
	cert, roots := exampleCert()
	tlsConfig := &tls.Config{Certificates: []tls.Certificate{cert}}
	relay.AppendMetaCert(tlsConfig, srv.MetaCert())
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	hs := &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second}
	go hs.Serve(tls.NewListener(ln, tlsConfig))
	defer hs.Close()
	url := "https://" + ln.Addr().String() + "/derp"

	ctx := context.Background()
	connect := func(d *relay.FastStart) *relay.Client {
		priv, _ := relay.GeneratePrivateKey()
		c, h, err := d.Dial(ctx, url, priv)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Printf("%s path (%s)\n", h.Path, h.Reason)
		if _, err := c.Recv(); err != nil { // ServerInfo: logged in
			log.Fatal(err)
		}
		return c
	}
	ws := connect(&relay.FastStart{
		TLSConfig: &tls.Config{RootCAs: roots},
		WebSocket: true,
		// Proxy: http.ProxyFromEnvironment would tunnel through
		// HTTPS_PROXY; it never proxies 127.0.0.1.
		Proxy: http.ProxyFromEnvironment,
	})
	defer ws.Close()
	fast := connect(&relay.FastStart{TLSConfig: &tls.Config{RootCAs: roots}})
	defer fast.Close()

	ws.Send(fast.PublicKey(), []byte("from a browser, say"))
	for {
		m, err := fast.Recv()
		if err != nil {
			log.Fatal(err)
		}
		if p, ok := m.(*relay.ReceivedPacket); ok {
			fmt.Printf("%q, over WebSocket: %v\n", p.Data, p.Source == ws.PublicKey())
			break
		}
	}
	fmt.Println("WebSocket sessions:", srv.Stats().WebSocketAccepts)
	// Output:
	// upgrade path (WebSocket transport)
	// fast path ()
	// "from a browser, say", over WebSocket: true
	// WebSocket sessions: 1
}

// An operator's view of a running server: every session with its traffic,
// a self-check for a health endpoint, and ending a client's sessions.
func ExampleServer_Sessions() {
	serverKey, _ := relay.GeneratePrivateKey()
	srv := relay.NewServer(serverKey)
	defer srv.Close()

	connect := func(app string) *relay.Client {
		clientSide, serverSide := net.Pipe()
		go srv.Accept(context.Background(), serverSide, nil, "192.0.2.7:41641")
		priv, _ := relay.GeneratePrivateKey()
		c, err := relay.NewClient(priv, clientSide, nil, relay.AppName(app))
		if err != nil {
			log.Fatal(err)
		}
		// ServerInfo comes once the server has registered the client:
		// packets sent to it before then would be dropped.
		if _, err := c.Recv(); err != nil {
			log.Fatal(err)
		}
		return c
	}
	alice, bob := connect("alice"), connect("bob")
	defer alice.Close()
	defer bob.Close()
	alice.Send(bob.PublicKey(), []byte("hello"))
	for {
		m, err := bob.Recv()
		if err != nil {
			log.Fatal(err)
		}
		if _, ok := m.(*relay.ReceivedPacket); ok {
			break
		}
	}

	for si := range srv.Sessions() { // in login order
		fmt.Printf("%s from %v: sent %d packets (%d bytes) through the relay\n",
			si.Info.AppName, si.RemoteAddr, si.PacketsReceived, si.BytesReceived)
	}
	fmt.Println("consistent:", srv.ConsistencyCheck() == nil)
	fmt.Println("closed:", srv.ClosePeer(bob.PublicKey()))
	// Output:
	// alice from 192.0.2.7:41641: sent 1 packets (5 bytes) through the relay
	// bob from 192.0.2.7:41641: sent 0 packets (0 bytes) through the relay
	// consistent: true
	// closed: 1
}

// Measuring a region's HTTPS latency, as Tailscale's netcheck does: TLS to
// the first node that answers, then one request for /derp/latency-check over
// that connection through net/http. No DERP login happens.
func ExampleFastStart_DialRegionTLS() {
	// A server whose first node is down and whose second answers.
	serverKey, _ := relay.GeneratePrivateKey()
	srv := relay.NewServer(serverKey)
	defer srv.Close()
	cert, roots := exampleCert()
	tlsConfig := &tls.Config{Certificates: []tls.Certificate{cert}}
	relay.AppendMetaCert(tlsConfig, srv.MetaCert())
	mux := http.NewServeMux()
	mux.Handle("/derp", srv)
	mux.HandleFunc("/derp/latency-check", relay.ServeProbe)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go hs.Serve(tls.NewListener(ln, tlsConfig))
	defer hs.Close()
	down, _ := net.Listen("tcp", "127.0.0.1:0")
	down.Close()

	region := &relay.Region{RegionID: 1, RegionCode: "lab", Nodes: []*relay.Node{
		{Name: "1a", HostName: "127.0.0.1", DERPPort: down.Addr().(*net.TCPAddr).Port},
		{Name: "1b", HostName: "127.0.0.1", DERPPort: ln.Addr().(*net.TCPAddr).Port},
	}}
	dialer := &relay.FastStart{TLSConfig: &tls.Config{RootCAs: roots}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, node, err := dialer.DialRegionTLS(ctx, region)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()

	// The connection is already through TLS: hand it to net/http once.
	handed := false
	client := &http.Client{Transport: &http.Transport{
		DialTLSContext: func(context.Context, string, string) (net.Conn, error) {
			if handed {
				return nil, errors.New("one connection only")
			}
			handed = true
			return conn, nil
		},
	}}
	start := time.Now()
	resp, err := client.Head("https://" + node.HostName + "/derp/latency-check")
	if err != nil {
		log.Fatal(err)
	}
	resp.Body.Close()
	latency := time.Since(start)
	fmt.Printf("node %s answered %s in %v\n", node.Name, resp.Status, latency > 0)
	// Output: node 1b answered 200 OK in true
}
