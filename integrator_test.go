package relay

import (
	"context"
	"crypto/tls"
	"net"
	"testing"
	"time"
)

// ticketHandshake runs one TLS handshake over an in-memory pipe and has the
// server write a byte after it, which the client reads, so that a TLS 1.3
// client has processed the server's NewSessionTicket by the time it
// returns. It reports whether the session was resumed.
func ticketHandshake(t *testing.T, server, client *tls.Config) (resumed bool) {
	t.Helper()
	sc, cc := net.Pipe()
	defer sc.Close()
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	serverDone := make(chan error, 1)
	go func() {
		ts := tls.Server(sc, server)
		if err := ts.HandshakeContext(ctx); err != nil {
			sc.Close()
			serverDone <- err
			return
		}
		_, err := ts.Write([]byte{1})
		serverDone <- err
	}()
	tc := tls.Client(cc, client)
	if err := tc.HandshakeContext(ctx); err != nil {
		t.Fatalf("client handshake: %v (server: %v)", err, <-serverDone)
	}
	if _, err := tc.Read(make([]byte, 1)); err != nil {
		t.Fatalf("client read: %v", err)
	}
	if err := <-serverDone; err != nil {
		t.Fatalf("server: %v", err)
	}
	return tc.ConnectionState().DidResume
}

// TestAppendMetaCertSessionTicketKeyRotation: a fleet that shares session
// ticket keys rotates them on the live config with SetSessionTicketKeys,
// which crypto/tls documents for exactly that. The configs AppendMetaCert
// serves in cfg's place (TLS 1.2 handshakes, TLS 1.3 ones once the meta
// cert has been renewed) must follow the rotation: tickets sealed with
// the new key, so that the fleet's other servers resume them, and none
// accepted under the key that was retired.
func TestAppendMetaCertSessionTicketKeyRotation(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	pub := metaCertTestKey(t)
	start := time.Now()
	t.Cleanup(func() { metaCertNow = time.Now })
	const day = 24 * time.Hour
	for _, tc := range []struct {
		name    string
		version uint16
		at      time.Duration // the server's clock for the meta cert
	}{
		{"TLS1.2", tls.VersionTLS12, 0},
		{"TLS1.3/renewed", tls.VersionTLS13, 24 * day},
	} {
		t.Run(tc.name, func(t *testing.T) {
			metaCertNow = func() time.Time { return start.Add(tc.at) }
			var oldKey, newKey [32]byte
			oldKey[0], newKey[0] = 1, 2
			serverConfig := func(key [32]byte) *tls.Config {
				cfg := &tls.Config{Certificates: []tls.Certificate{pki.cert}}
				cfg.SetSessionTicketKeys([][32]byte{key})
				AppendMetaCert(cfg, metaCertTestMint(t, pub))
				return cfg
			}
			client := func() *tls.Config {
				c := pki.clientConfig()
				c.MinVersion, c.MaxVersion = tc.version, tc.version
				c.ClientSessionCache = tls.NewLRUClientSessionCache(4)
				return c
			}
			cfg := serverConfig(oldKey)
			before := client()
			ticketHandshake(t, cfg, before) // a ticket under the old key
			cfg.SetSessionTicketKeys([][32]byte{newKey})
			if ticketHandshake(t, cfg, before) {
				t.Errorf("a ticket sealed with the retired key was resumed after SetSessionTicketKeys")
			}
			after := client()
			ticketHandshake(t, cfg, after) // a ticket under the new key
			peer := serverConfig(newKey)   // another server of the fleet
			if !ticketHandshake(t, peer, after) {
				t.Errorf("a ticket issued after SetSessionTicketKeys was not resumed by a server with the new key: it was sealed with the old one")
			}
		})
	}
}
