package interop

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"net"
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
	cert, _ := selfSignedCert(t, "derp.invalid")
	sum := sha256.Sum256(cert.Certificate[0])
	pin := "sha256-raw:" + hex.EncodeToString(sum[:])

	ours := newOurServer(t)
	ourCfg := &tls.Config{Certificates: []tls.Certificate{cert}}
	relay.AppendMetaCert(ourCfg, ours.MetaCert())
	ourURL := serveTLS(t, derpMux(ours), ourCfg)
	theirs := newTSServer(t)
	theirURL := serveTLS(t, derpMux(derpserver.Handler(theirs)), tsServerTLSConfig(cert, theirs, 0))

	region := func(serverURL string) (*tailcfg.DERPRegion, *relay.Region) {
		u, err := url.Parse(serverURL)
		if err != nil {
			t.Fatal(err)
		}
		port, _ := strconv.Atoi(u.Port())
		tr := &tailcfg.DERPRegion{RegionID: 900, RegionCode: "interop", RegionName: "Interop", Nodes: []*tailcfg.DERPNode{{
			Name: "900a", RegionID: 900, HostName: "derp.invalid", CertName: pin,
			IPv4: "127.0.0.1", IPv6: "none", DERPPort: port, STUNPort: -1,
		}}}
		js, err := json.Marshal(tr)
		if err != nil {
			t.Fatal(err)
		}
		var r relay.Region
		if err := json.Unmarshal(js, &r); err != nil {
			t.Fatal(err)
		}
		if n := r.Nodes[0]; n.HostName != "derp.invalid" || n.CertName != pin || n.IPv4 != "127.0.0.1" || n.IPv6 != "none" || n.DERPPort != port {
			t.Fatalf("decoded node %+v from %s", n, js)
		}
		return tr, &r
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

			// Tailscale's region client.
			priv := key.NewNode()
			tc2 := derphttp.NewRegionClient(priv, t.Logf, netmon.NewStatic(), func() *tailcfg.DERPRegion { return tr })
			t.Cleanup(func() { tc2.Close() })
			ctx, cancel := context.WithTimeout(context.Background(), recvTimeout)
			defer cancel()
			if err := tc2.Connect(ctx); err != nil {
				t.Fatalf("tailscale region client: %v", err)
			}
			ts := &tsPeer{name: "tailscale region client", pub: priv.Public(), send: tc2.Send, ping: tc2.SendPing,
				recv: tc2.Recv, close: func() { tc2.Close() }, serverKey: tc2.ServerPublicKey}
			tsWaitServerInfo(t, ts)

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
	cert, _ := selfSignedCert(t, "derp.invalid")
	sum := sha256.Sum256(cert.Certificate[0])
	pin := "sha256-raw:" + hex.EncodeToString(sum[:])
	s := newOurServer(t)
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
	relay.AppendMetaCert(cfg, s.MetaCert())
	u, err := url.Parse(serveTLS(t, derpMux(s), cfg))
	if err != nil {
		t.Fatal(err)
	}
	port, _ := strconv.Atoi(u.Port())
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadPort := dead.Addr().(*net.TCPAddr).Port
	dead.Close()
	node := func(name string, port int) *tailcfg.DERPNode {
		return &tailcfg.DERPNode{Name: name, RegionID: 901, HostName: "derp.invalid", CertName: pin,
			IPv4: "127.0.0.1", IPv6: "none", DERPPort: port}
	}
	tr := &tailcfg.DERPRegion{RegionID: 901, RegionCode: "fo", Nodes: []*tailcfg.DERPNode{node("901a", deadPort), node("901b", port)}}
	js, err := json.Marshal(tr)
	if err != nil {
		t.Fatal(err)
	}
	var r relay.Region
	if err := json.Unmarshal(js, &r); err != nil {
		t.Fatal(err)
	}

	priv := key.NewNode()
	tc := derphttp.NewRegionClient(priv, t.Logf, netmon.NewStatic(), func() *tailcfg.DERPRegion { return tr })
	t.Cleanup(func() { tc.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 2*recvTimeout)
	defer cancel()
	if err := tc.Connect(ctx); err != nil {
		t.Fatalf("tailscale region client: %v", err)
	}
	ts := &tsPeer{name: "tailscale region client", pub: priv.Public(), send: tc.Send, ping: tc.SendPing,
		recv: tc.Recv, close: func() { tc.Close() }, serverKey: tc.ServerPublicKey}
	tsWaitServerInfo(t, ts)

	rcPriv := newPriv(t)
	rc := &relay.ReconnectingClient{Region: &r, PrivateKey: rcPriv}
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
