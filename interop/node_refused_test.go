//go:build ts_omit_netstack && ts_omit_gro && !ts102

package interop

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fastderp/relay"
)

// TestTailscaleNodesOneRefused has our server's admission hook
// refuse one of two real Tailscale nodes. The refused node must retry with
// a backoff, not in a tight loop: in refusedWindow from its first refusal
// it may log in at most maxRefusals times, while the admitted node's
// session stays up. Once the hook admits it, the node logs in again by
// itself and the two exchange 1 MiB each way through our server.
func TestTailscaleNodesOneRefused(t *testing.T) {
	checkNoLeaks(t)
	checkNoNodeLeaks(t)

	// How often may a refused node log in? Our server refuses it after
	// its ClientInfo, by closing the connection; Tailscale's client has
	// then logged in as far as it knows (derp.NewClient waits for no
	// ServerInfo), and magicsock's DERP reader (runDerpReader,
	// wgengine/magicsock/derp.go) sees its Recv fail and backs off
	// (util/backoff) before its next Recv dials again: after the n-th
	// failure in a row it sleeps min(n²×10 ms, 5 s) times a random factor
	// in [0.5, 1.5). So k more logins after the first take at least
	// Σ 5 ms×n² for n = 1..k: 1.925 s for k = 10, 2.53 s for k = 11.
	// Within 2 s, then, a reader logs in at most 11 times; one more for
	// the Connect magicsock starts when it opens the region (which races
	// with the reader's first Recv). Each refusal also has magicsock
	// re-run its netcheck, and the endpoint update that follows one may
	// replace the DERP client (see below), whose new reader starts with
	// no backoff: measured, such updates come 3 s apart, so at most one
	// falls in the window, and the node logs in at most twice 12 times.
	// Sends would dial too, without a backoff (derphttp.Client.Send
	// connects), but the refused node has nothing to send here. A client
	// that retried without a backoff would log in hundreds of times a
	// second over loopback TLS. (Measured: 8 or 9 times.)
	const refusedWindow = 2 * time.Second
	const maxRefusals = 2 * 12
	// maxStartLogins bounds node A's logins while B is refused: its
	// first, and a second from the race of derphttp's Connect with its
	// reader's first Recv (measured: 1 or 2), and one to spare; B is
	// refused 8 to 10 times.
	const maxStartLogins = 3

	var refusing atomic.Bool
	refusing.Store(true)
	var admitted atomic.Pointer[relay.PublicKey] // the one key admitted while refusing
	var mu sync.Mutex
	var refusals []time.Time
	var aLogins atomic.Int32 // node A's logins while B is refused
	firstRefusal := make(chan struct{})
	hook := func(_ context.Context, a relay.Admission) error {
		if !refusing.Load() {
			return nil
		}
		if k := admitted.Load(); k != nil && *k == a.Key {
			aLogins.Add(1)
			return nil
		}
		mu.Lock()
		refusals = append(refusals, time.Now())
		if len(refusals) == 1 {
			close(firstRefusal)
		}
		mu.Unlock()
		return errors.New("refused by the test")
	}

	cert, _ := selfSignedCert(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	s := newOurServer(t, relay.WithAdmission(hook))
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
	relay.AppendMetaCert(cfg, s.MetaCert())
	serveTLSOn(t, ln, s, cfg)
	derpMap := nodeDERPMap(ln.Addr().(*net.TCPAddr))

	// Node A's key is admitted before node B exists: every other key is
	// B's.
	a := newTSNode(t, "nodeA", netip.MustParseAddr("100.64.0.1"), derpMap)
	aKey := relayKey(a.pub())
	admitted.Store(&aKey)
	b := newTSNode(t, "nodeB", netip.MustParseAddr("100.64.0.2"), derpMap)
	bKey := relayKey(b.pub())
	a.peerWith(b)
	b.peerWith(a)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	waitSessions(t, ctx, s, "node A logged in", func(m map[relay.PublicKey]relay.SessionInfo) bool { return m[aKey].Home })
	select {
	case <-firstRefusal:
	case <-ctx.Done():
		t.Fatalf("node B never tried to log in: %v", ctx.Err())
	}
	mu.Lock()
	t0 := refusals[0]
	mu.Unlock()
	time.Sleep(time.Until(t0.Add(refusedWindow)))
	mu.Lock()
	inWindow := 0
	for _, at := range refusals {
		if at.Sub(t0) <= refusedWindow {
			inWindow++
		}
	}
	mu.Unlock()
	t.Logf("node B refused %d times in %v", inWindow, refusedWindow)
	if inWindow > maxRefusals {
		t.Errorf("node B was refused %d times in %v, want at most %d (it retries without backing off)", inWindow, refusedWindow, maxRefusals)
	}
	if inWindow < 2 {
		t.Errorf("node B was refused %d times in %v, want it to retry", inWindow, refusedWindow)
	}
	// Node A kept its session through it all, alone: B has none. A may
	// log in twice as it starts (derphttp's Connect races its reader's
	// first Recv, and one of the two dials is cancelled: seen at the
	// same time as B's first refusals), but not once per refusal of B.
	t.Logf("node A logged in %d times while B was refused", aLogins.Load())
	if n := aLogins.Load(); n > maxStartLogins {
		t.Errorf("node A logged in %d times while node B was refused %d times, want at most %d", n, inWindow, maxStartLogins)
	}
	sessions := make(map[relay.PublicKey]relay.SessionInfo)
	for si := range s.Sessions() {
		sessions[si.Key] = si
	}
	if len(sessions) != 1 || !sessions[aKey].Home {
		t.Errorf("sessions at the end of the refusals: %+v, want node A's alone", sessions)
	}
	for reason, n := range s.Stats().Errors {
		if strings.HasPrefix(reason, "session:") && n != 0 {
			t.Errorf("%d sessions ended by %s", n, reason)
		}
	}

	// Admitted now, B logs in at its next try, with no help.
	refusing.Store(false)
	start := time.Now()
	waitSessions(t, ctx, s, "node B logged in once admitted", func(m map[relay.PublicKey]relay.SessionInfo) bool { return m[bKey].Home })
	mu.Lock()
	total := len(refusals)
	mu.Unlock()
	t.Logf("node B logged in %v after it was admitted; refused %d times in all", time.Since(start).Round(time.Millisecond), total)
	// B's session may be replaced meanwhile: each refusal had magicsock
	// re-run its netcheck (ReSTUN "derp-recv-error"), and the endpoint
	// update after one rebinds (as no UDP send succeeded), which closes
	// and redials the DERP connection, whose local address (loopback) is
	// not the default route's (maybeCloseDERPsOnRebind,
	// "rebind-default-route-change"). So the data is counted in the
	// server's totals, not in the sessions'.
	st0 := s.Stats()
	nodeExchange(t, ctx, a, b)
	for {
		st := s.Stats()
		if st.BytesReceived-st0.BytesReceived >= 2*nodeTransferBytes && st.BytesSent-st0.BytesSent >= 2*nodeTransferBytes {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the server received %d bytes and sent %d during the exchange, want at least %d each", st.BytesReceived-st0.BytesReceived, st.BytesSent-st0.BytesSent, 2*nodeTransferBytes)
		case <-time.After(20 * time.Millisecond):
		}
	}
	waitSessions(t, ctx, s, "the 2 nodes' sessions alone", func(m map[relay.PublicKey]relay.SessionInfo) bool {
		return len(m) == 2 && m[aKey].Home && m[bKey].Home
	})
}
