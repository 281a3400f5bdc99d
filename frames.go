package relay

// The frame codec: frame types, the 5-byte header, and the encoding and
// decoding of every payload. Nothing here starts goroutines, sets deadlines or
// decides policy; client.go and server.go own the I/O.

import (
	"bufio"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"time"

	"golang.org/x/crypto/curve25519"
	"golang.org/x/crypto/nacl/box"
	"golang.org/x/crypto/salsa20/salsa"
)

// FrameType is the first byte of every DERP frame.
type FrameType byte

// The frame types of protocol version 2. Values 0x0b–0x0f and above 0x15 are
// unassigned; receivers skip frames of types they do not know.
const (
	FrameServerKey     FrameType = 0x01 // S→C: 8-byte magic + server key
	FrameClientInfo    FrameType = 0x02 // C→S: client key + box(JSON)
	FrameServerInfo    FrameType = 0x03 // S→C: box(JSON)
	FrameSendPacket    FrameType = 0x04 // C→S: destination key + packet
	FrameRecvPacket    FrameType = 0x05 // S→C: source key + packet
	FrameKeepAlive     FrameType = 0x06 // S→C: empty
	FrameNotePreferred FrameType = 0x07 // C→S: 1 byte, non-zero = home server
	FramePeerGone      FrameType = 0x08 // S→C: key + reason
	FramePeerPresent   FrameType = 0x09 // S→C (watchers): key + IP + port + flags
	FrameForwardPacket FrameType = 0x0a // mesh C→S: source key + destination key + packet
	FrameWatchConns    FrameType = 0x10 // mesh C→S: empty
	FrameClosePeer     FrameType = 0x11 // mesh C→S: key
	FramePing          FrameType = 0x12 // 8 bytes
	FramePong          FrameType = 0x13 // 8 bytes, echoing a Ping
	FrameHealth        FrameType = 0x14 // S→C: problem text, empty = healthy
	FrameRestarting    FrameType = 0x15 // S→C: reconnect-in ms + try-for ms
)

var frameNames = [...]string{
	FrameServerKey:     "ServerKey",
	FrameClientInfo:    "ClientInfo",
	FrameServerInfo:    "ServerInfo",
	FrameSendPacket:    "SendPacket",
	FrameRecvPacket:    "RecvPacket",
	FrameKeepAlive:     "KeepAlive",
	FrameNotePreferred: "NotePreferred",
	FramePeerGone:      "PeerGone",
	FramePeerPresent:   "PeerPresent",
	FrameForwardPacket: "ForwardPacket",
	FrameWatchConns:    "WatchConns",
	FrameClosePeer:     "ClosePeer",
	FramePing:          "Ping",
	FramePong:          "Pong",
	FrameHealth:        "Health",
	FrameRestarting:    "Restarting",
}

// String returns the frame type's name, or "Unknown(0xNN)".
func (t FrameType) String() string {
	if int(t) < len(frameNames) && frameNames[t] != "" {
		return frameNames[t]
	}
	return "Unknown(0x" + strconv.FormatUint(uint64(t), 16) + ")"
}

// Sizes and limits of the wire format.
const (
	frameHeaderLen  = 5
	magic           = "DERP🔑" // 8 bytes: "DERP" + U+1F511
	nonceLen        = 24
	boxOverhead     = box.Overhead
	serverKeyLen    = len(magic) + KeyLen // 40
	maxServerKeyLen = 1 << 10             // client accepts ServerKey frames up to this

	minClientInfoLen = KeyLen + nonceLen                   // 56
	maxClientInfoLen = 256 << 10                           // 262144
	maxInfoLen       = 1 << 20                             // JSON documents
	maxClientFrame   = 1 << 20                             // largest frame a client accepts
	peerGoneLen      = KeyLen + 1                          // 33
	peerPresentLen   = KeyLen + 16 + 2 + 1                 // 51: up to the flags
	minPingLen       = 8                                   // Ping and Pong
	maxServerPingLen = 1000                                // server accepts Ping up to this
	restartingLen    = 8                                   // two uint32 ms
	maxWriteFrame    = 10 << 20                            // local sanity cap on written frames
	maxSendFrame     = KeyLen + MaxPacketSize              // largest SendPacket payload
	maxForwardFrame  = 2*KeyLen + MaxPacketSize            // largest ForwardPacket payload
	discoMagic       = "TS\xf0\x9f\x92\xac"                // "TS💬"
	minDiscoLen      = len(discoMagic) + KeyLen + nonceLen // 62
)

// frameSource is a buffered reader: *bufio.Reader, or the server's
// connReader.
type frameSource interface {
	Peek(n int) ([]byte, error)
	Discard(n int) (int, error)
}

// readFrameHeader reads the 5-byte frame header.
func readFrameHeader[R frameSource](br R) (t FrameType, n uint32, err error) {
	h, err := br.Peek(frameHeaderLen)
	if err != nil {
		if len(h) > 0 && err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, 0, err
	}
	t, n = FrameType(h[0]), binary.BigEndian.Uint32(h[1:])
	br.Discard(frameHeaderLen)
	return t, n, nil
}

// writeFrameHeader writes the 5-byte frame header.
func writeFrameHeader(bw *bufio.Writer, t FrameType, n uint32) error {
	if bw.Available() >= frameHeaderLen {
		b := bw.AvailableBuffer()[:frameHeaderLen]
		b[0] = byte(t)
		binary.BigEndian.PutUint32(b[1:], n)
		_, err := bw.Write(b)
		return err
	}
	var b [frameHeaderLen]byte
	b[0] = byte(t)
	binary.BigEndian.PutUint32(b[1:], n)
	_, err := bw.Write(b[:])
	return err
}

// writeFrame writes a whole frame whose payload is the concatenation of parts.
// It does not flush.
func writeFrame(bw *bufio.Writer, t FrameType, parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	if n > maxWriteFrame {
		return protoErr("frame_too_large", t, fmt.Sprintf("refusing to write %d bytes", n))
	}
	if err := writeFrameHeader(bw, t, uint32(n)); err != nil {
		return err
	}
	for _, p := range parts {
		if _, err := bw.Write(p); err != nil {
			return err
		}
	}
	return nil
}

// writePacketFrame writes a SendPacket or RecvPacket frame: a key then data.
// If key is nil (a RecvPacket whose source is unknown) only data is written,
// which is the version-1 layout.
func writePacketFrame(bw *bufio.Writer, t FrameType, key *PublicKey, data []byte) error {
	n := len(data)
	if key != nil {
		n += KeyLen
	}
	if err := writeFrameHeader(bw, t, uint32(n)); err != nil {
		return err
	}
	if key != nil {
		if _, err := bw.Write(key[:]); err != nil {
			return err
		}
	}
	_, err := bw.Write(data)
	return err
}

// appendServerKey appends the payload of a ServerKey frame.
func appendServerKey(b []byte, k PublicKey) []byte {
	b = append(b, magic...)
	return append(b, k[:]...)
}

// parseServerKey parses a ServerKey payload: the magic, the key, and any
// number of reserved bytes that are ignored.
func parseServerKey(p []byte) (PublicKey, error) {
	if len(p) < serverKeyLen {
		return PublicKey{}, protoErr("short_server_key", FrameServerKey, fmt.Sprintf("%d bytes, want at least %d", len(p), serverKeyLen))
	}
	if string(p[:len(magic)]) != magic {
		return PublicKey{}, protoErr("bad_magic", FrameServerKey, fmt.Sprintf("got %q", p[:len(magic)]))
	}
	return PublicKey(p[len(magic):serverKeyLen]), nil
}

// appendPeerGone appends the payload of a PeerGone frame.
func appendPeerGone(b []byte, k PublicKey, r PeerGoneReason) []byte {
	b = append(b, k[:]...)
	return append(b, byte(r))
}

// appendPeerPresent appends the payload of a PeerPresent frame: key,
// address, port and flags (51 bytes), then the length of the peer's app name
// and the name, as Tailscale's servers send since v1.104. An invalid name is
// sent as none.
func appendPeerPresent(b []byte, m PeerPresent) []byte {
	b = append(b, m.Key[:]...)
	var ip [16]byte
	if a := m.Addr.Addr(); a.IsValid() {
		ip = a.As16()
	}
	b = append(b, ip[:]...)
	b = binary.BigEndian.AppendUint16(b, m.Addr.Port())
	b = append(b, byte(m.Flags))
	name := m.AppName
	if !ValidAppName(name) {
		name = ""
	}
	b = append(b, byte(len(name)))
	return append(b, name...)
}

// MaxAppNameLen is the longest ClientInfo.AppName, in bytes.
const MaxAppNameLen = 32

// ValidAppName reports whether name may be a ClientInfo.AppName: at most
// MaxAppNameLen bytes of printable ASCII (space to tilde). The empty name is
// valid. Servers refuse logins with other names, as Tailscale's do.
func ValidAppName(name string) bool {
	if len(name) > MaxAppNameLen {
		return false
	}
	for i := range len(name) {
		if b := name[i]; b < ' ' || b > '~' {
			return false
		}
	}
	return true
}

// appendRestarting appends the payload of a Restarting frame.
func appendRestarting(b []byte, reconnectIn, tryFor time.Duration) []byte {
	b = binary.BigEndian.AppendUint32(b, durationMillis(reconnectIn))
	return binary.BigEndian.AppendUint32(b, durationMillis(tryFor))
}

func durationMillis(d time.Duration) uint32 {
	ms := d.Milliseconds()
	switch {
	case ms < 0:
		return 0
	case ms > 1<<32-1:
		return 1<<32 - 1
	}
	return uint32(ms)
}

// A Message is what [Client.Recv] returns: one of [*ReceivedPacket],
// [PeerGone], [PeerPresent], [KeepAlive], [Ping], [Pong], [Health],
// [ServerRestarting] or [ServerInfo].
type Message interface {
	msg()
}

// ReceivedPacket is a packet relayed to this client. Recv returns it as a
// pointer to a struct the Client reuses, so receiving allocates nothing; it
// and its Data are valid only until the next call to Recv.
type ReceivedPacket struct {
	// Source is the sender's public key: the first 32 bytes of the
	// frame. A frame without one (the version-1 layout, which a server
	// writes for a mesh-forwarded packet whose source is zero, as
	// Tailscale's does) cannot be told apart: its first 32 data bytes are
	// taken as Source.
	Source PublicKey
	// Data is the packet. It aliases the client's read buffer (or, for a
	// packet larger than that buffer, a pooled buffer the Client lends
	// until the next Recv) and is valid only until the next call to Recv:
	// copy it to keep it.
	Data []byte
}

// PeerGoneReason says why a [PeerGone] message was sent.
type PeerGoneReason byte

// The reasons of a PeerGone frame.
const (
	// PeerGoneDisconnected means the peer was connected and has left.
	PeerGoneDisconnected PeerGoneReason = 0x00
	// PeerGoneNotHere means the server has no route to that key.
	PeerGoneNotHere PeerGoneReason = 0x01
	// PeerGoneMeshConnBroke never appears on the wire: mesh code uses it
	// when a watch connection to another server breaks.
	PeerGoneMeshConnBroke PeerGoneReason = 0xF0
)

// String returns the reason's name.
func (r PeerGoneReason) String() string {
	switch r {
	case PeerGoneDisconnected:
		return "disconnected"
	case PeerGoneNotHere:
		return "not-here"
	case PeerGoneMeshConnBroke:
		return "mesh-conn-broke"
	}
	return "reason(0x" + strconv.FormatUint(uint64(r), 16) + ")"
}

// PeerGone says that a peer is no longer reachable through this server: a
// peer this client sent to or received from has left (for a mesh watcher:
// any client has left), or a disco packet was sent to a key the server does
// not know.
type PeerGone struct {
	Peer   PublicKey      // the peer that is gone
	Reason PeerGoneReason // why: it disconnected, or the server never had it
}

// PeerPresentFlags describe a connection announced in a [PeerPresent].
type PeerPresentFlags byte

// The flag bits of a PeerPresent frame. A server sets PeerIsRegular when no
// other bit applies; zero means an old server that sent no flags.
const (
	PeerIsRegular  PeerPresentFlags = 1 << 0
	PeerIsMeshPeer PeerPresentFlags = 1 << 1
	PeerIsProber   PeerPresentFlags = 1 << 2
	PeerIsNotIdeal PeerPresentFlags = 1 << 3
)

// PeerPresent tells a mesh watcher that a peer connected.
type PeerPresent struct {
	Key   PublicKey        // the peer that connected
	Addr  netip.AddrPort   // the peer's remote address; IPv4 is unmapped; zero if unknown
	Flags PeerPresentFlags // what kind of connection it is; zero from old servers
	// AppName is the name the peer gave in its ClientInfo, if the server
	// sends it (this package's and Tailscale's since v1.104 do) and it is
	// valid (ValidAppName).
	AppName string
}

// KeepAlive is the server's periodic one-way keepalive.
type KeepAlive struct{}

// Ping is a ping from the server; answer it with [Client.SendPong].
type Ping [8]byte

// Pong answers a ping sent with [Client.SendPing].
type Pong [8]byte

// Health carries a problem the server wants the user to see; an empty
// Problem means the earlier problem is over. A Client keeps at most the
// first 64 KiB of the text (a frame may carry 1 MiB): a longer one is cut
// there, less a character the cut splits, and ends in "…".
type Health struct {
	Problem string // for people to read; empty: no problem any more
}

// ServerRestarting says the server is going away: reconnect after
// ReconnectIn and keep trying for TryFor before treating it as a failure.
type ServerRestarting struct {
	ReconnectIn time.Duration // wait this long before reconnecting
	TryFor      time.Duration // then keep trying this long
}

// ServerInfo is the server's login reply. A non-zero TokenBucketBytesPerSecond
// is a per-client receive rate limit the server enforces; the Client then
// limits its own sends to fit it (frame header and key included).
type ServerInfo struct {
	Version                   int // the server's protocol version
	TokenBucketBytesPerSecond int // the rate limit; zero: none
	TokenBucketBytesBurst     int // the burst the rate limit allows
}

func (*ReceivedPacket) msg()  {}
func (PeerGone) msg()         {}
func (PeerPresent) msg()      {}
func (KeepAlive) msg()        {}
func (Ping) msg()             {}
func (Pong) msg()             {}
func (Health) msg()           {}
func (ServerRestarting) msg() {}
func (ServerInfo) msg()       {}

// errSkip marks a frame the client skips (too short to parse), as Tailscale's
// client does, rather than failing the connection.
var errSkip = errors.New("relay: frame skipped")

// parseRecvPacket parses a RecvPacket payload in the version-2 layout into m.
func parseRecvPacket(m *ReceivedPacket, p []byte) error {
	if len(p) < KeyLen {
		return errSkip
	}
	m.Source, m.Data = PublicKey(p[:KeyLen]), p[KeyLen:]
	return nil
}

// parsePeerGone parses a PeerGone payload; 32 bytes (old servers) means
// PeerGoneDisconnected, and bytes after the reason are ignored.
func parsePeerGone(p []byte) (PeerGone, error) {
	if len(p) < KeyLen {
		return PeerGone{}, errSkip
	}
	m := PeerGone{Peer: PublicKey(p[:KeyLen])}
	if len(p) > KeyLen {
		m.Reason = PeerGoneReason(p[KeyLen])
	}
	return m, nil
}

// parsePeerPresent parses a PeerPresent payload of any of its historical
// lengths: key only, key and address, key, address and flags, or all that
// and an app name. A truncated or invalid app name is ignored, as are bytes
// after it.
func parsePeerPresent(p []byte) (PeerPresent, error) {
	if len(p) < KeyLen {
		return PeerPresent{}, errSkip
	}
	m := PeerPresent{Key: PublicKey(p[:KeyLen])}
	const addrEnd = KeyLen + 16 + 2
	if len(p) >= addrEnd {
		ip := netip.AddrFrom16([16]byte(p[KeyLen : KeyLen+16])).Unmap()
		port := binary.BigEndian.Uint16(p[KeyLen+16:])
		if !ip.IsUnspecified() || port != 0 {
			m.Addr = netip.AddrPortFrom(ip, port)
		}
	}
	if len(p) >= peerPresentLen {
		m.Flags = PeerPresentFlags(p[addrEnd])
	}
	if len(p) > peerPresentLen {
		n := int(p[peerPresentLen])
		if name := p[peerPresentLen+1:]; n <= len(name) && ValidAppName(string(name[:n])) {
			m.AppName = string(name[:n])
		}
	}
	return m, nil
}

// parsePing8 returns the first 8 bytes of a Ping or Pong payload.
func parsePing8(p []byte) ([8]byte, error) {
	if len(p) < minPingLen {
		return [8]byte{}, errSkip
	}
	return [8]byte(p[:8]), nil
}

// parseRestarting parses a Restarting payload; extra bytes are ignored.
func parseRestarting(p []byte) (ServerRestarting, error) {
	if len(p) < restartingLen {
		return ServerRestarting{}, errSkip
	}
	return ServerRestarting{
		ReconnectIn: time.Duration(binary.BigEndian.Uint32(p)) * time.Millisecond,
		TryFor:      time.Duration(binary.BigEndian.Uint32(p[4:])) * time.Millisecond,
	}, nil
}

// looksLikeDisco reports whether a packet is a disco message: long enough and
// starting with the disco magic. Disco packets get their own send queue and
// NotHere replies.
func looksLikeDisco(p []byte) bool {
	return len(p) >= minDiscoLen && string(p[:len(discoMagic)]) == discoMagic
}

// ClientInfo is what a client tells the server at login, inside the sealed
// ClientInfo frame. The mesh key is not included: it is checked by the server
// and reported only as whether the client is a mesh peer.
type ClientInfo struct {
	Version     int    // protocol version the client speaks (2 today)
	CanAckPings bool   // the client answers server Pings with Pongs
	IsProber    bool   // the client is a monitoring prober
	AppName     string // application name, for statistics; see ValidAppName
}

// clientInfoJSON is the wire form of ClientInfo. JSON field names match
// case-insensitively, as in Tailscale's server. MeshKey is a value, not a
// pointer: encoding/json sets a pointer to nil for a JSON null without
// calling its UnmarshalJSON, which would accept "meshKey":null as absent.
type clientInfoJSON struct {
	MeshKey     meshKeyJSON `json:"meshKey,omitzero"`
	Version     int         `json:"version,omitempty"`
	CanAckPings bool        `json:"CanAckPings"`
	IsProber    bool        `json:"IsProber,omitempty"`
	AppName     string      `json:"AppName,omitempty"`
}

// meshKeyJSON is a mesh key that must be a string of exactly 64 hex digits
// when present; "" and null are errors, not "absent".
type meshKeyJSON [MeshKeyLen]byte

func (k meshKeyJSON) MarshalJSON() ([]byte, error) {
	var b [2 + 2*MeshKeyLen]byte
	b[0] = '"'
	const digits = "0123456789abcdef"
	for i, c := range k {
		b[1+2*i] = digits[c>>4]
		b[2+2*i] = digits[c&0xf]
	}
	b[len(b)-1] = '"'
	return b[:], nil
}

func (k *meshKeyJSON) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil || string(b) == "null" {
		return errors.New("meshKey must be a string of 64 hex digits")
	}
	mk, _, err := parseMeshKey(s)
	if err != nil || s == "" {
		return errors.New("meshKey must be a string of 64 hex digits")
	}
	*k = mk
	return nil
}

// serverInfoJSON is the wire form of ServerInfo.
type serverInfoJSON struct {
	Version                   int `json:"version,omitempty"`
	TokenBucketBytesPerSecond int `json:"TokenBucketBytesPerSecond,omitempty"`
	TokenBucketBytesBurst     int `json:"TokenBucketBytesBurst,omitempty"`
}

// sharedKey computes the NaCl box shared key between priv and pub. It fails
// for small-order public keys, whose shared secret is all zeroes.
func sharedKey(priv PrivateKey, pub PublicKey) (*[32]byte, error) {
	s, err := curve25519.X25519(priv[:], pub[:])
	if err != nil {
		return nil, ErrWeakKey
	}
	var k [32]byte
	var zero [16]byte
	salsa.HSalsa20(&k, &zero, (*[32]byte)(s), &salsa.Sigma)
	return &k, nil
}

// sealBox appends nonce || box(msg) to b, using a fresh random nonce.
func sealBox(b []byte, key *[32]byte, msg []byte) []byte {
	var nonce [nonceLen]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		panic("relay: crypto/rand failed: " + err.Error()) // crypto/rand never fails on supported platforms
	}
	b = append(b, nonce[:]...)
	return box.SealAfterPrecomputation(b, msg, &nonce, key)
}

// openBox opens nonce || box, appending the plaintext to dst.
func openBox(dst []byte, key *[32]byte, sealed []byte) ([]byte, bool) {
	if len(sealed) < nonceLen {
		return nil, false
	}
	nonce := (*[nonceLen]byte)(sealed[:nonceLen])
	return box.OpenAfterPrecomputation(dst, sealed[nonceLen:], nonce, key)
}
