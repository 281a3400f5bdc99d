// Package relay implements DERP, the packet relay protocol in which peers are
// addressed by Curve25519 public keys, wire-compatible with Tailscale's DERP
// servers and clients (protocol version 2), plus its "fast start" handshake.
//
// # The protocol
//
// A DERP session is one reliable byte stream (normally TCP, TLS 1.3, then an
// HTTP/1.1 request for /derp that switches protocols) carrying frames: one
// type byte, a big-endian uint32 payload length, and the payload. The server
// speaks first with a ServerKey frame holding its 32-byte DERP public key.
// The client answers with ClientInfo: its own public key and a NaCl box,
// sealed from its private key to the server's public key, around a small JSON
// document. Opening that box proves the client owns its key; the server
// answers with a ServerInfo box that proves the same of the server. From then
// on the client sends SendPacket frames addressed to another peer's public key
// and receives RecvPacket frames tagged with the sender's key. DERP never
// encrypts the packets it carries: they are already WireGuard or disco
// ciphertext. The server also sends KeepAlive, PeerGone ("the peer you talked
// to has left", or "is not here"), Pong, Health and ServerRestarting frames.
// Servers of one region that share a mesh key watch each other's clients
// (WatchConns, PeerPresent, PeerGone) and forward packets one hop
// (ForwardPacket), so a region can outgrow one machine.
//
// # Fast start
//
// The classic connection costs three round trips before the client can write
// its first DERP frame: TCP, TLS, and the HTTP 101 response that carries the
// server's key. A fast-start server appends one extra self-signed Ed25519
// certificate (the "meta cert", see [MintMetaCert]) to the end of its TLS
// chain whose subject names the server's DERP key. TLS 1.3 encrypts the
// certificate message, so a client that finds the meta cert in an
// authenticated TLS 1.3 handshake already knows the key: it sends the HTTP
// request with "Derp-Fast-Start: 1" and its ClientInfo frame in one flight,
// and the server answers with DERP frames and no HTTP response at all. The
// first frame leaves after two round trips (TCP, TLS) instead of three.
// [FastStart] chooses the path, reports which one it took and why in a
// [Handshake], and falls back to the classic upgrade whenever the meta cert
// is missing (TLS 1.2, plain HTTP, a TLS-intercepting proxy).
//
// # Other transports
//
// Browsers can open nothing but WebSocket: [Server.ServeHTTP] also accepts an
// upgrade to WebSocket with the subprotocol "derp", and carries the DERP
// stream in binary messages (of at most 32 KiB each way, since Tailscale's
// WebSocket stack refuses bigger ones); [FastStart] speaks it when its
// WebSocket field is set. Behind a corporate proxy, [FastStart] tunnels
// through HTTP CONNECT, and fast start still works inside the tunnel.
//
// # Cost
//
// A relay spends its life moving small packets for many mostly idle clients.
// The server allocates nothing per relayed packet and reads and writes many
// packets per system call. On Linux an idle session holds no goroutine and
// no buffer: its socket waits in an epoll set of the server's own until the
// client sends again (see [WithIdlePark]); a session served by ServeHTTP then
// costs about 3 KiB over plain HTTP and 10 KiB over TLS.
//
// # Where to start
//
// The examples are the place to start: a [Server] serving /derp from a
// net/http server with TLS and the meta cert, and [Client]s connected by
// [FastStart] relaying packets through it. [Server.Accept] and [NewClient]
// run DERP over any net.Conn for tests and custom transports. A client of a
// DERP map uses [Region] and [Node] with [FastStart.DialNode] or
// [ReconnectingClient], and [FastStart.DialRegionTLS] to measure a region's
// latency without logging in. To watch a running server: [Server.Stats]
// (also as expvar and Prometheus text), [Server.Sessions] for each
// session's traffic and RTT, and [Server.ConsistencyCheck] for a health
// endpoint. To admit only some clients, give [WithAdmission] a hook of your
// own, or one that asks an admission service ([AdmissionURL],
// [AdmissionService]) or the local tailscaled ([AdmissionTailscaled]), as
// Tailscale's derper does.
package relay

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"go4.org/mem"
	"golang.org/x/crypto/curve25519"
)

// ProtocolVersion is the DERP protocol version this package speaks. It is
// sent in ClientInfo and ServerInfo, in the Derp-Version response header and
// as the meta cert's serial number. It has been 2 since 2020.
const ProtocolVersion = 2

// MaxPacketSize is the largest packet, in bytes, that a client may send or
// that the server relays. Larger SendPacket frames end the connection.
const MaxPacketSize = 64 << 10

// KeyLen is the length in bytes of a public or private key.
const KeyLen = 32

// HTTP header names of the upgrade exchange.
const (
	// FastStartHeader set to "1" on the upgrade request asks the server to
	// skip the HTTP response and start with DERP frames at once.
	FastStartHeader = "Derp-Fast-Start"
	// IdealNodeHeader, when not empty, tells the server the client would
	// rather be on another node of the region (statistics only).
	IdealNodeHeader = "Ideal-Node"
	// VersionHeader carries the protocol version in the 101 response.
	VersionHeader = "Derp-Version"
	// PublicKeyHeader carries the server's DERP key (64 lowercase hex
	// digits) in the 101 response.
	PublicKeyHeader = "Derp-Public-Key"
)

// PublicKey is a Curve25519 public key: a client's identity, or a server's
// DERP key. Its text form is 64 lowercase hex digits.
type PublicKey [KeyLen]byte

// PrivateKey is a Curve25519 private key (a clamped scalar).
// Its String method never reveals it.
type PrivateKey [KeyLen]byte

// GeneratePrivateKey returns a new random private key, clamped as X25519
// requires.
func GeneratePrivateKey() (PrivateKey, error) {
	var k PrivateKey
	if _, err := rand.Read(k[:]); err != nil {
		return PrivateKey{}, fmt.Errorf("relay: generate private key: %w", err)
	}
	k.clamp()
	return k, nil
}

func (k *PrivateKey) clamp() {
	k[0] &= 248
	k[31] = (k[31] & 127) | 64
}

// Public returns the public key of k.
func (k PrivateKey) Public() PublicKey {
	var pub PublicKey
	curve25519.ScalarBaseMult((*[32]byte)(&pub), (*[32]byte)(&k))
	return pub
}

// IsZero reports whether k is the zero key (never set).
func (k PrivateKey) IsZero() bool { return k == PrivateKey{} }

// String returns a placeholder that does not reveal the key, so that a
// private key put in a log line by mistake leaks nothing.
func (k PrivateKey) String() string { return "privkey:<redacted>" }

// ParsePrivateKey parses 64 hex digits, optionally prefixed by "privkey:"
// (the form of Tailscale's derper key file).
func ParsePrivateKey(s string) (PrivateKey, error) {
	m := mem.S(s)
	if mem.HasPrefix(m, mem.S("privkey:")) {
		m = m.SliceFrom(len("privkey:"))
	}
	var k PrivateKey
	if err := parseHex32(m, (*[32]byte)(&k)); err != nil {
		return PrivateKey{}, fmt.Errorf("relay: parse private key: %w", err)
	}
	return k, nil
}

// IsZero reports whether k is all zeroes.
func (k PublicKey) IsZero() bool { return k == PublicKey{} }

// String returns the 64 lowercase hex digits of k.
func (k PublicKey) String() string {
	var buf [2 * KeyLen]byte
	hex.Encode(buf[:], k[:])
	return string(buf[:])
}

// AppendText appends the 64 lowercase hex digits of k to b.
func (k PublicKey) AppendText(b []byte) ([]byte, error) {
	return hex.AppendEncode(b, k[:]), nil
}

// MarshalText returns the 64 lowercase hex digits of k.
func (k PublicKey) MarshalText() ([]byte, error) { return k.AppendText(nil) }

// UnmarshalText parses 64 hex digits (either case), optionally prefixed by
// "nodekey:" as Tailscale writes node keys in JSON.
func (k *PublicKey) UnmarshalText(b []byte) error {
	m := mem.B(b)
	if mem.HasPrefix(m, mem.S("nodekey:")) {
		m = m.SliceFrom(len("nodekey:"))
	}
	p, err := ParsePublicKeyMem(m)
	if err != nil {
		return err
	}
	*k = p
	return nil
}

// ShortString returns the short form used in logs: "[" + the first five
// characters of the standard base64 encoding of k + "]".
func (k PublicKey) ShortString() string {
	var b64 [44]byte
	base64.StdEncoding.Encode(b64[:], k[:])
	return "[" + string(b64[:5]) + "]"
}

// ParsePublicKey parses 64 hex digits (either case).
func ParsePublicKey(s string) (PublicKey, error) { return ParsePublicKeyMem(mem.S(s)) }

// ParsePublicKeyMem parses 64 hex digits (either case) from m without
// allocating.
func ParsePublicKeyMem(m mem.RO) (PublicKey, error) {
	var k PublicKey
	if err := parseHex32(m, (*[32]byte)(&k)); err != nil {
		return PublicKey{}, fmt.Errorf("relay: parse public key: %w", err)
	}
	return k, nil
}

var errHexLength = errors.New("want 64 hex digits")
var errHexDigit = errors.New("invalid hex digit")

func parseHex32(m mem.RO, dst *[32]byte) error {
	if m.Len() != 64 {
		return errHexLength
	}
	for i := range 32 {
		hi, ok1 := fromHexChar(m.At(2 * i))
		lo, ok2 := fromHexChar(m.At(2*i + 1))
		if !ok1 || !ok2 {
			return errHexDigit
		}
		dst[i] = hi<<4 | lo
	}
	return nil
}

func fromHexChar(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// checkPeerKey reports why a peer's public key cannot be used to log in:
// the all-zero key, a non-canonical encoding (bit 255 set, or a value of at
// least 2^255-19), or a point of small order, for which the shared secret is
// predictable and anyone could forge the peer's boxes.
func checkPeerKey(k PublicKey) error {
	if k.IsZero() {
		return ErrZeroKey
	}
	if k[31]&0x80 != 0 || isAtLeastP(k) {
		return ErrWeakKey
	}
	return nil
}

// isAtLeastP reports whether the little-endian value of k (bit 255 clear) is
// at least p = 2^255 - 19, i.e. one of the 19 values p..2^255-1.
func isAtLeastP(k PublicKey) bool {
	if k[31] != 0x7f || k[0] < 0xed {
		return false
	}
	for _, b := range k[1:31] {
		if b != 0xff {
			return false
		}
	}
	return true
}

// MeshKeyLen is the length in bytes of a region's mesh key; its text form is
// 64 hex digits.
const MeshKeyLen = 32

// parseMeshKey parses a mesh key's 64 hex digits. An empty string means no
// mesh key.
func parseMeshKey(s string) (k [MeshKeyLen]byte, ok bool, err error) {
	if s == "" {
		return k, false, nil
	}
	if err := parseHex32(mem.S(s), &k); err != nil {
		return k, false, fmt.Errorf("relay: mesh key: %w", err)
	}
	return k, k != [MeshKeyLen]byte{}, nil
}

// Errors that callers can test for with errors.Is. Most errors returned by
// this package wrap one of them or are a [*ProtocolError]; a dial that the
// server (or something in front of it) answered with an HTTP status other
// than 101 wraps an [*HTTPError].
var (
	// ErrClosed is returned by operations on a Client, ReconnectingClient
	// or Server after Close. (A ReconnectingClient write whose connection
	// was dropped under it without Close returns ErrNotConnected.)
	ErrClosed = errors.New("relay: closed")
	// ErrZeroKey means a peer presented the all-zero public key.
	ErrZeroKey = errors.New("relay: all-zero public key")
	// ErrWeakKey means a peer presented a non-canonical or small-order
	// public key, whose NaCl boxes anyone could forge.
	ErrWeakKey = errors.New("relay: non-canonical or small-order public key")
	// ErrPacketTooLarge means a packet exceeds MaxPacketSize.
	ErrPacketTooLarge = errors.New("relay: packet larger than MaxPacketSize")
	// ErrServerKeyMismatch means the server's DERP key is not the one the
	// client was told to expect.
	ErrServerKeyMismatch = errors.New("relay: server key mismatch")
	// ErrRateLimited means a Client dropped a packet instead of sending it
	// because it exceeded the rate the server announced in ServerInfo.
	ErrRateLimited = errors.New("relay: packet dropped by the rate limit the server announced")
	// ErrNotMesh means a client without the region's mesh key sent a
	// frame only mesh peers may send.
	ErrNotMesh = errors.New("relay: frame requires the mesh key")
	// ErrLoginRejected means the server's admission hook refused a client.
	ErrLoginRejected = errors.New("relay: login rejected")
	// ErrReplayedLogin means a ClientInfo frame was replayed: its box's
	// nonce was already used in a recent login.
	ErrReplayedLogin = errors.New("relay: replayed login")
	// ErrTooManyConnections means a server limit on connections (in total
	// or per remote IP, an IPv6 /64 counting as one) was reached. A dial
	// that such a server refused over HTTP fails with an [*HTTPError] that
	// matches it.
	ErrTooManyConnections = errors.New("relay: too many connections")
)

// ProtocolError describes a malformed or forbidden frame, or a handshake that
// did not follow the protocol. Reason is a short stable name such as
// "frame_too_large" or "bad_client_info_box", suitable as a metric label.
type ProtocolError struct {
	Reason string    // stable short name of the failure
	Frame  FrameType // the frame type involved, or 0
	Detail string    // human-readable detail
	Err    error     // underlying error, if any
}

// Error returns "relay: protocol error: <reason> (<frame>): <detail>: <cause>".
func (e *ProtocolError) Error() string {
	s := "relay: protocol error: " + e.Reason
	if e.Frame != 0 {
		s += " (" + e.Frame.String() + ")"
	}
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Unwrap returns the underlying error.
func (e *ProtocolError) Unwrap() error { return e.Err }

// HTTPError is an HTTP answer other than 101 Switching Protocols to a
// dial's upgrade request (DERP or WebSocket) or fast-start request, from
// the server or from something in front of it (a reverse proxy's 502, an
// authenticating proxy's 401 or 403, a redirect). The errors FastStart,
// ReconnectingClient and Client.Recv return for such an answer wrap it:
// use errors.As to read the status. A server of this package answers 503
// when it is shutting down or a connection limit is reached; the latter
// also matches errors.Is(err, ErrTooManyConnections) (see Is).
type HTTPError struct {
	StatusCode int    // such as 503
	Status     string // the status line's code and text, such as "503 Service Unavailable"
	Body       string // the start of the body (at most 512 bytes), trimmed of white space
	Location   string // for a redirect (3xx), where to (cut after 256 bytes, then marked with "…"); redirects are not followed
}

// Error returns the quoted status and the quoted body, and for a redirect
// where to.
func (e *HTTPError) Error() string {
	s := strconv.Quote(e.Status) + ": " + strconv.Quote(e.Body)
	if e.Location != "" {
		s += " (redirected to " + strconv.Quote(e.Location) + "; redirects are not followed: use that URL)"
	}
	return s
}

// Is reports whether target is ErrTooManyConnections and e is how a server
// of this package refuses a connection over its limit: a 503 whose body
// starts with that error's text and a colon.
func (e *HTTPError) Is(target error) bool {
	return target == ErrTooManyConnections && e.StatusCode == 503 &&
		strings.HasPrefix(e.Body, ErrTooManyConnections.Error()+":")
}

func protoErr(reason string, t FrameType, detail string) *ProtocolError {
	return &ProtocolError{Reason: reason, Frame: t, Detail: detail}
}

// errorList is several errors as one, as errors.Join makes, but whose
// message lists them on one line, separated by "; ": an error of this
// package holds no line break, so that it cannot break the log line it
// goes into. errors.Is and errors.As look into each of them.
type errorList []error

func (e errorList) Error() string {
	var b strings.Builder
	for i, err := range e {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(err.Error())
	}
	return b.String()
}

func (e errorList) Unwrap() []error { return e }

// joinErrors returns the errors of errs that are not nil as one error, on
// one line (see errorList): nil if there are none, the error itself if
// there is one.
func joinErrors(errs ...error) error {
	var l errorList
	for _, err := range errs {
		if err != nil {
			l = append(l, err)
		}
	}
	switch len(l) {
	case 0:
		return nil
	case 1:
		return l[0]
	}
	return l
}

// ProtocolErrorReason returns the Reason of the first *ProtocolError in err's
// chain, or "" if there is none.
func ProtocolErrorReason(err error) string {
	var pe *ProtocolError
	if errors.As(err, &pe) {
		return pe.Reason
	}
	return ""
}
