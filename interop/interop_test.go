package interop

import (
	"bytes"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derpserver"
	"tailscale.com/types/key"

	"github.com/fastderp/relay"
)

// TestTailscaleClientOurServer_Accept runs Tailscale's raw derp.Client
// against our Server.Accept over plain TCP (the classic login: the client
// reads our ServerKey frame, seals ClientInfo to it and opens our
// ServerInfo).
func TestTailscaleClientOurServer_Accept(t *testing.T) {
	checkNoLeaks(t)
	s := newOurServer(t)
	addr := acceptLoop(t, s.Accept, s.Close)

	ts1 := dialTS(t, "tailscale 1", addr)
	ts2 := dialTS(t, "tailscale 2", addr)
	ours := dialOurs(t, "ours", addr)

	for _, p := range []*tsPeer{ts1, ts2} {
		if got, want := relayKey(p.serverKey()), s.PublicKey(); got != want {
			t.Fatalf("%s learned server key %v from our ServerKey frame, want %v", p.name, got, want)
		}
	}
	if got, want := ours.c.ServerPublicKey(), s.PublicKey(); got != want {
		t.Fatalf("our client learned server key %v, want %v", got, want)
	}

	t.Run("tailscale to ours and back", func(t *testing.T) { exchange(t, ts1, ours) })
	t.Run("tailscale to tailscale", func(t *testing.T) {
		tsToTS(t, ts1, ts2, testPackets("ts1 to ts2")...)
		tsToTS(t, ts2, ts1, testPackets("ts2 to ts1")...)
	})
	t.Run("ping", func(t *testing.T) {
		tsPingPong(t, ts1, [8]byte{1, 2, 3, 4, 5, 6, 7, 8})
		tsPingPong(t, ts2, [8]byte{0xff, 0, 0xfe, 1, 0xfd, 2, 0xfc, 3})
	})
	t.Run("disco to unknown key gets NotHere", func(t *testing.T) {
		unknown := newPriv(t).Public()
		if err := ts2.send(tsKey(unknown), discoPacket()); err != nil {
			t.Fatal(err)
		}
		tsWaitPeerGone(t, ts2, unknown, derp.PeerGoneReasonNotHere)
	})
	t.Run("peer gone", func(t *testing.T) {
		// ts1 has received packets from ours (above); when ours leaves,
		// ts1 is told.
		if err := ours.c.Close(); err != nil {
			t.Logf("our client Close: %v", err)
		}
		tsWaitPeerGone(t, ts1, ours.pub, derp.PeerGoneReasonDisconnected)
	})
}

// TestTailscaleHTTPClientOurServer runs Tailscale's derphttp.Client against
// our Server's HTTP handler over plain HTTP (the 101 upgrade), next to our
// own client dialed with FastStart on the same http:// URL.
func TestTailscaleHTTPClientOurServer(t *testing.T) {
	checkNoLeaks(t)
	s := newOurServer(t)
	rec := &headerRecorder{next: s}
	url := servePlain(t, derpMux(rec))

	ts, tc := dialTSHTTP(t, "tailscale derphttp", url, nil)
	ours, hs := dialFastStart(t, "ours", &relay.FastStart{}, url)
	// A 1-byte NotePreferred frame; a server that disliked it would end the
	// session and the exchange below would fail.
	tc.NotePreferred(true)

	if hs.Path != relay.UpgradePath {
		t.Errorf("FastStart over plain HTTP took path %v (reason %q), want UpgradePath", hs.Path, hs.Reason)
	}
	if got, want := relayKey(ts.serverKey()), s.PublicKey(); got != want {
		t.Fatalf("tailscale client learned server key %v, want %v", got, want)
	}
	exchange(t, ts, ours)
	tsPingPong(t, ts, [8]byte{9, 8, 7, 6, 5, 4, 3, 2})
	if got := rec.values(); len(got) != 2 || got[0] != "" || got[1] != "" {
		t.Errorf("Derp-Fast-Start headers seen over plain HTTP = %q, want two empty", got)
	}
}

// TestOurClientTailscaleServer runs our Client against Tailscale's
// derpserver, both through Server.Accept over raw TCP and through
// derpserver.Handler over plain HTTP.
func TestOurClientTailscaleServer(t *testing.T) {
	t.Run("Accept", func(t *testing.T) {
		checkNoLeaks(t)
		s := newTSServer(t)
		addr := tsAcceptLoop(t, s)

		ours := dialOurs(t, "ours", addr)
		ts := dialTS(t, "tailscale", addr)
		if got, want := ours.c.ServerPublicKey(), relayKey(s.PublicKey()); got != want {
			t.Fatalf("our client learned server key %v from Tailscale's ServerKey frame, want %v", got, want)
		}
		testOurClientTailscaleServer(t, ours, ts)
	})
	t.Run("HTTP", func(t *testing.T) {
		checkNoLeaks(t)
		s := newTSServer(t)
		url := servePlain(t, derpMux(derpserver.Handler(s)))

		ours, hs := dialFastStart(t, "ours", &relay.FastStart{}, url)
		ts, _ := dialTSHTTP(t, "tailscale derphttp", url, nil)
		if hs.Path != relay.UpgradePath {
			t.Errorf("FastStart over plain HTTP took path %v (reason %q), want UpgradePath", hs.Path, hs.Reason)
		}
		if got, want := ours.c.ServerPublicKey(), relayKey(s.PublicKey()); got != want {
			t.Fatalf("our client learned server key %v, want %v", got, want)
		}
		testOurClientTailscaleServer(t, ours, ts)
	})
}

func testOurClientTailscaleServer(t *testing.T, ours *ourPeer, ts *tsPeer) {
	t.Helper()
	// Tailscale's ServerInfo is box({"version":2}).
	if want := (relay.ServerInfo{Version: 2}); ours.info != want {
		t.Errorf("our client parsed Tailscale's ServerInfo as %+v, want %+v", ours.info, want)
	}
	exchange(t, ts, ours)
	ourPingPong(t, ours, [8]byte{'p', 'i', 'n', 'g', 0, 1, 2, 3})
	ourPingPong(t, ours, [8]byte{0xde, 0xad, 0xbe, 0xef, 0xca, 0xfe, 0xba, 0xbe})
	if err := ours.c.NotePreferred(true); err != nil {
		t.Fatalf("NotePreferred: %v", err)
	}
	// A NotePreferred frame Tailscale's server did not like would have
	// closed the connection: the session must still relay.
	tsToOurs(t, ts, ours, payload("after NotePreferred"))

	// Disco to a key nobody holds: Tailscale's server answers NotHere.
	unknown := newPriv(t).Public()
	if err := ours.c.Send(unknown, discoPacket()); err != nil {
		t.Fatal(err)
	}
	ourWaitPeerGone(t, ours, unknown, relay.PeerGoneNotHere)

	// ts sent to ours above; when ts leaves, ours is told.
	ts.close()
	ourWaitPeerGone(t, ours, ts.relayPub(), relay.PeerGoneDisconnected)
}

// TestFastStartTailscaleClientOurServerTLS serves our handler over TLS 1.3
// with our meta cert appended: Tailscale's derphttp client must find it and
// take the fast-start path (Derp-Fast-Start: 1, ClientInfo in the same
// flight, no HTTP response), and relay with our client.
func TestFastStartTailscaleClientOurServerTLS(t *testing.T) {
	checkNoLeaks(t)
	cert, pool := selfSignedCert(t)
	s := newOurServer(t)
	cfg := &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS13,
		NextProtos:   []string{"http/1.1"},
	}
	relay.AppendMetaCert(cfg, s.MetaCert())
	rec := &headerRecorder{next: s}
	url := serveTLS(t, derpMux(rec), cfg)

	ts, tc := dialTSHTTP(t, "tailscale derphttp", url, &tls.Config{RootCAs: pool})
	if cs, ok := tc.TLSConnectionState(); !ok || cs.Version != tls.VersionTLS13 {
		t.Fatalf("tailscale client TLS state = %+v, %v; want TLS 1.3", cs, ok)
	} else if n := len(cs.PeerCertificates); n != 2 {
		t.Errorf("tailscale client saw %d certificates, want leaf + meta cert", n)
	}
	if got, want := relayKey(ts.serverKey()), s.PublicKey(); got != want {
		t.Fatalf("tailscale client took server key %v from our meta cert, want %v", got, want)
	}
	ours, hs := dialFastStart(t, "ours", &relay.FastStart{TLSConfig: &tls.Config{RootCAs: pool}}, url)
	if hs.Path != relay.FastPath {
		t.Errorf("our FastStart to our server took path %v (reason %q), want FastPath", hs.Path, hs.Reason)
	}
	exchange(t, ts, ours)
	tsPingPong(t, ts, [8]byte{'f', 'a', 's', 't', 0, 0, 0, 1})

	// Both sessions carried packets, so both requests were handled.
	if got := rec.values(); len(got) != 2 || got[0] != "1" || got[1] != "1" {
		t.Errorf("Derp-Fast-Start headers seen = %q, want [1 1] (Tailscale's client, then ours)", got)
	}
}

// TestFastStartOurClientTailscaleServerTLS dials Tailscale's derpserver over
// TLS with our FastStart: with the meta cert it must take the fast path;
// without it (or over TLS 1.2, where the meta cert is not to be trusted) it
// must fall back to the 101 upgrade. Either way it relays with a Tailscale
// client.
func TestFastStartOurClientTailscaleServerTLS(t *testing.T) {
	for _, tc := range []struct {
		name       string
		metaCert   bool
		maxVersion uint16
		wantPath   relay.Path
		wantHeader string
	}{
		{"meta cert TLS 1.3", true, 0, relay.FastPath, "1"},
		{"no meta cert", false, 0, relay.UpgradePath, ""},
		{"meta cert TLS 1.2", true, tls.VersionTLS12, relay.UpgradePath, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkNoLeaks(t)
			cert, pool := selfSignedCert(t)
			s := newTSServer(t)
			meta := s
			if !tc.metaCert {
				meta = nil
			}
			rec := &headerRecorder{next: derpserver.Handler(s)}
			url := serveTLS(t, derpMux(rec), tsServerTLSConfig(cert, meta, tc.maxVersion))

			ours, hs := dialFastStart(t, "ours", &relay.FastStart{TLSConfig: &tls.Config{RootCAs: pool}}, url)
			t.Logf("handshake: %+v", hs)
			if hs.Path != tc.wantPath {
				t.Errorf("Handshake.Path = %v (reason %q), want %v", hs.Path, hs.Reason, tc.wantPath)
			}
			if tc.wantPath == relay.UpgradePath && hs.Reason == "" {
				t.Errorf("Handshake.Reason is empty for the upgrade path")
			}
			wantVersion := uint16(tls.VersionTLS13)
			if tc.maxVersion != 0 {
				wantVersion = tc.maxVersion
			}
			if hs.TLSVersion != wantVersion {
				t.Errorf("Handshake.TLSVersion = %#x, want %#x", hs.TLSVersion, wantVersion)
			}
			if want := relayKey(s.PublicKey()); ours.c.ServerPublicKey() != want {
				t.Errorf("client's ServerPublicKey = %v, want %v", ours.c.ServerPublicKey(), want)
			}
			if want := relayKey(s.PublicKey()); tc.wantPath == relay.FastPath && hs.ServerKey != want {
				t.Errorf("Handshake.ServerKey = %v, want %v (from the meta cert)", hs.ServerKey, want)
			}
			// ServerInfo opened (dialFastStart waited for it), so the
			// key used for ClientInfo was right, whichever the path.

			ts, _ := dialTSHTTP(t, "tailscale derphttp", url, &tls.Config{RootCAs: pool})
			exchange(t, ts, ours)
			ourPingPong(t, ours, [8]byte{'t', 'l', 's', 0, 0, 0, 0, 1})

			if got := rec.values(); len(got) != 2 || got[0] != tc.wantHeader {
				t.Errorf("Derp-Fast-Start headers seen = %q; want ours (first) to be %q", got, tc.wantHeader)
			}
		})
	}
}

// TestTailscaleClientOurServerTLSFallback serves our handler over TLS
// without a usable meta cert: Tailscale's client must take the 101 path
// (no Derp-Fast-Start header), which our server must answer correctly.
func TestTailscaleClientOurServerTLSFallback(t *testing.T) {
	for _, tc := range []struct {
		name       string
		metaCert   bool
		maxVersion uint16
	}{
		{"no meta cert", false, 0},
		{"meta cert TLS 1.2", true, tls.VersionTLS12},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkNoLeaks(t)
			cert, pool := selfSignedCert(t)
			s := newOurServer(t)
			cfg := &tls.Config{
				Certificates: []tls.Certificate{cert},
				MaxVersion:   tc.maxVersion,
				NextProtos:   []string{"http/1.1"},
			}
			if tc.metaCert {
				relay.AppendMetaCert(cfg, s.MetaCert())
			}
			rec := &headerRecorder{next: s}
			url := serveTLS(t, derpMux(rec), cfg)

			ts, tc2 := dialTSHTTP(t, "tailscale derphttp", url, &tls.Config{RootCAs: pool})
			if cs, ok := tc2.TLSConnectionState(); !ok {
				t.Errorf("tailscale client has no TLS state")
			} else if len(cs.PeerCertificates) != 1 {
				// Our server leaves the meta cert out of TLS 1.2
				// handshakes, where it would travel in clear text.
				t.Errorf("tailscale client: TLS %#x, %d certificates; want the leaf alone", cs.Version, len(cs.PeerCertificates))
			}
			if got, want := relayKey(ts.serverKey()), s.PublicKey(); got != want {
				t.Fatalf("tailscale client learned server key %v, want %v", got, want)
			}
			ours, hs := dialFastStart(t, "ours", &relay.FastStart{TLSConfig: &tls.Config{RootCAs: pool}}, url)
			if hs.Path != relay.UpgradePath {
				t.Errorf("our FastStart took path %v (reason %q), want UpgradePath", hs.Path, hs.Reason)
			}
			exchange(t, ts, ours)
			if got := rec.values(); len(got) != 2 || got[0] != "" || got[1] != "" {
				t.Errorf("Derp-Fast-Start headers seen = %q, want two empty", got)
			}
		})
	}
}

// TestOurServerCloseTailscaleClients checks what Tailscale clients see when
// our server shuts down: a ServerRestarting frame they can parse, then the
// end of the connection; Close returns once every session ended.
func TestOurServerCloseTailscaleClients(t *testing.T) {
	checkNoLeaks(t)
	s := newOurServer(t)
	addr := acceptLoop(t, s.Accept, s.Close)
	url := servePlain(t, derpMux(s))
	raw := dialTS(t, "tailscale raw", addr)
	viaHTTP, _ := dialTSHTTP(t, "tailscale derphttp", url, nil)

	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	for _, p := range []*tsPeer{raw, viaHTTP} {
		msgs, err := tsRecvUntilErr(t, p)
		t.Logf("%s got %v, then %v", p.name, msgs, err)
		var restarting *derp.ServerRestartingMessage
		for _, m := range msgs {
			if r, ok := m.(derp.ServerRestartingMessage); ok {
				restarting = &r
			}
		}
		if restarting == nil {
			t.Errorf("%s: no ServerRestarting before the connection ended (got %v)", p.name, msgs)
		} else if restarting.ReconnectIn < 0 || restarting.TryFor <= 0 {
			t.Errorf("%s: ServerRestarting %+v: want ReconnectIn >= 0 and TryFor > 0", p.name, *restarting)
		}
	}
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	case <-time.After(recvTimeout):
		t.Fatalf("our server's Close did not return within %v", recvTimeout)
	}
}

// tsRecvUntilErr returns every message a Tailscale client receives until
// its connection fails, and the error.
func tsRecvUntilErr(t *testing.T, p *tsPeer) ([]derp.ReceivedMessage, error) {
	t.Helper()
	type result struct {
		msgs []derp.ReceivedMessage
		err  error
	}
	done := make(chan result, 1)
	go func() {
		var r result
		for {
			m, err := p.recv()
			if err != nil {
				r.err = err
				break
			}
			if rp, ok := m.(derp.ReceivedPacket); ok {
				rp.Data = append([]byte(nil), rp.Data...)
				m = rp
			}
			r.msgs = append(r.msgs, m)
		}
		done <- r
	}()
	select {
	case r := <-done:
		return r.msgs, r.err
	case <-time.After(recvTimeout):
		p.close()
		r := <-done
		t.Fatalf("%s: connection still up %v after the server's Close; got %v", p.name, recvTimeout, r.msgs)
		return nil, nil
	}
}

// TestMeshInterop checks the mesh frames across implementations: a mesh
// watcher (WatchConns) gets PeerPresent (key, address, flags, and since
// Tailscale v1.104 the peer's app name) and PeerGone, and a mesh peer's
// ForwardPacket is delivered with the original source key.
func TestMeshInterop(t *testing.T) {
	mesh := newPriv(t) // 32 random bytes
	meshHex := hex.EncodeToString(mesh[:])

	t.Run("tailscale watcher, our server", func(t *testing.T) {
		checkNoLeaks(t)
		s := newOurServer(t, relay.WithMeshKey(meshHex))
		addr := acceptLoop(t, s.Accept, s.Close)
		mk, err := key.ParseDERPMesh(meshHex)
		if err != nil {
			t.Fatal(err)
		}
		w := dialTS(t, "tailscale mesh watcher", addr, derp.MeshKey(mk))
		if err := w.raw.WatchConnectionChanges(); err != nil {
			t.Fatal(err)
		}
		tsWaitPeerPresent(t, w, w.relayPub(), addrPortOf(t, w.nc.LocalAddr()), derp.PeerPresentIsMeshPeer, "")

		// A Tailscale client before v1.104 reads the 51 bytes it knows
		// and ignores the app name after them.
		ours := dialOurs(t, "ours", addr, relay.AppName("relay-interop/1"))
		want := ""
		if tsSendsAppName {
			want = "relay-interop/1"
		}
		tsWaitPeerPresent(t, w, ours.pub, addrPortOf(t, ours.c.LocalAddr()), derp.PeerPresentIsRegular, want)

		// ForwardPacket from the Tailscale mesh peer, on behalf of a key
		// that is not connected here, reaches our client with that source.
		src := newPriv(t).Public()
		pkt := payload("forwarded by tailscale")
		if err := tsForwardPacket(w.raw, tsKey(src), tsKey(ours.pub), pkt); err != nil {
			t.Fatal(err)
		}
		if got := recvPacket(t, ours); got.Source != src || !bytes.Equal(got.Data, pkt) {
			t.Fatalf("ours got %x from %v, want %x from %v", got.Data, got.Source, pkt, src)
		}

		ours.c.Close()
		tsWaitPeerGone(t, w, ours.pub, derp.PeerGoneReasonDisconnected)
	})

	t.Run("our watcher, tailscale server", func(t *testing.T) {
		checkNoLeaks(t)
		s := newTSServer(t)
		if err := s.SetMeshKey(meshHex); err != nil {
			t.Fatal(err)
		}
		addr := tsAcceptLoop(t, s)
		w := dialOurs(t, "our mesh watcher", addr, relay.MeshKey(meshHex))
		if err := w.c.WatchConnectionChanges(); err != nil {
			t.Fatal(err)
		}
		ourWaitPeerPresent(t, w, w.pub, addrPortOf(t, w.c.LocalAddr()), relay.PeerIsMeshPeer, "")

		ts := dialTS(t, "tailscale", addr, derp.AppName("tailscaled-interop"))
		want := ""
		if tsSendsAppName {
			want = "tailscaled-interop"
		}
		ourWaitPeerPresent(t, w, ts.relayPub(), addrPortOf(t, ts.nc.LocalAddr()), relay.PeerIsRegular, want)

		src := newPriv(t).Public()
		pkt := payload("forwarded by ours")
		if err := w.c.ForwardPacket(src, ts.relayPub(), pkt); err != nil {
			t.Fatal(err)
		}
		if got := recvTSPacket(t, ts); got.Source != tsKey(src) || !bytes.Equal(got.Data, pkt) {
			t.Fatalf("tailscale got %x from %v, want %x from %v", got.Data, got.Source, pkt, src)
		}

		ts.close()
		ourWaitPeerGone(t, w, ts.relayPub(), relay.PeerGoneDisconnected)
	})
}

func addrPortOf(t *testing.T, a net.Addr) netip.AddrPort {
	t.Helper()
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		t.Fatalf("address %v: %v", a, err)
	}
	return ap
}

// tsWaitPeerPresent waits for a Tailscale watcher's PeerPresent about peer
// and checks the address and flags it carries.
func tsWaitPeerPresent(t *testing.T, w *tsPeer, peer relay.PublicKey, addr netip.AddrPort, flags derp.PeerPresentFlags, appName string) {
	t.Helper()
	m := recvTS(t, "wait for PeerPresent", w, func(m derp.ReceivedMessage) bool {
		pp, ok := m.(derp.PeerPresentMessage)
		return ok && pp.Key == tsKey(peer)
	}).(derp.PeerPresentMessage)
	if name := tsPeerAppName(m); m.IPPort != addr || m.Flags != flags || name != appName {
		t.Fatalf("%s: PeerPresent for %v has address %v flags %#x app name %q, want %v flags %#x app name %q", w.name, peer.ShortString(), m.IPPort, m.Flags, name, addr, flags, appName)
	}
}

// ourWaitPeerPresent waits for our watcher's PeerPresent about peer.
func ourWaitPeerPresent(t *testing.T, w *ourPeer, peer relay.PublicKey, addr netip.AddrPort, flags relay.PeerPresentFlags, appName string) {
	t.Helper()
	m := recvOurs(t, "wait for PeerPresent", w, func(m relay.Message) bool {
		pp, ok := m.(relay.PeerPresent)
		return ok && pp.Key == peer
	}).(relay.PeerPresent)
	if m.Addr != addr || m.Flags != flags || m.AppName != appName {
		t.Fatalf("%s: PeerPresent for %v has address %v flags %#x app name %q, want %v flags %#x app name %q", w.name, peer.ShortString(), m.Addr, m.Flags, m.AppName, addr, flags, appName)
	}
}

// TestServerInfoRateLimitToTailscale checks that the send limit our server
// announces in ServerInfo is what Tailscale's client parses, and that a
// client obeying it still relays.
func TestServerInfoRateLimitToTailscale(t *testing.T) {
	checkNoLeaks(t)
	const rate, burst = 4 << 20, 1 << 20
	s := newOurServer(t, relay.WithRateLimit(rate, burst))
	addr := acceptLoop(t, s.Accept, s.Close)
	ts := dialTS(t, "tailscale", addr)
	ours := dialOurs(t, "ours", addr)
	if ts.info.TokenBucketBytesPerSecond != rate || ts.info.TokenBucketBytesBurst < burst {
		t.Errorf("tailscale client parsed ServerInfo %+v, want rate %d and burst >= %d", ts.info, rate, burst)
	}
	if ours.info.TokenBucketBytesPerSecond != rate || ours.info.TokenBucketBytesBurst != ts.info.TokenBucketBytesBurst {
		t.Errorf("our client parsed ServerInfo %+v, tailscale's %+v", ours.info, ts.info)
	}
	exchange(t, ts, ours)
}

// TestMaximalPacketFromTailscaleClientUnderRateLimit: Tailscale's client
// drops, without a word, every packet whose frame costs more than the
// burst our server announces, so the least burst must pay for a maximal
// SendPacket frame with its header: a 64 KiB packet gets through.
func TestMaximalPacketFromTailscaleClientUnderRateLimit(t *testing.T) {
	checkNoLeaks(t)
	s := newOurServer(t, relay.WithRateLimit(64<<20, 0)) // the least burst
	addr := acceptLoop(t, s.Accept, s.Close)
	a, b := dialTS(t, "tailscale a", addr), dialTS(t, "tailscale b", addr)
	if a.info.TokenBucketBytesPerSecond != 64<<20 {
		t.Fatalf("tailscale client parsed ServerInfo %+v", a.info)
	}
	pkt := payload("maximal")
	pkt = append(pkt, make([]byte, relay.MaxPacketSize-len(pkt))...)
	tsToTS(t, a, b, pkt)
}

// TestOurServerCloseWhileTailscaleClientsLeave closes our server while its
// Tailscale clients are disconnecting, each having received from all the
// others, so that PeerGone notices are being queued to sessions while Close
// runs. Run with -race: nothing may race, and Close must return promptly.
func TestOurServerCloseWhileTailscaleClientsLeave(t *testing.T) {
	const rounds, clients = 40, 6
	for round := range rounds {
		t.Run(fmt.Sprint(round), func(t *testing.T) {
			checkNoLeaks(t)
			s := newOurServer(t, relay.WithRestartNotice(0, time.Second))
			addr := acceptLoop(t, s.Accept, s.Close)
			var peers []*tsPeer
			for i := range clients {
				peers = append(peers, dialTS(t, fmt.Sprintf("tailscale %d", i), addr))
			}
			for _, from := range peers {
				for _, to := range peers {
					if to != from {
						tsToTS(t, from, to, payload(from.name))
					}
				}
			}
			closed := make(chan error, 1)
			go func() { closed <- s.Close() }()
			// Let Close send its ServerRestarting notices, then leave
			// while it waits for the writers.
			time.Sleep(time.Duration(round%5) * 100 * time.Microsecond)
			for _, p := range peers {
				go p.close()
			}
			select {
			case <-closed:
			case <-time.After(recvTimeout):
				t.Fatalf("Close did not return within %v", recvTimeout)
			}
		})
	}
}

// TestDuplicateKeyTailscaleClients logs in two Tailscale clients with the
// same key to our server: the newest receives (last writer wins, as on
// Tailscale's server), a frame from the other makes it active again, and
// the Health frames our server sends about the duplicate are parsed by
// Tailscale's client (and cleared when one of them leaves).
func TestDuplicateKeyTailscaleClients(t *testing.T) {
	checkNoLeaks(t)
	s := newOurServer(t)
	addr := acceptLoop(t, s.Accept, s.Close)
	sender := dialTS(t, "sender", addr)
	priv := key.NewNode()
	dup1 := dialTSKey(t, "dup 1", addr, priv)
	dup2 := dialTSKey(t, "dup 2", addr, priv)

	isProblem := func(m derp.ReceivedMessage) bool {
		h, ok := m.(derp.HealthMessage)
		return ok && h.Problem != ""
	}
	recvTS(t, "wait for Health about the duplicate", dup1, isProblem)
	recvTS(t, "wait for Health about the duplicate", dup2, isProblem)

	// The newest connection is active.
	tsToTS(t, sender, dup2, payload("to the newest"))
	// A frame from dup 1 makes it the active one.
	tsPingPong(t, dup1, [8]byte{'d', 'u', 'p', 1})
	tsToTS(t, sender, dup1, payload("to the last writer"))

	dup2.close()
	recvTS(t, "wait for Health to clear", dup1, func(m derp.ReceivedMessage) bool {
		h, ok := m.(derp.HealthMessage)
		return ok && h.Problem == ""
	})
	tsToTS(t, sender, dup1, payload("to the one left"))
}

// TestOperatorToolsWithTailscaleClients runs our server's operator tools
// on sessions of Tailscale's client: Sessions reports what the client said
// at login and its traffic, SetRateLimit reaches the ServerInfo of the next
// Tailscale login, ClosePeer disconnects a Tailscale client, and
// ConsistencyCheck holds throughout.
func TestOperatorToolsWithTailscaleClients(t *testing.T) {
	checkNoLeaks(t)
	s := newOurServer(t)
	addr := acceptLoop(t, s.Accept, s.Close)
	a := dialTS(t, "tailscale a", addr, derp.CanAckPings(true))
	b := dialTS(t, "tailscale b", addr)
	if a.info.TokenBucketBytesPerSecond != 0 {
		t.Fatalf("limit before SetRateLimit: %+v", a.info)
	}
	tsToTS(t, a, b, payload("x"))

	// The server counts a packet sent once its write returned, which may
	// be just after the client read it.
	var seen map[relay.PublicKey]relay.SessionInfo
	for deadline := time.Now().Add(recvTimeout); ; time.Sleep(5 * time.Millisecond) {
		seen = map[relay.PublicKey]relay.SessionInfo{}
		for si := range s.Sessions() {
			seen[si.Key] = si
		}
		if seen[b.relayPub()].PacketsSent > 0 || time.Now().After(deadline) {
			break
		}
	}
	sa, sb := seen[a.relayPub()], seen[b.relayPub()]
	if len(seen) != 2 || sa.Info.Version != relay.ProtocolVersion || !sa.Info.CanAckPings || sb.Info.CanAckPings {
		t.Errorf("sessions of Tailscale clients: %+v", seen)
	}
	if sa.PacketsReceived != 1 || sb.PacketsSent != 1 || sa.BytesReceived != int64(len(payload("x"))) {
		t.Errorf("traffic: a %+v, b %+v", sa, sb)
	}
	if err := s.ConsistencyCheck(); err != nil {
		t.Fatal(err)
	}

	const rate = 8 << 20
	s.SetRateLimit(rate, 0)
	c := dialTS(t, "tailscale c", addr)
	if c.info.TokenBucketBytesPerSecond != rate || c.info.TokenBucketBytesBurst < relay.MaxPacketSize {
		t.Errorf("Tailscale client parsed ServerInfo %+v after SetRateLimit(%d, 0)", c.info, rate)
	}
	tsToTS(t, c, a, payload("limited"))

	if n := s.ClosePeer(b.relayPub()); n != 1 {
		t.Fatalf("ClosePeer closed %d sessions", n)
	}
	// Tailscale's client sees its connection end.
	ended := make(chan error, 1)
	go func() {
		for {
			if _, err := b.recv(); err != nil {
				ended <- err
				return
			}
		}
	}()
	select {
	case err := <-ended:
		t.Logf("tailscale b after ClosePeer: %v", err)
	case <-time.After(recvTimeout):
		b.close()
		<-ended
		t.Fatal("tailscale b still connected after ClosePeer")
	}
	// The session unregisters as it ends, which may be just after the
	// client saw its connection close.
	for deadline := time.Now().Add(recvTimeout); s.IsClientConnected(b.relayPub()); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("b still registered after ClosePeer")
		}
	}
	if err := s.ConsistencyCheck(); err != nil {
		t.Fatal(err)
	}
}
