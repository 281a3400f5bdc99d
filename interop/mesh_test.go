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

// TestMeshLinkKeepsRouteAfterRecipientNotice: a Tailscale client x that
// sends a packet to our server's own key reaches our mesh link's watch
// session at their server, which counts that session among x's
// recipients. When x leaves, their server tells the session so twice:
// the watch's PeerGone and the recipients' notice, both Disconnected. With
// v1.102.5 the notice is written by a goroutine of its own, so it may come
// after x's next PeerPresent (x reconnected at once); our link took it
// for x leaving again and dropped its route to x, connected there, until
// x logged in again. (The order is forced with a copy of v1.102.5 whose
// notice goroutine sleeps; unpatched, the notice usually comes first.)
func TestMeshLinkKeepsRouteAfterRecipientNotice(t *testing.T) {
	checkNoLeaks(t)
	mk := newPriv(t)
	meshHex := hex.EncodeToString(mk[:])
	theirs := newTSServer(t)
	if err := theirs.SetMeshKey(meshHex); err != nil {
		t.Fatal(err)
	}
	theirURL := servePlain(t, derpMux(derpserver.Handler(theirs)))
	ours := newOurServer(t, relay.WithMeshKey(meshHex), relay.WithMeshPeers(theirURL))
	ourURL := servePlain(t, derpMux(ours))
	vars := theirs.ExpVar(false).(interface{ Get(string) expvar.Var })
	counter := func(name string) int64 { return vars.Get(name).(*expvar.Int).Value() }
	waitCounter := func(name string, atLeast int64) {
		t.Helper()
		deadline := time.Now().Add(recvTimeout)
		for counter(name) < atLeast {
			if time.Now().After(deadline) {
				t.Fatalf("their server's %s is %d after %v, want at least %d", name, counter(name), recvTimeout, atLeast)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}

	xPriv := key.NewNode()
	x, _ := dialTSHTTPAs(t, "x", theirURL, nil, xPriv)
	waitOurRoute(t, ours, x.relayPub(), theirURL)
	sent := counter("packets_sent")
	if err := x.send(tsKey(ours.PublicKey()), payload("to the server itself")); err != nil {
		t.Fatal(err)
	}
	waitCounter("packets_sent", sent+1) // written to our link's session
	gone := counter("peer_gone_disconnected_frames")
	x.close()
	deadline := time.Now().Add(recvTimeout)
	for _, ok := ours.MeshPeerFor(x.relayPub()); ok; _, ok = ours.MeshPeerFor(x.relayPub()) {
		if time.Now().After(deadline) {
			t.Fatalf("our server still routes x %v after it left", recvTimeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
	x2, _ := dialTSHTTPAs(t, "x again", theirURL, nil, xPriv)
	waitOurRoute(t, ours, x.relayPub(), theirURL)
	waitCounter("peer_gone_disconnected_frames", gone+2) // the watch's and the notice
	// Whatever their server wrote to our link before z's PeerPresent has
	// been applied once our server routes z.
	z, _ := dialTSHTTP(t, "z", theirURL, nil)
	waitOurRoute(t, ours, z.relayPub(), theirURL)
	if _, ok := ours.MeshPeerFor(x.relayPub()); !ok {
		t.Fatal("our server has no route to x, connected at their server: it took the notice to x's recipients for x leaving again")
	}
	ourC, _ := dialFastStart(t, "our client", &relay.FastStart{}, ourURL)
	oursToTS(t, ourC, x2, payload("still reachable"))
}
