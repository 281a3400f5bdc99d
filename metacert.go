package relay

// The meta cert: an extra certificate at the end of the server's TLS chain
// whose subject names the server's DERP key, so that a TLS 1.3 client knows
// the key before it sends its first HTTP byte (fast start). This file mints
// it, finds it in a peer's chain, and splices it into a tls.Config. It knows
// nothing about Server or Client internals.

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"log"
	"maps"
	"math/big"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// MetaCertCommonNamePrefix is the prefix of the meta cert's subject CN
// ("derpkey"); the 64 hex digits of the server's DERP key follow it. Clients
// match it case-sensitively, and Tailscale's pinned-certificate mode skips
// every certificate whose CN starts with it.
const MetaCertCommonNamePrefix = "derpkey"

// metaCertValidity is how far NotBefore and NotAfter lie from the moment the
// meta cert is minted. No DERP client checks them; they exist because some
// platform TLS stacks (Windows) reject certificates without sane validity,
// and a window on both sides tolerates clock skew.
const metaCertValidity = 30 * 24 * time.Hour

// MintMetaCert makes the self-signed Ed25519 "meta cert" DER that advertises
// a DERP key in a TLS chain: serial number protocolVersion, subject and
// issuer CN "derpkey" followed by the 64 lowercase hex digits of pub,
// valid from 30 days ago to 30 days from now, and a single critical Basic
// Constraints extension with cA false (macOS refuses a certificate whose
// subject equals its issuer without one). protocolVersion must be 1..255,
// because clients reject serials longer than 8 bits and read 0 as "no fast
// start"; servers pass [ProtocolVersion].
//
// The signing key is generated for this call and thrown away: nobody ever
// verifies the signature, since the cert is trusted only because it arrived
// inside a TLS 1.3 session the leaf already authenticated. DERP clients
// ignore validity too, but other TLS stacks and middleboxes may not, so
// [AppendMetaCert] mints a fresh one, for the same key and version, when
// the one it serves has less than a week left.
func MintMetaCert(pub PublicKey, protocolVersion int) ([]byte, error) {
	return mintMetaCertAt(pub, protocolVersion, time.Now())
}

// mintMetaCertAt is MintMetaCert at the given time.
func mintMetaCertAt(pub PublicKey, protocolVersion int, now time.Time) ([]byte, error) {
	if protocolVersion < 1 || protocolVersion > 255 {
		return nil, fmt.Errorf("relay: mint meta cert: protocol version %d outside 1..255", protocolVersion)
	}
	signPub, signPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("relay: mint meta cert: %w", err)
	}
	name := pkix.Name{CommonName: MetaCertCommonNamePrefix + pub.String()}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(int64(protocolVersion)),
		Subject:      name,
		Issuer:       name,
		NotBefore:    now.Add(-metaCertValidity),
		NotAfter:     now.Add(metaCertValidity),
		// crypto/x509 encodes cA=false with no path length as the empty
		// SEQUENCE the protocol calls for, and adds no SKID or AKID to a
		// self-signed non-CA certificate; TestMintMetaCert pins both.
		BasicConstraintsValid: true,
		IsCA:                  false,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, signPub, signPriv)
	if err != nil {
		return nil, fmt.Errorf("relay: mint meta cert: %w", err)
	}
	return der, nil
}

// ParseMetaCert finds the meta cert anywhere in a peer's certificate chain,
// the leaf position included, and returns the DERP key it names and the
// protocol version in its serial number.
//
// A certificate is a candidate if its subject CN is
// [MetaCertCommonNamePrefix] followed by exactly 64 hex digits (either case)
// and its serial number is between 0 and 255. The first candidate wins; a
// certificate that looks like a meta cert but fails a test is skipped, not
// fatal, so a later good one is still found. Nil entries and certificates
// without a serial are skipped. Signatures and validity are deliberately not
// checked.
//
// ok with version 0 means the server named its key but does not offer fast
// start; deciding what to do with that (Tailscale's client uses the classic
// upgrade and trusts the key) is the caller's job. So is the TLS version:
// only a chain from a TLS 1.3 or later handshake is encrypted on the wire
// and therefore trustworthy, and callers must ignore the meta cert of a TLS
// 1.2 handshake, which this function cannot see.
func ParseMetaCert(chain []*x509.Certificate) (pub PublicKey, version int, ok bool) {
	for _, cert := range chain {
		if pub, version, ok := parseMetaCertCandidate(cert); ok {
			return pub, version, true
		}
	}
	return PublicKey{}, 0, false
}

// parseMetaCertCandidate applies ParseMetaCert's tests to one certificate.
func parseMetaCertCandidate(cert *x509.Certificate) (pub PublicKey, version int, ok bool) {
	if cert == nil || cert.SerialNumber == nil {
		return PublicKey{}, 0, false
	}
	hexKey, found := strings.CutPrefix(cert.Subject.CommonName, MetaCertCommonNamePrefix)
	// The length test first keeps hostile CNs from costing an error value.
	if !found || len(hexKey) != 2*KeyLen {
		return PublicKey{}, 0, false
	}
	serial := cert.SerialNumber
	if serial.Sign() < 0 || serial.BitLen() > 8 {
		return PublicKey{}, 0, false
	}
	pub, err := ParsePublicKey(hexKey)
	if err != nil {
		return PublicKey{}, 0, false
	}
	return pub, int(serial.Int64()), true
}

// AppendMetaCert makes cfg present metaCert as the last certificate of its
// chain, after the leaf and any intermediates, where standard TLS clients
// ignore it (they build paths from the leaf and treat the rest as optional
// intermediates) and DERP clients look for it. It goes only into TLS 1.3
// handshakes: TLS 1.2 sends the chain in clear text, where the meta cert
// would tell every observer that the server is a DERP server and which key
// it has, and DERP clients do not trust it there anyway. Nor does it go
// into an ACME TLS-ALPN-01 validation (RFC 8737: a ClientHello offering
// only "acme-tls/1"), whose challenge certificate the CA checks alone.
//
// The choice is made for each handshake as its certificate is picked.
// AppendMetaCert takes cfg's certificates (cfg.Certificates,
// cfg.NameToCertificate, cfg.GetCertificate) as they are when it is
// called, so set them before; it empties cfg.Certificates and
// cfg.NameToCertificate and sets cfg.GetCertificate to a function that
// picks a certificate from them as crypto/tls would and, if the handshake
// negotiates TLS 1.3 under the config it runs on, returns a copy whose
// chain ends with the meta cert. The certificates, and those the original
// GetCertificate returns, are never modified, because certificate managers
// such as golang.org/x/crypto/acme/autocert hand one cached
// *tls.Certificate to every concurrent handshake. Errors of the original
// GetCertificate pass through unchanged, a nil result falls back to the
// static certificates as in crypto/tls, and a certificate with an empty
// chain, which has no leaf to put the meta cert behind, is served as it
// is. A config with no certificates of its own gets no GetCertificate, so
// that certificates a server puts into its copy (http.Server.ServeTLS
// given file names) are served as they are, without the meta cert.
//
// Every handshake runs on the config crypto/tls was given, so a clone of
// cfg made after AppendMetaCert, and the copy http.Server.ServeTLS makes,
// serve the meta cert with their own settings (client authentication,
// versions, session ticket keys). cfg.GetConfigForClient is set: it returns
// nil (use cfg), or, if cfg had one, wraps it, and a config that returns,
// other than cfg itself, is cloned for the handshake and set up the same
// way, with the certificates it has then.
//
// Calling AppendMetaCert again with the same metaCert adds nothing: a chain
// that already ends with metaCert is left alone. A chain that ends with
// another meta cert (cfg is a clone of a config given another Server's meta
// cert) has it replaced, since clients take the first meta cert of a chain;
// to serve two Servers, give each its own clone of a config. An empty
// metaCert leaves cfg unchanged, since a zero-length certificate would
// break every Go client's handshake.
//
// DERP upgrades an HTTP/1.1 request by hijacking its connection, and an
// HTTP/2 stream cannot be hijacked, so AppendMetaCert also rewrites
// cfg.NextProtos (and that of configs from GetConfigForClient) without
// "h2" and with "http/1.1" (which is what the list becomes if it was
// empty); other values such as "acme-tls/1" are kept. Beware of
// http.Server.ServeTLS and ListenAndServeTLS: unless srv.Protocols allows
// only HTTP/1 (or srv.TLSNextProto is a non-nil map without "h2"), they add
// "h2" back, to srv.TLSConfig itself and to their copy of it. It lands
// after "http/1.1", so clients offering both still get HTTP/1.1, but a
// client offering only h2 gets a connection that cannot be upgraded. Given
// certificate file names, they put the loaded pair into their copy's
// Certificates, which crypto/tls consults, if cfg had certificates of its
// own, only for clients that send no server name. Prefer
// srv.Serve(tls.NewListener(ln, cfg)), which uses cfg as it is.
//
// A meta cert that names a key (as every one from [MintMetaCert] does) is
// renewed while cfg is in use: the first TLS 1.3 handshake after it has less
// than a week of validity left (by the wall clock, time spent asleep
// included), or at which it is not valid yet (the clock was set back), mints
// a new one for the same key and version, and later handshakes serve that.
//
// AppendMetaCert modifies cfg, so call it before cfg is used by any
// listener, and set cfg.GetConfigForClient, if at all, before it; cfg must
// not be nil.
func AppendMetaCert(cfg *tls.Config, metaCert []byte) {
	if len(metaCert) == 0 {
		return
	}
	// Our own copy, so that a caller reusing its buffer cannot change
	// what every later handshake serves.
	renew := newMetaRenewer(bytes.Clone(metaCert))
	serveMetaCert(cfg, renew)
	// Set even without a callback to wrap, as AppendMetaCert always has:
	// code that wraps it afterwards calls it without a nil check.
	getConfig := cfg.GetConfigForClient
	cfg.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		if getConfig == nil {
			return nil, nil
		}
		c, err := getConfig(hello)
		if err != nil || c == nil || c == cfg {
			return c, err
		}
		// The returned config may be shared by other handshakes, so it
		// is cloned rather than changed. Its own GetConfigForClient is
		// never consulted by crypto/tls.
		c = c.Clone()
		serveMetaCert(c, renew)
		return c, nil
	}
}

// serveMetaCert does AppendMetaCert's work on everything in cfg except
// GetConfigForClient: its certificates are served through a metaCertSource
// with renew's meta cert, and its ALPN list is made DERP's.
func serveMetaCert(cfg *tls.Config, renew *metaRenewer) {
	cfg.NextProtos = metaCertNextProtos(cfg.NextProtos)
	// crypto/tls consults NameToCertificate only among Certificates.
	if len(cfg.Certificates) == 0 && cfg.GetCertificate == nil {
		return
	}
	src := &metaCertSource{
		certs: slices.Clone(cfg.Certificates),
		//lint:ignore SA1019 a caller that still fills it keeps it.
		byName: maps.Clone(cfg.NameToCertificate),
		get:    cfg.GetCertificate,
		renew:  renew,
	}
	//lint:ignore SA1019 as above.
	cfg.Certificates, cfg.NameToCertificate = nil, nil
	cfg.GetCertificate = src.certificate
}

// metaCertSource serves a config's certificates, taken when AppendMetaCert
// was called, with the meta cert behind the chain in TLS 1.3 handshakes.
type metaCertSource struct {
	certs  []tls.Certificate
	byName map[string]*tls.Certificate
	get    func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	renew  *metaRenewer
}

// certificate is the config's GetCertificate.
func (s *metaCertSource) certificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	c, err := s.pick(hello)
	if err != nil || c == nil || len(c.Certificate) == 0 {
		return c, err
	}
	if negotiatesTLS13(hello) && !acmeChallenge(hello) {
		cc := withMetaCert(c, s.renew.current())
		return &cc, nil
	}
	if endsWithMetaCert(c) {
		// A chain that came with a meta cert (from a config that
		// served one, or put there by hand) is sent without it.
		cc := withoutMetaCert(c)
		return &cc, nil
	}
	return c, nil
}

// pick chooses among s's certificates for hello in crypto/tls's documented
// order: the callback, when there is one and either no static certificates
// or a server name; then the only static certificate; the name map, by
// exact name and by a wildcard for the first label; the first static
// certificate the client supports; and finally the first one. (nil, nil)
// leaves the choice to crypto/tls, which then looks at the Certificates of
// the config the handshake runs on.
func (s *metaCertSource) pick(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if s.get != nil && (len(s.certs) == 0 || hello.ServerName != "") {
		if c, err := s.get(hello); c != nil || err != nil {
			return c, err
		}
	}
	switch len(s.certs) {
	case 0:
		return nil, nil
	case 1:
		return &s.certs[0], nil
	}
	if s.byName != nil {
		name := strings.ToLower(hello.ServerName)
		if c, ok := s.byName[name]; ok {
			return c, nil
		}
		if name != "" {
			wildcard := "*"
			if i := strings.IndexByte(name, '.'); i >= 0 {
				wildcard += name[i:]
			}
			if c, ok := s.byName[wildcard]; ok {
				return c, nil
			}
		}
	}
	for i := range s.certs {
		if hello.SupportsCertificate(&s.certs[i]) == nil {
			return &s.certs[i], nil
		}
	}
	return &s.certs[0], nil
}

// metaCertRenewBefore is how long before its NotAfter a served meta cert is
// replaced.
const metaCertRenewBefore = 7 * 24 * time.Hour

// metaCertNow is the clock of meta cert renewal; tests move it.
var metaCertNow = time.Now

// metaRenewer keeps the meta cert that AppendMetaCert serves fresh.
type metaRenewer struct {
	pub     PublicKey
	version int
	mu      sync.Mutex // serializes renewals
	cur     atomic.Pointer[servedMeta]
}

// servedMeta is a meta cert being served.
type servedMeta struct {
	der       []byte
	validFrom time.Time // renewed before this too (the clock went back)
	renewAt   time.Time // zero: never (the DER names no key)
}

// due reports whether m must be renewed at now: it is about to expire, or
// not valid yet. The times are wall-clock readings, as the certificate's
// are: a monotonic clock, which stops while the machine sleeps, would let
// a server that sleeps a lot serve an expired cert.
func (m *servedMeta) due(now time.Time) bool {
	return !m.renewAt.IsZero() && (now.Before(m.validFrom) || !now.Before(m.renewAt))
}

func newMetaRenewer(der []byte) *metaRenewer {
	r := &metaRenewer{}
	m := &servedMeta{der: der}
	if cert, err := x509.ParseCertificate(der); err == nil {
		if pub, version, ok := parseMetaCertCandidate(cert); ok && version > 0 {
			r.pub, r.version = pub, version
			m.validFrom, m.renewAt = cert.NotBefore, cert.NotAfter.Add(-metaCertRenewBefore)
		}
	}
	r.cur.Store(m)
	return r
}

// current returns the DER of the meta cert to serve now, minting a new one
// if the served one is due for renewal. If minting fails (crypto/rand
// failing), the old one is served and minting is retried an hour later.
func (r *metaRenewer) current() []byte {
	m := r.cur.Load()
	now := metaCertNow().Round(0) // the wall clock only (see due)
	if !m.due(now) {
		return m.der
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if m = r.cur.Load(); !m.due(now) {
		return m.der
	}
	der, err := mintMetaCertAt(r.pub, r.version, now)
	if err != nil {
		r.cur.Store(&servedMeta{der: m.der, renewAt: now.Add(time.Hour)})
		return m.der
	}
	r.cur.Store(&servedMeta{der: der, validFrom: now.Add(-metaCertValidity),
		renewAt: now.Add(metaCertValidity - metaCertRenewBefore)})
	return der
}

// extensionSupportedVersions is the TLS extension (RFC 8446, section
// 4.2.1) without which no TLS 1.3 can be negotiated.
const extensionSupportedVersions = 43

// negotiatesTLS13 reports whether the handshake hello was passed to for
// picking a certificate will use TLS 1.3. ClientHelloInfo does not carry
// the chosen version, but SupportsCertificate chooses it the way the
// handshake did: from the client's versions and those of the config the
// handshake runs on (cfg, a clone of it, or a config from
// GetConfigForClient), which a copy of hello still refers to. With the
// copy's server name, signature algorithms, groups, point formats and
// cipher suites cleared, a certificate without a key is supported exactly
// when that version is TLS 1.3: TLS 1.3 then has nothing left to check,
// and any older version needs a key exchange the certificate cannot do.
func negotiatesTLS13(hello *tls.ClientHelloInfo) bool {
	// crypto/tls makes up a version list from the legacy version field
	// when the extension is missing, which may name TLS 1.3; the
	// handshake then uses TLS 1.2 at most.
	if !slices.Contains(hello.SupportedVersions, tls.VersionTLS13) ||
		!slices.Contains(hello.Extensions, extensionSupportedVersions) {
		return false
	}
	probe := *hello
	probe.ServerName = ""
	probe.SignatureSchemes = nil
	probe.SupportedCurves, probe.SupportedPoints, probe.CipherSuites = nil, nil, nil
	return probe.SupportsCertificate(&tls.Certificate{}) == nil
}

// acmeChallenge reports whether hello is an ACME TLS-ALPN-01 validation
// (RFC 8737), which offers the one protocol "acme-tls/1". Its answer is
// the certificate manager's challenge certificate, checked by the CA; a
// meta cert behind it would be one more certificate for the CA's
// validator to refuse, and DERP clients never offer acme-tls/1.
func acmeChallenge(hello *tls.ClientHelloInfo) bool {
	return len(hello.SupportedProtos) == 1 && hello.SupportedProtos[0] == "acme-tls/1"
}

// endsWithMetaCert reports whether c's chain has a leaf and, after it, a
// meta cert at its end.
func endsWithMetaCert(c *tls.Certificate) bool {
	n := len(c.Certificate)
	return n > 1 && isMetaCert(c.Certificate[n-1])
}

// withoutMetaCert returns a shallow copy of c without the meta cert at the
// end of its chain, if there is one there; the chain is a new slice.
func withoutMetaCert(c *tls.Certificate) tls.Certificate {
	cc := *c
	if endsWithMetaCert(c) {
		cc.Certificate = slices.Clone(c.Certificate[:len(c.Certificate)-1])
	}
	return cc
}

// needsMetaCert reports whether c has a leaf but does not end with meta yet.
func needsMetaCert(c *tls.Certificate, meta []byte) bool {
	n := len(c.Certificate)
	return n > 0 && !bytes.Equal(c.Certificate[n-1], meta)
}

// withMetaCert returns a shallow copy of c whose chain ends with meta. The
// chain is always a new slice: appending to c.Certificate could write into
// spare capacity of a backing array that other handshakes are reading.
// A meta cert already at the end of the chain (another server's, in a
// config cloned from one that served it) is replaced, not followed:
// clients take the first meta cert of a chain.
func withMetaCert(c *tls.Certificate, meta []byte) tls.Certificate {
	cc := *c
	if !needsMetaCert(c, meta) {
		return cc
	}
	old := c.Certificate
	if n := len(old); n > 1 && isMetaCert(old[n-1]) {
		old = old[:n-1]
	}
	chain := make([][]byte, 0, len(old)+1)
	chain = append(chain, old...)
	cc.Certificate = append(chain, meta)
	return cc
}

// isMetaCert reports whether der is a meta cert, for any key. Only a
// certificate whose bytes contain the CN prefix is parsed, so that the
// chains of ordinary handshakes cost a byte search.
func isMetaCert(der []byte) bool {
	if !bytes.Contains(der, []byte(MetaCertCommonNamePrefix)) {
		return false
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return false
	}
	_, _, ok := parseMetaCertCandidate(cert)
	return ok
}

// metaCertNextProtos returns a new ALPN list for a DERP listener: "h2" is
// replaced by "http/1.1" (so the server's preference order is otherwise
// kept), and "http/1.1" is added if still missing, because a server whose
// list has no overlap with a client's offer fails the handshake.
func metaCertNextProtos(protos []string) []string {
	out := make([]string, 0, len(protos)+1)
	haveHTTP1 := false
	for _, p := range protos {
		if p == "h2" {
			p = "http/1.1"
		}
		if p == "http/1.1" {
			if haveHTTP1 {
				continue
			}
			haveHTTP1 = true
		}
		out = append(out, p)
	}
	if !haveHTTP1 {
		out = append(out, "http/1.1")
	}
	return out
}

// TB is the part of testing.TB that StartTestServer uses; *testing.T and
// *testing.B satisfy it.
type TB interface {
	Helper()
	Cleanup(func())
	Fatalf(format string, args ...any)
}

// TestServer is a relay server running in-process on 127.0.0.1 with TLS and
// the meta cert, for integration tests.
type TestServer struct {
	// Server is the relay server, for its statistics and sessions.
	Server *Server
	// URL is the server's DERP URL, "https://127.0.0.1:<port>/derp".
	URL string
	// TLSConfig trusts the server's self-signed certificate; give it to
	// FastStart (it is cloned there, so it may be shared).
	TLSConfig *tls.Config

	srv  *http.Server
	done chan struct{}
}

// StartTestServer starts a Server with opts behind an HTTP/1.1 TLS listener on
// 127.0.0.1 with a fresh self-signed certificate and the meta cert, so
// clients take the fast path. It is closed when the test ends:
//
//	ts := relay.StartTestServer(t)
//	c, _, err := (&relay.FastStart{TLSConfig: ts.TLSConfig}).Dial(ctx, ts.URL, priv)
func StartTestServer(t TB, opts ...ServerOption) *TestServer {
	t.Helper()
	priv, err := GeneratePrivateKey()
	if err != nil {
		t.Fatalf("relay: StartTestServer: %v", err)
	}
	s := NewServer(priv, opts...)
	cert, pool, err := selfSignedCert("127.0.0.1", "localhost")
	if err != nil {
		s.Close()
		t.Fatalf("relay: StartTestServer: %v", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	AppendMetaCert(cfg, s.MetaCert())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		s.Close()
		t.Fatalf("relay: StartTestServer: %v", err)
	}
	ts := &TestServer{
		Server:    s,
		URL:       "https://" + ln.Addr().String() + "/derp",
		TLSConfig: &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"},
		srv: &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second,
			ErrorLog: log.New(io.Discard, "", 0)}, // clients hanging up mid-handshake are normal here
		done: make(chan struct{}),
	}
	go func() {
		defer close(ts.done)
		ts.srv.Serve(tls.NewListener(ln, cfg))
	}()
	t.Cleanup(ts.Close)
	return ts
}

// Close stops the server and waits for its goroutines. It is safe to call
// more than once.
func (ts *TestServer) Close() {
	ts.Server.Close()
	ts.srv.Close()
	<-ts.done
}

// selfSignedCert makes a self-signed ECDSA certificate for hosts (IP
// addresses or DNS names) and a pool that trusts it.
func selfSignedCert(hosts ...string) (tls.Certificate, *x509.CertPool, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: hosts[0]},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool, nil
}
