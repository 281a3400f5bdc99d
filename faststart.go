package relay

import (
	"bufio"
	"cmp"
	"context"
	crand "crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
)

// FastStart dials DERP servers by URL ("https://host[:port]/derp" or
// "http://…"), taking the fast path (2 round trips before the first DERP
// frame: TCP and TLS) when it can and the classic HTTP upgrade (3) otherwise.
//
// The fast path needs the server's DERP key before the first write. It
// comes from the meta cert in a TLS 1.3 chain, or from ServerKey. With a
// configured ServerKey the fast path is taken on every transport (plain
// HTTP: 1 round trip; TLS 1.2: 3 instead of 4), and a server that turns out
// to have another key, or answers the fast-start request with HTTP other
// than a 101 (as a reverse proxy in between that does not pass fast start
// through may, with a 502), is redialled on the classic path.
//
// The zero FastStart is ready to use. Its fields must not change while Dial
// runs; FastStart never modifies TLSConfig, though it may drop a server's
// session from TLSConfig.ClientSessionCache (see TLSConfig).
type FastStart struct {
	// TLSConfig is used for https URLs. It is cloned; ServerName defaults to
	// the URL's host; ALPN is not offered (DERP needs HTTP/1.1). Nil means
	// the system roots. Without RootCAs (and verification callbacks of
	// its own), a server the system's roots do not vouch for (or a system
	// without any, such as a bare container) is checked against Let's
	// Encrypt's two roots, built in, as Tailscale's client does: its DERP
	// servers, and most others, have their certificates from it. The
	// server's own certificate is always the first of its chain; meta
	// certs come after it. With a ClientSessionCache, a resumed TLS 1.3
	// session shows the chain of the handshake that made it (there is
	// no Certificate message), so the key of its meta cert is confirmed
	// as a configured one is: the login still leaves at once, but Dial
	// waits for the server's ServerKey, and if the key is another (a
	// server that took a session of a server with another key, sharing
	// session ticket keys) drops the cached session and dials again. A
	// resumed session whose chain has no meta cert takes the upgrade
	// path and is dropped from the cache, so that the next dial makes a
	// full handshake and sees the server's current chain (the tickets
	// of a resumed connection are cached with the chain it resumed
	// with, which would otherwise hide a meta cert served since).
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
	// Proxy, if not nil, returns the HTTP(S) proxy to tunnel through with
	// CONNECT for a request to the DERP URL, or nil for a direct
	// connection. It has the signature of http.Transport's Proxy:
	// http.ProxyFromEnvironment honours HTTPS_PROXY, HTTP_PROXY and
	// NO_PROXY (and never proxies localhost). The tunnel goes to the
	// URL's host and port, through DialContext. The proxy resolves the
	// host name: through a proxy, DialNode's node addresses (Node.IPv4
	// and Node.IPv6, even both "none") are not used, the CONNECT naming
	// HostName as Tailscale's client's does (a proxy that allows hosts
	// by name would refuse an address), and Proxy is asked about
	// HostName, so a NO_PROXY entry must match the name, not those
	// addresses. Likewise ReconnectingClient's last reached address of
	// a host name applies only to the proxy's own name. A user and password in
	// the proxy URL are sent as Basic Proxy-Authorization. TLS to the DERP
	// server, and so fast start, runs inside the tunnel. Proxy URLs may be
	// http or https (reached over TLS with TLSConfig's roots); socks5 is
	// not supported.
	Proxy func(*http.Request) (*url.URL, error)
	// ProxyConnectHeader holds extra headers for the CONNECT request, such
	// as a Proxy-Authorization scheme other than Basic.
	ProxyConnectHeader http.Header
	// WebSocket carries DERP over WebSocket (subprotocol "derp"), as
	// browsers must, for networks that let only WebSocket through. It
	// always takes the upgrade path: a WebSocket client waits for the 101.
	// It offers no extension, and a 101 that names one fails the dial
	// with a *ProtocolError ("websocket_handshake"). A server that sends
	// more than 16 KiB of WebSocket framing (frame headers, pings, empty
	// frames) within a second that the DERP bytes between do not pay for
	// (64 bytes of framing each) has the connection ended with a
	// *ProtocolError whose Reason is "websocket_framing_flood".
	WebSocket bool
	// IPv6HeadStart is how long DialNode and DialRegionTLS try a node's
	// IPv6 address alone before trying its IPv4 address too, when the
	// node gives both (an IPv6 failure starts IPv4 at once). Zero means
	// 200 ms; negative starts both at once, as Tailscale's client does
	// unless told to prefer IPv6.
	IPv6HeadStart time.Duration

	node *Node // set by DialNode: how to check the server's certificate
	// regionAnswer, if not zero, replaces defaultLoginTimeout as the
	// bound DialRegionTLS puts on each answer it waits for (tests).
	regionAnswer time.Duration
}

// clientReadBuf is the read buffer of dialled clients (under the framing,
// for WebSocket): it bounds the HTTP response header a server may send,
// and frames that fit in it are received without a copy.
const clientReadBuf = 16 << 10

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
	// Path is the handshake that connected: FastPath or UpgradePath.
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
	// TLS is the state of the TLS connection to the DERP server (not to
	// a proxy), nil for plain HTTP: the chain it presented, for pinning or
	// for spotting a TLS-intercepting middlebox.
	TLS *tls.ConnectionState
	// Attempts is the number of connections made (2 after a fallback).
	Attempts int
	// URL is the URL dialled.
	URL string

	fastAnswered bool // the fast-start attempt got an HTTP answer, and the upgrade was tried after it (or, in ReconnectingClient, the dial before hung up on one)
}

// Dial connects to serverURL and logs in with priv. On the fast path Dial
// returns as soon as the ClientInfo frame is written (packets may be sent at
// once); with a key taken only from configuration, or from the meta cert
// of a resumed TLS session, it first waits for the server's first bytes to
// confirm the key. ctx bounds the whole dial,
// including DNS, TCP, TLS and the upgrade; it does not affect the returned
// Client. A dial that ctx ends fails with an error that wraps ctx's and
// names the step it was at (such as "TLS handshake" or "waiting for the
// 101 response"). Redirects are not followed (as Tailscale's client does
// not follow them): a dial answered with one fails with an error that
// names its Location. An answer other than 101 fails the dial (or, on the
// fast path, the first Recv) with an error wrapping an [*HTTPError].
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
	c, hs, err := f.dial(ctx, u, priv, key, opts, false)
	hs.Attempts, hs.URL = 1, serverURL
	// A key from a resumed TLS session's meta cert is assumed too, as a
	// configured one is (see dial).
	resumed := hs.TLS != nil && hs.TLS.DidResume
	if err == nil || (key.IsZero() && !resumed) || ctx.Err() != nil {
		return c, hs, err
	}
	var reason string
	first := err
	switch {
	case errors.Is(err, ErrServerKeyMismatch) && resumed && hs.KeySource == "meta-cert":
		// The cached session is another server's, or from before
		// this server's key changed (servers sharing session ticket
		// keys): evict it, and let a full handshake show the chain.
		reason = "the resumed TLS session's meta cert names a stale key (" + err.Error() + "); dropped the cached session and retried"
	case errors.Is(err, ErrServerKeyMismatch):
		// The configured key was stale: forget it and take the classic
		// path, which learns the key from the server.
		reason = "configured server key is stale (" + err.Error() + "); retried with the upgrade path"
	case errors.Is(err, errFastStartAnswered):
		// An HTTP answer, such as a reverse proxy's 502: whatever is in
		// between may pass the classic upgrade.
		reason = "fast start failed (" + err.Error() + "); retried with the upgrade path"
	default:
		return c, hs, err
	}
	c, hs, err = f.dial(ctx, u, priv, PublicKey{}, opts, resumed)
	hs.Attempts, hs.URL = 2, serverURL
	hs.fastAnswered = errors.Is(first, errFastStartAnswered)
	if hs.Reason == "" {
		hs.Reason = reason
	} else {
		hs.Reason = reason + "; " + hs.Reason
	}
	return c, hs, err
}

// dial makes one connection. With fresh it first drops the TLS session
// cached for the server (a resumed session led the attempt before astray),
// and does not trust the meta cert of a session resumed anyway.
func (f *FastStart) dial(ctx context.Context, u *url.URL, priv PrivateKey, known PublicKey, opts []ClientOption, fresh bool) (c *Client, hs Handshake, err error) {
	nc, err := f.dialTCP(ctx, u, func(nc net.Conn) func(error) error { return answerWithin(nc, opts) })
	if err != nil {
		return nil, hs, err
	}
	// Cancelling ctx closes the connection, which ends whatever step is
	// in progress. It closes the TCP conn: nc becomes the tls.Conn below,
	// and reading the variable from the AfterFunc goroutine would race.
	// The error then says which step ctx cut short, as the step's own
	// error (a read of a closed connection) would not.
	step := new(string)
	*step = "after the TCP connect"
	tcp := nc
	stop := context.AfterFunc(ctx, func() { tcp.Close() })
	defer func() {
		if !stop() && err == nil {
			c, err = nil, ctx.Err()
		}
		if err != nil {
			c = nil
			nc.Close()
			if ctx.Err() != nil {
				err = fmt.Errorf("relay: dial %s: %s: %w", u.Host, *step, ctx.Err())
			}
		}
	}()

	hs.KeySource = "configured"
	var sessions *sessionCache
	if u.Scheme == "https" {
		*step = "TLS handshake"
		// A server that takes the connection and never answers the
		// ClientHello would hold a dial whose ctx has no deadline
		// forever; LoginTimeout bounds this wait as it does the next.
		answered := answerWithin(nc, opts)
		tc, sc, err := f.tlsHandshake(ctx, nc, u, false, fresh, answered)
		if err != nil {
			return nil, hs, err
		}
		answered(nil)
		sessions = sc
		nc = tc
		cs := tc.ConnectionState()
		hs.TLSVersion, hs.TLS = cs.Version, &cs
	}
	if f.WebSocket {
		return f.webSocket(nc, u, priv, hs, opts, step)
	}
	if hs.TLS != nil {
		var reason string
		hs, reason = chooseKey(hs, *hs.TLS, known, fresh)
		if hs.TLS.DidResume && hs.TLS.Version >= tls.VersionTLS13 && hs.KeySource != "meta-cert" && !fresh && !f.DisableFastStart {
			// The chain is the one cached with the session, and
			// crypto/tls caches this connection's tickets with it
			// too: a client that keeps resuming would never see a
			// meta cert the server has served since.
			sessions.forget()
			reason = "the resumed TLS session's chain, cached from an earlier full handshake, has no usable meta cert (" +
				reason + "); the session was dropped, so the next dial sees the server's current chain"
		}
		if hs.ServerKey.IsZero() || f.DisableFastStart {
			hs.Reason = reason
			if f.DisableFastStart {
				hs.Reason = "fast start disabled"
			}
			return f.upgrade(nc, u, priv, hs, opts, step)
		}
		if hs.KeySource == "meta-cert" {
			// A resumed session has no Certificate message: crypto/tls
			// restores the chain of the handshake that made the
			// session, and servers sharing session ticket keys accept
			// each other's sessions. So the key is confirmed, as a
			// configured one is; the login still leaves at once.
			return f.fastStart(nc, u, priv, hs, hs.TLS.DidResume, opts, step)
		}
		hs.Reason = reason
		return f.fastStart(nc, u, priv, hs, true, opts, step)
	}
	if known.IsZero() {
		hs.Reason = "plain HTTP and no known server key"
		if f.DisableFastStart {
			hs.Reason = "fast start disabled"
		}
		return f.upgrade(nc, u, priv, hs, opts, step)
	}
	hs.ServerKey = known
	return f.fastStart(nc, u, priv, hs, true, opts, step)
}

// Steps of a dial, named in the error of one that its context cut short.
const (
	stepRequest  = "sending the upgrade request"
	step101      = "waiting for the 101 response"
	stepLogin    = "login (ServerKey frame, ClientInfo)"
	stepFast     = "sending the fast-start request and ClientInfo"
	stepConfirm  = "waiting for the ServerKey frame to confirm the server key"
	stepWSReq    = "sending the WebSocket upgrade request"
	stepWS101    = "waiting for the WebSocket 101 response"
	stepTCP      = "TCP connect"
	stepProxyTLS = "TLS handshake with the proxy"
	stepConnect  = "CONNECT through the proxy"
)

// setStep records the step a dial is at in *p, if p is not nil.
func setStep(p *string, step string) {
	if p != nil {
		*p = step
	}
}

// chooseKey picks the key for the fast path from the TLS state: a meta cert
// in a TLS 1.3 chain wins, then a configured key. It returns the reason the
// meta cert could not be used, if it could not. With noResumed, the meta
// cert of a resumed session is not used.
func chooseKey(hs Handshake, cs tls.ConnectionState, known PublicKey, noResumed bool) (Handshake, string) {
	var reason string
	if cs.Version < tls.VersionTLS13 {
		reason = "TLS version " + tls.VersionName(cs.Version) + " below 1.3: the meta cert is not trusted"
	} else if cs.DidResume && noResumed {
		reason = "TLS session resumed again after its meta cert named a stale key (the ClientSessionCache kept it): the meta cert is not trusted"
	} else if k, v, ok := ParseMetaCert(cs.PeerCertificates); !ok {
		reason = "no meta cert in the server's TLS chain (old server, or a TLS-intercepting proxy)"
	} else if v < 1 || v > ProtocolVersion {
		reason = fmt.Sprintf("meta cert protocol version %d not spoken", v)
	} else if err := usableServerKey(k); err != nil {
		reason = fmt.Sprintf("meta cert names key %s, which no server can own (%v)", k.ShortString(), err)
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

// usableServerKey reports why k cannot be a server's key: the checks
// checkPeerKey makes of a client's key, and a small order, for which
// sharedKey fails (whatever the private key).
func usableServerKey(k PublicKey) error {
	if err := checkPeerKey(k); err != nil {
		return err
	}
	_, err := sharedKey(PrivateKey{8}, k)
	return err
}

// hostPort is u's host and port, the port defaulting to the scheme's.
func hostPort(u *url.URL) string {
	if u.Port() != "" {
		return u.Host
	}
	port := "80"
	if u.Scheme == "https" {
		port = "443"
	}
	return net.JoinHostPort(u.Hostname(), port)
}

// dialTCP connects to u's host, through the Proxy if there is one. within,
// if not nil, bounds each wait for the proxy's answer (see answerWithin).
func (f *FastStart) dialTCP(ctx context.Context, u *url.URL, within func(net.Conn) func(error) error) (net.Conn, error) {
	addr := hostPort(u)
	dial := f.DialContext
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	var proxy *url.URL
	if f.Proxy != nil {
		var err error
		req := &http.Request{Method: http.MethodGet, URL: u, Host: u.Host, Header: http.Header{}}
		if proxy, err = f.Proxy(req); err != nil {
			return nil, fmt.Errorf("relay: choose proxy for %s: %w", u.Host, err)
		}
	}
	if proxy == nil {
		nc, err := dial(ctx, "tcp", addr)
		if err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("relay: dial %s: %s: %w", addr, stepTCP, withCtxErr(ctx, err))
			}
			return nil, fmt.Errorf("relay: dial %s: %w", addr, err)
		}
		return nc, nil
	}
	return f.dialProxy(ctx, dial, proxy, addr, within)
}

// withCtxErr returns err, a connect's error after ctx ended, wrapping
// ctx's error too if err does not: a DialContext of the caller's may
// report the abort in words of its own, and a dial that ctx ends must
// fail with an error that wraps ctx's (see Dial; ReconnectingClient
// tells a timeout by it).
func withCtxErr(ctx context.Context, err error) error {
	if cerr := ctx.Err(); cerr != nil && !errors.Is(err, cerr) {
		return fmt.Errorf("%w (%w)", err, cerr)
	}
	return err
}

// maxProxyResponse bounds the CONNECT response a proxy may send.
const maxProxyResponse = 16 << 10

// dialProxy opens a CONNECT tunnel to addr through proxy. within, if not
// nil, bounds the TLS handshake with the proxy and the wait for its answer
// to the CONNECT (see answerWithin): a proxy that takes the connection and
// says nothing, or drips its answer, would otherwise hold a dial whose ctx
// has no deadline forever.
func (f *FastStart) dialProxy(ctx context.Context, dial func(context.Context, string, string) (net.Conn, error), proxy *url.URL, addr string, within func(net.Conn) func(error) error) (nc net.Conn, err error) {
	if proxy.Scheme != "http" && proxy.Scheme != "https" {
		return nil, fmt.Errorf("relay: proxy %s: unsupported scheme %q (want http or https)", proxy.Redacted(), proxy.Scheme)
	}
	paddr := hostPort(proxy)
	raw, err := dial(ctx, "tcp", paddr)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("relay: dial proxy %s: %s: %w", paddr, stepTCP, withCtxErr(ctx, err))
		}
		return nil, fmt.Errorf("relay: dial proxy %s: %w", paddr, err)
	}
	nc = raw
	step := stepConnect
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	defer func() {
		if !stop() && err == nil {
			err = ctx.Err()
		}
		if err != nil {
			raw.Close()
			nc = nil
			if ctx.Err() != nil {
				err = fmt.Errorf("relay: proxy %s: %s: %w", paddr, step, ctx.Err())
			}
		}
	}()
	if within == nil {
		within = func(net.Conn) func(error) error { return func(err error) error { return err } }
	}
	if proxy.Scheme == "https" {
		step = stepProxyTLS
		answered := within(raw)
		tc, _, err := f.tlsHandshake(ctx, raw, proxy, true, false, answered)
		if err != nil {
			return nil, fmt.Errorf("relay: proxy: %w", err)
		}
		answered(nil)
		nc = tc
		step = stepConnect
	}
	bw := bufio.NewWriter(nc)
	fmt.Fprintf(bw, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n", addr, addr)
	hdr := f.ProxyConnectHeader.Clone()
	if hdr == nil {
		hdr = http.Header{}
	}
	if proxy.User != nil && hdr.Get("Proxy-Authorization") == "" {
		pass, _ := proxy.User.Password()
		hdr.Set("Proxy-Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(proxy.User.Username()+":"+pass)))
	}
	if err := hdr.Write(bw); err != nil {
		return nil, fmt.Errorf("relay: proxy %s: %w", paddr, err)
	}
	bw.WriteString("\r\n")
	if err := bw.Flush(); err != nil {
		return nil, fmt.Errorf("relay: proxy %s: send CONNECT: %w", paddr, err)
	}
	br := bufio.NewReaderSize(nc, maxProxyResponse)
	answered := within(raw)
	resp, err := readResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		return nil, fmt.Errorf("relay: proxy %s: read CONNECT response: %w", paddr, answered(err))
	}
	answered(nil)
	if resp.StatusCode/100 != 2 {
		// The status line is the proxy's: quoted, like a refusal's
		// body, so that it cannot break the error into lines.
		return nil, fmt.Errorf("relay: proxy %s refused CONNECT %s: %q", paddr, addr, resp.Status)
	}
	if n := br.Buffered(); n > 0 {
		// The DERP server speaks only after the client, so these bytes
		// cannot be the server's.
		return nil, fmt.Errorf("relay: proxy %s sent %d unexpected bytes after its CONNECT response", paddr, n)
	}
	return nc, nil
}

// tlsHandshake runs TLS over nc to u's host; for a proxy the server name is
// always the proxy's, not TLSConfig's. With evict, the session cached for
// the server name is dropped first, so that the handshake is a full one.
// For a DERP server (not a proxy) with a ClientSessionCache it also returns
// the cache as the connection uses it, to drop the session later.
//
// bound, if not nil, turns the handshake's error into one that says which
// bound cut it short (see answerWithin).
func (f *FastStart) tlsHandshake(ctx context.Context, nc net.Conn, u *url.URL, proxy, evict bool, bound func(error) error) (*tls.Conn, *sessionCache, error) {
	var cfg *tls.Config
	if f.TLSConfig != nil {
		cfg = f.TLSConfig.Clone()
	} else {
		cfg = &tls.Config{}
	}
	if cfg.ServerName == "" || proxy {
		cfg.ServerName = u.Hostname()
	}
	if f.node != nil && !proxy {
		f.node.verifyWith(cfg)
	}
	if !cfg.InsecureSkipVerify && cfg.RootCAs == nil && cfg.VerifyConnection == nil && cfg.VerifyPeerCertificate == nil {
		// (Callbacks of the caller's own may read the verified chains,
		// which crypto/tls fills only when it verifies.)
		verifyWithFallbackRoots(cfg)
	}
	cfg.NextProtos = nil
	if evict && cfg.ClientSessionCache != nil {
		// crypto/tls caches sessions under the server name, and a nil
		// session removes the entry.
		cfg.ClientSessionCache.Put(cfg.ServerName, nil)
	}
	var sc *sessionCache
	if cfg.ClientSessionCache != nil && !proxy {
		sc = &sessionCache{ClientSessionCache: cfg.ClientSessionCache, key: cfg.ServerName}
		cfg.ClientSessionCache = sc
	}
	tc := tls.Client(nc, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		if bound != nil {
			err = bound(err)
		}
		return nil, nil, fmt.Errorf("relay: TLS handshake with %s: %w", u.Host, err)
	}
	return tc, sc, nil
}

// sessionCache is the ClientSessionCache of one connection to a DERP
// server: the caller's, until forget.
type sessionCache struct {
	tls.ClientSessionCache
	key  string // the server's: crypto/tls caches under the server name
	drop atomic.Bool
}

// Put stores a session unless forget was called.
func (c *sessionCache) Put(key string, cs *tls.ClientSessionState) {
	if cs != nil && c.drop.Load() {
		return
	}
	c.ClientSessionCache.Put(key, cs)
}

// forget drops the session cached for the server, and the tickets the
// connection gets from now on: those of a resumed TLS 1.3 session carry
// the chain cached with it. A nil c does nothing.
func (c *sessionCache) forget() {
	if c == nil {
		return
	}
	c.drop.Store(true)
	c.ClientSessionCache.Put(c.key, nil)
}

// requestPath is the request target for u: /derp if u has no path.
func requestPath(u *url.URL) string {
	if u.Path == "" || u.Path == "/" {
		return "/derp"
	}
	return u.RequestURI()
}

func (f *FastStart) writeRequest(bw *bufio.Writer, u *url.URL, fast bool) {
	fmt.Fprintf(bw, "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: fastderp-relay\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n", requestPath(u), u.Host)
	if fast {
		fmt.Fprintf(bw, "%s: 1\r\n", FastStartHeader)
	}
	f.writeHeader(bw)
	bw.WriteString("\r\n")
}

// writeHeader writes f.Header, with line breaks removed from the values.
func (f *FastStart) writeHeader(bw *bufio.Writer) {
	for k, vs := range f.Header {
		for _, v := range vs {
			fmt.Fprintf(bw, "%s: %s\r\n", k, strings.NewReplacer("\r", "", "\n", "").Replace(v))
		}
	}
}

// fastStart writes the upgrade request and the ClientInfo in one flush. If
// the key is only assumed (confirm), it then waits for the server's first
// bytes to check it.
func (f *FastStart) fastStart(nc net.Conn, u *url.URL, priv PrivateKey, hs Handshake, confirm bool, opts []ClientOption, step *string) (*Client, Handshake, error) {
	hs.Path = FastPath
	setStep(step, stepFast)
	brw := bufio.NewReadWriter(bufio.NewReaderSize(nc, clientReadBuf), bufio.NewWriter(nc))
	f.writeRequest(brw.Writer, u, true)
	opts = append(opts[:len(opts):len(opts)], ServerPublicKey(hs.ServerKey), allowHTTPPrefix())
	c, err := NewClient(priv, nc, brw, opts...)
	if err != nil {
		return nil, hs, err
	}
	if confirm {
		setStep(step, stepConfirm)
		if err := c.readServerStart(); err != nil {
			return nil, hs, err
		}
	}
	return c, hs, nil
}

// upgrade takes the classic path: request, wait for 101, then log in.
func (f *FastStart) upgrade(nc net.Conn, u *url.URL, priv PrivateKey, hs Handshake, opts []ClientOption, step *string) (*Client, Handshake, error) {
	hs.Path = UpgradePath
	setStep(step, stepRequest)
	brw := bufio.NewReadWriter(bufio.NewReaderSize(nc, clientReadBuf), bufio.NewWriter(nc))
	f.writeRequest(brw.Writer, u, false)
	if err := brw.Flush(); err != nil {
		return nil, hs, fmt.Errorf("relay: send upgrade request: %w", err)
	}
	setStep(step, step101)
	answered := answerWithin(nc, opts)
	resp, err := readResponse(brw.Reader, nil)
	if err != nil {
		return nil, hs, fmt.Errorf("relay: read upgrade response: %w", answered(err))
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return nil, hs, fmt.Errorf("relay: upgrade refused: %w", newHTTPError(resp))
	}
	answered(nil)
	hs.ServerKey, hs.KeySource = PublicKey{}, "server-key-frame"
	if k, err := ParsePublicKey(resp.Header.Get(PublicKeyHeader)); err == nil {
		// The ServerKey frame is in the same flush as the 101, so using
		// the header saves no round trip; it only lets Recv cross-check.
		hs.ServerKey, hs.KeySource = k, "http-header"
		opts = append(opts[:len(opts):len(opts)], ServerPublicKey(k))
	}
	setStep(step, stepLogin)
	c, err := NewClient(priv, nc, brw, opts...)
	if err != nil {
		return nil, hs, err
	}
	hs.ServerKey = c.ServerPublicKey()
	return c, hs, nil
}

// answerWithin bounds the wait for the answer to an upgrade request (or
// to the ClientHello) by the LoginTimeout among opts: the server sends it
// with its first frame, whose wait that bounds too (see NewClient and
// readServerStart), so that a server that never answers, or drips its
// answer, fails the dial however long ctx allows. The function it returns ends the bound once
// the answer is read (nil), or turns the error of a read that the bound
// cut short into one that says so.
func answerWithin(nc net.Conn, opts []ClientOption) func(error) error {
	o := clientOptions{loginTimeout: defaultLoginTimeout}
	for _, opt := range opts {
		if opt != nil { // NewClient reports a nil one
			opt(&o)
		}
	}
	if o.loginTimeout <= 0 {
		return func(err error) error { return err }
	}
	nc.SetReadDeadline(time.Now().Add(o.loginTimeout))
	return func(err error) error {
		if err == nil {
			nc.SetReadDeadline(time.Time{})
			return nil
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return fmt.Errorf("no answer within LoginTimeout %v: %w", o.loginTimeout, err)
		}
		return err
	}
}

// webSocket takes the upgrade path to DERP over WebSocket.
func (f *FastStart) webSocket(nc net.Conn, u *url.URL, priv PrivateKey, hs Handshake, opts []ClientOption, step *string) (*Client, Handshake, error) {
	hs.Path, hs.Reason = UpgradePath, "WebSocket transport"
	setStep(step, stepWSReq)
	var nonce [16]byte
	crand.Read(nonce[:])
	key := base64.StdEncoding.EncodeToString(nonce[:])
	br := bufio.NewReaderSize(nc, clientReadBuf)
	bw := bufio.NewWriter(nc)
	fmt.Fprintf(bw, "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: fastderp-relay\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Protocol: %s\r\n", requestPath(u), u.Host, key, WebSocketProtocol)
	f.writeHeader(bw)
	bw.WriteString("\r\n")
	if err := bw.Flush(); err != nil {
		return nil, hs, fmt.Errorf("relay: send WebSocket request: %w", err)
	}
	setStep(step, stepWS101)
	answered := answerWithin(nc, opts)
	resp, err := readResponse(br, nil)
	if err != nil {
		return nil, hs, fmt.Errorf("relay: read WebSocket response: %w", answered(err))
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return nil, hs, fmt.Errorf("relay: WebSocket upgrade refused: %w", newHTTPError(resp))
	}
	answered(nil)
	switch {
	case !strings.EqualFold(resp.Header.Get("Upgrade"), "websocket") || !hasToken(resp.Header.Values("Connection"), "upgrade"):
		err = errors.New("101 response does not upgrade to websocket")
	case resp.Header.Get("Sec-WebSocket-Accept") != wsAcceptKey(key):
		err = errors.New("wrong Sec-WebSocket-Accept")
	case resp.Header.Get("Sec-WebSocket-Protocol") != WebSocketProtocol:
		err = fmt.Errorf("server chose subprotocol %q, not %q", resp.Header.Get("Sec-WebSocket-Protocol"), WebSocketProtocol)
	case len(resp.Header.Values("Sec-WebSocket-Extensions")) > 0:
		// None was offered (RFC 6455 §4.1: the client fails the
		// connection); its frames would fail later, blaming the server
		// for bits the extension it named may set.
		err = fmt.Errorf("server chose extensions %.100q, and none was offered", strings.Join(resp.Header.Values("Sec-WebSocket-Extensions"), ", "))
	}
	if err != nil {
		return nil, hs, &ProtocolError{Reason: "websocket_handshake", Detail: err.Error()}
	}
	// The DERP stream's reader reads the payloads wc decodes through br,
	// whose 16 KiB serve the WebSocket framing: a frame larger than
	// bufio's default buffer goes through it into the Client's payload
	// buffer with no more copies than one that fits, and a second
	// 16 KiB buffer would only sit idle with the client.
	wc := newWSConn(nc, br, true)
	brw := bufio.NewReadWriter(bufio.NewReader(wc), bufio.NewWriter(wc))
	setStep(step, stepLogin)
	c, err := NewClient(priv, wc, brw, opts...)
	if err != nil {
		return nil, hs, err
	}
	hs.ServerKey, hs.KeySource = c.ServerPublicKey(), "server-key-frame"
	return c, hs, nil
}

// readServerStart reads what a server sends first after a fast-start request
// made with an assumed key: possibly an HTTP response (it ignored fast
// start), then the ServerKey frame. It fails with ErrServerKeyMismatch if the
// key is not the assumed one.
func (c *Client) readServerStart() error {
	var by time.Time
	if c.opts.loginTimeout > 0 {
		by = time.Now().Add(c.opts.loginTimeout)
		c.setReadDeadline(by)
		defer c.setReadDeadline(time.Time{})
	}
	assumed := c.serverKey
	c.maybeHTTP = false
	if err := c.skipHTTPResponse(); err != nil {
		return err
	}
	if err := c.recvServerKey(by); err != nil {
		return fmt.Errorf("relay: login: receive server key: %w", err)
	}
	if c.serverKey != assumed {
		got := c.serverKey
		c.serverKey = assumed
		return fmt.Errorf("%w: expected %s, server sent %s", ErrServerKeyMismatch, assumed, got)
	}
	return nil
}

// ReconnectingClient is a long-lived DERP client built on FastStart: it
// connects on first use, reconnects after any failure with exponential
// backoff and jitter (a connection the server ends within MaxBackoff of
// its ServerInfo is a failure too, and so is one that a write finds
// failed within MaxBackoff of its dial while no Recv has returned its
// ServerInfo, so that a server that takes logins and hangs up at once is
// not redialled in a tight loop, with a Recv loop or without; after a
// longer one the count of failures starts again and the client
// reconnects at once; a failure counts once, whichever call sees it
// first), honours the server's
// ServerRestarting notice (waiting at most MaxBackoff, then retrying
// failed dials quickly for at most a minute; a session that ends within
// MaxBackoff of its ServerInfo still backs off as usual, notice or not,
// and a notice before ServerInfo, or one a Recv returns once a newer
// connection replaced the one it came on, is returned but not honoured),
// re-sends NotePreferred after a reconnect, answers the server's Pings, and
// remembers the server key it learned so that later connections take the
// fast path even over plain HTTP or TLS 1.2 (unless such a dial times out
// after connecting, as it does through a reverse proxy that does not pass
// fast start through: that server is then dialled as if no key were
// known, unless its path was silent already, as in a black hole; see
// Dialer; and after a fast start to it got an HTTP answer, such as a
// reverse proxy's 502, and the upgrade that Dial tried at once got
// through, or it hung up on a fast start and the next dial's upgrade got
// through, that server is dialled as if no key were known for 30 minutes,
// or until Reconnect). It also remembers the address each host name was last reached
// at: when DNS fails on a reconnect, it dials that address (the
// certificate is still checked against the name).
//
// A dial that the ctx of the call that dialled ends first (its deadline
// or its cancel, before the dial's own bounds such as DialTimeout) is no
// failure: it sets no wait for the next call, which may be another
// caller's with more time, nor changes the server that call starts with
// (see Fallbacks); unless the dial before it was cut short so
// too, when it counts as a failed dial, so that callers whose ctx never
// leaves a dial time to finish do not redial a slow server at the pace
// of their calls.
//
// When the network under it changes, or a Ping gets no answer, call
// Reconnect: the next connection is dialled at once, instead of a silent
// path holding the current one until RecvTimeout.
//
// Set the exported fields, then call its methods; the fields must not
// change afterwards. Send, NotePreferred, Ping, Reconnect and Close may be
// called concurrently; Recv from one goroutine at a time. Keep a goroutine calling
// Recv: Pongs for Ping arrive there, and the server's liveness pings are
// answered there (the client tells servers it answers them, so a server
// that checks liveness, as this package's does by default, drops a client
// that never reads after its idle timeout; the next call then reconnects).
type ReconnectingClient struct {
	// URL is the server's DERP URL, such as "https://derp.example.com/derp".
	URL string
	// Fallbacks are more servers of the same region (a mesh), tried in
	// order when a dial to URL fails; every reconnect starts again with
	// URL, the ideal node. A connection that ends before the server's
	// ServerInfo (a login the server refused once the dial had succeeded,
	// which returns before ServerInfo on either path), or whose first
	// frames (NotePreferred, WatchConns) fail, counts as a failed dial of
	// that server: the next dial starts with the server after it, even
	// after a Reconnect (see Reconnect). So does
	// one that a write finds failed within MaxBackoff of its dial while no
	// Recv has returned its ServerInfo (all a client that only sends can
	// tell of a refused login). A connection to a fallback
	// sends the Ideal-Node header naming URL's host, so the server can
	// count clients that are not where they should be.
	Fallbacks []string
	// Region, if not nil, is used instead of URL and Fallbacks: its nodes
	// are dialled in order as FastStart.DialNode does (by their own
	// addresses unless through Dialer's Proxy, checking CertName or its
	// pin), STUN-only nodes skipped, and a node other than the first
	// sends the first node's Name as Ideal-Node.
	Region *Region
	// NodeConnectTimeout bounds the TCP connect to each node while there
	// are Fallbacks (or more than one node in Region), so that an
	// unreachable node costs little of DialTimeout. Default 1.5 s. A node
	// that accepts TCP and then stalls is bounded too: while more nodes
	// remain, each attempt gets an equal share of what is left of
	// DialTimeout, up to the server's ServerInfo (a dial that returns
	// before it, as on the fast path, leaves what is left of the share to
	// Recv's wait for it, counted from Recv's first wait). The last node
	// to try has only RecvTimeout to send its ServerInfo.
	NodeConnectTimeout time.Duration
	// PrivateKey is the client's identity.
	PrivateKey PrivateKey
	// Dialer dials each connection; nil means a zero FastStart. Its
	// ServerKey, if set, is the first key tried for URL; later the key
	// learned from each server is used for it, and neither once a fast
	// start with a known key timed out on that server (a bound of the
	// dial's own ended it, such as DialTimeout or a node's share of it,
	// not the deadline of the caller's ctx), unless the path to it was
	// silent already: its last connection or dial had timed out too, as
	// in a black hole every dial does, or a Ping on its last connection
	// had. Nor is it used for 30 minutes, or until a Reconnect, after a
	// dial to that server whose fast start got an HTTP answer (such as a
	// reverse proxy's 502) connected with the upgrade that Dial tried at
	// once: each reconnect would otherwise make that extra connection.
	// A fast start with it that fails otherwise once connected (reset
	// or closed before the server's first frame, not timed out) fails
	// that dial, and the next one goes without the key; if that one
	// connects on the upgrade path, the same 30 minutes apply.
	Dialer *FastStart
	// Options are passed to every connection (MeshKey, CanAckPings, …).
	Options []ClientOption
	// OnConnect, if set, is called after each connection with how it was
	// made (fast path or not, and why), before the call that dialled goes
	// on, with no lock held: it may call the client's methods.
	OnConnect func(Handshake)
	// Logger receives one line per connection and failure (a failed dial
	// of several nodes: one line naming each node's error, and one at
	// Debug per node); nil is quiet. Lines are logged with no lock held,
	// and a dial's once it is over: its handler may call the client's
	// methods, even those that dial.
	Logger *slog.Logger
	// MinBackoff and MaxBackoff bound the wait between failed dials.
	// Defaults: 100 ms and 5 s. Each wait is uniformly random in
	// [d/2, d] for the current step d.
	MinBackoff, MaxBackoff time.Duration
	// DialTimeout bounds each connection attempt, up to the frames a new
	// connection starts with (NotePreferred, WatchConns). Default 10 s.
	// An attempt it ends is a failed dial, unlike one its caller's ctx
	// ends first (see ReconnectingClient).
	DialTimeout time.Duration

	dialing chan struct{} // holds a token while a call dials: one at a time; made under mu
	// setupMu is held by NotePreferred and WatchConnectionChanges from
	// their decision to their write, and by dial while it writes a new
	// connection's first frames (taken before mu).
	setupMu sync.Mutex

	mu           sync.Mutex
	c            *Client
	gen          int
	learned      PublicKey             // the current or last server's key
	keys         map[string]PublicKey  // learned keys by URL
	noFast       map[string]bool       // servers (keyID) a fast start with a known key timed out on
	silent       map[string]bool       // servers whose last connection, or dial other than such a fast start, timed out (see dial)
	noKeyOnce    map[string]bool       // servers to dial once without their key, after a fast start timed out while silent
	fastRefused  map[string]time.Time  // servers whose fast start got an HTTP answer, or hung up, and the upgrade then got past: until when they are dialled without their key
	fastHungUp   map[string]bool       // servers a fast start with a known key failed on after connecting (not a timeout): the next dial goes without the key
	cKeyID       string                // keyID of c's server
	lastGood     map[string]netip.Addr // where each host name was last reached
	preferred    bool                  // what the caller wants
	watch        bool                  // WatchConnectionChanges was called
	sentPref     bool                  // what the current connection was told
	closed       bool
	failures     int
	cutShort     bool          // the last dial was cut short by its caller's ctx (see dial)
	cTarget      int           // index in targets() of c's server
	nTargets     int           // len(targets()) when c was dialled
	startAt      int           // index in targets() the next dial starts with
	loginWait    time.Duration // how long Recv may wait for c's ServerInfo; 0: RecvTimeout
	loginBy      time.Time     // when c's ServerInfo is due, from Recv's first wait; zero: not yet
	nextDial     time.Time
	notBefore    time.Time // no dial before this either: the backoff after a short session
	infoAt       time.Time // when the current connection's ServerInfo arrived
	connAt       time.Time // when the current connection was made
	infoGen      int       // the last connection whose ServerInfo Recv returned
	restartUntil time.Time
	askedGen     int           // generation of the last connection made before the last Reconnect (not the Client: one no Recv waited on would stay, buffers and all): the ends of it and older ones count for nothing; 0: none
	callerGen    int           // generation of the last connection a call's interrupt dropped (see drop) whose end no write has accounted for since: a write the server failed before the interrupt may still (see endLocked); 0: none
	redial       chan struct{} // closed by Reconnect: a wait for the next dial starts over; made by redialCh
	pings        map[[8]byte]chan struct{}
	done         chan struct{} // closed by Close; made by doneCh

	testHookDialed      func() // if set (tests only), called by dial after its servers were tried
	testHookRecvFailed  func() // if set (tests only), called by RecvDetail when a read fails, before it drops the connection
	testHookRecvDropped func() // if set (tests only), called by RecvDetail once it dropped a connection whose read failed, before it goes on
	testHookWriteFailed func() // if set (tests only), called by dropAfterWrite once it accounted for the connection's end and forgot it, before it closes it
	testHookIOEnded     func() // if set (tests only), called by writeUnder, RecvDetail and dial (a new connection's first frames) once their I/O on the connection ended (and whether an interrupt had fired was noted), before they stop ctx's interrupt
}

// doneCh returns the channel Close closes. rc.mu must be held.
func (rc *ReconnectingClient) doneCh() chan struct{} {
	if rc.done == nil {
		rc.done = make(chan struct{})
	}
	return rc.done
}

// redialCh returns the channel the next Reconnect closes. rc.mu must be
// held.
func (rc *ReconnectingClient) redialCh() chan struct{} {
	if rc.redial == nil {
		rc.redial = make(chan struct{})
	}
	return rc.redial
}

// fastRefusedFor is how long ReconnectingClient dials a server without
// its key after a fast start to it got an HTTP answer, or hung up, and the
// upgrade then got through (see Dialer).
const fastRefusedFor = 30 * time.Minute

// maxRestartTry bounds how long after a ServerRestarting notice's wait the
// client retries at MinBackoff.
const maxRestartTry = time.Minute

// ErrNotConnected is returned by ReconnectingClient.Ping when the Pong did
// not arrive on the connection the Ping was sent on, and by its writes
// (Send, Ping, NotePreferred, …) whose connection was dropped while they
// wrote: by Reconnect, by another call that saw it fail, or by another
// call whose ctx ended during its own I/O on it. The client is not closed
// (that is ErrClosed): the next call connects again.
var ErrNotConnected = errors.New("relay: connection lost")

func (rc *ReconnectingClient) backoff(failures int, now time.Time) time.Duration {
	lo, hi := rc.backoffBounds()
	return backoffStep(lo, hi, failures, now.Before(rc.restartUntil))
}

// backoffBounds returns MinBackoff and MaxBackoff with their defaults.
func (rc *ReconnectingClient) backoffBounds() (lo, hi time.Duration) {
	lo, hi = rc.MinBackoff, rc.MaxBackoff
	if lo <= 0 {
		lo = 100 * time.Millisecond
	}
	if hi <= 0 {
		hi = 5 * time.Second
	}
	return lo, max(hi, lo)
}

// backoffStep returns a jittered wait for the given number of consecutive
// failures: uniform in [d/2, d] where d = lo·2^(failures-1), capped at hi.
// While a server restart is in progress (restarting) it stays at lo.
func backoffStep(lo, hi time.Duration, failures int, restarting bool) time.Duration {
	d := lo
	if !restarting {
		for i := 1; i < failures && d < hi; i++ {
			if d > hi/2 { // doubling would pass hi, and a huge hi overflow
				d = hi
				break
			}
			d *= 2
		}
	}
	d = min(d, hi)
	return d/2 + rand.N(d/2+1)
}

// current returns the live client, dialling if there is none.
func (rc *ReconnectingClient) current(ctx context.Context) (*Client, int, error) {
	rc.mu.Lock()
	if rc.closed {
		rc.mu.Unlock()
		return nil, 0, ErrClosed
	}
	if rc.c != nil {
		c, gen := rc.c, rc.gen
		rc.mu.Unlock()
		return c, gen, nil
	}
	rc.mu.Unlock()
	if err := ctxEnded(ctx); err != nil {
		return nil, 0, err // no dial for a call that is over: see ctxEnded
	}

	c, gen, hs, err := rc.dialOnce(ctx)
	if err == nil && hs != nil && rc.OnConnect != nil {
		// With no lock held: it may call rc's methods, even ones that
		// dial again.
		rc.OnConnect(*hs)
	}
	return c, gen, err
}

// dialOnce dials unless another caller connected meanwhile, one caller at
// a time, after the wait the last failure set. hs is nil when it did not
// dial. ctx bounds the wait for another caller's dial too.
func (rc *ReconnectingClient) dialOnce(ctx context.Context) (*Client, int, *Handshake, error) {
	rc.mu.Lock()
	if rc.dialing == nil {
		rc.dialing = make(chan struct{}, 1)
	}
	dialing, done := rc.dialing, rc.doneCh()
	rc.mu.Unlock()
	select {
	case dialing <- struct{}{}:
	case <-ctx.Done():
		return nil, 0, nil, ctx.Err()
	case <-done:
		return nil, 0, nil, ErrClosed
	}
	var log dialLog
	defer rc.flushLog(&log) // after the turn is given back: see dialLog
	defer func() { <-dialing }()
	for {
		c, gen, hs, dialed, err := rc.waitAndDial(ctx, done, &log)
		if dialed && errors.Is(err, errRedial) && ctx.Err() == nil {
			continue // Reconnect cut the dial short: dial again at once
		}
		return c, gen, hs, err
	}
}

// waitAndDial waits out the wait the last failure set, then dials, unless
// another caller connected meanwhile (dialed false). The caller holds the
// turn to dial.
func (rc *ReconnectingClient) waitAndDial(ctx context.Context, done chan struct{}, log *dialLog) (*Client, int, *Handshake, bool, error) {
	var redial chan struct{}
	for {
		rc.mu.Lock()
		if rc.c != nil || rc.closed {
			c, gen, closed := rc.c, rc.gen, rc.closed
			rc.mu.Unlock()
			if closed {
				return nil, 0, nil, false, ErrClosed
			}
			return c, gen, nil, false, nil
		}
		next := rc.nextDial
		if rc.notBefore.After(next) {
			next = rc.notBefore
		}
		wait := time.Until(next)
		redial = rc.redialCh()
		rc.mu.Unlock()
		if wait <= 0 {
			break
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-redial:
			// Reconnect cleared the wait (unless a restart notice
			// set it): look again.
			t.Stop()
			continue
		case <-ctx.Done():
			t.Stop()
			return nil, 0, nil, false, ctx.Err()
		case <-done:
			t.Stop()
			return nil, 0, nil, false, ErrClosed
		}
		break
	}
	c, gen, hs, err := rc.dial(ctx, done, redial, log)
	return c, gen, &hs, true, err
}

// errRedial is the error of a dial that Reconnect cut short.
var errRedial = fmt.Errorf("relay: dial cut short by Reconnect: %w", ErrNotConnected)

// dialLog holds the lines a dial logs, which go out once it is over and
// the turn to dial is given back (see dialOnce): the log handler may call
// the client's methods, and those that dial would otherwise wait for the
// dial that is logging, for good.
type dialLog struct {
	mu    sync.Mutex // a dialer may log from a goroutine of its own
	lines []slog.Record
}

func (l *dialLog) add(level slog.Level, msg string, args ...any) {
	r := slog.NewRecord(time.Now(), level, msg, 0)
	r.Add(args...)
	l.mu.Lock()
	l.lines = append(l.lines, r)
	l.mu.Unlock()
}

// flushLog logs the lines of a dial that is over.
func (rc *ReconnectingClient) flushLog(l *dialLog) {
	l.mu.Lock()
	lines := l.lines
	l.lines = nil
	l.mu.Unlock()
	if rc.Logger == nil {
		return
	}
	ctx := context.Background()
	for _, r := range lines {
		if rc.Logger.Enabled(ctx, r.Level) {
			rc.Logger.Handler().Handle(ctx, r)
		}
	}
}

// dial connects to the first of rc's servers that answers. Close (closing
// done) cancels it, and Reconnect (closing redial) too, making it fail
// with errRedial: the dial may be stuck on the network that changed. Its
// lines go to log.
func (rc *ReconnectingClient) dial(ctx context.Context, done, redial <-chan struct{}, log *dialLog) (*Client, int, Handshake, error) {
	timeout := rc.DialTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	select {
	case <-done:
		return nil, 0, Handshake{}, ErrClosed
	default:
	}
	if err := ctxEnded(ctx); err != nil {
		// Ended while the call waited for its turn or the backoff: a
		// dial begun now would be cut short at once.
		return nil, 0, Handshake{}, err
	}
	go func() {
		select {
		case <-done:
			cancel()
		case <-redial:
			cancel()
		case <-dctx.Done():
		}
	}()
	opts := append(rc.Options[:len(rc.Options):len(rc.Options)], CanAckPings(true))
	var c *Client
	var hs Handshake
	var err error
	targets := rc.targets()
	if len(targets) == 0 {
		err = fmt.Errorf("relay: region %d (%s) has no DERP node", rc.Region.RegionID, rc.Region.RegionCode)
	}
	// Start with the ideal server, or with the one after a server that
	// accepted the last connection and then ended it before confirming
	// the login.
	rc.mu.Lock()
	first := rc.startAt
	rc.startAt = 0
	rc.mu.Unlock()
	var won dialTarget
	wonIdx := 0
	var loginWait time.Duration
	var nodeErrs []error // of each node tried, when there are several
	// Whether the caller's ctx had ended when the dial failed: one that
	// ends later did not cut it short, and the failure is the server's.
	cut := false
	for k := range targets {
		i := (first + k) % len(targets)
		t := targets[i]
		f, keyless := rc.dialerFor(i, t, len(targets) > 1, log)
		actx, acancel := attemptContext(dctx, len(targets)-k)
		if t.node != nil {
			c, hs, err = f.DialNode(actx, t.node, rc.PrivateKey, opts...)
		} else {
			c, hs, err = f.Dial(actx, t.url, rc.PrivateKey, opts...)
		}
		cut = err != nil && ctx.Err() != nil
		if dl, ok := actx.Deadline(); ok && err == nil && len(targets)-k > 1 {
			// The dial returns before the login is confirmed (always on
			// the fast path): while more servers remain, what is left
			// of the attempt's share bounds the wait for ServerInfo.
			loginWait = max(time.Until(dl), time.Millisecond)
		}
		acancel()
		won, wonIdx = t, i
		// Timed out on the server's side: a bound of the dial's own
		// (DialTimeout, the attempt's share of it, LoginTimeout), not
		// the caller's ctx, whose deadline says nothing of the server
		// or the path to it.
		timedOut := err != nil && ctx.Err() == nil && (errors.Is(err, context.DeadlineExceeded) || isTimeout(err))
		switch {
		case timedOut && hs.Path == FastPath && hs.KeySource == "configured":
			// The fast path with a key known in advance got no answer
			// after the connection was made: something between (a
			// reverse proxy) does not pass fast start through, and the
			// server waits for a ClientInfo it never gets. From now on
			// the server is dialled as if no key were known. (A server
			// that hangs up instead is dialled once without it: see
			// the next case but one.)
			// Unless the path to it was silent already (the last
			// connection or dial timed out): in a black hole every dial
			// times out, with the key or without, so the next dial
			// only goes without it, and one that succeeds proves
			// nothing against fast start either.
			rc.mu.Lock()
			silent := rc.silent[t.keyID()]
			if silent {
				if rc.noKeyOnce == nil {
					rc.noKeyOnce = map[string]bool{}
				}
				rc.noKeyOnce[t.keyID()] = true
			} else {
				if rc.noFast == nil {
					rc.noFast = map[string]bool{}
				}
				rc.noFast[t.keyID()] = true
			}
			rc.mu.Unlock()
			if !silent {
				log.add(slog.LevelInfo, "relay: fast start failed with a known key; not using it again for this server", "url", t.url, "node", t.name(), "err", err)
			}
		case timedOut:
			rc.noteSilent(t.keyID(), true)
		case err != nil && hs.Path == FastPath && hs.KeySource == "configured" && dctx.Err() == nil:
			// The fast path with a key known in advance failed after
			// the connection was made, before the server's first
			// frame: something in front of it may refuse fast start
			// without an HTTP answer (a reset, a close). The next dial
			// goes without the key, and if it gets through, fast start
			// is remembered as refused there (see Dialer); a server
			// that hung up as it went down, and whose dial without the
			// key failed too, keeps its key.
			rc.mu.Lock()
			if rc.fastHungUp == nil {
				rc.fastHungUp = map[string]bool{}
			}
			rc.fastHungUp[t.keyID()] = true
			rc.mu.Unlock()
		case err == nil:
			rc.noteSilent(t.keyID(), false)
		}
		if keyless && !hs.fastAnswered {
			// Dialled without the key after a fast start that hung up.
			// Unless a cut-short dial, which leaves it to the next.
			rc.mu.Lock()
			if err == nil || dctx.Err() == nil {
				delete(rc.fastHungUp, t.keyID())
			}
			rc.mu.Unlock()
			if err == nil && hs.Path == UpgradePath {
				// Remembered as a fast start answered by HTTP is
				// (see Dialer). A failure is no evidence either
				// way: the next dial takes the key again.
				hs.fastAnswered = true
			}
		}
		if err != nil && len(targets) > 1 {
			// One line per failed dial, not per node: the failure's
			// line names every node's error.
			e := err // DialNode's errors name the node
			if t.node == nil {
				e = fmt.Errorf("%s: %w", t.url, err)
			}
			nodeErrs = append(nodeErrs, e)
			if rc.Logger != nil {
				log.add(slog.LevelDebug, "relay: node unreachable", "url", t.url, "node", t.name(), "err", err)
			}
		}
		if err == nil || dctx.Err() != nil {
			break
		}
	}
	if rc.testHookDialed != nil {
		rc.testHookDialed()
	}
	logErr := err // what the failure's line says
	if err != nil && len(nodeErrs) > 1 {
		args := make([]any, len(nodeErrs))
		for i, e := range nodeErrs {
			args[i] = e
		}
		logErr = fmt.Errorf(strings.TrimSuffix(strings.Repeat("%w; ", len(args)), "; "), args...)
	}
	setupFailed := false // the connection was made, its first frames were not
	if err == nil {
		// The new connection's first frames. Under setupMu, so that a
		// concurrent NotePreferred or WatchConnectionChanges either
		// sees this connection or is seen here; but not under mu, nor
		// beyond dctx (which Close cancels): a server that does not
		// read them (over a transport with no buffer, such as a pipe)
		// must not hold Close, Generation and the other calls.
		rc.setupMu.Lock()
		defer rc.setupMu.Unlock()
		rc.mu.Lock()
		pref, watch := rc.preferred, rc.watch
		rc.mu.Unlock()
		if pref || watch {
			stop := context.AfterFunc(dctx, c.interrupt)
			if pref {
				err = c.NotePreferred(true)
			}
			if err == nil && watch {
				err = c.WatchConnectionChanges()
			}
			// Whether the interrupt had fired when the frames
			// failed: one that fires later did not fail them.
			interrupted := c.interrupted.Load()
			if rc.testHookIOEnded != nil {
				rc.testHookIOEnded()
			}
			fired := !stop()
			if fired && err == nil {
				err = dctx.Err() // interrupted: c is unusable
				interrupted = true
			}
			if err != nil {
				c.Close()
				// Cut short only if dctx's interrupt ended them
				// and the caller's ctx had ended: first frames
				// that failed before are the server's failure.
				setupFailed, cut = true, interrupted && ctx.Err() != nil
			}
		}
	}
	rc.mu.Lock()
	defer rc.mu.Unlock()
	rc.sentPref = rc.preferred // a new connection starts as "not home"
	if rc.closed {
		if err == nil {
			c.Close()
		}
		return nil, 0, Handshake{}, ErrClosed
	}
	select {
	case <-redial:
		// Reconnect cut it short: no failure of the server's. Even if
		// it made a connection (Reconnect came after, but before this
		// lock): that was made on the path Reconnect says may be gone.
		if err == nil {
			c.Close()
			err = errRedial
		}
		if rc.startAt == 0 {
			// Nor does it use up the next dial's start past a server
			// that refused a login (as a dial the caller's ctx cut
			// short does not): that dial begins at once.
			rc.startAt = first
		}
		log.add(slog.LevelDebug, "relay: dial cut short by Reconnect", "url", rc.URL, "err", err)
		return nil, 0, Handshake{}, errRedial
	default:
	}
	if err != nil {
		// A dial, or first frames, that failed before ctx ended (or
		// before any interrupt did) are the server's failure, even if
		// ctx has ended since (as for a write: see writeUnder).
		if cut && !rc.cutShort {
			// The caller's ctx ended it (its deadline or cancel), not a
			// bound of the dial's own: no failure of the server's, and
			// no wait for the next call, which may be another caller's
			// with more time. Unless the dial before was cut short too:
			// callers whose ctx never leaves a dial time to finish must
			// not redial a slow server at the pace of their calls.
			rc.cutShort = true
			if rc.startAt == 0 {
				// Nor does it use up the next dial's start past a
				// server that refused a login.
				rc.startAt = first
			}
			log.add(slog.LevelDebug, "relay: dial cut short by the caller's ctx", "url", rc.URL, "err", err)
			return nil, 0, Handshake{}, err
		}
		rc.cutShort = cut
		rc.failures++
		// Keeping a later wait: a restart notice that a Recv applied
		// while this dial was under way (from a connection dropped
		// before it), or a late Recv's accounting (see endLocked).
		now := time.Now()
		if next := now.Add(rc.backoff(rc.failures, now)); next.After(rc.nextDial) {
			rc.nextDial = next
		}
		if setupFailed && !cut && (errors.Is(err, context.DeadlineExceeded) || isTimeout(err)) {
			// Its first frames timed out (DialTimeout, or the write's
			// own bound): a dial that timed out, whose server's path
			// is silent, as one that timed out before the connection
			// was made (see Dialer).
			rc.noteSilentLocked(won.keyID(), true)
		}
		if setupFailed && !cut && len(targets) > 1 {
			// The server took the connection and then failed its first
			// frames (a login it refused, as a client that has not read
			// its ServerInfo can tell): the next dial starts with the
			// server after it, as after any connection that ended before
			// its ServerInfo (see Fallbacks).
			rc.startAt = (wonIdx + 1) % len(targets)
		}
		if logErr == nil {
			logErr = err // the new connection's first frames failed
		}
		log.add(slog.LevelInfo, "relay: connect failed", "url", rc.URL, "region", rc.regionID(), "failures", rc.failures, "err", logErr)
		return nil, 0, Handshake{}, err
	}
	rc.cutShort = false
	// A move past a server that a Recv set while this dial was under
	// way (accounting late for a connection that ended before its
	// ServerInfo, which a write had dropped) was for this dial, which
	// read where to start before it: the next dial starts with the ideal
	// server again.
	rc.startAt = 0
	rc.c = c
	rc.cTarget, rc.nTargets = wonIdx, len(targets)
	rc.cKeyID = won.keyID()
	rc.loginWait, rc.loginBy = loginWait, time.Time{}
	rc.connAt = time.Now()
	rc.gen++
	c.gen = rc.gen
	rc.learned = hs.ServerKey
	if rc.keys == nil {
		rc.keys = map[string]PublicKey{}
	}
	rc.keys[won.keyID()] = hs.ServerKey
	if hs.fastAnswered && hs.Path == UpgradePath {
		// Something in front of the server (a reverse proxy) answers
		// fast start and passes the upgrade: until fastRefusedFor has
		// passed, or a Reconnect, skip the connection that fast start
		// would cost every reconnect.
		if rc.fastRefused == nil {
			rc.fastRefused = map[string]time.Time{}
		}
		rc.fastRefused[won.keyID()] = rc.connAt.Add(fastRefusedFor)
		log.add(slog.LevelInfo, "relay: fast start refused (an HTTP answer, or a hang-up on the dial before), the upgrade got through; dialling without the key for a while", "url", hs.URL, "node", won.name(), "for", fastRefusedFor)
	}
	log.add(slog.LevelInfo, "relay: connected", "url", hs.URL, "path", hs.Path.String(), "reason", hs.Reason, "generation", rc.gen)
	return c, rc.gen, hs, nil
}

// dialTarget is a server ReconnectingClient may dial: a URL, or a node of
// its Region.
type dialTarget struct {
	url  string
	node *Node // nil for URL and Fallbacks
}

// name is the target's node name, or its URL.
func (t dialTarget) name() string {
	if t.node != nil {
		return t.node.Name
	}
	return t.url
}

// targets lists the servers to try, the ideal one first.
func (rc *ReconnectingClient) targets() []dialTarget {
	var ts []dialTarget
	if rc.Region == nil {
		for _, u := range append([]string{rc.URL}, rc.Fallbacks...) {
			ts = append(ts, dialTarget{url: u})
		}
		return ts
	}
	for _, n := range rc.Region.derpNodes() {
		ts = append(ts, dialTarget{url: n.URL(), node: n})
	}
	return ts
}

// derpNodes returns r's nodes that serve DERP, in order.
func (r *Region) derpNodes() []*Node {
	var nodes []*Node
	for _, n := range r.Nodes {
		if n != nil && !n.STUNOnly && n.HostName != "" {
			nodes = append(nodes, n)
		}
	}
	return nodes
}

// keyID is what the server key learned from t is remembered by: the URL,
// or for a node (nodes may share a host name) its name too.
func (t dialTarget) keyID() string {
	if t.node != nil {
		return t.node.Name + " " + t.url
	}
	return t.url
}

func (rc *ReconnectingClient) regionID() int {
	if rc.Region == nil {
		return 0
	}
	return rc.Region.RegionID
}

// dialerFor returns the FastStart for t, the i-th server to try; several
// says whether there are more than one. keyless says it goes without t's
// key after a fast start to t hung up.
func (rc *ReconnectingClient) dialerFor(i int, t dialTarget, several bool, log *dialLog) (_ *FastStart, keyless bool) {
	var f FastStart
	if rc.Dialer != nil {
		f = *rc.Dialer
	}
	if i > 0 {
		f.ServerKey = PublicKey{} // Dialer's key is URL's
		f.Header = f.Header.Clone()
		if f.Header == nil {
			f.Header = http.Header{}
		}
		if rc.Region != nil {
			if ideal := rc.Region.Nodes[0]; ideal != nil && ideal.Name != "" {
				f.Header.Set(IdealNodeHeader, ideal.Name)
			}
		} else if u, err := url.Parse(rc.URL); err == nil {
			f.Header.Set(IdealNodeHeader, u.Hostname())
		}
	}
	rc.mu.Lock()
	refused := false
	if until, ok := rc.fastRefused[t.keyID()]; ok {
		if refused = time.Now().Before(until); !refused {
			delete(rc.fastRefused, t.keyID()) // try fast start again
		}
	}
	keyless = rc.fastHungUp[t.keyID()] && !refused && !rc.noFast[t.keyID()]
	if rc.noFast[t.keyID()] || rc.noKeyOnce[t.keyID()] || refused || keyless {
		f.ServerKey = PublicKey{} // dialled as if no key were known
		delete(rc.noKeyOnce, t.keyID())
	} else if k, ok := rc.keys[t.keyID()]; ok {
		f.ServerKey = k
	}
	rc.mu.Unlock()
	if several {
		per := rc.NodeConnectTimeout
		if per <= 0 {
			per = defaultNodeConnectTimeout
		}
		f.DialContext = boundConnect(f.DialContext, per)
	}
	f.DialContext = rc.lastGoodDial(f.DialContext, log)
	return &f, keyless
}

// lastGoodDial returns dial (a net.Dialer if nil) remembering the address
// each host name was last reached at; when a later lookup of the name
// fails, it dials that address instead, and says so in log. TLS still
// checks the certificate against the name, so a stale address can only
// fail, never impersonate.
func (rc *ReconnectingClient) lastGoodDial(dial func(ctx context.Context, network, addr string) (net.Conn, error), log *dialLog) func(ctx context.Context, network, addr string) (net.Conn, error) {
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		host, port, serr := net.SplitHostPort(addr)
		if serr != nil {
			return c, err
		}
		if _, perr := netip.ParseAddr(host); perr == nil {
			return c, err // an address: nothing was looked up
		}
		host = strings.ToLower(host)
		if err == nil {
			if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
				rc.mu.Lock()
				if rc.lastGood == nil {
					rc.lastGood = map[string]netip.Addr{}
				}
				if len(rc.lastGood) < maxLastGood {
					rc.lastGood[host] = ta.AddrPort().Addr().Unmap()
				}
				rc.mu.Unlock()
			}
			return c, nil
		}
		var dnsErr *net.DNSError
		if !errors.As(err, &dnsErr) || ctx.Err() != nil {
			return nil, err
		}
		rc.mu.Lock()
		ip, ok := rc.lastGood[host]
		rc.mu.Unlock()
		if !ok {
			return nil, err
		}
		c, err2 := dial(ctx, network, net.JoinHostPort(ip.String(), port))
		if err2 != nil {
			return nil, fmt.Errorf("%w; and at its last good address %s: %w", err, ip, err2)
		}
		log.add(slog.LevelInfo, "relay: DNS lookup failed; dialled the last good address", "host", host, "addr", ip.String(), "err", err)
		return c, nil
	}
}

// maxLastGood bounds the host names a ReconnectingClient remembers
// addresses for (its URL and Fallbacks, or its Region's nodes, and their
// proxies: a handful).
const maxLastGood = 64

func (rc *ReconnectingClient) logf(msg string, args ...any) {
	if rc.Logger != nil {
		rc.Logger.Info(msg, args...)
	}
}

// drop ends c for a call whose ctx's interrupt ended it (or fired as it
// finished): c is forgotten if it is still the current client, so the
// next call reconnects, and its end counts for nothing (see endLocked).
// The interrupt is made sure of first (a fired AfterFunc runs it on a
// goroutine of its own, maybe not yet): a Recv whose read the Close fails
// must find c interrupted, and take its end for this call's.
func (rc *ReconnectingClient) drop(c *Client) {
	c.interrupt()
	rc.mu.Lock()
	rc.endLocked(c, 0, endByCaller, false, nil)
	rc.mu.Unlock()
	c.Close()
}

// connEnd is how a call found a connection ended (see endLocked).
type connEnd int

const (
	// endByCaller: a call's ctx (its own or another's) interrupted it,
	// or fired as the call finished, or Reconnect dropped it: no failure
	// of the server's, nor a sign of a silent path. It decides nothing
	// for a Recv whose read the server failed before.
	endByCaller connEnd = iota
	// endRead: a Recv's read failed (or its Pong's write, or Recv's
	// bound on the login ended it). The Recv knows whether ServerInfo
	// arrived.
	endRead
	// endWrite: a write failed. It knows only whether a Recv returned
	// the connection's ServerInfo, and sees its own connection only
	// while it is the current one, or the last one made if a call's
	// interrupt dropped it after the write failed (callerGen).
	endWrite
)

// endLocked is where every call that finds connection c (generation
// gen; any for endByCaller) ended accounts for it, with rc.mu held and
// err the failure (nil if none); gotInfo is whether c's ServerInfo
// arrived, as far as the caller can tell. It forgets c if it is still the
// current client (the caller closes it once it unlocks; a timeout then
// marks its server's path silent, unless a caller's ctx ended it), and
// decides once per connection (Client.accounted), whichever call comes
// first, whether and how its end counts:
//   - ended by a caller's ctx or by Reconnect: nothing counts, and nothing
//     is decided: a Recv whose read the server failed before a ctx's
//     interrupt fired still counts that failure (one whose read the
//     interrupt failed is endByCaller itself; after Reconnect, see
//     askedGen), and so does a write, while no newer connection was made
//     (callerGen);
//   - made before the last Reconnect (askedGen): no failure;
//   - ended before its ServerInfo: a failed dial of its server (a login
//     it refused): the count goes up, the next dial waits the backoff
//     for it (in a restart notice's window, the quick one), and starts
//     with the server after it while c is the last connection made;
//     except that a write, which cannot tell a refused login from a
//     session that lasted once c is older than MaxBackoff, resets the
//     count then as after such a session and leaves the end to a Recv
//     that finds no ServerInfo on c;
//   - ended within MaxBackoff of its ServerInfo: a failure, whose
//     backoff holds however the server's notices set the next dial;
//   - ended later: the count starts again.
//
// A wait it sets keeps a later one already set (a late Recv's, for an
// older connection, may follow a write's for a newer one). A connection
// whose first frames fail before dial keeps it is accounted for by dial,
// as a failed dial.
func (rc *ReconnectingClient) endLocked(c *Client, gen int, how connEnd, gotInfo bool, err error) {
	current := rc.c == c
	if current {
		rc.c = nil
		rc.wakePingsLocked()
		if how == endByCaller {
			rc.callerGen = rc.gen // its end is still to be decided
		} else if err != nil && isTimeout(err) {
			rc.noteSilentLocked(rc.cKeyID, true)
		}
	} else if how == endWrite && (gen != rc.gen || gen != rc.callerGen) {
		// Dropped under the write by another call, which accounted
		// for it (or left it to Recv, as the write would have), or
		// a newer connection was made since: what the write knows
		// (connAt, infoGen) is that one's.
		return
	}
	if how == endWrite {
		rc.callerGen = 0 // a later write leaves it as this one does
	}
	if c.accounted || how == endByCaller {
		return
	}
	now := time.Now()
	lo, hi := rc.backoffBounds()
	switch {
	case gen <= rc.askedGen:
	case !gotInfo && how == endWrite && now.Sub(rc.connAt) >= hi:
		rc.failures = 0
		return // not accounted: see above
	case !gotInfo:
		rc.failures++
		if next := now.Add(rc.backoff(rc.failures, now)); next.After(rc.nextDial) {
			rc.nextDial = next
		}
		// Only while c is the last connection made: cTarget is its
		// server's (a newer connection was the next dial's, which the
		// move was for).
		if rc.c == nil && rc.gen == gen && rc.nTargets > 1 {
			rc.startAt = (rc.cTarget + 1) % rc.nTargets
		}
	case now.Sub(rc.infoAt) < hi:
		// The server ended the session soon after taking it: a failure
		// too, or a server that does so every time would be redialled
		// in a tight loop. A restart notice's wait (nextDial) still
		// holds if it is longer, but not its window of fast retries,
		// which is for dials while the server is away: one that came
		// back and ended the session again, as one that sends a notice
		// on every session does, gets the usual backoff.
		rc.failures++
		if next := now.Add(backoffStep(lo, hi, rc.failures, false)); next.After(rc.notBefore) {
			rc.notBefore = next
		}
	default:
		rc.failures = 0
	}
	c.accounted = true
}

// noteSilent records whether the last connection or dial to the server
// keyID timed out (see dial).
func (rc *ReconnectingClient) noteSilent(keyID string, silent bool) {
	rc.mu.Lock()
	rc.noteSilentLocked(keyID, silent)
	rc.mu.Unlock()
}

func (rc *ReconnectingClient) noteSilentLocked(keyID string, silent bool) {
	if !silent {
		delete(rc.silent, keyID)
		return
	}
	if rc.silent == nil {
		rc.silent = map[string]bool{}
	}
	rc.silent[keyID] = true
}

// wakePingsLocked ends the Pings waiting on the current connection, which
// is going away: they return ErrNotConnected.
func (rc *ReconnectingClient) wakePingsLocked() {
	for k, ch := range rc.pings {
		close(ch)
		delete(rc.pings, k)
	}
}

// Send sends pkt to dst, connecting first if needed. A failed write drops
// the connection (the next call reconnects) and is returned; the packet is
// not retried. ctx bounds the write too: if it ends while a server that has
// stopped reading holds the write, Send returns ctx's error and drops the
// connection, as a DERP stream cannot resume mid-frame (no failure is
// counted for it, by Send or by a Recv it interrupts); if it ended before
// Send, Send returns its error at once, writing (and dialling) nothing and
// leaving the connection as it is. Whatever ctx, a
// packet the connection cannot take within 10 seconds fails Send with the
// write's error, and drops the connection too (see Client.Send). A write
// whose connection another call dropped under it (Reconnect, a Recv that
// saw the connection fail, or a call whose ctx ended during its own I/O
// on it) returns ErrNotConnected; only after Close
// does Send return ErrClosed. (A ctx that can end costs one small
// allocation per call.)
func (rc *ReconnectingClient) Send(ctx context.Context, dst PublicKey, pkt []byte) error {
	c, _, err := rc.current(ctx)
	if err != nil {
		return err
	}
	return rc.writeUnder(ctx, c, func() error { return c.Send(dst, pkt) })
}

// writeUnder runs write on c, which ctx's end interrupts. A failure other
// than a packet refused before it was written drops c (one that another
// call's interrupt caused, having fired when the write ended, is left to
// that call, which drops c); if ctx's
// interrupt ended the write, ctx's error is returned and no failure is
// counted (a write that failed before ctx ended is the server's failure,
// whenever ctx ends). A refused packet is returned as such, and c dropped
// all the same if ctx's interrupt fired, as after a write that succeeded
// (see settle). If ctx ended already, nothing is written and c stays.
func (rc *ReconnectingClient) writeUnder(ctx context.Context, c *Client, write func() error) error {
	if err := ctxEnded(ctx); err != nil {
		return err
	}
	var stop func() bool
	if ctx.Done() != nil {
		stop = context.AfterFunc(ctx, c.interrupt)
	}
	err := write()
	// Whether an interrupt had fired when the write ended: one that
	// fires later did not fail it.
	interrupted := c.interrupted.Load()
	if rc.testHookIOEnded != nil {
		rc.testHookIOEnded()
	}
	refused := errors.Is(err, ErrPacketTooLarge) || errors.Is(err, ErrRateLimited)
	fired := false
	if stop != nil {
		fired = !stop()
		if refused {
			// The stream is as it was, but not c: an interrupt that
			// fired is for good, and no other call would drop c.
			rc.settle(c, fired, nil)
		} else {
			rc.settle(c, fired, err)
		}
	}
	if err != nil && !refused {
		if fired {
			rc.drop(c) // ctx's interrupt, not the server's silence
			return ctx.Err()
		}
		// Failed before ctx ended, if it has since: the server's
		// failure, accounted for as such.
		return rc.writeFailed(c, err, interrupted)
	}
	return err
}

// writeFailed ends a write on c that failed with err, not by its own
// ctx's end, and returns the caller's error: c is dropped and its end
// accounted for (see dropAfterWrite), unless another call's interrupt
// failed the write (interrupted: it had fired when the write ended; one
// that fired later did not fail it, and the failure is the server's).
func (rc *ReconnectingClient) writeFailed(c *Client, err error, interrupted bool) error {
	if interrupted {
		// Another call's interrupt (a Recv's or another write's ctx,
		// or Recv's bound on the login) failed the write: that call
		// drops c and accounts for its end, if there is anything to
		// account (the login's bound is a failure of the server's, and
		// a timeout of its path). The interrupt's timeout says nothing
		// of the server: the connection was dropped under the write.
		if !errors.Is(err, ErrClosed) {
			err = fmt.Errorf("%w: the connection was dropped during the write (another call's ctx ended, or Recv's wait for the login's ServerInfo did): %v", ErrNotConnected, err)
		}
		return rc.writeErr(err)
	}
	rc.dropAfterWrite(c, err)
	return rc.writeErr(err)
}

// dropAfterWrite drops c, on which a write failed with err, and accounts
// for its end if it is the first to find it (see endLocked), as RecvDetail
// does (which a client that only sends never calls): a failure counts
// once, whichever call sees it first. While no Recv has returned c's
// ServerInfo, a connection made less than MaxBackoff ago counts as a
// failed dial of its server (a login the server refused, as far as a
// client that does not read can tell).
func (rc *ReconnectingClient) dropAfterWrite(c *Client, err error) {
	rc.mu.Lock()
	// Forgotten under the same lock as it is accounted for: another
	// write that finds c failed must find it gone, not count its end
	// again.
	rc.endLocked(c, c.gen, endWrite, rc.infoGen == c.gen, err)
	rc.mu.Unlock()
	if rc.testHookWriteFailed != nil {
		rc.testHookWriteFailed()
	}
	c.Close()
}

// ctxEnded returns ctx's error if ctx has ended. A call whose ctx ended
// before it began returns that at once: its interrupt would otherwise drop
// a connection that nothing held (and other callers use), and a dial it
// began would be cut short and counted against the server.
func ctxEnded(ctx context.Context) error {
	if ctx.Done() == nil {
		return nil
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	default:
		return nil
	}
}

// writeErr is the error of a write that failed with err on a connection
// it had from current. ErrClosed from the connection means it was closed
// under the write: by Close, or by another call that dropped it
// (Reconnect, a Recv that saw it fail). Only the first is ErrClosed for
// the caller, which may stop using rc on it; the other is ErrNotConnected,
// and the next call connects again.
func (rc *ReconnectingClient) writeErr(err error) error {
	if !errors.Is(err, ErrClosed) {
		return err
	}
	rc.mu.Lock()
	closed := rc.closed
	rc.mu.Unlock()
	if closed {
		return err
	}
	return fmt.Errorf("%w: the connection was dropped during the write (by Reconnect, or after another call saw it fail)", ErrNotConnected)
}

// settle ends a call on c that an interrupt (ctx's, or a bound's) could
// cut short: if the interrupt fired but the call succeeded anyway, ending
// at that instant, c is dropped all the same, since an interrupt is for
// good; what the call did stands, and the next call connects again.
func (rc *ReconnectingClient) settle(c *Client, fired bool, err error) {
	if fired && err == nil {
		rc.drop(c)
	}
}

// NotePreferred records whether this server is the client's home; the value
// is sent now if connected and again after every reconnect. The write must
// be done within 5 seconds (see Client): if it is not, or fails, the
// connection is dropped and the error returned; the next connection is
// told the value.
func (rc *ReconnectingClient) NotePreferred(preferred bool) error {
	// One call at a time from the decision to the write, so that two
	// calls cannot write in the opposite order of their decisions.
	rc.setupMu.Lock()
	defer rc.setupMu.Unlock()
	rc.mu.Lock()
	if rc.closed {
		rc.mu.Unlock()
		return ErrClosed
	}
	rc.preferred = preferred
	c := rc.c
	send := c != nil && rc.sentPref != preferred
	if send {
		rc.sentPref = preferred
	}
	rc.mu.Unlock()
	if !send {
		return nil
	}
	if err := c.NotePreferred(preferred); err != nil {
		return rc.writeFailed(c, err, c.interrupted.Load())
	}
	return nil
}

// Connect connects now unless connected, waiting out the backoff after a
// failed dial (or another call's dial under way) within ctx, and returns the
// dial's error. The other methods connect by themselves; Connect reports a
// bad configuration early: a host that cannot be reached, a certificate
// that does not verify, and an HTTP answer other than the upgrade (a wrong
// path, a redirect) where the dial waits for the server's answer (the
// upgrade path, a server key already known, or a resumed TLS session). A
// first fast-path dial that takes the key from the meta cert of a full TLS
// handshake returns once the login is written, so such an answer, like a
// refused login on any path, shows only afterwards (the Recv loop
// reconnects, and the Logger says why).
func (rc *ReconnectingClient) Connect(ctx context.Context) error {
	_, _, err := rc.current(ctx)
	return err
}

// ForwardPacket hands the server a packet from src to dst, as a mesh peer
// does (the client needs the server's mesh key, in Options), connecting
// first if needed. A failed write drops the connection and is returned.
// ctx bounds the write as for Send, and whatever ctx it must be done
// within 5 seconds (see Client.ForwardPacket).
func (rc *ReconnectingClient) ForwardPacket(ctx context.Context, src, dst PublicKey, pkt []byte) error {
	c, _, err := rc.current(ctx)
	if err != nil {
		return err
	}
	return rc.writeUnder(ctx, c, func() error { return c.ForwardPacket(src, dst, pkt) })
}

// ClosePeer asks the server to end the sessions of key (mesh key needed),
// connecting first if needed. A failed write drops the connection and is
// returned. ctx bounds the write as for Send, and whatever ctx it must be
// done within 5 seconds (see Client.ClosePeer).
func (rc *ReconnectingClient) ClosePeer(ctx context.Context, key PublicKey) error {
	c, _, err := rc.current(ctx)
	if err != nil {
		return err
	}
	return rc.writeUnder(ctx, c, func() error { return c.ClosePeer(key) })
}

// WatchConnectionChanges asks the server (mesh key needed) to report which
// clients are connected, as PeerPresent and PeerGone messages from Recv:
// on this connection and on every later one, each of which starts with
// the whole list again. A watcher that reconnects should forget what it
// learned from the old connection when RecvDetail's generation changes.
// The write is bounded as NotePreferred's is; the next connection asks
// again.
func (rc *ReconnectingClient) WatchConnectionChanges() error {
	rc.setupMu.Lock()
	defer rc.setupMu.Unlock()
	rc.mu.Lock()
	if rc.closed {
		rc.mu.Unlock()
		return ErrClosed
	}
	rc.watch = true
	c := rc.c
	rc.mu.Unlock()
	if c == nil {
		return nil // the next connection asks
	}
	if err := c.WatchConnectionChanges(); err != nil {
		return rc.writeFailed(c, err, c.interrupted.Load())
	}
	return nil
}

// LocalAddr returns the local address of the current connection, or nil
// when not connected.
func (rc *ReconnectingClient) LocalAddr() net.Addr {
	rc.mu.Lock()
	c := rc.c
	rc.mu.Unlock()
	if c == nil {
		return nil
	}
	return c.LocalAddr()
}

// Recv returns the next message, reconnecting (with backoff) as often as
// needed; it returns an error only when ctx is done or the client is closed.
// A ServerInfo message starts every connection. The server's Pings are
// answered and not returned (a Pong must be written within 5 seconds, or
// within ctx: otherwise, as when a server stops reading, the connection is
// dropped and Recv connects again); Pongs for Ping are consumed. A
// *ReceivedPacket is valid until the next Recv. Because a DERP stream
// cannot be resumed mid-frame, cancelling ctx while Recv waits drops the
// current connection; a ctx that ended before Recv was called makes it
// return ctx's error at once, leaving the connection as it is.
func (rc *ReconnectingClient) Recv(ctx context.Context) (Message, error) {
	m, _, err := rc.RecvDetail(ctx)
	return m, err
}

// RecvDetail is Recv, and also returns the generation (see Generation) of
// the connection the message arrived on.
func (rc *ReconnectingClient) RecvDetail(ctx context.Context) (Message, int, error) {
	for {
		c, gen, err := rc.current(ctx)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, ErrClosed) {
				return nil, 0, err
			}
			continue // current waits out the backoff before the next dial
		}
		if err := ctxEnded(ctx); err != nil {
			return nil, 0, err // before the interrupt: c stays
		}
		stop := context.AfterFunc(ctx, c.interrupt)
		var login *time.Timer // the login's bound, if any, until ServerInfo
		if !c.gotInfo {
			if by := rc.loginDeadline(gen); !by.IsZero() {
				login = time.AfterFunc(time.Until(by), c.interrupt)
			}
		}
		m, err := c.Recv()
		p, isPing := m.(Ping)
		if isPing && err == nil {
			// Answered while ctx can still interrupt: a server that
			// stopped reading must not hold Recv past ctx. A failed
			// write ends the connection as a failed read does.
			err = c.SendPong(p)
		}
		// Whether an interrupt had fired when the I/O ended: one that
		// fires later did not fail it.
		interrupted := c.interrupted.Load()
		if rc.testHookIOEnded != nil {
			rc.testHookIOEnded()
		}
		byCtx := !stop() // ctx's interrupt fired
		fired := byCtx
		if login != nil && !login.Stop() {
			fired = true
			if err != nil {
				err = fmt.Errorf("relay: login not confirmed (no ServerInfo) within the server's share of DialTimeout: %w", err)
			} else if !byCtx && !c.gotInfo {
				// It fired as a frame other than ServerInfo came:
				// the login was not confirmed in time all the
				// same, the server's failure, not the caller's.
				err = fmt.Errorf("relay: login not confirmed (no ServerInfo) within the server's share of DialTimeout: %w", os.ErrDeadlineExceeded)
			}
		}
		rc.settle(c, fired, err)
		if isPing && err == nil {
			continue
		}
		if err != nil {
			if rc.testHookRecvFailed != nil {
				rc.testHookRecvFailed()
			}
			if byCtx && interrupted {
				rc.drop(c) // ctx's interrupt, not the server's silence
				return nil, 0, ctx.Err()
			}
			// If ctx ended only after the read failed (its interrupt
			// firing after, or not at all), the failure is the
			// server's: accounted for below, and the next turn returns
			// ctx's error.
			// Interrupted by another call's ctx, not Recv's: a write
			// whose ctx ended under it, which drops c (see writeUnder),
			// no failure of the server's nor a sign of a silent path.
			byCaller := !fired && interrupted
			// Dropped and accounted for under one lock: a dial that
			// another call begins once c is gone must find the wait
			// and the server to start with that c's end sets.
			how := endRead
			if byCaller {
				how = endByCaller
			}
			rc.mu.Lock()
			// Made before the last Reconnect: a new connection, as
			// asked.
			asked := gen <= rc.askedGen
			rc.endLocked(c, gen, how, c.gotInfo, err)
			closed := rc.closed
			rc.mu.Unlock()
			c.Close()
			if rc.testHookRecvDropped != nil {
				rc.testHookRecvDropped()
			}
			if closed {
				return nil, 0, ErrClosed
			}
			if asked {
				rc.logf("relay: reconnecting as asked", "url", rc.URL)
				continue
			}
			rc.logf("relay: connection lost", "url", rc.URL, "err", err)
			continue
		}
		switch m := m.(type) {
		case Pong:
			rc.mu.Lock()
			ch, ok := rc.pings[m]
			delete(rc.pings, m)
			rc.mu.Unlock()
			if ok {
				ch <- struct{}{}
				continue
			}
		case ServerInfo:
			// failures are reset when the session ends, if it lasted.
			rc.mu.Lock()
			rc.infoAt, rc.infoGen = time.Now(), gen
			rc.mu.Unlock()
		case ServerRestarting:
			if !c.gotInfo {
				// Before the login is confirmed the server has not
				// shown that it owns its key, nor taken the session:
				// its notice sets no schedule, and the hang-up that
				// follows backs off as for a refused login.
				break
			}
			// The server chooses these, up to 49 days each: bounded,
			// so that a broken server cannot stop reconnects for weeks
			// or have them hammer it at MinBackoff as long. The wait is
			// one between dials, so MaxBackoff bounds it.
			// Not once a newer connection was made (c was dropped
			// under this Recv): that one is up, and its end owes
			// nothing to an old notice.
			now := time.Now()
			_, hi := rc.backoffBounds()
			rc.mu.Lock()
			if rc.gen == gen {
				rc.nextDial = now.Add(min(m.ReconnectIn, hi))
				rc.restartUntil = rc.nextDial.Add(min(m.TryFor, maxRestartTry))
			}
			rc.mu.Unlock()
		}
		return m, gen, nil
	}
}

// loginDeadline returns when the ServerInfo of connection gen is due, or
// zero if only RecvTimeout bounds the wait. The clock starts at the first
// wait for it, so that a caller slow to call Recv loses nothing.
func (rc *ReconnectingClient) loginDeadline(gen int) time.Time {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if rc.gen != gen || rc.loginWait <= 0 {
		return time.Time{}
	}
	if rc.loginBy.IsZero() {
		rc.loginBy = time.Now().Add(rc.loginWait)
	}
	return rc.loginBy
}

// Ping sends a Ping and waits for its Pong, returning the round-trip time.
// It needs a concurrent Recv loop. Without a deadline in ctx it waits at
// most 5 seconds. Concurrent Pings may go unanswered: a server keeps one
// Pong queued at a time (see Client.SendPing). A Ping whose Pong does not
// come in time leaves the connection as it is; if its path may be dead
// (after a network change, say), call Reconnect. One whose write ctx cuts
// short drops the connection, as a DERP stream cannot resume mid-frame.
// Either way the error wraps ctx's, and a deadline that passed marks the
// server's path as silent for the next dial (see Dialer). A ctx that ended
// before Ping was called makes it return ctx's error at once, sending
// nothing and leaving the connection and its server's record as they are.
func (rc *ReconnectingClient) Ping(ctx context.Context) (time.Duration, error) {
	if err := ctxEnded(ctx); err != nil {
		return 0, fmt.Errorf("relay: ping: %w", err)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
	}
	c, gen, err := rc.current(ctx)
	if err != nil {
		return 0, err
	}
	var data [8]byte
	binary.LittleEndian.PutUint64(data[:], rand.Uint64())
	ch := make(chan struct{}, 1)
	rc.mu.Lock()
	if rc.c != c {
		// Dropped (or closed) since current returned it: no Pong can
		// come, and nothing would wake this Ping.
		closed := rc.closed
		rc.mu.Unlock()
		if closed {
			return 0, ErrClosed
		}
		return 0, ErrNotConnected
	}
	if rc.pings == nil {
		rc.pings = map[[8]byte]chan struct{}{}
	}
	rc.pings[data] = ch
	rc.mu.Unlock()
	defer func() {
		rc.mu.Lock()
		delete(rc.pings, data)
		rc.mu.Unlock()
	}()
	start := time.Now()
	// ctx bounds the write too: a server that stopped reading must not
	// hold Ping past it.
	if err := rc.writeUnder(ctx, c, func() error { return c.SendPing(data) }); err != nil {
		if ctx.Err() == nil || !errors.Is(err, ctx.Err()) {
			return 0, err
		}
		// ctx ended the write (and writeUnder dropped c): a Ping that
		// timed out before its Pong could come, as below.
		if errors.Is(err, context.DeadlineExceeded) {
			rc.mu.Lock()
			if rc.gen == gen { // no newer connection: cKeyID is still c's
				rc.noteSilentLocked(rc.cKeyID, true)
			}
			rc.mu.Unlock()
		}
		return 0, fmt.Errorf("relay: ping: %w", err)
	}
	select {
	case _, ok := <-ch:
		if !ok {
			rc.mu.Lock()
			closed := rc.closed
			rc.mu.Unlock()
			if closed {
				return 0, ErrClosed
			}
			return 0, ErrNotConnected
		}
		return time.Since(start), nil
	case <-ctx.Done():
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			// No Pong in time: the path may have gone silent, which a
			// later dial's timeout must know (see dial).
			rc.mu.Lock()
			if rc.c == c {
				rc.noteSilentLocked(rc.cKeyID, true)
			}
			rc.mu.Unlock()
		}
		return 0, fmt.Errorf("relay: ping: %w", ctx.Err())
	}
}

// Reconnect drops the current connection, if there is one: the next call
// that needs a connection (a Recv loop's next turn) dials again at once,
// without the wait earlier failures set (a server's ServerRestarting
// notice is still honoured), and so does a call already waiting that wait
// out (a Recv loop while the network was down). Call it when the network
// under the client changed (a new default route, a new local address) or
// when Ping failed: a connection whose path went silent, with no FIN or
// RST, otherwise lasts until RecvTimeout (120 s by default). A Recv waiting on the
// dropped connection does not return: it dials the next one, which starts
// with a ServerInfo as every connection does; Pings waiting on it return
// ErrNotConnected. Servers whose fast start was refused (see Dialer)
// are tried with their key again: the new path may not go
// through the front that answered. A dial under way, which may be stuck on the old path,
// is cut short and started again at once, with the server it started
// with, counting as no failure (a call waiting for it goes on waiting for
// the new one). Reconnect resets the count of failures but not the server
// the next dial starts with: after a login the server refused (see
// Fallbacks), that is still the server after it, since the refusal is the
// server's answer and not the path's. After Close, Reconnect does
// nothing.
func (rc *ReconnectingClient) Reconnect() {
	rc.mu.Lock()
	if rc.closed {
		rc.mu.Unlock()
		return
	}
	// Failures on the old path say nothing of the new one: nor do the
	// ends of connections made on it that a Recv accounts for late, the
	// one dropped here or older ones (dropped by a write that left
	// their end to Recv).
	rc.askedGen = rc.gen
	c := rc.c
	if c != nil {
		rc.endLocked(c, rc.gen, endByCaller, false, nil)
	}
	rc.failures = 0
	rc.cutShort = false
	rc.notBefore = time.Time{}
	// The new path may not go through the front that answered fast
	// start (or it was fixed): try it again.
	clear(rc.fastRefused)
	clear(rc.fastHungUp)
	if !time.Now().Before(rc.restartUntil) {
		rc.nextDial = time.Time{}
	}
	if rc.redial != nil {
		close(rc.redial) // a call waiting out the old wait looks again
		rc.redial = nil
	}
	rc.mu.Unlock()
	if c != nil {
		c.Close()
	}
}

// ServerPublicKey returns the server key learned from the last connection,
// or zero before the first.
func (rc *ReconnectingClient) ServerPublicKey() PublicKey {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.learned
}

// Generation returns how many connections have been made; it changes on
// every reconnect.
func (rc *ReconnectingClient) Generation() int {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.gen
}

// Close closes the current connection and cancels a dial or a wait for one
// under way; every later call returns ErrClosed.
func (rc *ReconnectingClient) Close() error {
	rc.mu.Lock()
	if !rc.closed {
		close(rc.doneCh()) // wakes a wait for the next dial, cancels a dial
	}
	rc.closed = true
	c := rc.c
	rc.c = nil
	rc.wakePingsLocked()
	rc.mu.Unlock()
	if c != nil {
		return c.Close()
	}
	return nil
}

// Region is a DERP region as Tailscale's DERP map describes one
// (tailcfg.DERPRegion): a region of a DERP map decodes into it with
// encoding/json. It keeps what a client needs to connect; give it to
// ReconnectingClient.Region.
type Region struct {
	RegionID   int    // the region's number in the DERP map
	RegionCode string // a short name, such as "nyc"
	RegionName string // a human-readable name, such as "New York City"
	// Nodes are the region's servers, the preferred one first.
	Nodes []*Node
}

// Node is one server of a Region, with the fields and JSON names of a node
// of Tailscale's DERP map (tailcfg.DERPNode). Dial one with
// FastStart.DialNode.
type Node struct {
	// Name names the node uniquely across regions, such as "1a"; it is
	// not a host name. A client on another node of the region sends
	// the region's first node's Name as Ideal-Node.
	Name     string
	RegionID int // the number of the node's Region
	// HostName is the server's DNS name: the TLS server name, the name
	// its certificate must have (unless CertName says otherwise) and,
	// unless IPv4 and IPv6 say otherwise, the name dialled.
	HostName string
	// CertName, if set, is the name the certificate must have instead of
	// HostName (which is still sent as the TLS server name), or
	// "sha256-raw:" and the hex SHA-256 of the DER of the server's
	// certificate, which pins a self-signed certificate: the server must
	// present that one certificate (besides meta certs), valid now and,
	// unless HostName is an IP address, for HostName.
	CertName string `json:",omitempty"`
	// IPv4 and IPv6 are addresses to dial instead of looking HostName
	// up in DNS. Empty means DNS; a string that is not an address of
	// the family ("none" by convention) disables the family. With both
	// families, IPv6 is tried first and IPv4 200 ms later, or at once
	// if IPv6 fails (see FastStart.IPv6HeadStart). Through a proxy
	// (FastStart.Proxy) neither is used: the tunnel goes to HostName,
	// which the proxy resolves.
	IPv4 string `json:",omitempty"`
	IPv6 string `json:",omitempty"`
	// STUNPort is the node's STUN port (0 means 3478, -1 none); this
	// package does not speak STUN.
	STUNPort int `json:",omitempty"`
	// STUNOnly marks a node without DERP, which clients skip.
	STUNOnly bool `json:",omitempty"`
	// DERPPort is the HTTPS port; 0 means 443.
	DERPPort int `json:",omitempty"`
	// InsecureForTests skips the verification of the certificate.
	InsecureForTests bool `json:",omitempty"`
	// STUNTestIP and CanPort80 are kept for DERP maps; this package does
	// not use them.
	STUNTestIP string `json:",omitempty"`
	CanPort80  bool   `json:",omitempty"`
}

// URL returns the node's DERP URL, "https://HostName[:DERPPort]/derp".
func (n *Node) URL() string {
	host := n.HostName
	if n.DERPPort != 0 {
		host = net.JoinHostPort(host, strconv.Itoa(n.DERPPort))
	} else if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	return "https://" + host + "/derp"
}

// DialNode dials a node of a DERP map as Dial dials a URL: to its IPv4 or
// IPv6 address if the node gives one, checking the certificate against
// CertName or its pin if the node gives one. f's DialContext makes the
// connections and f's TLSConfig supplies the roots; Proxy, asked about
// HostName, if it returns a proxy, tunnels to HostName and the proxy
// resolves it: the node's IPv4 and IPv6 are then not used. Its errors
// name the node once, at their start (relay: node "a": …).
func (f *FastStart) DialNode(ctx context.Context, n *Node, priv PrivateKey, opts ...ClientOption) (*Client, Handshake, error) {
	if err := n.check(); err != nil {
		return nil, Handshake{}, err
	}
	c, hs, err := f.forNode(n).Dial(ctx, n.URL(), priv, opts...)
	if err != nil {
		return nil, hs, n.named(err)
	}
	return c, hs, nil
}

// named names n in err, which must not name it already: each wrapper of
// a node's error names it once, in one shape.
func (n *Node) named(err error) error {
	return fmt.Errorf("relay: node %q: %w", n.Name, err)
}

// check reports why n cannot be dialled, if it cannot.
func (n *Node) check() error {
	if n == nil || n.STUNOnly || n.HostName == "" {
		name := "nil"
		if n != nil {
			name = strconv.Quote(n.Name)
		}
		return fmt.Errorf("relay: node %s: no DERP server (STUN only or no host name)", name)
	}
	ip, err := netip.ParseAddr(n.HostName)
	if err != nil && strings.ContainsAny(n.HostName, "/@?#%[]: \t\r\n") ||
		err == nil && ip.Zone() != "" || strings.ContainsFunc(n.HostName, unicode.IsControl) {
		// A zone or a control character would make a URL that does
		// not parse, and an error about the URL rather than the map.
		return n.named(fmt.Errorf("host name %q is not a host name", n.HostName))
	}
	return nil
}

// DialRegionTLS connects to the first node of r that answers and runs TLS
// with it, and stops there: no HTTP request, no DERP. It is for measuring a
// region's latency (send an HTTP request for /derp/latency-check over the
// connection, as ExampleFastStart_DialRegionTLS does) or checking that a
// region is reachable without logging in. Nodes are tried in order,
// STUN-only ones skipped, each dialled and its certificate checked as
// DialNode does. While more than one node is left, each TCP connect gets
// at most 1.5 s, and each node's connect and handshake together an equal
// share of what is left of ctx's deadline (5 s if it has none), so a node
// that accepts TCP and stalls TLS cannot hold up the others. Each wait for
// an answer (the server's to the ClientHello; through a Proxy, also the
// proxy's TLS handshake and its answer to the CONNECT) is bounded by 10 s,
// LoginTimeout's default, however long ctx allows, so that the last node
// cannot hold a call whose ctx has no deadline forever. It returns the
// node connected to; if none, an error naming each node's failure on one
// line, which errors.Is and errors.As look into. ctx bounds the call, not
// the returned connection.
func (f *FastStart) DialRegionTLS(ctx context.Context, r *Region) (*tls.Conn, *Node, error) {
	if r == nil {
		return nil, nil, errors.New("relay: dial region: nil region")
	}
	nodes := r.derpNodes()
	if len(nodes) == 0 {
		return nil, nil, fmt.Errorf("relay: dial region %d (%s): no DERP node", r.RegionID, r.RegionCode)
	}
	var errs []error
	for i, n := range nodes {
		if err := n.check(); err != nil {
			errs = append(errs, err)
			continue
		}
		g := f.forNode(n)
		if i < len(nodes)-1 {
			g.DialContext = boundConnect(g.DialContext, defaultNodeConnectTimeout)
		}
		u, err := url.Parse(n.URL())
		if err != nil {
			errs = append(errs, err)
			continue
		}
		actx, acancel := attemptContext(ctx, len(nodes)-i)
		tc, err := g.dialTLS(actx, u)
		if err == nil {
			acancel()
			return tc, n, nil
		}
		errs = append(errs, n.named(err))
		acancel()
		if ctx.Err() != nil {
			break
		}
	}
	return nil, nil, fmt.Errorf("relay: dial region %d (%s): %w", r.RegionID, r.RegionCode, joinErrors(errs...))
}

// dialTLS connects to u and runs TLS with it. The last node of a region
// gets all of ctx, which may have no deadline: each wait for an answer
// (a Proxy's, then the server's to the ClientHello) is bounded as in Dial,
// by LoginTimeout's default (regionAnswer in tests).
func (f *FastStart) dialTLS(ctx context.Context, u *url.URL) (*tls.Conn, error) {
	bound := []ClientOption{LoginTimeout(cmp.Or(f.regionAnswer, defaultLoginTimeout))}
	within := func(nc net.Conn) func(error) error { return answerWithin(nc, bound) }
	nc, err := f.dialTCP(ctx, u, within)
	if err != nil {
		return nil, err
	}
	answered := within(nc)
	tc, _, err := f.tlsHandshake(ctx, nc, u, false, false, answered)
	if err != nil {
		nc.Close()
		return nil, err
	}
	answered(nil)
	return tc, nil
}

// attemptContext returns the context for dialling one of left servers still
// to try. While more than one is left, the attempt gets an equal share of
// what remains before ctx's deadline (defaultNodeAttemptTimeout if it has
// none), so that a server that accepts TCP and then stalls the TLS
// handshake or the upgrade cannot use up the whole dial.
func attemptContext(ctx context.Context, left int) (context.Context, context.CancelFunc) {
	if left <= 1 {
		return context.WithCancel(ctx)
	}
	d := defaultNodeAttemptTimeout
	if dl, ok := ctx.Deadline(); ok {
		d = time.Until(dl) / time.Duration(left)
	}
	return context.WithTimeout(ctx, d)
}

// defaultNodeAttemptTimeout bounds a whole attempt on one of several
// servers when the caller's context has no deadline.
const defaultNodeAttemptTimeout = 5 * time.Second

// defaultNodeConnectTimeout bounds the TCP connect to one of several nodes
// or URLs, so that an unreachable one costs little of the whole dial.
const defaultNodeConnectTimeout = 1500 * time.Millisecond

// boundConnect returns dial (a net.Dialer if nil) with each connect
// bounded by per.
func boundConnect(dial func(ctx context.Context, network, addr string) (net.Conn, error), per time.Duration) func(ctx context.Context, network, addr string) (net.Conn, error) {
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(ctx, per)
		defer cancel()
		return dial(ctx, network, addr)
	}
}

// forNode returns a copy of f that dials n's addresses and checks n's
// certificate.
func (f *FastStart) forNode(n *Node) *FastStart {
	g := *f
	g.node = n
	dial := f.DialContext
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	g.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, port, err := net.SplitHostPort(addr)
		if err != nil || host != n.HostName {
			return dial(ctx, network, addr) // a proxy, not the node
		}
		return n.dial(ctx, dial, port, f.IPv6HeadStart)
	}
	return &g
}

// defaultIPv6HeadStart is how long IPv6 has before IPv4 is tried too,
// unless FastStart.IPv6HeadStart says otherwise.
const defaultIPv6HeadStart = 200 * time.Millisecond

// dial connects to the node's port: HostName through DNS, or the node's own
// addresses, IPv6 first with headStart (0 means the default, negative
// none).
func (n *Node) dial(ctx context.Context, dial func(ctx context.Context, network, addr string) (net.Conn, error), port string, headStart time.Duration) (net.Conn, error) {
	family := func(s string, want6 bool) (network, host string, ok bool) {
		network = "tcp4"
		if want6 {
			network = "tcp6"
		}
		if s == "" {
			return network, n.HostName, true
		}
		ip, err := netip.ParseAddr(s)
		if err != nil || ip.Is6() != want6 || ip.Is4In6() {
			return "", "", false
		}
		return network, ip.String(), true
	}
	if n.IPv4 == "" && n.IPv6 == "" {
		return dial(ctx, "tcp", net.JoinHostPort(n.HostName, port)) // the dialer's own dual-stack dialling
	}
	type target struct{ network, addr string }
	var targets []target
	for _, want6 := range []bool{true, false} {
		s := n.IPv4
		if want6 {
			s = n.IPv6
		}
		if network, host, ok := family(s, want6); ok {
			targets = append(targets, target{network, net.JoinHostPort(host, port)})
		}
	}
	switch len(targets) {
	case 0:
		return nil, fmt.Errorf("relay: neither IPv4 (%q) nor IPv6 (%q) is an address to dial", n.IPv4, n.IPv6)
	case 1:
		return dial(ctx, targets[0].network, targets[0].addr)
	}
	// Both: IPv6 first, IPv4 after a head start or as soon as IPv6
	// fails; the first connection wins and the other is closed.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		c   net.Conn
		err error
	}
	results := make(chan result, len(targets))
	start := func(t target) {
		go func() {
			c, err := dial(ctx, t.network, t.addr)
			results <- result{c, err}
		}()
	}
	if headStart == 0 {
		headStart = defaultIPv6HeadStart
	}
	start(targets[0])
	started, pending := 1, 1
	if headStart < 0 {
		start(targets[1])
		started, pending = 2, 2
	}
	timer := time.NewTimer(max(headStart, 0))
	defer timer.Stop()
	var errs []error
	for {
		select {
		case <-timer.C:
			if started == 1 {
				start(targets[1])
				started, pending = 2, pending+1
			}
			continue
		case r := <-results:
			pending--
			if r.err == nil {
				if pending > 0 {
					// The other attempt is cancelled; close what it
					// may still return.
					go func() {
						if r := <-results; r.c != nil {
							r.c.Close()
						}
					}()
				}
				return r.c, nil
			}
			errs = append(errs, r.err)
			if started == 1 {
				start(targets[1])
				started, pending = 2, pending+1
			}
			if pending == 0 {
				return nil, joinErrors(errs...) // the caller names the node (named)
			}
		}
	}
}

// verifyWith makes cfg check the server's certificate as n says: against
// CertName, against a pinned hash, or not at all (InsecureForTests); at
// the time cfg.Time gives, as crypto/tls would.
func (n *Node) verifyWith(cfg *tls.Config) {
	clock := cfg.Time
	switch pin, pinned := strings.CutPrefix(n.CertName, "sha256-raw:"); {
	case n.InsecureForTests:
		cfg.InsecureSkipVerify = true
	case pinned:
		// As Tailscale's client checks a pin: the server presents that
		// one certificate (and meta certs), valid now, and for the
		// server name if one was sent (not for an IP address).
		cfg.InsecureSkipVerify = true
		cfg.VerifyConnection = chainVerify(cfg.VerifyConnection, func(cs tls.ConnectionState) error {
			leaf := leafCert(cs.PeerCertificates)
			if leaf == nil {
				return errors.New("relay: no certificate to check against the pin")
			}
			for _, c := range cs.PeerCertificates[1:] {
				if _, _, meta := parseMetaCertCandidate(c); !meta {
					return errors.New("relay: a pinned server presented more than one certificate")
				}
			}
			sum := sha256.Sum256(leaf.Raw)
			if !strings.EqualFold(hex.EncodeToString(sum[:]), pin) {
				return fmt.Errorf("relay: server certificate's SHA-256 %x is not the pinned %s", sum, pin)
			}
			if cs.ServerName != "" {
				if err := leaf.VerifyHostname(cs.ServerName); err != nil {
					return fmt.Errorf("relay: pinned certificate: %w", err)
				}
			}
			if now := timeNow(clock); now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
				return fmt.Errorf("relay: pinned certificate valid only from %v to %v", leaf.NotBefore, leaf.NotAfter)
			}
			return nil
		})
	case n.CertName != "":
		roots := cfg.RootCAs
		cfg.InsecureSkipVerify = true
		cfg.VerifyConnection = chainVerify(cfg.VerifyConnection, func(cs tls.ConnectionState) error {
			return verifyChain(cs.PeerCertificates, n.CertName, roots, timeNow(clock))
		})
	}
}

// verifyChain checks chain (leaf first, then intermediates and perhaps a
// meta cert) for name against roots at the time now. Nil roots means the
// system's, and if they do not vouch for the chain (or the system has
// none), Let's Encrypt's.
func verifyChain(chain []*x509.Certificate, name string, roots *x509.CertPool, now time.Time) error {
	leaf := leafCert(chain)
	if leaf == nil {
		return errors.New("relay: server sent no certificate")
	}
	opts := x509.VerifyOptions{DNSName: name, Roots: roots, Intermediates: x509.NewCertPool(), CurrentTime: now}
	for _, c := range chain[1:] {
		opts.Intermediates.AddCert(c)
	}
	_, err := leaf.Verify(opts)
	if err == nil || roots != nil {
		return err
	}
	opts.Roots = fallbackRoots()
	if _, ferr := leaf.Verify(opts); ferr == nil {
		return nil
	}
	return &tls.CertificateVerificationError{UnverifiedCertificates: chain, Err: err}
}

// verifyWithFallbackRoots makes cfg, which verifies against the system's
// roots, fall back to Let's Encrypt's roots (see fallbackRoots) when the
// system's do not vouch for the server.
func verifyWithFallbackRoots(cfg *tls.Config) {
	name, clock := cfg.ServerName, cfg.Time
	cfg.InsecureSkipVerify = true
	cfg.VerifyConnection = chainVerify(cfg.VerifyConnection, func(cs tls.ConnectionState) error {
		return verifyChain(cs.PeerCertificates, name, nil, timeNow(clock))
	})
}

// timeNow returns the time a tls.Config whose Time field is clock checks
// certificates at: clock's, or the machine's if it is nil.
func timeNow(clock func() time.Time) time.Time {
	if clock != nil {
		return clock()
	}
	return time.Now()
}

// fallbackRoots returns the roots a client trusts when the system's roots
// do not vouch for a server (a container or small device without CA
// certificates): those of Let's Encrypt, which issues the certificates of
// Tailscale's DERP servers and of most others. Tests replace it.
var fallbackRoots = sync.OnceValue(func() *x509.CertPool {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(letsEncryptRoots)) {
		panic("relay: bad built-in root certificates")
	}
	return pool
})

// letsEncryptRoots are ISRG Root X1 (RSA, until 2035) and ISRG Root X2
// (ECDSA, until 2040), as Mozilla's root store has them.
const letsEncryptRoots = `-----BEGIN CERTIFICATE-----
MIIFazCCA1OgAwIBAgIRAIIQz7DSQONZRGPgu2OCiwAwDQYJKoZIhvcNAQELBQAw
TzELMAkGA1UEBhMCVVMxKTAnBgNVBAoTIEludGVybmV0IFNlY3VyaXR5IFJlc2Vh
cmNoIEdyb3VwMRUwEwYDVQQDEwxJU1JHIFJvb3QgWDEwHhcNMTUwNjA0MTEwNDM4
WhcNMzUwNjA0MTEwNDM4WjBPMQswCQYDVQQGEwJVUzEpMCcGA1UEChMgSW50ZXJu
ZXQgU2VjdXJpdHkgUmVzZWFyY2ggR3JvdXAxFTATBgNVBAMTDElTUkcgUm9vdCBY
MTCCAiIwDQYJKoZIhvcNAQEBBQADggIPADCCAgoCggIBAK3oJHP0FDfzm54rVygc
h77ct984kIxuPOZXoHj3dcKi/vVqbvYATyjb3miGbESTtrFj/RQSa78f0uoxmyF+
0TM8ukj13Xnfs7j/EvEhmkvBioZxaUpmZmyPfjxwv60pIgbz5MDmgK7iS4+3mX6U
A5/TR5d8mUgjU+g4rk8Kb4Mu0UlXjIB0ttov0DiNewNwIRt18jA8+o+u3dpjq+sW
T8KOEUt+zwvo/7V3LvSye0rgTBIlDHCNAymg4VMk7BPZ7hm/ELNKjD+Jo2FR3qyH
B5T0Y3HsLuJvW5iB4YlcNHlsdu87kGJ55tukmi8mxdAQ4Q7e2RCOFvu396j3x+UC
B5iPNgiV5+I3lg02dZ77DnKxHZu8A/lJBdiB3QW0KtZB6awBdpUKD9jf1b0SHzUv
KBds0pjBqAlkd25HN7rOrFleaJ1/ctaJxQZBKT5ZPt0m9STJEadao0xAH0ahmbWn
OlFuhjuefXKnEgV4We0+UXgVCwOPjdAvBbI+e0ocS3MFEvzG6uBQE3xDk3SzynTn
jh8BCNAw1FtxNrQHusEwMFxIt4I7mKZ9YIqioymCzLq9gwQbooMDQaHWBfEbwrbw
qHyGO0aoSCqI3Haadr8faqU9GY/rOPNk3sgrDQoo//fb4hVC1CLQJ13hef4Y53CI
rU7m2Ys6xt0nUW7/vGT1M0NPAgMBAAGjQjBAMA4GA1UdDwEB/wQEAwIBBjAPBgNV
HRMBAf8EBTADAQH/MB0GA1UdDgQWBBR5tFnme7bl5AFzgAiIyBpY9umbbjANBgkq
hkiG9w0BAQsFAAOCAgEAVR9YqbyyqFDQDLHYGmkgJykIrGF1XIpu+ILlaS/V9lZL
ubhzEFnTIZd+50xx+7LSYK05qAvqFyFWhfFQDlnrzuBZ6brJFe+GnY+EgPbk6ZGQ
3BebYhtF8GaV0nxvwuo77x/Py9auJ/GpsMiu/X1+mvoiBOv/2X/qkSsisRcOj/KK
NFtY2PwByVS5uCbMiogziUwthDyC3+6WVwW6LLv3xLfHTjuCvjHIInNzktHCgKQ5
ORAzI4JMPJ+GslWYHb4phowim57iaztXOoJwTdwJx4nLCgdNbOhdjsnvzqvHu7Ur
TkXWStAmzOVyyghqpZXjFaH3pO3JLF+l+/+sKAIuvtd7u+Nxe5AW0wdeRlN8NwdC
jNPElpzVmbUq4JUagEiuTDkHzsxHpFKVK7q4+63SM1N95R1NbdWhscdCb+ZAJzVc
oyi3B43njTOQ5yOf+1CceWxG1bQVs5ZufpsMljq4Ui0/1lvh+wjChP4kqKOJ2qxq
4RgqsahDYVvTH9w7jXbyLeiNdd8XM2w9U/t7y0Ff/9yi0GE44Za4rF2LN9d11TPA
mRGunUHBcnWEvgJBQl9nJEiU0Zsnvgc/ubhPgXRR4Xq37Z0j4r7g1SgEEzwxA57d
emyPxgcYxn/eR44/KJ4EBs+lVDR3veyJm+kXQ99b21/+jh5Xos1AnX5iItreGCc=
-----END CERTIFICATE-----
-----BEGIN CERTIFICATE-----
MIICGzCCAaGgAwIBAgIQQdKd0XLq7qeAwSxs6S+HUjAKBggqhkjOPQQDAzBPMQsw
CQYDVQQGEwJVUzEpMCcGA1UEChMgSW50ZXJuZXQgU2VjdXJpdHkgUmVzZWFyY2gg
R3JvdXAxFTATBgNVBAMTDElTUkcgUm9vdCBYMjAeFw0yMDA5MDQwMDAwMDBaFw00
MDA5MTcxNjAwMDBaME8xCzAJBgNVBAYTAlVTMSkwJwYDVQQKEyBJbnRlcm5ldCBT
ZWN1cml0eSBSZXNlYXJjaCBHcm91cDEVMBMGA1UEAxMMSVNSRyBSb290IFgyMHYw
EAYHKoZIzj0CAQYFK4EEACIDYgAEzZvVn4CDCuwJSvMWSj5cz3es3mcFDR0HttwW
+1qLFNvicWDEukWVEYmO6gbf9yoWHKS5xcUy4APgHoIYOIvXRdgKam7mAHf7AlF9
ItgKbppbd9/w+kHsOdx1ymgHDB/qo0IwQDAOBgNVHQ8BAf8EBAMCAQYwDwYDVR0T
AQH/BAUwAwEB/zAdBgNVHQ4EFgQUfEKWrt5LSDv6kviejM9ti6lyN5UwCgYIKoZI
zj0EAwMDaAAwZQIwe3lORlCEwkSHRhtFcP9Ymd70/aTSVaYgLXTWNLxBo1BfASdW
tL4ndQavEi51mI38AjEAi/V3bNTIZargCyzuFJ0nN6T5U6VR5CmD1/iQMVtCnwr1
/q4AaOeMSQ+2b1tbFfLn
-----END CERTIFICATE-----
`

// chainVerify returns a VerifyConnection callback that runs check, then
// prev if there was one.
func chainVerify(prev, check func(tls.ConnectionState) error) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		if err := check(cs); err != nil {
			return err
		}
		if prev != nil {
			return prev(cs)
		}
		return nil
	}
}

// leafCert returns the server's own certificate: the first of its chain,
// the one whose key crypto/tls checked the handshake's signature against
// (it does so even when it leaves the chain to us). Meta certs come after
// it; a chain that starts with one is checked as any other and fails, as
// it must: a meta cert is self-signed by whoever made it, so skipping it
// would let a server sign with a key of its own while presenting another
// server's (public) certificate next.
func leafCert(chain []*x509.Certificate) *x509.Certificate {
	if len(chain) == 0 {
		return nil
	}
	return chain[0]
}
