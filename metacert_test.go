package relay

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// metaCertTestKey returns a fresh random DERP public key.
func metaCertTestKey(t testing.TB) PublicKey {
	t.Helper()
	priv, err := GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return priv.Public()
}

// metaCertTestMint mints a meta cert for pub with ProtocolVersion.
func metaCertTestMint(t testing.TB, pub PublicKey) []byte {
	t.Helper()
	der, err := MintMetaCert(pub, ProtocolVersion)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// metaCertTestCertDER makes a self-signed certificate with an arbitrary
// subject CN and serial, for building chains ParseMetaCert must judge.
func metaCertTestCertDER(t testing.TB, cn string, serial int64) []byte {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, priv)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func metaCertTestCert(t testing.TB, cn string, serial int64) *x509.Certificate {
	t.Helper()
	cert, err := x509.ParseCertificate(metaCertTestCertDER(t, cn, serial))
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

const metaCertTestServerName = "derp.example"

// metaCertTestPKI is a CA and a leaf it signed, both Ed25519 so that a
// thousand handshakes stay fast under the race detector.
type metaCertTestPKI struct {
	roots *x509.CertPool
	cert  tls.Certificate // chain: leaf, CA
}

func newMetaCertTestPKI(t testing.TB) *metaCertTestPKI {
	t.Helper()
	caPub, caPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "metacert test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caPub, caPriv)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	leafPub, leafPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: metaCertTestServerName},
		DNSNames:     []string{metaCertTestServerName},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, leafPub, caPriv)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	// Spare capacity in the chain's backing array: an AppendMetaCert that
	// appended to a copy of the slice header would write into it, which
	// the callers check for and the race detector reports.
	chain := make([][]byte, 2, 4)
	chain[0], chain[1] = leafDER, caDER
	return &metaCertTestPKI{
		roots: roots,
		cert:  tls.Certificate{Certificate: chain, PrivateKey: leafPriv},
	}
}

// clientConfig verifies the server's chain the standard way, so every
// handshake also shows that an extra certificate at the end does not upset
// path building.
// serverConfigs makes server configs that take their certificate in each
// of the ways AppendMetaCert handles: a static chain, GetCertificate
// returning the shared p.cert, and GetConfigForClient returning a shared
// config that offers h2.
func (p *metaCertTestPKI) serverConfigs() map[string]func() *tls.Config {
	return map[string]func() *tls.Config{
		"static": func() *tls.Config { return &tls.Config{Certificates: []tls.Certificate{p.cert}} },
		"GetCertificate": func() *tls.Config {
			return &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &p.cert, nil }}
		},
		"GetConfigForClient": func() *tls.Config {
			inner := &tls.Config{Certificates: []tls.Certificate{p.cert}, NextProtos: []string{"h2"}}
			return &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) { return inner, nil }}
		},
	}
}

func (p *metaCertTestPKI) clientConfig() *tls.Config {
	return &tls.Config{
		RootCAs:    p.roots,
		ServerName: metaCertTestServerName,
		MinVersion: tls.VersionTLS13,
		// Plain X25519: the hybrid post-quantum key exchange would add
		// nothing here but time under the race detector.
		CurvePreferences: []tls.CurveID{tls.X25519},
	}
}

// checkUntouched fails t if c's chain is no longer the leaf and CA alone,
// including in the spare capacity behind it.
func checkUntouched(t testing.TB, c *tls.Certificate) {
	t.Helper()
	if len(c.Certificate) != 2 {
		t.Errorf("shared certificate's chain length = %d, want 2", len(c.Certificate))
	}
	for i, der := range c.Certificate[len(c.Certificate):cap(c.Certificate)] {
		if der != nil {
			t.Errorf("spare capacity of the shared chain written at index %d", len(c.Certificate)+i)
		}
	}
}

// metaCertTestHandshake runs one TLS handshake over an in-memory pipe and
// returns the client's view and both sides' errors.
func metaCertTestHandshake(server, client *tls.Config) (state tls.ConnectionState, clientErr, serverErr error) {
	sc, cc := net.Pipe()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	serverDone := make(chan error, 1)
	go func() {
		ts := tls.Server(sc, server)
		err := ts.HandshakeContext(ctx)
		if err != nil {
			sc.Close()
		}
		serverDone <- err
	}()
	tc := tls.Client(cc, client)
	clientErr = tc.HandshakeContext(ctx)
	state = tc.ConnectionState()
	cc.Close()
	serverErr = <-serverDone
	sc.Close()
	return state, clientErr, serverErr
}

// checkMetaCertState fails t unless the client saw the leaf chain followed by
// meta, and ParseMetaCert finds pub with ProtocolVersion in it.
func checkMetaCertState(t testing.TB, state tls.ConnectionState, leafChain int, meta []byte, pub PublicKey) {
	t.Helper()
	certs := state.PeerCertificates
	if len(certs) != leafChain+1 {
		t.Errorf("client saw %d certificates, want %d", len(certs), leafChain+1)
		return
	}
	if !bytes.Equal(certs[len(certs)-1].Raw, meta) {
		t.Errorf("last certificate is not the meta cert")
	}
	got, version, ok := ParseMetaCert(certs)
	if !ok || got != pub || version != ProtocolVersion {
		t.Errorf("ParseMetaCert = %v, %d, %v; want %v, %d, true", got, version, ok, pub, ProtocolVersion)
	}
}

func TestMintMetaCert(t *testing.T) {
	pub := metaCertTestKey(t)
	der := metaCertTestMint(t, pub)
	if len(der) >= 500 {
		t.Errorf("meta cert is %d bytes of DER, want under 500", len(der))
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if cert.Version != 3 {
		t.Errorf("Version = %d, want 3", cert.Version)
	}
	if cert.SerialNumber.Cmp(big.NewInt(2)) != 0 {
		t.Errorf("SerialNumber = %v, want 2", cert.SerialNumber)
	}
	wantCN := "derpkey" + pub.String()
	if cert.Subject.CommonName != wantCN || len(wantCN) != 71 {
		t.Errorf("subject CN = %q, want %q", cert.Subject.CommonName, wantCN)
	}
	if len(cert.Subject.Names) != 1 {
		t.Errorf("subject has %d attributes, want only the CN", len(cert.Subject.Names))
	}
	if !bytes.Equal(cert.RawIssuer, cert.RawSubject) {
		t.Errorf("issuer %q differs from subject %q", cert.Issuer, cert.Subject)
	}
	now := time.Now()
	const day = 24 * time.Hour
	if d := cert.NotBefore.Sub(now.Add(-30 * day)).Abs(); d > time.Minute {
		t.Errorf("NotBefore = %v, want about 30 days before %v", cert.NotBefore, now)
	}
	if d := cert.NotAfter.Sub(now.Add(30 * day)).Abs(); d > time.Minute {
		t.Errorf("NotAfter = %v, want about 30 days after %v", cert.NotAfter, now)
	}
	if len(cert.Extensions) != 1 {
		t.Fatalf("%d extensions, want exactly Basic Constraints: %+v", len(cert.Extensions), cert.Extensions)
	}
	ext := cert.Extensions[0]
	if !ext.Id.Equal(asn1.ObjectIdentifier{2, 5, 29, 19}) || !ext.Critical || !bytes.Equal(ext.Value, []byte{0x30, 0x00}) {
		t.Errorf("extension = %v critical=%v value=%x, want 2.5.29.19 critical=true value=3000", ext.Id, ext.Critical, ext.Value)
	}
	if cert.IsCA || len(cert.SubjectKeyId) != 0 || len(cert.AuthorityKeyId) != 0 || cert.KeyUsage != 0 || len(cert.DNSNames) != 0 {
		t.Errorf("unexpected CA flag, key IDs, key usage or SAN")
	}
	if cert.SignatureAlgorithm != x509.PureEd25519 || cert.PublicKeyAlgorithm != x509.Ed25519 {
		t.Errorf("algorithms = %v, %v; want Ed25519", cert.SignatureAlgorithm, cert.PublicKeyAlgorithm)
	}
	if err := cert.CheckSignature(cert.SignatureAlgorithm, cert.RawTBSCertificate, cert.Signature); err != nil {
		t.Errorf("self-signature does not verify: %v", err)
	}
	if got, version, ok := ParseMetaCert([]*x509.Certificate{cert}); !ok || got != pub || version != ProtocolVersion {
		t.Errorf("ParseMetaCert(minted) = %v, %d, %v", got, version, ok)
	}

	// A fresh key each time: two mints for one server key share nothing
	// but the subject.
	cert2, err := x509.ParseCertificate(metaCertTestMint(t, pub))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(cert.RawSubjectPublicKeyInfo, cert2.RawSubjectPublicKeyInfo) {
		t.Errorf("two meta certs share a signing key")
	}

	for _, v := range []int{1, 255} {
		der, err := MintMetaCert(pub, v)
		if err != nil {
			t.Errorf("MintMetaCert(version %d): %v", v, err)
			continue
		}
		if _, got, ok := ParseMetaCert(metaCertTestParse(t, der)); !ok || got != v {
			t.Errorf("version %d parsed back as %d, %v", v, got, ok)
		}
	}
	for _, v := range []int{0, 256, -1, 1 << 20} {
		if der, err := MintMetaCert(pub, v); err == nil {
			t.Errorf("MintMetaCert(version %d) = %d bytes, want an error", v, len(der))
		}
	}
}

func metaCertTestParse(t testing.TB, der []byte) []*x509.Certificate {
	t.Helper()
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return []*x509.Certificate{cert}
}

func TestParseMetaCert(t *testing.T) {
	key1, key2 := metaCertTestKey(t), metaCertTestKey(t)
	hex1, hex2 := key1.String(), key2.String()
	leaf := metaCertTestCert(t, metaCertTestServerName, 7)
	good1 := metaCertTestCert(t, "derpkey"+hex1, 2)
	good2 := metaCertTestCert(t, "derpkey"+hex2, 2)
	upper := metaCertTestCert(t, "derpkey"+strings.ToUpper(hex1), 2)
	serial0 := metaCertTestCert(t, "derpkey"+hex1, 0)
	serial255 := metaCertTestCert(t, "derpkey"+hex1, 255)
	badHex := metaCertTestCert(t, "derpkeyzz"+hex1[2:], 2)
	short := metaCertTestCert(t, "derpkey"+hex1[:62], 2)
	long := metaCertTestCert(t, "derpkey"+hex1+"0", 2)
	prefixOnly := metaCertTestCert(t, "derpkey", 2)
	serial256 := metaCertTestCert(t, "derpkey"+hex1, 256)
	hugeSerial := metaCertTestCert(t, "derpkey"+hex1, 1<<62)
	upperPrefix := metaCertTestCert(t, "DERPKEY"+hex1, 2)
	spaced := metaCertTestCert(t, " derpkey"+hex1, 2)
	// Shapes x509.ParseCertificate would not produce, which a caller could
	// still hand over.
	negative := &x509.Certificate{Subject: pkix.Name{CommonName: "derpkey" + hex1}, SerialNumber: big.NewInt(-2)}
	noSerial := &x509.Certificate{Subject: pkix.Name{CommonName: "derpkey" + hex1}}
	empty := &x509.Certificate{}

	tests := []struct {
		name        string
		chain       []*x509.Certificate
		wantKey     PublicKey
		wantVersion int
		wantOK      bool
	}{
		{"end of chain", []*x509.Certificate{leaf, good1}, key1, 2, true},
		{"leaf position", []*x509.Certificate{good1, leaf}, key1, 2, true},
		{"only cert", []*x509.Certificate{good1}, key1, 2, true},
		{"first candidate wins", []*x509.Certificate{leaf, good2, good1}, key2, 2, true},
		{"upper case hex", []*x509.Certificate{leaf, upper}, key1, 2, true},
		{"serial 0 is found", []*x509.Certificate{leaf, serial0}, key1, 0, true},
		{"serial 255", []*x509.Certificate{serial255}, key1, 255, true},
		{"skip bad hex", []*x509.Certificate{badHex, good2}, key2, 2, true},
		{"skip short key", []*x509.Certificate{short, good2}, key2, 2, true},
		{"skip long key", []*x509.Certificate{long, good2}, key2, 2, true},
		{"skip bare prefix", []*x509.Certificate{prefixOnly, good2}, key2, 2, true},
		{"skip serial 256", []*x509.Certificate{serial256, good2}, key2, 2, true},
		{"skip huge serial", []*x509.Certificate{hugeSerial, good2}, key2, 2, true},
		{"skip negative serial", []*x509.Certificate{negative, good2}, key2, 2, true},
		{"skip nil serial", []*x509.Certificate{noSerial, good2}, key2, 2, true},
		{"prefix is case-sensitive", []*x509.Certificate{upperPrefix, good2}, key2, 2, true},
		{"prefix must be at the start", []*x509.Certificate{spaced, good2}, key2, 2, true},
		{"skip all bad", []*x509.Certificate{leaf, badHex, short, long, serial256, negative, noSerial, upperPrefix, empty, good2}, key2, 2, true},
		{"skip nil entry", []*x509.Certificate{nil, leaf, nil, good1}, key1, 2, true},
		{"no candidate", []*x509.Certificate{leaf}, PublicKey{}, 0, false},
		{"only bad candidates", []*x509.Certificate{badHex, short, long, serial256, hugeSerial, negative, noSerial, upperPrefix}, PublicKey{}, 0, false},
		{"nil chain", nil, PublicKey{}, 0, false},
		{"empty chain", []*x509.Certificate{}, PublicKey{}, 0, false},
		{"nil entries", []*x509.Certificate{nil, nil}, PublicKey{}, 0, false},
		{"zero certificate", []*x509.Certificate{empty}, PublicKey{}, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key, version, ok := ParseMetaCert(tt.chain)
			if key != tt.wantKey || version != tt.wantVersion || ok != tt.wantOK {
				t.Errorf("ParseMetaCert = %v, %d, %v; want %v, %d, %v", key, version, ok, tt.wantKey, tt.wantVersion, tt.wantOK)
			}
		})
	}
}

func TestAppendMetaCertGetCertificate(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	pub := metaCertTestKey(t)
	meta := metaCertTestMint(t, pub)

	// Like autocert: one cached certificate for every handshake.
	shared := &pki.cert
	var calls sync.Map // distinct *tls.Certificate values returned
	cfg := &tls.Config{
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return shared, nil },
	}
	AppendMetaCert(cfg, meta)
	wrapped := cfg.GetCertificate
	cfg.GetCertificate = func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
		c, err := wrapped(hello)
		if c == shared {
			t.Errorf("GetCertificate returned the shared certificate itself")
		}
		calls.Store(c, true)
		return c, err
	}

	const handshakes, workers = 1000, 8
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := w; i < handshakes; i += workers {
				state, clientErr, serverErr := metaCertTestHandshake(cfg, pki.clientConfig())
				if clientErr != nil || serverErr != nil {
					t.Errorf("handshake %d: client %v, server %v", i, clientErr, serverErr)
					return
				}
				if state.Version != tls.VersionTLS13 {
					t.Errorf("handshake %d: version %x", i, state.Version)
				}
				checkMetaCertState(t, state, 2, meta, pub)
			}
		})
	}
	wg.Wait()
	checkUntouched(t, shared)
	n := 0
	calls.Range(func(any, any) bool { n++; return true })
	if n != handshakes {
		t.Errorf("%d distinct certificates returned for %d handshakes, want a fresh copy each", n, handshakes)
	}
}

func TestAppendMetaCertStatic(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	pub := metaCertTestKey(t)
	meta := metaCertTestMint(t, pub)

	orig := []tls.Certificate{pki.cert}
	cfg := &tls.Config{Certificates: orig}
	AppendMetaCert(cfg, meta)
	//lint:ignore SA1019 AppendMetaCert empties it.
	if len(cfg.Certificates) != 0 || cfg.NameToCertificate != nil || cfg.GetCertificate == nil {
		t.Errorf("cfg.Certificates or NameToCertificate not emptied, or GetCertificate not set")
	}
	orig[0] = tls.Certificate{} // taken when AppendMetaCert was called
	checkUntouched(t, &pki.cert)
	checkUntouched(t, &pki.cert)

	var wg sync.WaitGroup
	for i := range 50 {
		wg.Go(func() {
			state, clientErr, serverErr := metaCertTestHandshake(cfg, pki.clientConfig())
			if clientErr != nil || serverErr != nil {
				t.Errorf("handshake %d: client %v, server %v", i, clientErr, serverErr)
				return
			}
			checkMetaCertState(t, state, 2, meta, pub)
		})
	}
	wg.Wait()
	checkUntouched(t, &pki.cert)

	// The deprecated NameToCertificate map, which crypto/tls consults
	// when there are several Certificates, is taken too.
	other, _, err := selfSignedCert("other.example")
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]*tls.Certificate{metaCertTestServerName: &pki.cert}
	//lint:ignore SA1019 a caller that still fills it.
	cfg = &tls.Config{Certificates: []tls.Certificate{other, other}, NameToCertificate: byName}
	AppendMetaCert(cfg, meta)
	byName[metaCertTestServerName] = &other // taken when AppendMetaCert was called
	state, clientErr, serverErr := metaCertTestHandshake(cfg, pki.clientConfig())
	if clientErr != nil || serverErr != nil {
		t.Fatalf("NameToCertificate handshake: client %v, server %v", clientErr, serverErr)
	}
	checkMetaCertState(t, state, 2, meta, pub)
	checkUntouched(t, &pki.cert)
}

func TestAppendMetaCertIdempotent(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	pub := metaCertTestKey(t)
	meta := metaCertTestMint(t, pub)

	static := &tls.Config{Certificates: []tls.Certificate{pki.cert}}
	AppendMetaCert(static, meta)
	AppendMetaCert(static, bytes.Clone(meta))
	shared := &pki.cert
	callback := &tls.Config{
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return shared, nil },
	}
	AppendMetaCert(callback, meta)
	AppendMetaCert(callback, meta)
	for name, cfg := range map[string]*tls.Config{"static": static, "GetCertificate": callback} {
		state, clientErr, serverErr := metaCertTestHandshake(cfg, pki.clientConfig())
		if clientErr != nil || serverErr != nil {
			t.Fatalf("%s handshake: client %v, server %v", name, clientErr, serverErr)
		}
		checkMetaCertState(t, state, 2, meta, pub) // the meta cert once
	}

	// A GetConfigForClient that hands back the config it belongs to is
	// wrapped over an already wrapped config.
	self := &tls.Config{Certificates: []tls.Certificate{pki.cert}}
	self.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) { return self, nil }
	AppendMetaCert(self, meta)
	state, clientErr, serverErr := metaCertTestHandshake(self, pki.clientConfig())
	if clientErr != nil || serverErr != nil {
		t.Fatalf("handshake: client %v, server %v", clientErr, serverErr)
	}
	checkMetaCertState(t, state, 2, meta, pub)
	checkUntouched(t, shared)
}

func TestAppendMetaCertGetConfigForClient(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	pub := metaCertTestKey(t)
	meta := metaCertTestMint(t, pub)

	inner := &tls.Config{
		Certificates: []tls.Certificate{pki.cert},
		NextProtos:   []string{"h2", "http/1.1"},
	}
	cfg := &tls.Config{
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) { return inner, nil },
	}
	AppendMetaCert(cfg, meta)

	client := pki.clientConfig()
	client.NextProtos = []string{"h2", "http/1.1"}
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Go(func() {
			state, clientErr, serverErr := metaCertTestHandshake(cfg, client)
			if clientErr != nil || serverErr != nil {
				t.Errorf("handshake %d: client %v, server %v", i, clientErr, serverErr)
				return
			}
			checkMetaCertState(t, state, 2, meta, pub)
			if state.NegotiatedProtocol != "http/1.1" {
				t.Errorf("negotiated %q, want http/1.1", state.NegotiatedProtocol)
			}
		})
	}
	wg.Wait()
	checkUntouched(t, &inner.Certificates[0])
	if !slices.Equal(inner.NextProtos, []string{"h2", "http/1.1"}) {
		t.Errorf("returned config's NextProtos changed to %q", inner.NextProtos)
	}
}

func TestAppendMetaCertALPN(t *testing.T) {
	tests := []struct {
		in, want []string
	}{
		{nil, []string{"http/1.1"}},
		{[]string{}, []string{"http/1.1"}},
		{[]string{"h2"}, []string{"http/1.1"}},
		{[]string{"http/1.1"}, []string{"http/1.1"}},
		{[]string{"h2", "http/1.1"}, []string{"http/1.1"}},
		{[]string{"http/1.1", "h2"}, []string{"http/1.1"}},
		// autocert's Manager.TLSConfig.
		{[]string{"h2", "http/1.1", "acme-tls/1"}, []string{"http/1.1", "acme-tls/1"}},
		{[]string{"h2", "acme-tls/1"}, []string{"http/1.1", "acme-tls/1"}},
		{[]string{"acme-tls/1"}, []string{"acme-tls/1", "http/1.1"}},
	}
	pki := newMetaCertTestPKI(t)
	meta := metaCertTestMint(t, metaCertTestKey(t))
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%q", tt.in), func(t *testing.T) {
			in := slices.Clone(tt.in)
			cfg := &tls.Config{Certificates: []tls.Certificate{pki.cert}, NextProtos: in}
			AppendMetaCert(cfg, meta)
			if !slices.Equal(cfg.NextProtos, tt.want) {
				t.Errorf("NextProtos = %q, want %q", cfg.NextProtos, tt.want)
			}
			if !slices.Equal(in, tt.in) {
				t.Errorf("caller's NextProtos slice changed to %q", in)
			}
		})
	}

	cfg := &tls.Config{
		Certificates: []tls.Certificate{pki.cert},
		NextProtos:   []string{"h2", "http/1.1", "acme-tls/1"},
	}
	AppendMetaCert(cfg, meta)
	for _, tt := range []struct {
		offer []string
		want  string
	}{
		{[]string{"h2", "http/1.1"}, "http/1.1"},
		{nil, ""},
		{[]string{"acme-tls/1"}, "acme-tls/1"},
	} {
		client := pki.clientConfig()
		client.NextProtos = tt.offer
		state, clientErr, serverErr := metaCertTestHandshake(cfg, client)
		if clientErr != nil || serverErr != nil {
			t.Errorf("offer %q: client %v, server %v", tt.offer, clientErr, serverErr)
			continue
		}
		if state.NegotiatedProtocol != tt.want {
			t.Errorf("offer %q: negotiated %q, want %q", tt.offer, state.NegotiatedProtocol, tt.want)
		}
	}
}

// TestAppendMetaCertHTTPServer shows why AppendMetaCert drops "h2", and the
// net/http pitfall its documentation warns about.
func TestAppendMetaCertHTTPServer(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	pub := metaCertTestKey(t)
	meta := metaCertTestMint(t, pub)

	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hj, ok := w.(http.Hijacker)
		if !ok {
			http.Error(w, "cannot hijack "+r.Proto, http.StatusInternalServerError)
			return
		}
		conn, brw, err := hj.Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		brw.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nhijacked\n")
		brw.Flush()
	})

	// Refused h2-only handshakes are expected below; keep them out of the
	// test output.
	quiet := log.New(io.Discard, "", 0)

	get := func(t *testing.T, addr string) (*http.Response, string) {
		t.Helper()
		tr := &http.Transport{TLSClientConfig: pki.clientConfig(), ForceAttemptHTTP2: true}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("https://" + addr + "/derp")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp, string(body)
	}

	t.Run("tls.NewListener", func(t *testing.T) {
		cfg := &tls.Config{Certificates: []tls.Certificate{pki.cert}, NextProtos: []string{"h2", "http/1.1"}}
		AppendMetaCert(cfg, meta)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: handler, ErrorLog: quiet}
		go srv.Serve(tls.NewListener(ln, cfg))
		defer srv.Close()

		resp, body := get(t, ln.Addr().String())
		if resp.ProtoMajor != 1 || body != "hijacked\n" {
			t.Errorf("got %s %q, want HTTP/1.1 and a hijacked connection", resp.Proto, body)
		}
		if resp.TLS == nil {
			t.Fatal("no TLS state")
		}
		checkMetaCertState(t, *resp.TLS, 2, meta, pub)
	})

	// ServeTLS appends "h2" to its own copy of NextProtos. The server's
	// order decides, so clients offering both still get HTTP/1.1, but one
	// offering only h2 now gets a connection DERP cannot hijack.
	serveTLS := func(t *testing.T, protocols *http.Protocols) string {
		t.Helper()
		cfg := &tls.Config{Certificates: []tls.Certificate{pki.cert}}
		AppendMetaCert(cfg, meta)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: handler, TLSConfig: cfg, Protocols: protocols, ErrorLog: quiet}
		go srv.ServeTLS(ln, "", "")
		t.Cleanup(func() { srv.Close() })
		return ln.Addr().String()
	}
	negotiate := func(t *testing.T, addr string, offer ...string) string {
		t.Helper()
		client := pki.clientConfig()
		client.NextProtos = offer
		conn, err := tls.Dial("tcp", addr, client)
		if err != nil {
			return "handshake failed"
		}
		defer conn.Close()
		return conn.ConnectionState().NegotiatedProtocol
	}
	t.Run("ServeTLS puts h2 back", func(t *testing.T) {
		addr := serveTLS(t, nil)
		if got := negotiate(t, addr, "h2", "http/1.1"); got != "http/1.1" {
			t.Errorf("client offering h2 and http/1.1 got %q, want http/1.1", got)
		}
		if got := negotiate(t, addr, "h2"); got != "h2" {
			t.Errorf("h2-only client got %q; if net/http no longer adds h2, update AppendMetaCert's documentation", got)
		}
	})
	t.Run("ServeTLS with HTTP/1 only", func(t *testing.T) {
		var protocols http.Protocols
		protocols.SetHTTP1(true)
		addr := serveTLS(t, &protocols)
		if got := negotiate(t, addr, "h2"); got == "h2" {
			t.Errorf("h2-only client negotiated h2 although srv.Protocols is HTTP/1 only")
		}
		resp, body := get(t, addr)
		if resp.ProtoMajor != 1 || body != "hijacked\n" {
			t.Errorf("got %s %q, want HTTP/1.1 and a hijacked connection", resp.Proto, body)
		}
	})
}

func TestAppendMetaCertPassesErrors(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	meta := metaCertTestMint(t, metaCertTestKey(t))
	errCert := errors.New("no certificate for you")
	hello := &tls.ClientHelloInfo{ServerName: metaCertTestServerName, SupportedVersions: []uint16{tls.VersionTLS13, tls.VersionTLS12}}

	var ret *tls.Certificate
	var retErr error
	cfg := &tls.Config{
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return ret, retErr },
	}
	AppendMetaCert(cfg, meta)

	withChain := &pki.cert
	noChain := &tls.Certificate{}
	for _, tt := range []struct {
		name string
		c    *tls.Certificate
		err  error
	}{
		{"error", nil, errCert},
		{"certificate and error", withChain, errCert},
		{"nil, nil", nil, nil},
		{"empty chain", noChain, nil},
	} {
		ret, retErr = tt.c, tt.err
		c, err := cfg.GetCertificate(hello)
		if c != tt.c || err != tt.err {
			t.Errorf("%s: GetCertificate = %p, %v; want %p, %v unchanged", tt.name, c, err, tt.c, tt.err)
		}
	}
	checkUntouched(t, withChain)

	ret, retErr = nil, errCert
	client := pki.clientConfig()
	if _, clientErr, serverErr := metaCertTestHandshake(cfg, client); clientErr == nil || !errors.Is(serverErr, errCert) {
		t.Errorf("handshake: client %v, server %v; want the server to fail with %v", clientErr, serverErr, errCert)
	}

	errConfig := errors.New("no config for you")
	var retCfg *tls.Config
	cfg = &tls.Config{
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) { return retCfg, retErr },
	}
	AppendMetaCert(cfg, meta)
	retErr = errConfig
	if c, err := cfg.GetConfigForClient(hello); c != nil || err != errConfig {
		t.Errorf("GetConfigForClient = %p, %v; want nil, %v", c, err, errConfig)
	}
	retErr = nil
	if c, err := cfg.GetConfigForClient(hello); c != nil || err != nil {
		t.Errorf("GetConfigForClient = %p, %v; want nil, nil", c, err)
	}

	// An empty meta cert would make every Go client fail the handshake.
	cfg = &tls.Config{Certificates: []tls.Certificate{pki.cert}, NextProtos: []string{"h2"}}
	AppendMetaCert(cfg, nil)
	if len(cfg.Certificates[0].Certificate) != 2 || !slices.Equal(cfg.NextProtos, []string{"h2"}) {
		t.Errorf("AppendMetaCert with an empty meta cert changed cfg")
	}
}

// TestMetaCertTLS12 checks that TLS 1.2 handshakes get the chain without
// the meta cert, whichever side limits the version and wherever the
// certificates come from, while TLS 1.3 handshakes on the same config get
// it.
func TestMetaCertTLS12(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	pub := metaCertTestKey(t)
	meta := metaCertTestMint(t, pub)
	shared := &pki.cert
	configs := pki.serverConfigs()
	for name, mk := range configs {
		for _, limit := range []string{"server", "client", "none"} {
			t.Run(name+"/limit="+limit, func(t *testing.T) {
				cfg := mk()
				client := pki.clientConfig()
				client.MinVersion = tls.VersionTLS12
				client.NextProtos = []string{"h2", "http/1.1"}
				want := uint16(tls.VersionTLS12)
				switch limit {
				case "server":
					if cfg.GetConfigForClient != nil {
						t.Skip("the inner config sets the version")
					}
					cfg.MaxVersion = tls.VersionTLS12
				case "client":
					client.MaxVersion = tls.VersionTLS12
				default:
					want = tls.VersionTLS13
				}
				AppendMetaCert(cfg, meta)
				for i := range 3 {
					state, clientErr, serverErr := metaCertTestHandshake(cfg, client)
					if clientErr != nil || serverErr != nil {
						t.Fatalf("handshake %d: client %v, server %v", i, clientErr, serverErr)
					}
					if state.Version != want {
						t.Fatalf("negotiated version %x, want %x", state.Version, want)
					}
					if state.NegotiatedProtocol != "http/1.1" {
						t.Errorf("negotiated %q, want http/1.1", state.NegotiatedProtocol)
					}
					if want == tls.VersionTLS13 {
						checkMetaCertState(t, state, 2, meta, pub)
						continue
					}
					if n := len(state.PeerCertificates); n != 2 {
						t.Errorf("TLS 1.2 client saw %d certificates, want the leaf and the CA", n)
					}
					if _, _, ok := ParseMetaCert(state.PeerCertificates); ok {
						t.Errorf("TLS 1.2 client saw the meta cert")
					}
				}
				checkUntouched(t, shared)
			})
		}
	}
}

// TestMetaCertTLS12ConfigClonedFromItself: a GetConfigForClient that
// returns a clone of the config it is set on (to vary a field per client)
// clones, once AppendMetaCert has set that config up, certificates with
// the meta cert. TLS 1.2 handshakes must still not show it, and TLS 1.3
// ones show it once, at the end.
func TestMetaCertTLS12ConfigClonedFromItself(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	pub := metaCertTestKey(t)
	meta := metaCertTestMint(t, pub)
	shared := &pki.cert
	for name, mk := range map[string]func() *tls.Config{
		"static": func() *tls.Config { return &tls.Config{Certificates: []tls.Certificate{pki.cert}} },
		"NameToCertificate": func() *tls.Config {
			// With more than one certificate crypto/tls asks the map.
			cfg := &tls.Config{Certificates: []tls.Certificate{pki.cert, pki.cert}}
			//lint:ignore SA1019 a caller that still fills it.
			cfg.NameToCertificate = map[string]*tls.Certificate{metaCertTestServerName: &pki.cert}
			return cfg
		},
		"GetCertificate": func() *tls.Config {
			return &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &pki.cert, nil }}
		},
	} {
		t.Run(name, func(t *testing.T) {
			cfg := mk()
			cfg.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
				c := cfg.Clone()
				c.MinVersion = tls.VersionTLS12
				return c, nil
			}
			AppendMetaCert(cfg, meta)
			for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
				client := pki.clientConfig()
				client.MinVersion, client.MaxVersion = tls.VersionTLS12, version
				state, clientErr, serverErr := metaCertTestHandshake(cfg, client)
				if clientErr != nil || serverErr != nil {
					t.Fatalf("%s handshake: client %v, server %v", tls.VersionName(version), clientErr, serverErr)
				}
				if state.Version != version {
					t.Fatalf("negotiated %s, want %s", tls.VersionName(state.Version), tls.VersionName(version))
				}
				if version == tls.VersionTLS13 {
					checkMetaCertState(t, state, 2, meta, pub)
					continue
				}
				if _, _, ok := ParseMetaCert(state.PeerCertificates); ok || len(state.PeerCertificates) != 2 {
					t.Errorf("TLS 1.2 client saw %d certificates, meta cert among them: %v; want the leaf and the CA alone",
						len(state.PeerCertificates), ok)
				}
			}
			checkUntouched(t, shared)
		})
	}
}

// FuzzParseMetaCert parses arbitrary certificates as meta certs: what it
// finds must be what the CN and serial say, alone or in a chain (behind a
// nil entry, before a good meta cert), and chooseKey must take it for the
// fast path only from TLS 1.3 and a protocol version the client speaks.
func FuzzParseMetaCert(f *testing.F) {
	pub := metaCertTestKey(f)
	f.Add(metaCertTestMint(f, pub))
	f.Add(metaCertTestCertDER(f, "derpkey"+strings.ToUpper(pub.String()), 2))
	f.Add(metaCertTestCertDER(f, "derpkey"+pub.String(), 0))
	f.Add(metaCertTestCertDER(f, "derpkey"+pub.String(), 256))
	f.Add(metaCertTestCertDER(f, "derpkey"+pub.String()[1:], 2))
	f.Add(metaCertTestCertDER(f, metaCertTestServerName, 1))
	other := metaCertTestKey(f)
	good, err := x509.ParseCertificate(metaCertTestMint(f, other))
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, der []byte) {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return
		}
		pub, version, ok := ParseMetaCert([]*x509.Certificate{cert})
		// In a chain, nil entries are skipped and the first candidate
		// wins; a client trusts it only from TLS 1.3 and a version it
		// speaks.
		cpub, cversion, cok := ParseMetaCert([]*x509.Certificate{nil, cert, good})
		if !ok && (!cok || cpub != other || cversion != ProtocolVersion) || ok && (!cok || cpub != pub || cversion != version) {
			t.Fatalf("chain scan found %v, %d, %v; the certificate alone %v, %d, %v", cpub, cversion, cok, pub, version, ok)
		}
		for _, tlsVersion := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
			hs, reason := chooseKey(Handshake{}, tls.ConnectionState{Version: tlsVersion, PeerCertificates: []*x509.Certificate{cert}}, PublicKey{}, false)
			fast := tlsVersion == tls.VersionTLS13 && ok && version >= 1 && version <= ProtocolVersion
			want := PublicKey{}
			if fast {
				want = pub
			}
			if fast != (hs.KeySource == "meta-cert") || fast != (reason == "") || hs.ServerKey != want {
				t.Fatalf("TLS %x, meta cert %v %d %v: chose %+v (%q)", tlsVersion, pub, version, ok, hs, reason)
			}
		}
		if !ok {
			if pub != (PublicKey{}) || version != 0 {
				t.Fatalf("not found but returned %v, %d", pub, version)
			}
			return
		}
		rest, found := strings.CutPrefix(cert.Subject.CommonName, MetaCertCommonNamePrefix)
		if !found || !strings.EqualFold(rest, pub.String()) {
			t.Fatalf("found key %v in CN %q", pub, cert.Subject.CommonName)
		}
		if version < 0 || version > 255 || cert.SerialNumber.Cmp(big.NewInt(int64(version))) != 0 {
			t.Fatalf("version %d from serial %v", version, cert.SerialNumber)
		}
	})
}

// TestMetaCertRenewal moves the renewal clock: a served meta cert with less
// than a week left is replaced, once, by a fresh one for the same key and
// version, in every kind of config, and TLS 1.2 still gets none.
func TestMetaCertRenewal(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	pub := metaCertTestKey(t)
	shared := &pki.cert
	configs := pki.serverConfigs()
	start := time.Now()
	t.Cleanup(func() { metaCertNow = time.Now })
	for name, mk := range configs {
		t.Run(name, func(t *testing.T) {
			metaCertNow = time.Now
			meta := metaCertTestMint(t, pub)
			cfg := mk()
			AppendMetaCert(cfg, meta)
			served := func(at time.Duration) *x509.Certificate {
				t.Helper()
				metaCertNow = func() time.Time { return start.Add(at) }
				client := pki.clientConfig()
				client.NextProtos = []string{"h2", "http/1.1"}
				state, clientErr, serverErr := metaCertTestHandshake(cfg, client)
				if clientErr != nil || serverErr != nil {
					t.Fatalf("handshake at +%v: client %v, server %v", at, clientErr, serverErr)
				}
				if state.NegotiatedProtocol != "http/1.1" {
					t.Errorf("negotiated %q", state.NegotiatedProtocol)
				}
				certs := state.PeerCertificates
				if len(certs) != 3 {
					t.Fatalf("at +%v the client saw %d certificates, want leaf, CA, meta cert", at, len(certs))
				}
				if got, version, ok := ParseMetaCert(certs[2:]); !ok || got != pub || version != ProtocolVersion {
					t.Fatalf("at +%v: meta cert for %v version %d (%v)", at, got, version, ok)
				}
				return certs[2]
			}
			const day = 24 * time.Hour
			if c := served(22 * day); !bytes.Equal(c.Raw, meta) {
				t.Fatal("renewed with 8 days left")
			}
			first := served(24 * day)
			if bytes.Equal(first.Raw, meta) {
				t.Fatal("not renewed with 6 days left")
			}
			if want := start.Add(24*day + metaCertValidity); first.NotAfter.Before(want.Add(-time.Minute)) || first.NotAfter.After(want.Add(time.Minute)) {
				t.Errorf("renewed NotAfter %v, want about %v", first.NotAfter, want)
			}
			if c := served(25 * day); !bytes.Equal(c.Raw, first.Raw) {
				t.Fatal("renewed again a day after renewing")
			}
			if c := served(50 * day); bytes.Equal(c.Raw, first.Raw) {
				t.Fatal("the renewed meta cert was not renewed in turn")
			}
			client := pki.clientConfig()
			client.MinVersion, client.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
			state, clientErr, serverErr := metaCertTestHandshake(cfg, client)
			if clientErr != nil || serverErr != nil {
				t.Fatalf("TLS 1.2 handshake: client %v, server %v", clientErr, serverErr)
			}
			if _, _, ok := ParseMetaCert(state.PeerCertificates); ok || len(state.PeerCertificates) != 2 {
				t.Errorf("TLS 1.2 client saw %d certificates, a meta cert: %v", len(state.PeerCertificates), ok)
			}
			checkUntouched(t, shared)
		})
	}
}

// A meta cert that names no key is served as it is, forever.
func TestMetaCertRenewalNeedsKey(t *testing.T) {
	t.Cleanup(func() { metaCertNow = time.Now })
	r := newMetaRenewer([]byte("not a certificate"))
	metaCertNow = func() time.Time { return time.Now().Add(10 * 365 * 24 * time.Hour) }
	if der := r.current(); string(der) != "not a certificate" {
		t.Fatalf("served %q", der)
	}
}

// TestMetaCertRenewalClockBack: a served meta cert that is not yet valid at
// the server's clock (stepped back by more than the 30 days of skew the
// cert allows for) is replaced too, by one valid then, and only once.
func TestMetaCertRenewalClockBack(t *testing.T) {
	t.Cleanup(func() { metaCertNow = time.Now })
	r := newMetaRenewer(metaCertTestMint(t, metaCertTestKey(t)))
	back := time.Now().Add(-40 * 24 * time.Hour)
	metaCertNow = func() time.Time { return back }
	der := r.current()
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if back.Before(cert.NotBefore) || back.After(cert.NotAfter) {
		t.Fatalf("at %v serving a meta cert valid from %v to %v", back, cert.NotBefore, cert.NotAfter)
	}
	if again := r.current(); !bytes.Equal(again, der) {
		t.Fatal("renewed again at the same time")
	}
}

// A config cloned from one that already serves a Server's meta cert, and
// given a second Server's, must serve the second one alone: clients take
// the first meta cert of a chain, so one appended behind the first would
// send the second server's clients to the first server's key.
func TestAppendMetaCertClonedForAnotherServer(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	pub1, pub2 := metaCertTestKey(t), metaCertTestKey(t)
	meta1, meta2 := metaCertTestMint(t, pub1), metaCertTestMint(t, pub2)
	for name, mk := range pki.serverConfigs() {
		t.Run(name, func(t *testing.T) {
			first := mk()
			AppendMetaCert(first, meta1)
			second := first.Clone()
			AppendMetaCert(second, meta2)
			for _, tc := range []struct {
				cfg  *tls.Config
				meta []byte
				pub  PublicKey
			}{{first, meta1, pub1}, {second, meta2, pub2}} {
				state, clientErr, serverErr := metaCertTestHandshake(tc.cfg, pki.clientConfig())
				if clientErr != nil || serverErr != nil {
					t.Fatalf("handshake: client %v, server %v", clientErr, serverErr)
				}
				checkMetaCertState(t, state, 2, tc.meta, tc.pub)
			}
			// Once the meta certs are renewed, too (the second config
			// calls the first one's GetCertificate, which renews its
			// own meta cert).
			metaCertNow = func() time.Time { return time.Now().Add(24 * 24 * time.Hour) }
			defer func() { metaCertNow = time.Now }()
			for _, tc := range []struct {
				cfg *tls.Config
				pub PublicKey
			}{{second, pub2}, {first, pub1}, {second, pub2}} {
				state, clientErr, serverErr := metaCertTestHandshake(tc.cfg, pki.clientConfig())
				if clientErr != nil || serverErr != nil {
					t.Fatalf("handshake after renewal: client %v, server %v", clientErr, serverErr)
				}
				certs := state.PeerCertificates
				if got, _, ok := ParseMetaCert(certs); len(certs) != 3 || !ok || got != tc.pub {
					t.Errorf("after renewal: %d certificates, meta cert for %v (%v), want 3 and %v", len(certs), got.ShortString(), ok, tc.pub.ShortString())
				}
			}
			if name == "static" {
				checkUntouched(t, &pki.cert)
			}
		})
	}
}

// TestAppendMetaCertSkipsACMEChallenge: a TLS-ALPN-01 challenge (RFC 8737),
// a handshake that offers only "acme-tls/1", is answered with the
// certificate manager's challenge certificate alone. The CA checks that
// certificate, and the meta cert is for DERP clients, which never offer
// acme-tls/1; a meta cert behind the challenge certificate would be one
// more thing for a CA's validator to refuse. Both ways a config is served
// are covered: cfg itself, and a config from GetConfigForClient.
func TestAppendMetaCertSkipsACMEChallenge(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	pub := metaCertTestKey(t)
	meta := metaCertTestMint(t, pub)
	challenge, _, err := selfSignedCert(metaCertTestServerName)
	if err != nil {
		t.Fatal(err)
	}
	// Like autocert: the challenge certificate for acme-tls/1.
	getCert := func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
		if slices.Contains(hello.SupportedProtos, "acme-tls/1") {
			return &challenge, nil
		}
		return &pki.cert, nil
	}
	direct := &tls.Config{GetCertificate: getCert, NextProtos: []string{"http/1.1", "acme-tls/1"}}
	AppendMetaCert(direct, meta)
	inner := &tls.Config{GetCertificate: getCert, NextProtos: []string{"http/1.1", "acme-tls/1"}}
	viaCallback := &tls.Config{
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) { return inner, nil },
	}
	AppendMetaCert(viaCallback, meta)

	for name, cfg := range map[string]*tls.Config{"cfg": direct, "GetConfigForClient": viaCallback} {
		acme := pki.clientConfig()
		acme.NextProtos = []string{"acme-tls/1"}
		acme.InsecureSkipVerify = true // the challenge certificate is self-signed
		state, clientErr, serverErr := metaCertTestHandshake(cfg, acme)
		if clientErr != nil || serverErr != nil {
			t.Fatalf("%s: challenge handshake: client %v, server %v", name, clientErr, serverErr)
		}
		if state.NegotiatedProtocol != "acme-tls/1" {
			t.Errorf("%s: negotiated %q, want acme-tls/1", name, state.NegotiatedProtocol)
		}
		if n := len(state.PeerCertificates); n != 1 || !bytes.Equal(state.PeerCertificates[0].Raw, challenge.Certificate[0]) {
			t.Errorf("%s: a TLS 1.3 acme-tls/1 handshake was served %d certificates, want the challenge certificate alone", name, n)
		}
		// DERP clients still get the meta cert.
		state, clientErr, serverErr = metaCertTestHandshake(cfg, pki.clientConfig())
		if clientErr != nil || serverErr != nil {
			t.Fatalf("%s: handshake: client %v, server %v", name, clientErr, serverErr)
		}
		checkMetaCertState(t, state, 2, meta, pub)
	}
}

// TestAppendMetaCertCloneKeepsClientAuth: a config cloned after
// AppendMetaCert to require client certificates must refuse a client that
// has none, in TLS 1.2 and, once the meta cert has been renewed, in TLS
// 1.3: every handshake on the clone runs with the clone's settings, and
// TLS 1.3 ones still carry the meta cert.
func TestAppendMetaCertCloneKeepsClientAuth(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	pub := metaCertTestKey(t)
	t.Cleanup(func() { metaCertNow = time.Now })
	const day = 24 * time.Hour
	for _, tc := range []struct {
		name    string
		version uint16
		at      time.Duration // the server's clock for the meta cert
	}{
		{"TLS1.2", tls.VersionTLS12, 0},
		{"TLS1.3", tls.VersionTLS13, 0},
		{"TLS1.3/renewed", tls.VersionTLS13, 24 * day},
	} {
		t.Run(tc.name, func(t *testing.T) {
			metaCertNow = time.Now
			cfg := &tls.Config{Certificates: []tls.Certificate{pki.cert}}
			AppendMetaCert(cfg, metaCertTestMint(t, pub))
			strict := cfg.Clone()
			strict.ClientAuth = tls.RequireAndVerifyClientCert
			strict.ClientCAs = pki.roots
			metaCertNow = func() time.Time { return time.Now().Add(tc.at) }
			client := pki.clientConfig()
			client.MinVersion, client.MaxVersion = tc.version, tc.version
			state, clientErr, serverErr := metaCertTestHandshake(strict, client)
			if serverErr == nil {
				t.Fatalf("%s handshake without a client certificate accepted by a config that requires one (client error %v)",
					tls.VersionName(state.Version), clientErr)
			}
			// The original config still takes the client.
			state, clientErr, serverErr = metaCertTestHandshake(cfg, client)
			if clientErr != nil || serverErr != nil {
				t.Fatalf("handshake on the original config: client %v, server %v", clientErr, serverErr)
			}
			if _, _, ok := ParseMetaCert(state.PeerCertificates); ok != (tc.version == tls.VersionTLS13) {
				t.Errorf("%s: meta cert served: %v", tls.VersionName(tc.version), ok)
			}
		})
	}
}

// TestAppendMetaCertServeTLSRenewal: http.Server.ServeTLS serves a copy of
// the config with "h2" put back into NextProtos (see
// TestAppendMetaCertHTTPServer). Renewing the meta cert must not change
// what that copy negotiates: a client offering only h2 gets h2 before and
// after, and the meta cert both times.
func TestAppendMetaCertServeTLSRenewal(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	pub := metaCertTestKey(t)
	t.Cleanup(func() { metaCertNow = time.Now })
	cfg := &tls.Config{Certificates: []tls.Certificate{pki.cert}}
	AppendMetaCert(cfg, metaCertTestMint(t, pub))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.NotFoundHandler(), TLSConfig: cfg, ErrorLog: log.New(io.Discard, "", 0)}
	done := make(chan struct{})
	go func() { defer close(done); srv.ServeTLS(ln, "", "") }()
	t.Cleanup(func() { srv.Close(); <-done })
	for _, at := range []time.Duration{0, 24 * 24 * time.Hour} {
		metaCertNow = func() time.Time { return time.Now().Add(at) }
		client := pki.clientConfig()
		client.NextProtos = []string{"h2"}
		conn, err := tls.Dial("tcp", ln.Addr().String(), client)
		if err != nil {
			t.Errorf("meta cert clock +%v: h2-only client: %v", at, err)
			continue
		}
		state := conn.ConnectionState()
		conn.Close()
		if state.NegotiatedProtocol != "h2" {
			t.Errorf("meta cert clock +%v: h2-only client negotiated %q, want h2 as ServeTLS's config offers", at, state.NegotiatedProtocol)
		}
		if got, _, ok := ParseMetaCert(state.PeerCertificates); !ok || got != pub {
			t.Errorf("meta cert clock +%v: no meta cert for the server's key", at)
		}
	}
}

// TestAppendMetaCertCloneLimitsVersion: a config cloned after
// AppendMetaCert and limited to TLS 1.2 sends its chain in clear text, so
// it must not carry the meta cert; the decision follows the version the
// handshake's own config negotiates, not the original's limits.
func TestAppendMetaCertCloneLimitsVersion(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	pub := metaCertTestKey(t)
	for name, mk := range pki.serverConfigs() {
		t.Run(name, func(t *testing.T) {
			cfg := mk()
			AppendMetaCert(cfg, metaCertTestMint(t, pub))
			old := cfg.Clone()
			old.MaxVersion = tls.VersionTLS12
			client := pki.clientConfig()
			client.MinVersion = tls.VersionTLS12
			state, clientErr, serverErr := metaCertTestHandshake(old, client)
			if clientErr != nil || serverErr != nil {
				t.Fatalf("handshake: client %v, server %v", clientErr, serverErr)
			}
			if state.Version != tls.VersionTLS12 && name != "GetConfigForClient" {
				t.Fatalf("negotiated %s, want TLS 1.2", tls.VersionName(state.Version))
			}
			if _, _, ok := ParseMetaCert(state.PeerCertificates); ok && state.Version == tls.VersionTLS12 {
				t.Errorf("TLS 1.2 handshake on a clone limited to TLS 1.2 sent the meta cert in clear text")
			}
		})
	}
}

// TestAppendMetaCertPicksLikeCryptoTLS: with its certificates taken over
// by AppendMetaCert, a config must serve each client the leaf crypto/tls
// would have picked from them itself, in TLS 1.2 and 1.3: callback or
// static certificates by server name, the name map and its wildcard, the
// first certificate the client supports, and the first as the fallback.
func TestAppendMetaCertPicksLikeCryptoTLS(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	meta := metaCertTestMint(t, metaCertTestKey(t))
	cert := func(host string) tls.Certificate {
		c, _, err := selfSignedCert(host)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	a, b, w, fromCallback := cert("a.example"), cert("b.example"), cert("w.example"), cert("cb.example")
	callback := func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
		if hello.ServerName == "cb.example" {
			return &fromCallback, nil
		}
		return nil, nil // crypto/tls goes on to Certificates
	}
	configs := map[string]func() *tls.Config{
		"several": func() *tls.Config { return &tls.Config{Certificates: []tls.Certificate{a, b, pki.cert}} },
		"NameToCertificate": func() *tls.Config {
			//lint:ignore SA1019 a caller that still fills it.
			return &tls.Config{Certificates: []tls.Certificate{a, b}, NameToCertificate: map[string]*tls.Certificate{
				"b.example": &b, "*.wild.example": &w, "*": &w,
			}}
		},
		"GetCertificate and Certificates": func() *tls.Config {
			return &tls.Config{Certificates: []tls.Certificate{a, b}, GetCertificate: callback}
		},
		"GetCertificate alone": func() *tls.Config {
			return &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &fromCallback, nil }}
		},
	}
	names := []string{"", "a.example", "b.example", "B.Example", "x.wild.example", "nowhere", metaCertTestServerName, "cb.example", "other.example"}
	for name, mk := range configs {
		plain, withMeta := mk(), mk()
		AppendMetaCert(withMeta, meta)
		for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
			for _, sni := range names {
				client := &tls.Config{InsecureSkipVerify: true, ServerName: sni, MinVersion: version, MaxVersion: version}
				want, clientErr, serverErr := metaCertTestHandshake(plain, client)
				if clientErr != nil || serverErr != nil {
					t.Fatalf("%s, %q, without AppendMetaCert: client %v, server %v", name, sni, clientErr, serverErr)
				}
				got, clientErr, serverErr := metaCertTestHandshake(withMeta, client)
				if clientErr != nil || serverErr != nil {
					t.Fatalf("%s, %q: client %v, server %v", name, sni, clientErr, serverErr)
				}
				if !bytes.Equal(got.PeerCertificates[0].Raw, want.PeerCertificates[0].Raw) {
					t.Errorf("%s, %s, server name %q: served %q, crypto/tls picks %q", name, tls.VersionName(version), sni,
						got.PeerCertificates[0].Subject.CommonName, want.PeerCertificates[0].Subject.CommonName)
				}
				_, _, ok := ParseMetaCert(got.PeerCertificates)
				if ok != (version == tls.VersionTLS13) || len(got.PeerCertificates) != len(want.PeerCertificates)+btoi(ok) {
					t.Errorf("%s, %s, server name %q: %d certificates, meta cert %v", name, tls.VersionName(version), sni, len(got.PeerCertificates), ok)
				}
			}
		}
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestMetaCertLegacyVersionHello: a ClientHello whose legacy version field
// says TLS 1.3 but that has no supported_versions extension gets TLS 1.2
// from crypto/tls (RFC 8446, section 4.2.1), although the ClientHelloInfo
// it shows callbacks lists TLS 1.3 first. Its Certificate message goes out
// in clear text, so it must not carry the meta cert.
func TestMetaCertLegacyVersionHello(t *testing.T) {
	pki := newMetaCertTestPKI(t)
	meta := metaCertTestMint(t, metaCertTestKey(t))
	cfg := &tls.Config{Certificates: []tls.Certificate{pki.cert}}
	AppendMetaCert(cfg, meta)

	exts := []byte{
		0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d, // supported_groups: x25519
		0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // ec_point_formats: uncompressed
		0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x08, 0x07, // signature_algorithms: ed25519
	}
	body := []byte{0x03, 0x04} // legacy_version TLS 1.3
	body = append(body, make([]byte, 32)...)
	body = append(body, 0x00)                                // session id
	body = append(body, 0x00, 0x02, 0xc0, 0x2b)              // TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
	body = append(body, 0x01, 0x00)                          // compression: null
	body = append(body, byte(len(exts)>>8), byte(len(exts))) // extensions
	body = append(body, exts...)
	msg := append([]byte{0x01, 0x00, byte(len(body) >> 8), byte(len(body))}, body...)
	record := append([]byte{0x16, 0x03, 0x01, byte(len(msg) >> 8), byte(len(msg))}, msg...)

	sc, cc := net.Pipe()
	defer cc.Close()
	serverDone := make(chan error, 1)
	go func() {
		defer sc.Close()
		serverDone <- tls.Server(sc, cfg).Handshake()
	}()
	cc.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := cc.Write(record); err != nil {
		t.Fatal(err)
	}
	// The server's first flight, in clear text up to ServerHelloDone.
	var flight []byte
	buf := make([]byte, 4096)
	for !bytes.Contains(flight, []byte{0x0e, 0x00, 0x00, 0x00}) {
		n, err := cc.Read(buf)
		flight = append(flight, buf[:n]...)
		if err != nil {
			t.Fatalf("reading the server's flight after %d bytes: %v (server: %v)", len(flight), err, <-serverDone)
		}
	}
	if len(flight) < 11 || flight[0] != 0x16 || flight[5] != 0x02 || flight[9] != 0x03 || flight[10] != 0x03 {
		t.Fatalf("server's flight does not start with a TLS 1.2 ServerHello: % x", flight[:min(len(flight), 16)])
	}
	if !bytes.Contains(flight, pki.cert.Certificate[0]) {
		t.Fatal("no leaf certificate in the server's flight")
	}
	if bytes.Contains(flight, meta) {
		t.Error("the meta cert went out in the clear text Certificate message of a TLS 1.2 handshake")
	}
	cc.Close()
	<-serverDone
}
