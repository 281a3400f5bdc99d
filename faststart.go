package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// FastStart dials DERP servers by URL ("https://host[:port]/derp" or
// "http://…"), taking the fast path (2 round trips before the first DERP
// frame: TCP and TLS) when it can and the classic HTTP upgrade (3) otherwise.
//
// The fast path needs the server's DERP key before the first write. It
// comes from the meta cert in a TLS 1.3 chain, or from ServerKey. With a
// configured ServerKey the fast path is taken on every transport (plain
// HTTP: 1 round trip; TLS 1.2: 3 instead of 4), and a server that turns out
// to have another key is redialled on the classic path.
//
// The zero FastStart is ready to use. Its fields must not change while Dial
// runs; FastStart never modifies TLSConfig.
type FastStart struct {
	// TLSConfig is used for https URLs. It is cloned; ServerName defaults to
	// the URL's host; ALPN is not offered (DERP needs HTTP/1.1). Nil means
	// the system roots.
	TLSConfig *tls.Config
	// DialContext dials the TCP connection. Nil means a net.Dialer.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// ServerKey, if not zero, is the server's DERP key as known from
	// configuration or an earlier connection.
	ServerKey PublicKey
	// DisableFastStart always takes the classic upgrade path.
	DisableFastStart bool
	// Header holds extra request headers, such as Ideal-Node.
	Header http.Header
}

// Path is the way a connection reached DERP.
type Path int

const (
	// UpgradePath is the classic upgrade: the client waited for the HTTP 101
	// response before writing its first DERP frame.
	UpgradePath Path = iota
	// FastPath wrote the upgrade request and the first DERP frame at once.
	FastPath
)

// String returns "upgrade" or "fast".
func (p Path) String() string {
	if p == FastPath {
		return "fast"
	}
	return "upgrade"
}

// Handshake reports how Dial connected.
type Handshake struct {
	Path Path
	// Reason says why the fast path was not taken, or what went wrong with
	// a first attempt that was retried; empty on a plain fast path.
	Reason string
	// ServerKey is the server's DERP key.
	ServerKey PublicKey
	// KeySource says where the key came from: "meta-cert",
	// "configured", "http-header" or "server-key-frame".
	KeySource string
	// TLSVersion is the negotiated TLS version, or 0 for plain HTTP.
	TLSVersion uint16
	// Attempts is the number of connections made (2 after a fallback).
	Attempts int
}

// Dial connects to serverURL and logs in with priv. On the fast path Dial
// returns as soon as the ClientInfo frame is written (packets may be sent at
// once); with a key taken only from configuration it first waits for the
// server's first bytes to confirm the key. ctx bounds the whole dial,
// including DNS, TCP, TLS and the upgrade; it does not affect the returned
// Client.
func (f *FastStart) Dial(ctx context.Context, serverURL string, priv PrivateKey, opts ...ClientOption) (*Client, Handshake, error) {
	u, err := url.Parse(serverURL)
	if err != nil {
		return nil, Handshake{}, fmt.Errorf("relay: dial: %w", err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, Handshake{}, fmt.Errorf("relay: dial: unsupported URL scheme %q (want http or https)", u.Scheme)
	}
	key := f.ServerKey
	if f.DisableFastStart {
		key = PublicKey{}
	}
	c, hs, err := f.dial(ctx, u, priv, key, opts)
	hs.Attempts = 1
	if err == nil || !errors.Is(err, ErrServerKeyMismatch) || key.IsZero() || ctx.Err() != nil {
		return c, hs, err
	}
	// The configured key was stale: forget it and take the classic path,
	// which learns the key from the server.
	reason := "configured server key is stale (" + err.Error() + "); retried with the upgrade path"
	c, hs, err = f.dial(ctx, u, priv, PublicKey{}, opts)
	hs.Attempts = 2
	if hs.Reason == "" {
		hs.Reason = reason
	} else {
		hs.Reason = reason + "; " + hs.Reason
	}
	return c, hs, err
}

func (f *FastStart) dial(ctx context.Context, u *url.URL, priv PrivateKey, known PublicKey, opts []ClientOption) (c *Client, hs Handshake, err error) {
	nc, err := f.dialTCP(ctx, u)
	if err != nil {
		return nil, hs, err
	}
	// Cancelling ctx closes the connection, which ends whatever step is
	// in progress.
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	defer func() {
		if !stop() && err == nil {
			c, err = nil, ctx.Err()
		}
		if err != nil {
			c = nil
			nc.Close()
			if ctx.Err() != nil {
				err = fmt.Errorf("relay: dial %s: %w", u.Host, ctx.Err())
			}
		}
	}()

	hs.KeySource = "configured"
	if u.Scheme == "https" {
		tc, err := f.tlsHandshake(ctx, nc, u)
		if err != nil {
			return nil, hs, err
		}
		nc = tc
		cs := tc.ConnectionState()
		hs.TLSVersion = cs.Version
		var reason string
		hs, reason = chooseKey(hs, cs, known)
		if hs.ServerKey.IsZero() || f.DisableFastStart {
			hs.Reason = reason
			if f.DisableFastStart {
				hs.Reason = "fast start disabled"
			}
			return f.upgrade(nc, u, priv, hs, opts)
		}
		if hs.KeySource == "meta-cert" {
			return f.fastStart(nc, u, priv, hs, false, opts)
		}
		hs.Reason = reason
		return f.fastStart(nc, u, priv, hs, true, opts)
	}
	if known.IsZero() {
		hs.Reason = "plain HTTP and no known server key"
		return f.upgrade(nc, u, priv, hs, opts)
	}
	hs.ServerKey = known
	return f.fastStart(nc, u, priv, hs, true, opts)
}

// chooseKey picks the key for the fast path from the TLS state: a meta cert
// in a TLS 1.3 chain wins, then a configured key. It returns the reason the
// meta cert could not be used, if it could not.
func chooseKey(hs Handshake, cs tls.ConnectionState, known PublicKey) (Handshake, string) {
	var reason string
	if cs.Version < tls.VersionTLS13 {
		reason = "TLS version " + tls.VersionName(cs.Version) + " below 1.3: the meta cert is not trusted"
	} else if k, v, ok := ParseMetaCert(cs.PeerCertificates); !ok {
		reason = "no meta cert in the server's TLS chain (old server, or a TLS-intercepting proxy)"
	} else if v < 1 || v > ProtocolVersion {
		reason = fmt.Sprintf("meta cert protocol version %d not spoken", v)
	} else {
		hs.ServerKey, hs.KeySource = k, "meta-cert"
		if !known.IsZero() && known != k {
			hs.Reason = fmt.Sprintf("configured server key %s is stale; meta cert has %s", known.ShortString(), k.ShortString())
		}
		return hs, ""
	}
	if !known.IsZero() {
		hs.ServerKey = known
		hs.KeySource = "configured"
	}
	return hs, reason
}

func (f *FastStart) dialTCP(ctx context.Context, u *url.URL) (net.Conn, error) {
	addr := u.Host
	if u.Port() == "" {
		port := "80"
		if u.Scheme == "https" {
			port = "443"
		}
		addr = net.JoinHostPort(u.Hostname(), port)
	}
	dial := f.DialContext
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	nc, err := dial(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("relay: dial %s: %w", addr, err)
	}
	return nc, nil
}

func (f *FastStart) tlsHandshake(ctx context.Context, nc net.Conn, u *url.URL) (*tls.Conn, error) {
	var cfg *tls.Config
	if f.TLSConfig != nil {
		cfg = f.TLSConfig.Clone()
	} else {
		cfg = &tls.Config{}
	}
	if cfg.ServerName == "" {
		cfg.ServerName = u.Hostname()
	}
	cfg.NextProtos = nil
	tc := tls.Client(nc, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, fmt.Errorf("relay: TLS handshake with %s: %w", u.Host, err)
	}
	return tc, nil
}

func (f *FastStart) writeRequest(bw *bufio.Writer, u *url.URL, fast bool) {
	path := u.RequestURI()
	if u.Path == "" || u.Path == "/" {
		path = "/derp"
	}
	fmt.Fprintf(bw, "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: fastderp-relay\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n", path, u.Host)
	if fast {
		fmt.Fprintf(bw, "%s: 1\r\n", FastStartHeader)
	}
	for k, vs := range f.Header {
		for _, v := range vs {
			fmt.Fprintf(bw, "%s: %s\r\n", k, strings.NewReplacer("\r", "", "\n", "").Replace(v))
		}
	}
	bw.WriteString("\r\n")
}

// fastStart writes the upgrade request and the ClientInfo in one flush. If
// the key is only assumed (confirm), it then waits for the server's first
// bytes to check it.
func (f *FastStart) fastStart(nc net.Conn, u *url.URL, priv PrivateKey, hs Handshake, confirm bool, opts []ClientOption) (*Client, Handshake, error) {
	hs.Path = FastPath
	brw := bufio.NewReadWriter(bufio.NewReader(nc), bufio.NewWriter(nc))
	f.writeRequest(brw.Writer, u, true)
	opts = append(opts[:len(opts):len(opts)], ServerPublicKey(hs.ServerKey), allowHTTPPrefix())
	c, err := NewClient(priv, nc, brw, opts...)
	if err != nil {
		return nil, hs, err
	}
	if confirm {
		if err := c.readServerStart(); err != nil {
			return nil, hs, err
		}
	}
	return c, hs, nil
}

// upgrade takes the classic path: request, wait for 101, then log in.
func (f *FastStart) upgrade(nc net.Conn, u *url.URL, priv PrivateKey, hs Handshake, opts []ClientOption) (*Client, Handshake, error) {
	hs.Path = UpgradePath
	brw := bufio.NewReadWriter(bufio.NewReader(nc), bufio.NewWriter(nc))
	f.writeRequest(brw.Writer, u, false)
	if err := brw.Flush(); err != nil {
		return nil, hs, fmt.Errorf("relay: send upgrade request: %w", err)
	}
	resp, err := http.ReadResponse(brw.Reader, nil)
	if err != nil {
		return nil, hs, fmt.Errorf("relay: read upgrade response: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, hs, fmt.Errorf("relay: upgrade refused: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	hs.ServerKey, hs.KeySource = PublicKey{}, "server-key-frame"
	if k, err := ParsePublicKey(resp.Header.Get(PublicKeyHeader)); err == nil {
		// The ServerKey frame is in the same flush as the 101, so using
		// the header saves no round trip; it only lets Recv cross-check.
		hs.ServerKey, hs.KeySource = k, "http-header"
		opts = append(opts[:len(opts):len(opts)], ServerPublicKey(k))
	}
	c, err := NewClient(priv, nc, brw, opts...)
	if err != nil {
		return nil, hs, err
	}
	hs.ServerKey = c.ServerPublicKey()
	return c, hs, nil
}

// readServerStart reads what a server sends first after a fast-start request
// made with an assumed key: possibly an HTTP response (it ignored fast
// start), then the ServerKey frame. It fails with ErrServerKeyMismatch if the
// key is not the assumed one.
func (c *Client) readServerStart() error {
	if c.opts.loginTimeout > 0 {
		c.nc.SetReadDeadline(time.Now().Add(c.opts.loginTimeout))
		defer c.nc.SetReadDeadline(time.Time{})
	}
	assumed := c.serverKey
	c.maybeHTTP = false
	if err := c.skipHTTPResponse(); err != nil {
		return err
	}
	if err := c.recvServerKey(); err != nil {
		return fmt.Errorf("relay: login: %w", err)
	}
	if c.serverKey != assumed {
		got := c.serverKey
		c.serverKey = assumed
		return fmt.Errorf("%w: expected %s, server sent %s", ErrServerKeyMismatch, assumed, got)
	}
	return nil
}
