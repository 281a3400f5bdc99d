//go:build ts_omit_netstack && ts_omit_gro && !ts102

package interop

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tailscale/wireguard-go/device"
	"github.com/tailscale/wireguard-go/tun/tuntest"
	"tailscale.com/health"
	"tailscale.com/net/netmon"
	"tailscale.com/net/packet"
	"tailscale.com/net/tstun"
	"tailscale.com/tailcfg"
	"tailscale.com/types/ipproto"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
	"tailscale.com/util/eventbus"
	"tailscale.com/util/usermetric"
	"tailscale.com/wgengine/filter"
	"tailscale.com/wgengine/magicsock"
	"tailscale.com/wgengine/wgcfg"
	"tailscale.com/wgengine/wglog"

	"github.com/fastderp/relay"
)

// This file runs real Tailscale data planes (magicsock, with its DERP
// client, under wireguard-go) through our relay.Server, the only DERP
// server in their DERP map, over UDP sockets that lose every packet so that
// nothing can go direct.
//
// It needs the build tags ts_omit_netstack and ts_omit_gro: without them
// magicsock's packages import gvisor.dev/gvisor, which the module proxy
// refuses at the version tailscale.com v1.104.5 requires (so tsnet, which
// needs gvisor's netstack, cannot be built here at all). With the tag
// ts_debug_websockets too, Tailscale's DERP client can dial WebSocket,
// which the websocket case of TestTailscaleNodesThroughOurServer needs (it
// is skipped without it); the tag changes nothing else: the client dials
// WebSocket only when TS_DEBUG_DERP_WS_CLIENT is set, as that case does.
// Run it with
//
//	go test -race -tags ts_omit_netstack,ts_omit_gro,ts_debug_websockets -run TestTailscaleNodes .
//
// Set RELAY_INTEROP_NODE_LOG=1 to see the nodes' logs.

// nodeTransferBytes is how much each node sends the other.
const nodeTransferBytes = 1 << 20

// nodeChunk is the payload of each UDP packet the nodes exchange: a 4-byte
// sequence number, then data.
const nodeChunk = 1024

// tsNode is one Tailscale data plane: magicsock (the DERP client and
// WireGuard's transport), a wireguard-go device, and Tailscale's TUN wrapper
// over an in-memory TUN whose packets the test writes and reads.
type tsNode struct {
	name   string
	priv   key.NodePrivate
	ip     netip.Addr
	bus    *eventbus.Bus
	netMon *netmon.Monitor
	conn   *magicsock.Conn
	tun    *tuntest.ChannelTUN
	tsTun  *tstun.Wrapper
	dev    *device.Device
	// resendAfter is how long nodeTransfer waits for a window of packets
	// from this node before it sends the missing ones again: a second
	// if zero.
	resendAfter time.Duration
	// sendWindow is how many packets nodeTransfer sends from this node
	// before it waits for them: 32 if zero.
	sendWindow int
}

func newTSNode(t *testing.T, name string, ip netip.Addr, derpMap *tailcfg.DERPMap) *tsNode {
	t.Helper()
	logf := nodeLogf(t, name)
	n := &tsNode{name: name, priv: key.NewNode(), ip: ip, bus: eventbus.New()}
	var err error
	n.netMon, err = netmon.New(n.bus, logf)
	if err != nil {
		t.Fatalf("%s: netmon.New: %v", name, err)
	}
	var reg usermetric.Registry
	n.conn, err = magicsock.NewConn(magicsock.Options{
		NetMon:            n.netMon,
		EventBus:          n.bus,
		Metrics:           &reg,
		Logf:              logf,
		HealthTracker:     health.NewTracker(n.bus),
		DisablePortMapper: true,
		// UDP loses every packet, so the nodes reach each other only
		// through DERP. (TS_DEBUG_ALWAYS_USE_DERP would do it too, but
		// with it magicsock's Close can leave wireguard-go's receive
		// calls blocked forever: a rebind replaces its blocking dummy
		// socket without closing it.)
		TestOnlyPacketListener: udpBlackHole{},
	})
	if err != nil {
		t.Fatalf("%s: magicsock.NewConn: %v", name, err)
	}
	n.conn.SetDERPMap(derpMap)
	if err := n.conn.SetPrivateKey(n.priv); err != nil {
		t.Fatalf("%s: SetPrivateKey: %v", name, err)
	}
	n.tun = tuntest.NewChannelTUN()
	n.tsTun = tstun.Wrap(logf, n.tun.TUN(), &reg, n.bus)
	n.tsTun.SetFilter(filter.NewAllowAllForTest(logf))
	n.tsTun.Start()
	n.dev = wgcfg.NewDevice(n.tsTun, n.conn.Bind(), wglog.NewLogger(logf, nil).DeviceLogger)
	n.dev.Up()
	t.Cleanup(n.close)
	return n
}

// close closes the node as wgengine does: magicsock first, which ends the
// receive calls that the wireguard-go device's Close waits for.
func (n *tsNode) close() {
	n.conn.Close()
	n.netMon.Close()
	n.dev.Close()
	n.bus.Close()
}

func (n *tsNode) pub() key.NodePublic { return n.priv.Public() }

// udpBlackHole is a nettype.PacketListener whose sockets lose every packet
// written to them and receive none.
type udpBlackHole struct{}

var blackHolePort atomic.Int32

func (udpBlackHole) ListenPacket(_ context.Context, network, address string) (net.PacketConn, error) {
	ip := net.IPv4(127, 0, 0, 1)
	if network == "udp6" {
		ip = net.IPv6loopback
	}
	_, p, err := net.SplitHostPort(address)
	if err != nil {
		return nil, err
	}
	port, err := strconv.Atoi(p)
	if err != nil {
		return nil, err
	}
	if port == 0 {
		port = 20000 + int(blackHolePort.Add(1))
	}
	return &blackHoleConn{
		addr:   &net.UDPAddr{IP: ip, Port: port},
		closed: make(chan struct{}),
	}, nil
}

type blackHoleConn struct {
	addr      *net.UDPAddr
	closeOnce sync.Once
	closed    chan struct{}
}

func (c *blackHoleConn) ReadFromUDPAddrPort([]byte) (int, netip.AddrPort, error) {
	<-c.closed
	return 0, netip.AddrPort{}, net.ErrClosed
}

func (c *blackHoleConn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, _, err := c.ReadFromUDPAddrPort(b)
	return n, nil, err
}

func (c *blackHoleConn) WriteToUDPAddrPort(b []byte, _ netip.AddrPort) (int, error) {
	select {
	case <-c.closed:
		return 0, net.ErrClosed
	default:
		return len(b), nil
	}
}

func (c *blackHoleConn) WriteTo(b []byte, _ net.Addr) (int, error) {
	return c.WriteToUDPAddrPort(b, netip.AddrPort{})
}

func (c *blackHoleConn) Close() error {
	c.closeOnce.Do(func() { close(c.closed) })
	return nil
}

func (c *blackHoleConn) LocalAddr() net.Addr              { return c.addr }
func (c *blackHoleConn) SetDeadline(time.Time) error      { return nil }
func (c *blackHoleConn) SetReadDeadline(time.Time) error  { return nil }
func (c *blackHoleConn) SetWriteDeadline(time.Time) error { return nil }

// nodeLogf returns a discarding logger, or one that writes the node's logs
// to stderr if RELAY_INTEROP_NODE_LOG is set (t.Logf would panic on lines
// logged after the test ends).
func nodeLogf(t *testing.T, name string) logger.Logf {
	if os.Getenv("RELAY_INTEROP_NODE_LOG") == "" {
		return logger.Discard
	}
	return func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "%s %s: %s\n", time.Now().Format("15:04:05.000"), name, fmt.Sprintf(format, args...))
	}
}

// peerWith tells n about peer, as a control server would: its node and
// disco keys, its address, and region 1 as its home DERP (it has no UDP
// endpoints), and configures n's WireGuard device to reach it.
func (n *tsNode) peerWith(peer *tsNode) {
	self := (&tailcfg.Node{
		Key:       n.pub(),
		Addresses: []netip.Prefix{netip.PrefixFrom(n.ip, 32)},
	}).View()
	addrs := []netip.Prefix{netip.PrefixFrom(peer.ip, 32)}
	p := (&tailcfg.Node{
		ID:         tailcfg.NodeID(peer.ip.As4()[3]),
		Name:       peer.name,
		Key:        peer.pub(),
		DiscoKey:   peer.conn.DiscoPublicKey(),
		Addresses:  addrs,
		AllowedIPs: addrs,
		// Its UDP socket (which loses every packet), for magicsock to
		// try a direct path that never works.
		Endpoints: []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), peer.conn.LocalPort())},
		HomeDERP:  1,
	}).View()
	n.conn.SetNetworkMap(self, []tailcfg.NodeView{p})
	n.tsTun.SetWGConfig(&wgcfg.Config{PrivateKey: n.priv, Addresses: []netip.Prefix{netip.PrefixFrom(n.ip, 32)}})
	peerKey := device.NoisePublicKey(peer.pub().Raw32())
	n.dev.SetPeerByIPPacketFunc(func(_, dst netip.Addr, _ []byte) (device.NoisePublicKey, bool) {
		return peerKey, dst == peer.ip
	})
	n.dev.SetPeerLookupFunc(wgcfg.NewPeerLookupFunc(n.conn.Bind(), logger.Discard, func(k device.NoisePublicKey) (wgcfg.PeerConfig, bool) {
		if k != peerKey {
			return wgcfg.PeerConfig{}, false
		}
		return wgcfg.PeerConfig{AllowedIPs: addrs}, true
	}))
	n.dev.SetPrivateKey(key.NodePrivateAs[device.NoisePrivateKey](n.priv))
}

// TestTailscaleNodesThroughOurServer has two Tailscale data planes exchange
// 1 MiB each way through our server over TLS, and checks that the data
// arrived intact and that our server relayed it between the two node keys
// (its per-session byte counters carry at least the data each way), so
// that the test fails if the traffic went another way. The nodes log in by
// fast start when our TLS 1.3 chain has the meta cert, by the 101 upgrade
// when it has none; in a region of two meshed servers, each node on its
// own, the data crosses the mesh. With sessions parked whenever idle for
// 1 ms (WithIdlePark), their readers stop and start all through the
// transfer. Over WebSocket, the nodes dial wss:// to our server's /derp
// (Tailscale's WebSocket client, which native builds have only with the
// build tag ts_debug_websockets, and use only with
// TS_DEBUG_DERP_WS_CLIENT set; the case is skipped without the tag), and
// our server must list their sessions as WebSocket ones.
func TestTailscaleNodesThroughOurServer(t *testing.T) {
	for _, tc := range []struct {
		name      string
		metaCert  bool
		mesh      bool
		idlePark  time.Duration // if not zero, WithIdlePark
		fastStart bool          // how the nodes log in
		webSocket bool          // the nodes dial WebSocket
	}{
		{"fast start", true, false, 0, true, false},
		{"upgrade", false, false, 0, false, false},
		{"mesh", true, true, 0, true, false},
		{"parked when idle 1ms", true, false, time.Millisecond, true, false},
		// With the meta cert, which the WebSocket client never
		// looks for: it always waits for the 101.
		{"websocket", true, false, 0, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cert, pool := selfSignedCert(t)
			if tc.webSocket {
				if !tsDERPWebSocket {
					t.Skip("Tailscale's DERP client dials WebSocket only when built with tag ts_debug_websockets")
				}
				nodesDialWebSocket(t, pool)
			}
			checkNoLeaks(t)
			checkNoNodeLeaks(t)
			nServers := 1
			if tc.mesh {
				nServers = 2
			}
			// Listen first: a mesh peer's URL is needed to make its
			// servers. Each server is given every URL (its own is
			// ignored).
			lns := make([]net.Listener, nServers)
			urls := make([]string, nServers)
			for i := range lns {
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { ln.Close() }) // if the test ends before serving it
				lns[i], urls[i] = ln, "https://"+ln.Addr().String()+"/derp"
			}
			servers := make([]*relay.Server, nServers)
			derpMaps := make([]*tailcfg.DERPMap, nServers)
			for i := range servers {
				var opts []relay.ServerOption
				if tc.idlePark != 0 {
					opts = append(opts, relay.WithIdlePark(tc.idlePark))
				}
				if tc.mesh {
					opts = append(opts, relay.WithMeshKey(nodeMeshKey),
						relay.WithMeshPeers(urls...),
						relay.WithMeshDialer(&relay.FastStart{TLSConfig: &tls.Config{RootCAs: pool}}))
				}
				servers[i] = newOurServer(t, opts...)
				cfg := &tls.Config{
					Certificates: []tls.Certificate{cert},
					MinVersion:   tls.VersionTLS13,
				}
				if tc.metaCert {
					relay.AppendMetaCert(cfg, servers[i].MetaCert())
				}
				serveTLSOn(t, lns[i], servers[i], cfg) // /derp and the probe paths (netcheck)
				derpMaps[i] = nodeDERPMap(lns[i].Addr().(*net.TCPAddr))
			}
			// Node A uses the first server, node B the last (the same
			// without a mesh): region 1 in their DERP maps.
			sA, sB := servers[0], servers[nServers-1]
			a := newTSNode(t, "nodeA", netip.MustParseAddr("100.64.0.1"), derpMaps[0])
			b := newTSNode(t, "nodeB", netip.MustParseAddr("100.64.0.2"), derpMaps[nServers-1])
			a.peerWith(b)
			b.peerWith(a)

			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			aKey, bKey := relayKey(a.pub()), relayKey(b.pub())
			// Both nodes home on our servers, and each server
			// knows where the other node is, before any packet is
			// sent.
			waitSessions(t, ctx, sA, "node A logged in", func(m map[relay.PublicKey]relay.SessionInfo) bool { return m[aKey].Home })
			waitSessions(t, ctx, sB, "node B logged in", func(m map[relay.PublicKey]relay.SessionInfo) bool { return m[bKey].Home })
			if tc.mesh {
				waitMeshRoute(t, ctx, sA, bKey)
				waitMeshRoute(t, ctx, sB, aKey)
			}

			nodeExchange(t, ctx, a, b)

			// Every byte of it went through our servers, between
			// these two keys and no other: each node's session
			// received and was sent at least the data (WireGuard and
			// IP headers come on top), from the other node alone.
			// (The counters are updated as each write ends, so wait
			// a little for them.)
			countCtx, countCancel := context.WithTimeout(context.Background(), time.Minute)
			defer countCancel()
			for _, n := range []struct {
				name string
				s    *relay.Server
				k    relay.PublicKey
			}{{"A", sA, aKey}, {"B", sB, bKey}} {
				m := waitSessions(t, countCtx, n.s, "node "+n.name+"'s data counted both ways", func(m map[relay.PublicKey]relay.SessionInfo) bool {
					return m[n.k].BytesReceived >= nodeTransferBytes && m[n.k].BytesSent >= nodeTransferBytes
				})
				si := m[n.k]
				t.Logf("node %s session: %+v", n.name, si)
				clients := 0
				for _, si := range m {
					if !si.Mesh {
						clients++
					}
				}
				if want := 3 - nServers; clients != want {
					t.Errorf("node %s's server has %d client sessions, want %d: %v", n.name, clients, want, m)
				}
				if si.Senders != 1 {
					t.Errorf("node %s's session: %d senders, want 1 (the other node)", n.name, si.Senders)
				}
				if si.FastStart != tc.fastStart {
					t.Errorf("node %s's session: FastStart %v, want %v", n.name, si.FastStart, tc.fastStart)
				}
				if si.WebSocket != tc.webSocket {
					t.Errorf("node %s's session: WebSocket %v, want %v", n.name, si.WebSocket, tc.webSocket)
				}
			}
			// Every WebSocket handshake our servers completed was a
			// node's: at least one each over WebSocket (more if a node
			// reconnected), none otherwise.
			var wsAccepts int64
			for _, s := range servers {
				wsAccepts += s.Stats().WebSocketAccepts
			}
			t.Logf("WebSocket handshakes: %d", wsAccepts)
			if tc.webSocket && wsAccepts < 2 || !tc.webSocket && wsAccepts != 0 {
				t.Errorf("our servers completed %d WebSocket handshakes, want %s", wsAccepts, map[bool]string{true: "at least 2", false: "none"}[tc.webSocket])
			}
			if tc.idlePark != 0 {
				st := sA.Stats()
				t.Logf("sessions parked %d times", st.Parks)
				if st.Parks < 2 {
					t.Errorf("sessions parked %d times, want at least one each", st.Parks)
				}
			}
			if tc.mesh {
				// Each server forwarded its node's data to the
				// other, and delivered what the other forwarded.
				for i, s := range servers {
					st := s.Stats()
					if st.PacketsForwardedOut < nodeTransferBytes/nodeChunk || st.PacketsForwardedIn < nodeTransferBytes/nodeChunk {
						t.Errorf("server %d forwarded out %d packets and in %d, want at least %d each way", i, st.PacketsForwardedOut, st.PacketsForwardedIn, nodeTransferBytes/nodeChunk)
					}
				}
			}
		})
	}
}

// nodesDialWebSocket has the nodes of the test dial our server over
// WebSocket, trusting pool. Tailscale's WebSocket dialer
// (derphttp/websocket.go, coder/websocket) takes no TLS config, so it uses
// http.DefaultClient, whose transport verifies the server's certificate
// against the system's roots (the DERP map's InsecureForTests does not
// apply): the test swaps http.DefaultTransport for one that trusts pool.
// Both settings are process-wide and restored by the test's cleanup,
// registered first so that it runs last, after the nodes closed; t.Setenv
// keeps parallel tests from running meanwhile.
func nodesDialWebSocket(t *testing.T, pool *x509.CertPool) {
	t.Setenv("TS_DEBUG_DERP_WS_CLIENT", "true")
	old := http.DefaultTransport
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	http.DefaultTransport = tr
	t.Cleanup(func() {
		http.DefaultTransport = old
		tr.CloseIdleConnections()
	})
}

// nodeExchange has a and b send each other nodeTransferBytes of random data
// at once, and fails the test unless it arrives intact. It returns how many
// packets were sent again.
func nodeExchange(t *testing.T, ctx context.Context, a, b *tsNode) (resent int) {
	t.Helper()
	// One packet from A first, so that only A starts a WireGuard
	// handshake (if none is established): when both start one at once,
	// each drops the other's response and they retry after 5 s
	// (WireGuard's REKEY_TIMEOUT).
	if got, _, err := nodeTransfer(ctx, a, b, []byte("hello")); err != nil || string(got) != "hello" {
		t.Fatalf("first packet from A to B: got %q, %v", got, err)
	}
	dataAB, dataBA := make([]byte, nodeTransferBytes), make([]byte, nodeTransferBytes)
	rand.Read(dataAB)
	rand.Read(dataBA)
	var wg sync.WaitGroup
	var errAB, errBA error
	var gotAB, gotBA []byte
	var resentAB, resentBA int
	start := time.Now()
	wg.Add(2)
	go func() { defer wg.Done(); gotAB, resentAB, errAB = nodeTransfer(ctx, a, b, dataAB) }()
	go func() { defer wg.Done(); gotBA, resentBA, errBA = nodeTransfer(ctx, b, a, dataBA) }()
	wg.Wait()
	t.Logf("transfer took %v; packets sent again: A to B %d, B to A %d", time.Since(start).Round(time.Millisecond), resentAB, resentBA)
	if errAB != nil || errBA != nil {
		t.Fatalf("transfer: A to B: %v; B to A: %v", errAB, errBA)
	}
	if !bytes.Equal(gotAB, dataAB) || !bytes.Equal(gotBA, dataBA) {
		t.Fatalf("data corrupted: A to B intact %v, B to A intact %v", bytes.Equal(gotAB, dataAB), bytes.Equal(gotBA, dataBA))
	}
	return resentAB + resentBA
}

// TestTailscaleNodesAcrossServerRestart: our server closes (telling its
// clients it restarts) while another takes its address; the nodes
// reconnect to the new one, with its new key, and their traffic flows
// through it.
func TestTailscaleNodesAcrossServerRestart(t *testing.T) {
	checkNoLeaks(t)
	checkNoNodeLeaks(t)
	cert, _ := selfSignedCert(t)
	var current atomic.Pointer[relay.Server]
	s1, s2 := newOurServer(t), newOurServer(t)
	current.Store(s1)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { current.Load().ServeHTTP(w, r) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS13,
		// The meta cert of the server that answers. (Only
		// GetCertificate: with Certificates set, it is not called for
		// a ClientHello without SNI, as the nodes send for an IP.)
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			c := cert
			c.Certificate = append(c.Certificate[:1:1], current.Load().MetaCert())
			return &c, nil
		},
	}
	serveTLSOn(t, ln, h, cfg)
	derpMap := nodeDERPMap(ln.Addr().(*net.TCPAddr))
	a := newTSNode(t, "nodeA", netip.MustParseAddr("100.64.0.1"), derpMap)
	b := newTSNode(t, "nodeB", netip.MustParseAddr("100.64.0.2"), derpMap)
	a.peerWith(b)
	b.peerWith(a)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	aKey, bKey := relayKey(a.pub()), relayKey(b.pub())
	for _, s := range []*relay.Server{s1, s2} {
		if s == s2 {
			current.Store(s2)
			s1.Close()
		}
		m := waitSessions(t, ctx, s, "both nodes logged in", func(m map[relay.PublicKey]relay.SessionInfo) bool {
			return m[aKey].Home && m[bKey].Home
		})
		for _, k := range []relay.PublicKey{aKey, bKey} {
			if !m[k].FastStart {
				t.Errorf("session %v did not use fast start (with the meta cert of the server that answered)", k.ShortString())
			}
		}
		nodeExchange(t, ctx, a, b)
	}
	countCtx, countCancel := context.WithTimeout(context.Background(), time.Minute)
	defer countCancel()
	m := waitSessions(t, countCtx, s2, "the data counted both ways on the new server", func(m map[relay.PublicKey]relay.SessionInfo) bool {
		return m[aKey].BytesReceived >= nodeTransferBytes && m[aKey].BytesSent >= nodeTransferBytes &&
			m[bKey].BytesReceived >= nodeTransferBytes && m[bKey].BytesSent >= nodeTransferBytes
	})
	if len(m) != 2 {
		t.Errorf("the new server has %d sessions, want the 2 nodes': %v", len(m), m)
	}
}

// nodeMeshKey is the mesh key of the meshed servers.
const nodeMeshKey = "8b1c0aa9a61de2c07f4c4e1d6a0b1e5a8c3f2d4e6b7a9c0d1e2f3a4b5c6d7e8f"

// nodeDERPMap returns a DERP map whose one region has our server at addr,
// over TLS, which the nodes do not verify (InsecureForTests), and without
// STUN.
func nodeDERPMap(addr *net.TCPAddr) *tailcfg.DERPMap {
	return &tailcfg.DERPMap{Regions: map[tailcfg.DERPRegionID]*tailcfg.DERPRegion{
		1: {
			RegionID:   1,
			RegionCode: "ours",
			Nodes: []*tailcfg.DERPNode{{
				Name:             "1a",
				RegionID:         1,
				HostName:         addr.IP.String(),
				IPv4:             addr.IP.String(),
				IPv6:             "none",
				STUNPort:         -1,
				DERPPort:         addr.Port,
				InsecureForTests: true,
			}},
		},
	}}
}

// waitMeshRoute waits until s routes k to a mesh peer.
func waitMeshRoute(t *testing.T, ctx context.Context, s *relay.Server, k relay.PublicKey) {
	t.Helper()
	for {
		if _, ok := s.MeshPeerFor(k); ok {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for a mesh route to %v: %v", k.ShortString(), ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// checkNoNodeLeaks is checkNoLeaks for the goroutines of Tailscale's data
// plane (magicsock, netmon, the event bus, wireguard-go): call it first.
func checkNoNodeLeaks(t *testing.T) {
	t.Helper()
	checkNoGoroutines(t, 5*time.Second, " of the nodes", func(g string) bool {
		return strings.Contains(g, "tailscale.com/") || strings.Contains(g, "tailscale/wireguard-go")
	})
}

// waitSessions polls s.Sessions, keyed by client key, until cond accepts
// them or ctx ends (a failure).
func waitSessions(t *testing.T, ctx context.Context, s *relay.Server, what string, cond func(map[relay.PublicKey]relay.SessionInfo) bool) map[relay.PublicKey]relay.SessionInfo {
	t.Helper()
	for {
		m := make(map[relay.PublicKey]relay.SessionInfo)
		for si := range s.Sessions() {
			m[si.Key] = si
		}
		if cond(m) {
			return m
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v; sessions: %+v", what, ctx.Err(), m)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// nodeTransfer sends data from one node to the other as UDP packets
// through their TUNs, nodeChunk bytes at a time, and returns what the other
// node's TUN delivered. UDP may lose packets (a WireGuard handshake in
// progress, a full queue), so it sends a window of packets (32, or
// from.sendWindow), waits for them
// to arrive (the receiver tells it directly, not over the network), and
// sends again those that did not arrive within a second (from.resendAfter
// if set).
func nodeTransfer(ctx context.Context, from, to *tsNode, data []byte) (_ []byte, resent int, _ error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	n := (len(data) + nodeChunk - 1) / nodeChunk
	got := make([]byte, len(data))
	var mu sync.Mutex
	have := make([]bool, n)
	arrived := make(chan struct{}, 1)
	const srcPort, dstPort = 40001, 40002
	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		for {
			var pkt []byte
			select {
			case <-ctx.Done():
				return
			case pkt = <-to.tun.Inbound:
			}
			var p packet.Parsed
			p.Decode(pkt)
			if p.IPProto != ipproto.UDP || p.Src.Addr() != from.ip || p.Dst.Port() != dstPort {
				continue
			}
			body := p.Payload()
			if len(body) < 4 {
				continue
			}
			seq := int(binary.BigEndian.Uint32(body))
			if seq >= n {
				continue
			}
			mu.Lock()
			if !have[seq] {
				have[seq] = true
				copy(got[seq*nodeChunk:], body[4:])
			}
			mu.Unlock()
			select {
			case arrived <- struct{}{}:
			default:
			}
		}
	}()
	defer func() { cancel(); <-recvDone }()

	h := packet.UDP4Header{
		IP4Header: packet.IP4Header{IPProto: ipproto.UDP, Src: from.ip, Dst: to.ip},
		SrcPort:   srcPort,
		DstPort:   dstPort,
	}
	window := from.sendWindow
	if window == 0 {
		window = 32
	}
	for base := 0; base < n; base += window {
		end := min(base+window, n)
		sent := false
		for {
			mu.Lock()
			var missing []int
			for i := base; i < end; i++ {
				if !have[i] {
					missing = append(missing, i)
				}
			}
			mu.Unlock()
			if len(missing) == 0 {
				break
			}
			if sent {
				resent += len(missing)
				if os.Getenv("RELAY_INTEROP_NODE_LOG") != "" {
					fmt.Fprintf(os.Stderr, "%s %s: resending %d of window %d\n", time.Now().Format("15:04:05.000"), from.name, len(missing), base)
				}
			}
			sent = true
			for _, i := range missing {
				body := binary.BigEndian.AppendUint32(nil, uint32(i))
				body = append(body, data[i*nodeChunk:min((i+1)*nodeChunk, len(data))]...)
				h.IPID = uint16(i)
				select {
				case from.tun.Outbound <- packet.Generate(h, body):
				case <-ctx.Done():
					return nil, resent, fmt.Errorf("sending packet %d of %d: %w", i, n, ctx.Err())
				}
			}
			resendAfter := from.resendAfter
			if resendAfter == 0 {
				resendAfter = time.Second
			}
			retry := time.NewTimer(resendAfter)
		wait:
			for {
				select {
				case <-arrived:
					mu.Lock()
					done := true
					for i := base; i < end && done; i++ {
						done = have[i]
					}
					mu.Unlock()
					if done {
						break wait
					}
				case <-retry.C:
					break wait
				case <-ctx.Done():
					retry.Stop()
					return nil, resent, fmt.Errorf("waiting for packets %d..%d of %d: %w", base, end-1, n, ctx.Err())
				}
			}
			retry.Stop()
		}
	}
	mu.Lock()
	defer mu.Unlock()
	return bytes.Clone(got), resent, nil
}

// startNodes starts our server with opts, over TLS with the meta cert, and
// two nodes homed on it and peered with each other, and waits for both to
// log in. It returns the nodes' sessions as the server lists them then.
func startNodes(t *testing.T, ctx context.Context, opts ...relay.ServerOption) (s *relay.Server, a, b *tsNode, sessions map[relay.PublicKey]relay.SessionInfo) {
	t.Helper()
	cert, _ := selfSignedCert(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	s = newOurServer(t, opts...)
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
	relay.AppendMetaCert(cfg, s.MetaCert())
	serveTLSOn(t, ln, s, cfg)
	derpMap := nodeDERPMap(ln.Addr().(*net.TCPAddr))
	a = newTSNode(t, "nodeA", netip.MustParseAddr("100.64.0.1"), derpMap)
	b = newTSNode(t, "nodeB", netip.MustParseAddr("100.64.0.2"), derpMap)
	a.peerWith(b)
	b.peerWith(a)
	aKey, bKey := relayKey(a.pub()), relayKey(b.pub())
	sessions = waitSessions(t, ctx, s, "both nodes logged in", func(m map[relay.PublicKey]relay.SessionInfo) bool {
		return m[aKey].Home && m[bKey].Home
	})
	return s, a, b, sessions
}

// checkSameSessions fails the test unless s still has the sessions of
// before (by key and login time), and no other, and counted no session
// that ended by an error.
func checkSameSessions(t *testing.T, s *relay.Server, before map[relay.PublicKey]relay.SessionInfo) map[relay.PublicKey]relay.SessionInfo {
	t.Helper()
	now := make(map[relay.PublicKey]relay.SessionInfo)
	for si := range s.Sessions() {
		now[si.Key] = si
	}
	if len(now) != len(before) {
		t.Errorf("%d sessions now, %d before: %+v", len(now), len(before), now)
	}
	for k, si := range before {
		if !now[k].Connected.Equal(si.Connected) {
			t.Errorf("session %v: logged in at %v, before at %v (it ended)", k.ShortString(), now[k].Connected, si.Connected)
		}
	}
	for reason, n := range s.Stats().Errors {
		if strings.HasPrefix(reason, "session:") && n != 0 {
			t.Errorf("%d sessions ended by %s", n, reason)
		}
	}
	return now
}

// nodeFrames is how many SendPacket frames each node sends at least in
// nodeExchange.
const nodeFrames = nodeTransferBytes / nodeChunk

// TestTailscaleNodesUnderLimits runs the nodes' exchange through our server
// under its limits.
func TestTailscaleNodesUnderLimits(t *testing.T) {
	// rate is the rate limit: an eighth of what the nodes send
	// unlimited here (about 4 MiB/s each way, 1 MiB in 0.3 s), so that
	// the exchange takes 2 s.
	const rate = 512 << 10

	// The limit announced in ServerInfo at login: Tailscale's client
	// (derp.Client.send) then drops what its own token bucket, of that
	// rate and burst, cannot pay for, counting each SendPacket as the
	// server does (header, key and packet). The server's bucket, which
	// starts full when the session does, never holds fewer tokens than
	// the client's did when it sent, but for the delays between the two,
	// so the server rarely paces; the losses are the client's, and the
	// test's resends make up for them.
	t.Run("rate limit announced", func(t *testing.T) {
		checkNoLeaks(t)
		checkNoNodeLeaks(t)
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		s, a, b, before := startNodes(t, ctx, relay.WithRateLimit(rate, 0))
		// Packets the client drops are missed at once: at the
		// limit a window of 32 takes 0.07 s.
		a.resendAfter, b.resendAfter = 100*time.Millisecond, 100*time.Millisecond
		resent, waits := rateExchange(t, ctx, s, a, b, before, rate)
		// The client limited itself: the packets it could not pay
		// for were lost before the server (which dropped none), so
		// the test sent them again; and the server seldom paced it. It
		// sent data at eight times the limit, so a server pacing it
		// would wait for most frames past the burst, 1100 to 1900 times
		// (as in the next case). Measured here: 16 to 260 waits, each
		// of at most a few milliseconds, where the server read a burst
		// of frames later than the frames after it (delays of the
		// reader, TLS and the race detector), which gave it fewer
		// tokens than the client had when it sent.
		if resent == 0 {
			t.Errorf("no packet sent again: the limit did not bind, or the client did not keep to it")
		}
		if waits > nodeFrames*3/4 {
			t.Errorf("the server waited %d times for the rate limit: Tailscale's client did not keep within the limit announced", waits)
		}
	})

	// The same limit set once the nodes are logged in: they are not
	// told (the protocol cannot), so they send what they will, and the
	// server paces them by reading more slowly, so that TCP flow control
	// slows them: it waits for most frames, yet drops nothing.
	t.Run("rate limit set after login", func(t *testing.T) {
		checkNoLeaks(t)
		checkNoNodeLeaks(t)
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		s, a, b, before := startNodes(t, ctx)
		s.SetRateLimit(rate, 0)
		_, waits := rateExchange(t, ctx, s, a, b, before, rate)
		// Measured: 1100 to 1900 waits (fewer when the machine is
		// busy, as the reader's own delays refill the bucket).
		if waits < nodeFrames/4 {
			t.Errorf("the server waited %d times for the rate limit, want at least %d", waits, nodeFrames/4)
		}
	})

	// A queue of two packets per client and kind: a full queue loses
	// its oldest packet, counted. WireGuard's packets arrive all the
	// same, thanks to the test's resends, and no session ends.
	t.Run("queue depth 2", func(t *testing.T) {
		checkNoLeaks(t)
		checkNoNodeLeaks(t)
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		s, a, b, before := startNodes(t, ctx, relay.WithQueueDepth(2))
		// Windows of 256 packets (280 KiB), which the server may read
		// faster than it writes them. Whether a queue fills depends on
		// the scheduling (measured: 2 to 470 drops an exchange), so
		// the exchange is repeated, up to 5 times, until one did.
		a.resendAfter, b.resendAfter = 100*time.Millisecond, 100*time.Millisecond
		a.sendWindow, b.sendWindow = 256, 256
		resent := 0
		for i := 0; i < 5 && s.Stats().PacketsDropped["queue_head/other"] == 0; i++ {
			resent += nodeExchange(t, ctx, a, b)
		}
		after := checkSameSessions(t, s, before)
		st := s.Stats()
		dropped := nonZero(st.PacketsDropped)
		t.Logf("%d packets sent again; dropped: %v", resent, dropped)
		var inSessions int64
		for _, si := range after {
			inSessions += si.PacketsDropped
		}
		if dropped["queue_head/other"] == 0 {
			t.Errorf("dropped %v: want drops from full queues", dropped)
		}
		var queueDrops int64
		for reason, n := range dropped {
			if strings.HasPrefix(reason, "queue_head/") {
				queueDrops += n
			} else {
				t.Errorf("dropped %d packets: %s", n, reason)
			}
		}
		if inSessions != queueDrops {
			t.Errorf("the sessions counted %d drops, Stats %d", inSessions, queueDrops)
		}
	})

	// An idle timeout shorter than the pause between two exchanges:
	// the nodes declare CanAckPings, so the server sends its
	// keepalives as Pings, and magicsock answers each with a Pong,
	// which keeps the sessions alive (WithIdleTimeout) though the
	// nodes have nothing to send.
	t.Run("idle timeout", func(t *testing.T) {
		checkNoLeaks(t)
		checkNoNodeLeaks(t)
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		const keepAlive, idle = 250 * time.Millisecond, time.Second
		s, a, b, before := startNodes(t, ctx, relay.WithKeepAlive(keepAlive), relay.WithIdleTimeout(idle))
		for k, si := range before {
			if !si.Info.CanAckPings {
				t.Fatalf("session %v: the node did not declare CanAckPings", k.ShortString())
			}
		}
		nodeExchange(t, ctx, a, b)
		st0 := s.Stats()
		m0 := checkSameSessions(t, s, before)
		time.Sleep(3 * idle)
		st := s.Stats()
		m := checkSameSessions(t, s, before)
		// Measured: the nodes sent no packet in the pause, so their
		// Pongs alone kept the sessions.
		for k, si := range m {
			t.Logf("in the pause, node %v sent %d packets", k.ShortString(), si.PacketsReceived-m0[k].PacketsReceived)
		}
		// About 12 Pings to each node in the pause.
		if pings, pongs := st.PingsSent-st0.PingsSent, st.PongsReceived-st0.PongsReceived; pings < 4 || pongs < 4 {
			t.Errorf("in the pause, %d Pings sent and %d Pongs received, want at least 4 each", pings, pongs)
		}
		nodeExchange(t, ctx, a, b)
		checkSameSessions(t, s, before)
		st = s.Stats()
		t.Logf("Pings sent %d, Pongs received %d", st.PingsSent, st.PongsReceived)
	})
}

// maxFrameCost is the cost of a maximal SendPacket frame under a rate
// limit, and the least burst: header, key and packet.
const maxFrameCost = 5 + 32 + relay.MaxPacketSize

// rateExchange runs nodeExchange between a and b through s, whose rate
// limit is rate, and returns how many packets the nodes sent again and how
// many times s waited for the limit meanwhile. It fails the test if either
// node's session sent more than the burst, one frame more, and the rate for
// the time the exchange took (what the server read of it: payloads alone,
// counted as each read ends), or if s dropped any packet.
func rateExchange(t *testing.T, ctx context.Context, s *relay.Server, a, b *tsNode, before map[relay.PublicKey]relay.SessionInfo, rate int) (resent int, waits int64) {
	t.Helper()
	st0 := s.Stats()
	start := time.Now()
	at0 := checkSameSessions(t, s, before)
	resent = nodeExchange(t, ctx, a, b)
	elapsed := time.Since(start)
	after := checkSameSessions(t, s, before)
	st := s.Stats()
	waits = st.RateLimitWaits - st0.RateLimitWaits
	t.Logf("%d packets sent again; the server waited %d times for the limit; dropped: %v", resent, waits, nonZero(st.PacketsDropped))
	for k, si := range after {
		got := si.BytesReceived - at0[k].BytesReceived
		if limit := 2*maxFrameCost + int64(elapsed.Seconds()*float64(rate)); got > limit {
			t.Errorf("session %v sent %d bytes in %v, beyond the limit (%d)", k.ShortString(), got, elapsed, limit)
		}
	}
	for reason, n := range st.PacketsDropped {
		if n != 0 {
			t.Errorf("server dropped %d packets (%s)", n, reason)
		}
	}
	return resent, waits
}

// nonZero returns the non-zero counters of m.
func nonZero(m map[string]int64) map[string]int64 {
	r := make(map[string]int64)
	for k, v := range m {
		if v != 0 {
			r[k] = v
		}
	}
	return r
}
