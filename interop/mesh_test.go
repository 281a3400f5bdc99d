package interop

import (
	"context"
	"encoding/hex"
	"expvar"
	"sync"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/derp/derpserver"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"

	"github.com/fastderp/relay"
)

// TestMeshRegionWithTailscaleServer meshes one of our servers with one of
// Tailscale's, sharing a mesh key, the way a region of derpers is meshed:
// ours watches theirs through WithMeshPeers, theirs watches ours with
// derphttp's RunWatchConnectionLoop feeding AddPacketForwarder and
// RemovePacketForwarder (as cmd/derper's mesh.go does). Clients attached to
// each then relay to each other in both directions, and each side tells its
// clients when a peer they heard from leaves the other server.
func TestMeshRegionWithTailscaleServer(t *testing.T) {
	checkNoLeaks(t)
	mk := newPriv(t) // 32 random bytes
	meshHex := hex.EncodeToString(mk[:])

	theirs := newTSServer(t)
	if err := theirs.SetMeshKey(meshHex); err != nil {
		t.Fatal(err)
	}
	theirURL := servePlain(t, derpMux(derpserver.Handler(theirs)))

	ours := newOurServer(t, relay.WithMeshKey(meshHex), relay.WithMeshPeers(theirURL))
	ourURL := servePlain(t, derpMux(ours))

	learned := tsWatchRegion(t, theirs, ourURL, meshHex)

	tsC, _ := dialTSHTTP(t, "tailscale client on their server", theirURL, nil)
	ourC, _ := dialFastStart(t, "our client on our server", &relay.FastStart{}, ourURL)
	waitOurRoute(t, ours, tsC.relayPub(), theirURL)
	learned.wait(t, ourC.pub)

	exchange(t, tsC, ourC)
	st := ours.Stats()
	if n := len(testPackets("")); st.PacketsForwardedIn < int64(n) {
		t.Errorf("our server forwarded in %d packets, want at least %d", st.PacketsForwardedIn, n)
	}

	// Our client leaves: their server removes its forwarder and tells
	// the Tailscale client, which received from it.
	ourC.c.Close()
	tsWaitPeerGone(t, tsC, ourC.pub, derp.PeerGoneReasonDisconnected)

	// The other way: a new client of ours hears from the Tailscale client,
	// which then leaves their server; our watcher sees it go and our server
	// tells our client.
	ourC2, _ := dialFastStart(t, "second client on our server", &relay.FastStart{}, ourURL)
	learned.wait(t, ourC2.pub)
	tsToOurs(t, tsC, ourC2, payload("before leaving"))
	tsC.close()
	ourWaitPeerGone(t, ourC2, tsC.relayPub(), relay.PeerGoneDisconnected)
	if _, ok := ours.MeshPeerFor(tsC.relayPub()); ok {
		t.Errorf("our server still routes to %v after it left", tsC.pub.ShortString())
	}
}

// TestMeshLinkPingsTailscaleServer: our mesh link pings a peer that has
// sent it nothing for 5 s, and drops the link if nothing comes back within
// 5 s more. Tailscale's server answers a mesh watcher's Pings, so an idle
// link to it stays up, with its routes, however long it is quiet.
func TestMeshLinkPingsTailscaleServer(t *testing.T) {
	checkNoLeaks(t)
	mk := newPriv(t)
	meshHex := hex.EncodeToString(mk[:])
	theirs := newTSServer(t)
	if err := theirs.SetMeshKey(meshHex); err != nil {
		t.Fatal(err)
	}
	theirURL := servePlain(t, derpMux(derpserver.Handler(theirs)))
	ours := newOurServer(t, relay.WithMeshKey(meshHex), relay.WithMeshPeers(theirURL))
	tsC, _ := dialTSHTTP(t, "tailscale client on their server", theirURL, nil)
	waitOurRoute(t, ours, tsC.relayPub(), theirURL)

	vars := theirs.ExpVar(false).(interface{ Get(string) expvar.Var }) // a metrics.Set
	counter := func(name string) int64 { return vars.Get(name).(*expvar.Int).Value() }
	deadline := time.Now().Add(40 * time.Second)
	for counter("got_ping") < 2 || counter("sent_pong") < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("their server got %d pings and sent %d pongs in 40 s, want 2 of each (our link pings after 5 s of silence)",
				counter("got_ping"), counter("sent_pong"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Our link and the Tailscale client: the link was never redialled.
	if n := counter("accepts"); n != 2 {
		t.Errorf("their server accepted %d connections, want 2: our link went down while pinging", n)
	}
	if got, ok := ours.MeshPeerFor(tsC.relayPub()); !ok || got != theirURL {
		t.Errorf("after the pings our route to %v is %q, %v; want %s", tsC.pub.ShortString(), got, ok, theirURL)
	}
}

// waitOurRoute waits until our server forwards packets for k to peerURL.
func waitOurRoute(t *testing.T, s *relay.Server, k relay.PublicKey, peerURL string) {
	t.Helper()
	deadline := time.Now().Add(recvTimeout)
	for {
		got, ok := s.MeshPeerFor(k)
		if ok && got == peerURL {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("our server has no route to %v via %s within %v (have %q, %v)", k.ShortString(), peerURL, recvTimeout, got, ok)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// tsRegionWatch records the keys a Tailscale mesh watch loop was told about.
type tsRegionWatch struct {
	mu      sync.Mutex
	present map[key.NodePublic]bool
}

// wait waits until the watch loop added a forwarder for k.
func (w *tsRegionWatch) wait(t *testing.T, k relay.PublicKey) {
	t.Helper()
	deadline := time.Now().Add(recvTimeout)
	for {
		w.mu.Lock()
		ok := w.present[tsKey(k)]
		w.mu.Unlock()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("tailscale's server learned no route to %v within %v", k.ShortString(), recvTimeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// tsWatchRegion makes Tailscale's server s watch the server at peerURL as
// derper --mesh-with does: a derphttp client with s's own key and the mesh
// key runs RunWatchConnectionLoop, and s forwards through that client. The
// cleanup stops the loop and waits for it.
func tsWatchRegion(t *testing.T, s *derpserver.Server, peerURL, meshHex string) *tsRegionWatch {
	t.Helper()
	c, err := derphttp.NewClient(s.PrivateKey(), peerURL, t.Logf, netmon.NewStatic())
	if err != nil {
		t.Fatal(err)
	}
	mk, err := key.ParseDERPMesh(meshHex)
	if err != nil {
		t.Fatal(err)
	}
	c.MeshKey = mk
	c.WatchConnectionChanges = true
	w := &tsRegionWatch{present: map[key.NodePublic]bool{}}
	add := func(m derp.PeerPresentMessage) {
		s.AddPacketForwarder(m.Key, c)
		w.mu.Lock()
		w.present[m.Key] = true
		w.mu.Unlock()
	}
	remove := func(m derp.PeerGoneMessage) {
		s.RemovePacketForwarder(m.Peer, c)
		w.mu.Lock()
		delete(w.present, m.Peer)
		w.mu.Unlock()
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.RunWatchConnectionLoop(ctx, s.PublicKey(), t.Logf, add, remove, nil)
	}()
	t.Cleanup(func() {
		cancel()
		c.Close()
		<-done
	})
	return w
}
