package interop

import (
	"crypto/tls"
	"testing"

	"tailscale.com/derp/derpserver"
	"tailscale.com/types/key"
)

// tsServerTLSConfig returns a TLS server config for cert that serves it
// through GetCertificate (Tailscale's ModifyTLSConfigToAddMetaCert only
// wraps GetCertificate), with s's meta cert appended when s is not nil.
// The config does not set Certificates: Go calls GetCertificate only when
// Certificates is empty or the client sent SNI, and clients dialing
// 127.0.0.1 send no SNI.
func tsServerTLSConfig(cert tls.Certificate, s *derpserver.Server, maxVersion uint16) *tls.Config {
	cfg := &tls.Config{
		MaxVersion: maxVersion,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return &cert, nil
		},
	}
	if s != nil {
		s.ModifyTLSConfigToAddMetaCert(cfg)
	}
	return cfg
}

// newTSServer starts Tailscale's DERP server; cleanup closes it, which
// ends every connection it accepted.
func newTSServer(t *testing.T) *derpserver.Server {
	t.Helper()
	s := derpserver.New(key.NewNode(), t.Logf)
	t.Cleanup(func() { s.Close() })
	return s
}

// TestTailscaleSanity checks the harness itself with Tailscale on both
// ends: derphttp clients take the fast-start path to derpserver.Handler
// over TLS 1.3 with the meta cert, raw derp clients go through
// Server.Accept, and all of them relay packets to each other.
func TestTailscaleSanity(t *testing.T) {
	checkNoLeaks(t)
	cert, pool := selfSignedCert(t)
	s := newTSServer(t)
	rec := &headerRecorder{next: derpserver.Handler(s)}
	url := serveTLS(t, derpMux(rec), tsServerTLSConfig(cert, s, 0))
	addr := tsAcceptLoop(t, s)

	a, ac := dialTSHTTP(t, "derphttp a", url, &tls.Config{RootCAs: pool})
	b, _ := dialTSHTTP(t, "derphttp b", url, &tls.Config{RootCAs: pool})
	c := dialTS(t, "raw c", addr)

	if cs, ok := ac.TLSConnectionState(); !ok || cs.Version != tls.VersionTLS13 {
		t.Fatalf("TLS state = %v, %v; want TLS 1.3", cs, ok)
	}
	for _, p := range []*tsPeer{a, b, c} {
		if got, want := p.serverKey(), s.PublicKey(); got != want {
			t.Fatalf("%s sees server key %v, want %v", p.name, got, want)
		}
	}
	tsToTS(t, a, b, payload("a to b"))
	tsToTS(t, b, a, payload("b to a"))
	tsToTS(t, c, a, payload("c to a"))
	tsToTS(t, a, c, payload("a to c"))
	// Both handlers have run by now: each client received a packet.
	if got := rec.values(); len(got) != 2 || got[0] != "1" || got[1] != "1" {
		t.Fatalf("Derp-Fast-Start headers seen = %q, want [1 1]", got)
	}
}
