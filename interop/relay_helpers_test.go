package interop

// Helpers that use package relay's client and server.

import (
	"bufio"
	"bytes"
	"context"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/fastderp/relay"
)

// ourPeer is one of our clients and its key.
type ourPeer struct {
	name string
	c    *relay.Client
	pub  relay.PublicKey
	info relay.ServerInfo // the first ServerInfo received
}

// recvOurs returns the first message of our client for which match is true.
func recvOurs(t *testing.T, what string, p *ourPeer, match func(relay.Message) bool) relay.Message {
	t.Helper()
	return recvMatch(t, p.name+": "+what, p.c.Recv, func() { p.c.Close() }, match)
}

// recvPacket returns the next packet our client receives, skipping every
// other message (ServerInfo, KeepAlive, ...).
func recvPacket(t *testing.T, p *ourPeer) relay.ReceivedPacket {
	t.Helper()
	m := recvOurs(t, "recvPacket", p, func(m relay.Message) bool {
		_, ok := m.(*relay.ReceivedPacket)
		return ok
	})
	rp := *m.(*relay.ReceivedPacket)
	rp.Data = append([]byte(nil), rp.Data...)
	return rp
}

// waitServerInfo waits for the ServerInfo message and checks that it is the
// first message Recv returns. Servers send it after
// they registered the client, so from then on packets reach it; and it
// opening proves the server owns the key the client sealed ClientInfo to.
func waitServerInfo(t *testing.T, p *ourPeer) relay.ServerInfo {
	t.Helper()
	first := true
	return recvOurs(t, "wait for ServerInfo", p, func(m relay.Message) bool {
		_, ok := m.(relay.ServerInfo)
		if first && !ok {
			t.Errorf("%s: first message is %s, want ServerInfo before anything else", p.name, describe(m))
		}
		first = false
		return ok
	}).(relay.ServerInfo)
}

// dialOurs connects our relay.Client over TCP to addr, where the listener
// hands connections to a server's Accept, and waits for its ServerInfo.
func dialOurs(t *testing.T, name, addr string, opts ...relay.ClientOption) *ourPeer {
	t.Helper()
	priv := newPriv(t)
	nc, err := net.DialTimeout("tcp", addr, recvTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(recvTimeout))
	brw := bufio.NewReadWriter(bufio.NewReader(nc), bufio.NewWriter(nc))
	c, err := relay.NewClient(priv, nc, brw, opts...)
	if err != nil {
		t.Fatalf("%s: relay.NewClient: %v", name, err)
	}
	nc.SetDeadline(time.Time{})
	t.Cleanup(func() { c.Close() })
	p := &ourPeer{name: name, c: c, pub: priv.Public()}
	p.info = waitServerInfo(t, p)
	return p
}

// dialFastStart connects our client with relay.FastStart and waits for its
// ServerInfo.
func dialFastStart(t *testing.T, name string, fs *relay.FastStart, serverURL string) (*ourPeer, relay.Handshake) {
	t.Helper()
	priv := newPriv(t)
	ctx, cancel := context.WithTimeout(context.Background(), recvTimeout)
	defer cancel()
	c, hs, err := fs.Dial(ctx, serverURL, priv)
	if err != nil {
		t.Fatalf("%s: FastStart.Dial(%s): %v (handshake %+v)", name, serverURL, err, hs)
	}
	t.Cleanup(func() { c.Close() })
	p := &ourPeer{name: name, c: c, pub: priv.Public()}
	p.info = waitServerInfo(t, p)
	return p, hs
}

func newPriv(t *testing.T) relay.PrivateKey {
	t.Helper()
	k, err := relay.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// newOurServer returns a relay.Server; cleanup closes it.
func newOurServer(t *testing.T, opts ...relay.ServerOption) *relay.Server {
	t.Helper()
	opts = append([]relay.ServerOption{relay.WithLogger(testLogger(t))}, opts...)
	s := relay.NewServer(newPriv(t), opts...)
	t.Cleanup(func() { s.Close() })
	return s
}

// testPackets are the packets sent in each direction: an ordinary one, an
// empty one (legal: SendPacket may carry 0 bytes) and one of the maximum size.
func testPackets(tag string) [][]byte {
	big := make([]byte, relay.MaxPacketSize)
	for i := range big {
		big[i] = byte(i * 31)
	}
	copy(big, tag)
	return [][]byte{payload(tag), {}, big}
}

// tsToOurs sends pkts from a Tailscale client to ours and checks each
// arrives with the right source key and bytes.
func tsToOurs(t *testing.T, from *tsPeer, to *ourPeer, pkts ...[]byte) {
	t.Helper()
	for _, pkt := range pkts {
		if err := from.send(tsKey(to.pub), pkt); err != nil {
			t.Fatalf("%s: Send %d bytes to %s: %v", from.name, len(pkt), to.name, err)
		}
		got := recvPacket(t, to)
		if got.Source != from.relayPub() {
			t.Fatalf("%s got a packet from %v, want from %s %v", to.name, got.Source, from.name, from.relayPub())
		}
		if !bytes.Equal(got.Data, pkt) {
			t.Fatalf("%s got %d bytes %.40x..., want %d bytes %.40x... from %s", to.name, len(got.Data), got.Data, len(pkt), pkt, from.name)
		}
	}
}

// oursToTS sends pkts from our client to a Tailscale client.
func oursToTS(t *testing.T, from *ourPeer, to *tsPeer, pkts ...[]byte) {
	t.Helper()
	for _, pkt := range pkts {
		if err := from.c.Send(to.relayPub(), pkt); err != nil {
			t.Fatalf("%s: Send %d bytes to %s: %v", from.name, len(pkt), to.name, err)
		}
		got := recvTSPacket(t, to)
		if got.Source != tsKey(from.pub) {
			t.Fatalf("%s got a packet from %v, want from %s %v", to.name, got.Source, from.name, from.pub)
		}
		if !bytes.Equal(got.Data, pkt) {
			t.Fatalf("%s got %d bytes %.40x..., want %d bytes %.40x... from %s", to.name, len(got.Data), got.Data, len(pkt), pkt, from.name)
		}
	}
}

// exchange relays testPackets both ways between a Tailscale client and ours.
func exchange(t *testing.T, ts *tsPeer, ours *ourPeer) {
	t.Helper()
	tsToOurs(t, ts, ours, testPackets(ts.name+" to "+ours.name)...)
	oursToTS(t, ours, ts, testPackets(ours.name+" to "+ts.name)...)
}

// ourPingPong sends a Ping from our client and expects the Pong.
func ourPingPong(t *testing.T, p *ourPeer, data [8]byte) {
	t.Helper()
	if err := p.c.SendPing(data); err != nil {
		t.Fatalf("%s: SendPing: %v", p.name, err)
	}
	m := recvOurs(t, "wait for Pong", p, func(m relay.Message) bool {
		_, ok := m.(relay.Pong)
		return ok
	})
	if got := m.(relay.Pong); got != relay.Pong(data) {
		t.Fatalf("%s: Pong %x, want %x", p.name, got, data)
	}
}

// ourWaitPeerGone waits until our client is told that peer left.
func ourWaitPeerGone(t *testing.T, p *ourPeer, peer relay.PublicKey, want relay.PeerGoneReason) {
	t.Helper()
	m := recvOurs(t, "wait for PeerGone", p, func(m relay.Message) bool {
		pg, ok := m.(relay.PeerGone)
		return ok && pg.Peer == peer
	})
	if got := m.(relay.PeerGone).Reason; got != want {
		t.Fatalf("%s: PeerGone reason %v, want %v", p.name, got, want)
	}
}

// discoPacket returns a packet that servers classify as disco (magic
// "TS💬", then 32 + 24 bytes), the kind for which an unknown destination
// earns the sender a PeerGone(NotHere).
func discoPacket() []byte {
	b := []byte("TS\xf0\x9f\x92\xac")
	for len(b) < 6+32+24+16 {
		b = append(b, byte(len(b)))
	}
	return b
}

// testLogger returns a slog.Logger writing to t.Log until the test's
// cleanups that were registered after it have run; later lines (which a
// server should not write once closed) are dropped rather than panicking.
func testLogger(t *testing.T) *slog.Logger {
	w := &testWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct {
	t    *testing.T
	mu   sync.Mutex
	done bool
}

func (w *testWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Logf("relay.Server: %s", bytes.TrimRight(b, "\n"))
	}
	return len(b), nil
}
