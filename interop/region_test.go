package interop

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"testing"

	"tailscale.com/derp/derphttp"
	"tailscale.com/derp/derpserver"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/fastderp/relay"
)

// TestDERPMapRegion describes each server by a region of a Tailscale DERP
// map (tailcfg.DERPRegion, encoded to JSON and decoded into relay.Region):
// a host name that DNS cannot know (.invalid), the IPv4 address to use
// instead, IPv6 disabled, and the self-signed certificate pinned with
// sha256-raw. Our
// ReconnectingClient and FastStart.DialNode, and Tailscale's region client,
// read the same region and reach our server and Tailscale's over TLS, on
// the fast path, and relay between each other.
func TestDERPMapRegion(t *testing.T) {
	checkNoLeaks(t)
	cert, pin := pinnedCert(t)
	ours, ourURL := serveOursTLS(t, cert)
	theirs := newTSServer(t)
	theirURL := serveTLS(t, derpMux(derpserver.Handler(theirs)), tsServerTLSConfig(cert, theirs, 0))

	region := func(serverURL string) (*tailcfg.DERPRegion, *relay.Region) {
		port := portOf(t, serverURL)
		tr := &tailcfg.DERPRegion{RegionID: 900, RegionCode: "interop", RegionName: "Interop",
			Nodes: []*tailcfg.DERPNode{regionNode("900a", pin, port)}}
		r := decodeRegion(t, tr)
		if n := r.Nodes[0]; n.Name != "900a" || n.HostName != "derp.invalid" || n.CertName != pin || n.IPv4 != "127.0.0.1" ||
			n.IPv6 != "none" || n.DERPPort != port || n.STUNPort != -1 || r.RegionCode != "interop" {
			t.Fatalf("decoded region %+v, node %+v", r, n)
		}
		return tr, r
	}

	for _, tc := range []struct {
		name, url string
		key       relay.PublicKey
	}{
		{"our server", ourURL, ours.PublicKey()},
		{"tailscale server", theirURL, relayKey(theirs.PublicKey())},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr, r := region(tc.url)

			ts := dialTSRegion(t, tr)
			ctx, cancel := context.WithTimeout(context.Background(), recvTimeout)
			defer cancel()

			// Ours: DialNode once, and a ReconnectingClient on the region.
			dnPriv := newPriv(t)
			c, hs, err := (&relay.FastStart{}).DialNode(ctx, r.Nodes[0], dnPriv)
			if err != nil {
				t.Fatalf("DialNode: %v", err)
			}
			t.Cleanup(func() { c.Close() })
			if hs.Path != relay.FastPath || hs.KeySource != "meta-cert" || hs.ServerKey != tc.key {
				t.Errorf("DialNode handshake %+v", hs)
			}
			dn := &ourPeer{name: "ours DialNode", c: c, pub: dnPriv.Public()}
			waitServerInfo(t, dn)
			exchange(t, ts, dn)

			var rhs []relay.Handshake
			rcPriv := newPriv(t)
			rc := &relay.ReconnectingClient{Region: r, PrivateKey: rcPriv, OnConnect: func(h relay.Handshake) { rhs = append(rhs, h) }}
			t.Cleanup(func() { rc.Close() })
			if err := rc.Send(ctx, ts.relayPub(), payload("region")); err != nil {
				t.Fatal(err)
			}
			if p := recvTSPacket(t, ts); string(p.Data) != string(payload("region")) || relayKey(p.Source) != rcPriv.Public() {
				t.Errorf("tailscale client got %q from %v", p.Data, p.Source)
			}
			if len(rhs) != 1 || rhs[0].Path != relay.FastPath || rhs[0].ServerKey != tc.key {
				t.Errorf("ReconnectingClient handshakes %+v", rhs)
			}
		})
	}
}

// TestDERPMapRegionFailover gives the region a first node that refuses
// connections: Tailscale's region client and our ReconnectingClient both
// move on to our server, the second node, and tell it with Ideal-Node that
// they are not on their ideal node, which our server records.
func TestDERPMapRegionFailover(t *testing.T) {
	checkNoLeaks(t)
	cert, pin := pinnedCert(t)
	s, sURL := serveOursTLS(t, cert)
	port := portOf(t, sURL)
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadPort := dead.Addr().(*net.TCPAddr).Port
	dead.Close()
	tr := &tailcfg.DERPRegion{RegionID: 900, RegionCode: "fo",
		Nodes: []*tailcfg.DERPNode{regionNode("900a", pin, deadPort), regionNode("900b", pin, port)}}
	ts := dialTSRegion(t, tr)

	ctx, cancel := context.WithTimeout(context.Background(), 2*recvTimeout)
	defer cancel()
	rcPriv := newPriv(t)
	rc := &relay.ReconnectingClient{Region: decodeRegion(t, tr), PrivateKey: rcPriv}
	t.Cleanup(func() { rc.Close() })
	if err := rc.Send(ctx, ts.relayPub(), payload("failed over")); err != nil {
		t.Fatal(err)
	}
	if p := recvTSPacket(t, ts); string(p.Data) != string(payload("failed over")) {
		t.Errorf("tailscale client got %q", p.Data)
	}

	notIdeal := map[relay.PublicKey]bool{}
	for si := range s.Sessions() {
		notIdeal[si.Key] = si.NotIdeal
	}
	if len(notIdeal) != 2 || !notIdeal[ts.relayPub()] || !notIdeal[rcPriv.Public()] {
		t.Errorf("not-ideal flags by session: %v (tailscale %v, ours %v)", notIdeal, ts.relayPub().ShortString(), rcPriv.Public().ShortString())
	}
	if n := s.Stats().CurrentNotIdealConns; n != 2 {
		t.Errorf("CurrentNotIdealConns = %d, want 2", n)
	}
}

// TestDialRegionTLS is netcheck's HTTPS latency probe in both directions:
// our FastStart.DialRegionTLS and Tailscale's netcheck client
// (derphttp.NewNetcheckClient) read the same DERP-map region, whose first
// node is down, connect to its second node, our server or Tailscale's, with
// TLS only, find the server's meta cert in the chain, and send one request
// for /derp/latency-check over the connection.
func TestDialRegionTLS(t *testing.T) {
	checkNoLeaks(t)
	cert, pin := pinnedCert(t)
	ours := newOurServer(t)
	ourCfg := &tls.Config{Certificates: []tls.Certificate{cert}}
	relay.AppendMetaCert(ourCfg, ours.MetaCert())
	ourMux := derpMux(ours)
	ourMux.HandleFunc("/derp/latency-check", relay.ServeProbe)
	ourURL := serveTLS(t, ourMux, ourCfg)
	theirs := newTSServer(t)
	theirMux := derpMux(derpserver.Handler(theirs))
	theirMux.HandleFunc("/derp/latency-check", derpserver.ProbeHandler)
	theirURL := serveTLS(t, theirMux, tsServerTLSConfig(cert, theirs, 0))
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadPort := dead.Addr().(*net.TCPAddr).Port
	dead.Close()

	// probe sends one latency check over conn.
	probe := func(t *testing.T, conn net.Conn) {
		t.Helper()
		req, _ := http.NewRequest("HEAD", "https://derp.invalid/derp/latency-check", nil)
		if err := req.Write(conn); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(conn), req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("latency check: %s", resp.Status)
		}
	}
	for _, tc := range []struct {
		name, url string
		key       relay.PublicKey
	}{
		{"our server", ourURL, ours.PublicKey()},
		{"tailscale server", theirURL, relayKey(theirs.PublicKey())},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := &tailcfg.DERPRegion{RegionID: 900, RegionCode: "nc",
				Nodes: []*tailcfg.DERPNode{regionNode("900a", pin, deadPort), regionNode("900b", pin, portOf(t, tc.url))}}
			ctx, cancel := context.WithTimeout(context.Background(), 2*recvTimeout)
			defer cancel()

			conn, node, err := (&relay.FastStart{}).DialRegionTLS(ctx, decodeRegion(t, tr))
			if err != nil {
				t.Fatalf("our DialRegionTLS: %v", err)
			}
			defer conn.Close()
			if k, _, ok := relay.ParseMetaCert(conn.ConnectionState().PeerCertificates); node.Name != "900b" || !ok || k != tc.key {
				t.Errorf("ours: node %q, meta cert key %v (found %v), want 900b and %v", node.Name, k.ShortString(), ok, tc.key.ShortString())
			}
			probe(t, conn)

			nc := derphttp.NewNetcheckClient(t.Logf, netmon.NewStatic())
			tconn, closer, tnode, err := nc.DialRegionTLS(ctx, tr)
			if err != nil {
				t.Fatalf("tailscale DialRegionTLS: %v", err)
			}
			defer closer.Close()
			if k, _, ok := relay.ParseMetaCert(tconn.ConnectionState().PeerCertificates); tnode.Name != "900b" || !ok || k != tc.key {
				t.Errorf("tailscale: node %q, meta cert key %v (found %v), want 900b and %v", tnode.Name, k.ShortString(), ok, tc.key.ShortString())
			}
			probe(t, tconn)
		})
	}
}

// pinnedCert returns a self-signed certificate for derp.invalid (among
// others) and its sha256-raw pin, as a DERP map's CertName gives it.
func pinnedCert(t *testing.T) (tls.Certificate, string) {
	t.Helper()
	cert, _ := selfSignedCert(t, "derp.invalid")
	sum := sha256.Sum256(cert.Certificate[0])
	return cert, "sha256-raw:" + hex.EncodeToString(sum[:])
}

// regionNode is a node of region 900 at derp.invalid (which DNS cannot
// resolve) reached at 127.0.0.1:port, IPv6 disabled, with the pinned
// certificate.
func regionNode(name, pin string, port int) *tailcfg.DERPNode {
	return &tailcfg.DERPNode{Name: name, RegionID: 900, HostName: "derp.invalid", CertName: pin,
		IPv4: "127.0.0.1", IPv6: "none", DERPPort: port, STUNPort: -1}
}

// decodeRegion encodes a Tailscale DERP region to JSON and decodes it into
// ours.
func decodeRegion(t *testing.T, tr *tailcfg.DERPRegion) *relay.Region {
	t.Helper()
	js, err := json.Marshal(tr)
	if err != nil {
		t.Fatal(err)
	}
	var r relay.Region
	if err := json.Unmarshal(js, &r); err != nil {
		t.Fatal(err)
	}
	return &r
}

// dialTSRegion connects Tailscale's region client to tr and waits for its
// ServerInfo.
func dialTSRegion(t *testing.T, tr *tailcfg.DERPRegion) *tsPeer {
	t.Helper()
	priv := key.NewNode()
	c := derphttp.NewRegionClient(priv, t.Logf, netmon.NewStatic(), func() *tailcfg.DERPRegion { return tr })
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 2*recvTimeout)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		t.Fatalf("tailscale region client: %v", err)
	}
	p := &tsPeer{name: "tailscale region client", pub: priv.Public(), send: c.Send, ping: c.SendPing,
		recv: c.Recv, close: func() { c.Close() }, serverKey: c.ServerPublicKey}
	tsWaitServerInfo(t, p)
	return p
}

// portOf returns the port of a server URL.
func portOf(t *testing.T, serverURL string) int {
	t.Helper()
	u, err := url.Parse(serverURL)
	if err != nil {
		t.Fatal(err)
	}
	port, err := strconv.Atoi(u.Port())
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// serveOursTLS serves a new server of ours over TLS with cert and its meta
// cert, and returns it and its URL.
func serveOursTLS(t *testing.T, cert tls.Certificate) (*relay.Server, string) {
	t.Helper()
	s := newOurServer(t)
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
	relay.AppendMetaCert(cfg, s.MetaCert())
	return s, serveTLS(t, derpMux(s), cfg)
}
