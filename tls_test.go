package relay

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"hash"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/chacha20poly1305"
)

// recConn wraps a client's TCP connection: it counts the TLS records the
// client writes and remembers the cipher suite from the ServerHello, so that
// a test can inject a record of its own encrypted with the client's keys.
type recConn struct {
	net.Conn
	mu      sync.Mutex
	out     []byte // partial outgoing record header/body tracking
	need    int    // bytes left of the current outgoing record body
	appRecs int    // 0x17 records written so far
	in      []byte // first incoming bytes (for the ServerHello)
}

func (c *recConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.track(p)
	return c.Conn.Write(p)
}

func (c *recConn) track(p []byte) {
	for len(p) > 0 {
		if c.need > 0 {
			k := min(c.need, len(p))
			c.need -= k
			p = p[k:]
			continue
		}
		k := min(5-len(c.out), len(p))
		c.out = append(c.out, p[:k]...)
		p = p[k:]
		if len(c.out) == 5 {
			if c.out[0] == 0x17 {
				c.appRecs++
			}
			c.need = int(binary.BigEndian.Uint16(c.out[3:5]))
			c.out = c.out[:0]
		}
	}
}

func (c *recConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	if len(c.in) < 4096 {
		c.in = append(c.in, p[:n]...)
	}
	c.mu.Unlock()
	return n, err
}

func (c *recConn) cipherSuite() uint16 {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := c.in
	// record header (5), handshake header (4), version (2), random (32)
	if len(b) < 5+4+2+32+1 || b[0] != 0x16 || b[5] != 2 {
		return 0
	}
	b = b[5+4+2+32:]
	sl := int(b[0])
	return binary.BigEndian.Uint16(b[1+sl:])
}

func expandLabel(h func() hash.Hash, secret []byte, label string, n int) []byte {
	var info []byte
	info = binary.BigEndian.AppendUint16(info, uint16(n))
	info = append(info, byte(len("tls13 "+label)))
	info = append(info, "tls13 "+label...)
	info = append(info, 0) // empty context
	out, err := hkdf.Expand(h, secret, string(info), n)
	if err != nil {
		panic(err)
	}
	return out
}

// injectKeyUpdate writes, as the client, a TLS 1.3 KeyUpdate with
// update_requested set. After it, the client can no longer write (its
// tls.Conn keeps the old key), but it can still read.
func (c *recConn) injectKeyUpdate(t *testing.T, secret []byte) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	suite := binary.BigEndian.Uint16(c.in[5+4+2+32+1+int(c.in[5+4+2+32]):])
	var aead cipher.AEAD
	switch suite {
	case tls.TLS_AES_128_GCM_SHA256, tls.TLS_AES_256_GCM_SHA384:
		h, kl := sha256.New, 16
		if suite == tls.TLS_AES_256_GCM_SHA384 {
			h, kl = sha512.New384, 32
		}
		blk, err := aes.NewCipher(expandLabel(h, secret, "key", kl))
		if err != nil {
			t.Fatal(err)
		}
		aead, _ = cipher.NewGCM(blk)
	case tls.TLS_CHACHA20_POLY1305_SHA256:
		var err error
		aead, err = chacha20poly1305.New(expandLabel(sha256.New, secret, "key", 32))
		if err != nil {
			t.Fatal(err)
		}
	default:
		t.Fatalf("cipher suite %#x", suite)
	}
	h := sha256.New
	if suite == tls.TLS_AES_256_GCM_SHA384 {
		h = sha512.New384
	}
	iv := expandLabel(h, secret, "iv", 12)
	seq := uint64(c.appRecs - 1) // the first 0x17 record was the client's Finished
	nonce := bytes.Clone(iv)
	for i := 0; i < 8; i++ {
		nonce[4+i] ^= byte(seq >> (56 - 8*i))
	}
	plain := []byte{24, 0, 0, 1, 1, 0x16} // KeyUpdate(update_requested), inner type handshake
	hdr := []byte{0x17, 3, 3, 0, 0}
	binary.BigEndian.PutUint16(hdr[3:], uint16(len(plain)+aead.Overhead()))
	rec := aead.Seal(bytes.Clone(hdr), nonce, plain, hdr)
	if _, err := c.Conn.Write(rec); err != nil {
		t.Fatal(err)
	}
}

// keyLog collects CLIENT_TRAFFIC_SECRET_0.
type keyLog struct {
	mu     sync.Mutex
	secret []byte
}

func (k *keyLog) Write(p []byte) (int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, line := range strings.Split(string(p), "\n") {
		f := strings.Fields(line)
		if len(f) == 3 && f[0] == "CLIENT_TRAFFIC_SECRET_0" {
			k.secret, _ = hex.DecodeString(f[2])
		}
	}
	return len(p), nil
}

// A TLS 1.3 client sends a KeyUpdate (update_requested) more than the write
// timeout after the server's last write. crypto/tls answers it from the
// reader's goroutine, under whatever write deadline is set: the one of the
// last batch, long passed, would fail the answer, and tls.Conn would keep
// that error, ending the session at the next packet though the client
// reads everything. The session must go on relaying.
func TestTLSKeyUpdateAfterIdle(t *testing.T) { testKeyUpdate(t, 900*time.Millisecond) }

// Control: the same KeyUpdate within the write timeout works.
func TestTLSKeyUpdateFresh(t *testing.T) { testKeyUpdate(t, 0) }

func testKeyUpdate(t *testing.T, idle time.Duration) {
	const wt = 300 * time.Millisecond
	s := newTestServer(t, WithWriteTimeout(wt))
	d := serveDERP(t, s, derpServeOpts{})

	var rc *recConn
	kl := &keyLog{}
	cfg := d.ClientTLS.Clone()
	cfg.KeyLogWriter = kl
	cfg.MinVersion = tls.VersionTLS13
	fsA := &FastStart{TLSConfig: cfg, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var dl net.Dialer
		nc, err := dl.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		rc = &recConn{Conn: nc}
		return rc, nil
	}}
	a, _ := dialFast(t, fsA, d.URL)
	b, _ := dialFast(t, &FastStart{TLSConfig: d.ClientTLS}, d.URL)
	relayBothWays(t, a, b)

	// Idle longer than the write timeout: the deadline of the server's
	// last batch to a has passed.
	time.Sleep(idle)
	kl.mu.Lock()
	secret := kl.secret
	kl.mu.Unlock()
	if secret == nil {
		t.Fatal("no client traffic secret logged")
	}
	rc.injectKeyUpdate(t, secret)
	time.Sleep(100 * time.Millisecond) // the server's reader handles it

	if err := b.Send(a.PublicKey(), []byte("after key update")); err != nil {
		t.Fatal(err)
	}
	got, ok := recvMsg[*ReceivedPacket](t, a)
	if !ok {
		t.Fatalf("a lost its session after a KeyUpdate; WriteTimeouts=%d", s.Stats().WriteTimeouts)
	}
	if string(got.Data) != "after key update" {
		t.Fatalf("got %q", got.Data)
	}
	if n := s.Stats().WriteTimeouts; n != 0 {
		t.Fatalf("WriteTimeouts = %d", n)
	}
}

// After a write timeout on a TLS session the socket is closed at once:
// tls.Conn.Close would first try a close_notify under a 5 s deadline of its
// own, into the socket that just timed out, and the session (and
// Server.Close, which waits for it) would linger that long.
func TestTLSWriteTimeoutClosesAtOnce(t *testing.T) { testWriteTimeoutLingers(t, false) }

// Control: the same over plain HTTP.
func TestPlainWriteTimeoutClosesAtOnce(t *testing.T) { testWriteTimeoutLingers(t, true) }

func testWriteTimeoutLingers(t *testing.T, plain bool) {
	s := NewServer(mustKey(t), WithWriteTimeout(200*time.Millisecond), WithQueueDepth(4))
	defer s.Close()
	d := serveDERP(t, s, derpServeOpts{plain: plain})
	a, _ := dialFast(t, &FastStart{TLSConfig: d.ClientTLS}, d.URL)
	b, _ := dialFast(t, &FastStart{TLSConfig: d.ClientTLS}, d.URL)
	relayBothWays(t, a, b)
	// a stops reading; b floods it until the server's write times out.
	pkt := make([]byte, 60<<10)
	deadline := time.Now().Add(10 * time.Second)
	for s.Stats().WriteTimeouts == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no write timeout")
		}
		b.Send(a.PublicKey(), pkt)
		time.Sleep(time.Millisecond)
	}
	b.Close()
	waitFor(t, func() bool { return !s.IsClientConnected(b.PublicKey()) })
	start := time.Now()
	s.Close()
	if el := time.Since(start); el > 3*time.Second {
		t.Fatalf("Server.Close took %v after a write timeout (plain %v)", el, plain)
	}
}

// TestCloseSendsNoCloseNotify: a session ended from the server's side
// (ClosePeer here, like Close's cut, an idle timeout or a cancelled
// context) and Client.Close close the socket at once. tls.Conn.Close would
// first write a close_notify under a 5 s deadline of its own (and a
// WebSocket connection a close frame under 1 s), into a socket the other
// side may have filled by not reading: ClosePeer, the mesh peer's reader
// calling it, or Server.Close, which holds the server's lock while it cuts
// sessions, waited that long for each such client, and so did
// Client.Close for a server that stopped reading. The closing side's end
// of the pipe records whether a write came before its close.
func TestCloseSendsNoCloseNotify(t *testing.T) {
	for _, tc := range []struct {
		name      string
		ws        bool
		serverEnd bool // the server closes; else the client
	}{
		{"server tls", false, true},
		{"server websocket over tls", true, true},
		{"client tls", false, false},
		{"client websocket over tls", true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestServer(t)
			cc, sc := net.Pipe()
			defer cc.Close()
			defer sc.Close()
			var cn, sn net.Conn = cc, sc
			wc := &watchConn{ev: make(chan string, 4)}
			if tc.serverEnd {
				wc.Conn, sn = sc, wc
			} else {
				wc.Conn, cn = cc, wc
			}
			cert, _ := testCert(t, "derp.test")
			sn = tls.Server(sn, &tls.Config{Certificates: []tls.Certificate{cert}})
			cn = tls.Client(cn, &tls.Config{InsecureSkipVerify: true})
			if tc.ws {
				sn, cn = newWSConn(sn, nil, false), newWSConn(cn, nil, true)
			}
			done := make(chan struct{})
			go func() { s.Accept(context.Background(), sn, nil, "192.0.2.1:1"); close(done) }()
			priv := mustKey(t)
			c := loginClient(t, cn, priv)
			wc.armed.Store(true)
			if tc.serverEnd {
				go s.ClosePeer(priv.Public())
			} else {
				go c.Close()
			}
			select {
			case ev := <-wc.ev:
				if ev != "close" {
					t.Fatalf("the closing side's first act was a %s: a close_notify or close frame into a socket the other side does not read", ev)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("neither a write nor a close")
			}
			<-done
		})
	}
}

// watchConn reports, once armed, each Write and Close on ev.
type watchConn struct {
	net.Conn
	armed atomic.Bool
	ev    chan string
}

func (c *watchConn) Write(p []byte) (int, error) {
	if c.armed.Load() {
		select {
		case c.ev <- "write":
		default:
		}
	}
	return c.Conn.Write(p)
}

func (c *watchConn) Close() error {
	if c.armed.Load() {
		select {
		case c.ev <- "close":
		default:
		}
	}
	return c.Conn.Close()
}
