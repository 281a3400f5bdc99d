package relay

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// Client is one DERP session over an established byte stream.
//
// Send, SendPing, SendPong, NotePreferred and the mesh calls may be called
// concurrently from any goroutines; Recv must be called from one goroutine at
// a time. After any read error the Client is dead: Recv keeps returning that
// error and the caller should Close it and connect again.
//
// NotePreferred, SendPing, SendPong, WatchConnectionChanges, ClosePeer and
// ForwardPacket each must be written within 5 seconds, any wait for another
// write on the Client to finish included, or they fail (and so do a write
// they waited for past that and any write that takes the Client before
// them); Send within 10 seconds (see Send): a
// server that stops reading cannot hold their caller forever. A failed
// write leaves the Client dead too: every later write fails. Close ends
// every blocked call at once.
type Client struct {
	priv      PrivateKey
	pub       PublicKey
	serverKey PublicKey
	nc        net.Conn
	box       *[32]byte // shared key with the server, for ServerInfo
	opts      clientOptions

	wmu     sync.Mutex // guards bw, limiter, werr, dst, sendBy
	bw      *bufio.Writer
	dst     PublicKey // Send's copy of its destination, so it does not escape
	limiter *tokenBucket
	werr    error
	sendBy  time.Time // the write deadline Send left set; zero if none

	// Read side: owned by the goroutine calling Recv.
	br          *bufio.Reader
	rerr        error                   // sticky read error
	discard     int                     // bytes of the previous frame still to discard from br
	big         *bigPayload             // lent by bigPayloads to the last payload that did not fit br's buffer; nil if none
	buf         []byte                  // the last payload larger than a bigPayload, if any
	maybeHTTP   bool                    // the stream may start with an HTTP response (fast start answered with 101)
	sawFirst    bool                    // a frame has been read
	gotInfo     bool                    // ServerInfo arrived
	pkt         ReceivedPacket          // returned by Recv, reused
	head        [maxPeerPresentLen]byte // the bytes kept of a large frame whose payload parse reads a prefix of
	closed      atomic.Bool
	closeOnce   sync.Once
	closeResult error
	// interrupted is set by interrupt: every read and write fails at
	// once from then on, whatever deadline is set later.
	interrupted atomic.Bool
	// givenUp is set when a write's bound passed while it waited for
	// another to release the Client (lockBy): the stream is given up, and
	// every write fails at once from then on, whatever deadline it sets,
	// so that no later write holds the waiter past its bound.
	givenUp atomic.Bool
	// accounted is set, under the ReconnectingClient's mu, once the end
	// of this connection was accounted for (see
	// ReconnectingClient.endLocked): a failure counts once.
	accounted bool
	// gen is the connection's generation in the ReconnectingClient that
	// dialled it (see ReconnectingClient.Generation); 0 for others. Set
	// under its mu before the Client is handed out.
	gen int
}

// pastDeadline is a deadline that has passed: I/O under it fails at once.
var pastDeadline = time.Unix(1, 0)

// interrupt makes the connection's reads and writes under way, and all
// later ones, fail with a timeout: the way to abandon a blocked call, since
// a DERP stream cannot resume mid-frame. The caller then drops the Client.
func (c *Client) interrupt() {
	c.interrupted.Store(true)
	c.nc.SetReadDeadline(pastDeadline)
	c.nc.SetWriteDeadline(pastDeadline)
}

// setReadDeadline and setWriteDeadline set a deadline unless interrupt
// was called, whose deadline stays; setWriteDeadline also unless the
// stream was given up (givenUp).
func (c *Client) setReadDeadline(t time.Time) {
	c.nc.SetReadDeadline(t)
	if c.interrupted.Load() {
		c.nc.SetReadDeadline(pastDeadline)
	}
}

func (c *Client) setWriteDeadline(t time.Time) {
	c.nc.SetWriteDeadline(t)
	if c.interrupted.Load() || c.givenUp.Load() {
		c.nc.SetWriteDeadline(pastDeadline)
	}
}

// ClientOption configures NewClient.
type ClientOption func(*clientOptions)

type clientOptions struct {
	meshKey      [MeshKeyLen]byte
	hasMeshKey   bool
	meshKeyErr   error
	serverKey    PublicKey
	canAckPings  bool
	isProber     bool
	appName      string
	recvTimeout  time.Duration
	loginTimeout time.Duration
	maybeHTTP    bool
	// sendBound and writeBound are the bounds of Send and of the other
	// writes: sendBound and writeBound unless a test lowers them.
	sendBound, writeBound time.Duration
	// lockByWait, if set (tests only), is called by lockBy after it armed
	// its timer and before it waits for the write lock.
	lockByWait func()
}

// MeshKey sets the region's mesh key, 64 hex digits, which lets the client
// watch the server's connections and forward packets (mesh peers only). An
// empty string means no mesh key. A malformed key makes NewClient fail.
func MeshKey(k string) ClientOption {
	return func(o *clientOptions) {
		o.meshKey, o.hasMeshKey, o.meshKeyErr = parseMeshKey(k)
	}
}

// ServerPublicKey declares the server's DERP key as known, so that the client
// sends its ClientInfo at once instead of first waiting for the ServerKey
// frame (fast start). The ServerKey frame that still arrives is checked
// against k by Recv; a mismatch is ErrServerKeyMismatch. A zero k is ignored.
func ServerPublicKey(k PublicKey) ClientOption {
	return func(o *clientOptions) { o.serverKey = k }
}

// CanAckPings tells the server that this client answers server Pings with
// Pongs (the caller must do so with SendPong when Recv returns a Ping).
// Default false.
func CanAckPings(v bool) ClientOption { return func(o *clientOptions) { o.canAckPings = v } }

// IsProber tells the server that this client is a monitoring prober.
func IsProber(v bool) ClientOption { return func(o *clientOptions) { o.isProber = v } }

// AppName tells the server an application name, for its statistics and
// for mesh watchers (PeerPresent.AppName). It must be valid (ValidAppName):
// servers refuse other names, so NewClient does too.
func AppName(name string) ClientOption { return func(o *clientOptions) { o.appName = name } }

// RecvTimeout bounds how long Recv waits for each frame, frames it skips
// included (of which it reads at most 4 MiB in a row: see Recv); the
// default, 120 s, is twice the server's keepalive interval, so silence that
// long means the connection is dead. Zero or negative means no limit.
func RecvTimeout(d time.Duration) ClientOption { return func(o *clientOptions) { o.recvTimeout = d } }

// LoginTimeout bounds NewClient: its wait for the server's ServerKey frame
// and its write of the ClientInfo (which a server that does not read, over
// a transport with no buffer, would hold forever). In FastStart's dials it
// also bounds the TLS handshake with the server, the wait for the server's
// answer to the upgrade request (the 101, which the server sends with its
// ServerKey frame, or the WebSocket 101), and, on the fast path, the wait
// for the server's first bytes when the key is to be confirmed; through a
// Proxy, also the TLS handshake with the proxy and the wait for its answer
// to the CONNECT. Default 10 s; zero or negative means no limit.
func LoginTimeout(d time.Duration) ClientOption {
	return func(o *clientOptions) { o.loginTimeout = d }
}

// defaultLoginTimeout is the default of LoginTimeout.
const defaultLoginTimeout = 10 * time.Second

// allowHTTPPrefix lets the stream start with an HTTP response (a server that
// answered a fast-start request with a 101 anyway): Recv parses and skips it.
func allowHTTPPrefix() ClientOption { return func(o *clientOptions) { o.maybeHTTP = true } }

// DefaultRecvTimeout is the default of RecvTimeout.
const DefaultRecvTimeout = 120 * time.Second

// NewClient logs in to the DERP server at the other end of nc. brw must
// buffer nc (it may already hold bytes read from nc, such as those after an
// HTTP 101 response, and bytes written but not yet flushed, such as a
// fast-start upgrade request, which leave together with the ClientInfo).
//
// Unless ServerPublicKey was given, NewClient first reads the server's
// ServerKey frame. It then writes the sealed ClientInfo and returns without
// waiting for the reply: packets may be sent at once, and the server's
// ServerInfo (which proves it owns its key) is the first message Recv
// returns. NewClient does not close nc when it fails.
func NewClient(priv PrivateKey, nc net.Conn, brw *bufio.ReadWriter, opts ...ClientOption) (*Client, error) {
	o := clientOptions{recvTimeout: DefaultRecvTimeout, loginTimeout: defaultLoginTimeout, sendBound: sendBound, writeBound: writeBound}
	for _, opt := range opts {
		if opt == nil {
			return nil, errors.New("relay: NewClient: nil ClientOption")
		}
		opt(&o)
	}
	if o.meshKeyErr != nil {
		return nil, o.meshKeyErr
	}
	if !ValidAppName(o.appName) {
		return nil, fmt.Errorf("relay: NewClient: AppName %.40q is not up to %d bytes of printable ASCII", o.appName, MaxAppNameLen)
	}
	if priv.IsZero() {
		return nil, errors.New("relay: NewClient: zero private key")
	}
	if brw == nil {
		brw = bufio.NewReadWriter(bufio.NewReader(nc), bufio.NewWriter(nc))
	}
	c := &Client{
		priv:      priv,
		pub:       priv.Public(),
		nc:        nc,
		br:        brw.Reader,
		bw:        brw.Writer,
		opts:      o,
		maybeHTTP: o.maybeHTTP,
		serverKey: o.serverKey,
	}
	var by time.Time // the login's deadline; zero if none
	if o.loginTimeout > 0 {
		by = time.Now().Add(o.loginTimeout)
	}
	if c.serverKey.IsZero() {
		if err := c.recvServerKey(by); err != nil {
			return nil, fmt.Errorf("relay: login: receive server key: %w", err)
		}
	}
	box, err := sharedKey(priv, c.serverKey)
	if err != nil {
		return nil, fmt.Errorf("relay: login: server key %s: %w", c.serverKey.ShortString(), err)
	}
	c.box = box
	if err := c.sendClientInfo(by); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil, fmt.Errorf("relay: login: send client info: not written within LoginTimeout %v (the server is not reading): %w", o.loginTimeout, err)
		}
		return nil, fmt.Errorf("relay: login: send client info: %w", err)
	}
	return c, nil
}

func (c *Client) recvServerKey(by time.Time) error {
	if !by.IsZero() {
		c.setReadDeadline(by)
		defer c.setReadDeadline(time.Time{})
	}
	t, n, err := readFrameHeader(c.br)
	if err != nil {
		return err
	}
	if t != FrameServerKey {
		return protoErr("unexpected_frame", t, "want ServerKey first")
	}
	if n > maxServerKeyLen {
		return protoErr("frame_too_large", t, fmt.Sprintf("%d bytes, limit %d", n, maxServerKeyLen))
	}
	var buf [maxServerKeyLen]byte
	if _, err := io.ReadFull(c.br, buf[:n]); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF // the server hung up inside the frame
		}
		return err
	}
	k, err := parseServerKey(buf[:n])
	if err != nil {
		return err
	}
	c.serverKey = k
	c.sawFirst = true
	c.maybeHTTP = false
	return nil
}

func (c *Client) sendClientInfo(by time.Time) error {
	info := clientInfoJSON{
		Version:     ProtocolVersion,
		CanAckPings: c.opts.canAckPings,
		IsProber:    c.opts.isProber,
		AppName:     c.opts.appName,
	}
	if c.opts.hasMeshKey {
		info.MeshKey = meshKeyJSON(c.opts.meshKey)
	}
	msg, err := json.Marshal(info)
	if err != nil {
		return err
	}
	payload := make([]byte, 0, KeyLen+nonceLen+boxOverhead+len(msg))
	payload = append(payload, c.pub[:]...)
	payload = sealBox(payload, c.box, msg)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if !by.IsZero() {
		c.setWriteDeadline(by)
		defer c.setWriteDeadline(time.Time{})
	}
	if err := writeFrame(c.bw, FrameClientInfo, payload); err != nil {
		return err
	}
	return c.bw.Flush()
}

// PublicKey returns the client's own public key.
func (c *Client) PublicKey() PublicKey { return c.pub }

// ServerPublicKey returns the server's DERP key, as received in the ServerKey
// frame or as given with the ServerPublicKey option.
func (c *Client) ServerPublicKey() PublicKey { return c.serverKey }

// LocalAddr returns the local address of the underlying connection.
func (c *Client) LocalAddr() net.Addr { return c.nc.LocalAddr() }

// Send sends pkt to the peer whose public key is dst. Packets larger than
// MaxPacketSize are refused with ErrPacketTooLarge, except after Close or
// a failed write, which every later write reports instead (see Close). If
// the server announced a rate limit and pkt does not fit in it right now,
// the packet is not sent and the error wraps ErrRateLimited; the connection
// stays usable.
//
// A packet the connection cannot take within 10 seconds (a server that
// stopped reading, a connection that stalled) fails the Send, and the
// Client with it. To keep Send cheap that bound is a write deadline
// renewed only once it is less than 5 seconds away, so such a Send may
// fail after 5 seconds already.
func (c *Client) Send(dst PublicKey, pkt []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil {
		return c.werr
	}
	if c.closed.Load() {
		// ErrClosed, not ErrPacketTooLarge or ErrRateLimited below: the
		// Client is not usable.
		return c.writeFailed(net.ErrClosed)
	}
	if c.givenUp.Load() {
		return c.writeFailed(errGivenUp)
	}
	if len(pkt) > MaxPacketSize {
		return ErrPacketTooLarge
	}
	now := time.Now()
	if c.limiter != nil && !c.limiter.allow(frameHeaderLen+KeyLen+len(pkt), now) {
		return ErrRateLimited
	}
	if c.sendBy.Sub(now) < c.opts.sendBound/2 {
		c.sendBy = now.Add(c.opts.sendBound)
		c.setWriteDeadline(c.sendBy)
	}
	c.dst = dst
	if err := writePacketFrame(c.bw, FrameSendPacket, &c.dst, pkt); err != nil {
		return c.writeFailed(err)
	}
	return c.flushLocked()
}

// ForwardPacket sends pkt to dst as if it came from src. Only mesh peers may
// send it; the server disconnects anyone else. Packets larger than
// MaxPacketSize are refused as by Send. The write, with any wait for
// another write on the Client to finish, must be done within 5 seconds or
// it fails (and so does a write it waited for past that), and every later
// write on the Client fails too (Close it and connect again), so that one
// stuck mesh link cannot hold its caller forever.
func (c *Client) ForwardPacket(src, dst PublicKey, pkt []byte) error {
	if len(pkt) > MaxPacketSize {
		// The Client's state first, as for Send: a write on a closed or
		// failed Client returns that whatever its packet.
		if err := c.forwardBatch(0, nil); err != nil {
			return err
		}
		return ErrPacketTooLarge
	}
	return c.forwardBatch(1, func(int) (*PublicKey, *PublicKey, []byte) { return &src, &dst, pkt })
}

// forwardBatch writes n ForwardPacket frames, item(i) giving each one's
// source, destination and packet, with one flush under one 5-second write
// deadline, which bounds the wait for the write lock too (a mesh link
// forwards whole bursts this way). Packets larger than
// MaxPacketSize are skipped. On error the connection is unusable and it is
// unknown how many frames arrived.
func (c *Client) forwardBatch(n int, item func(i int) (src, dst *PublicKey, pkt []byte)) error {
	err := c.lockWithin(time.Now().Add(c.opts.writeBound))
	defer c.wmu.Unlock()
	if err != nil {
		return err
	}
	defer c.clearWriteDeadline()
	for i := range n {
		src, dst, pkt := item(i)
		if len(pkt) > MaxPacketSize {
			continue
		}
		if err := writeFrameHeader(c.bw, FrameForwardPacket, uint32(2*KeyLen+len(pkt))); err != nil {
			return c.writeFailed(err)
		}
		c.bw.Write(src[:])
		c.bw.Write(dst[:])
		if _, err := c.bw.Write(pkt); err != nil {
			return c.writeFailed(err)
		}
	}
	return c.flushLocked()
}

// NotePreferred tells the server whether it is this client's home (preferred)
// server. It only affects the server's statistics. Like every control
// frame, it must be written within 5 seconds (see Client).
func (c *Client) NotePreferred(preferred bool) error {
	var b [1]byte
	if preferred {
		b[0] = 1
	}
	return c.writeFrame(FrameNotePreferred, b[:])
}

// SendPing sends a Ping; the server answers with a Pong carrying data,
// unless a Pong for an earlier Ping is still queued (servers keep one, as
// Tailscale's does), in which case this Ping goes unanswered. The write is
// bounded as NotePreferred's is.
func (c *Client) SendPing(data [8]byte) error { return c.writeFrame(FramePing, data[:]) }

// SendPong answers a Ping from the server. The write is bounded as
// NotePreferred's is.
func (c *Client) SendPong(data [8]byte) error { return c.writeFrame(FramePong, data[:]) }

// WatchConnectionChanges asks the server to send a PeerPresent for every
// connected client and then PeerPresent and PeerGone as clients come and go.
// Only mesh peers may send it. From then on a PeerGone (Disconnected) from
// this package's Server always means "left that server": it does not tell
// the watching session, as it tells other clients, that a peer it sent
// packets to or received packets from left the region (Tailscale's servers
// may). The write is bounded as NotePreferred's is.
func (c *Client) WatchConnectionChanges() error { return c.writeFrame(FrameWatchConns, nil) }

// ClosePeer asks the server to close every connection of key. Only mesh
// peers may send it. The write is bounded as NotePreferred's is.
func (c *Client) ClosePeer(key PublicKey) error { return c.writeFrame(FrameClosePeer, key[:]) }

func (c *Client) writeFrame(t FrameType, payload []byte) error {
	return c.writeFrameWithin(c.opts.writeBound, t, payload)
}

// sendBound bounds a Send: see Send.
const sendBound = 10 * time.Second

// clearWriteDeadline ends the write deadline of a write that set its own,
// Send's too (which the next Send sets again).
func (c *Client) clearWriteDeadline() {
	c.sendBy = time.Time{}
	c.setWriteDeadline(time.Time{})
}

// writeBound bounds a write on a Client with no bound of its own, the wait
// for another write to release the Client included: a server that stops
// reading (or a transport that stalls) then fails the write, leaving the
// Client unusable, instead of holding the caller, and every caller queued
// behind it, forever.
const writeBound = 5 * time.Second

// writeFrameWithin writes one frame under a write deadline d from now,
// which bounds the wait for the write lock too (see lockBy).
func (c *Client) writeFrameWithin(d time.Duration, t FrameType, payload []byte) error {
	err := c.lockWithin(time.Now().Add(d))
	defer c.wmu.Unlock()
	if err != nil {
		return err
	}
	defer c.clearWriteDeadline()
	if err := writeFrame(c.bw, t, payload); err != nil {
		return c.writeFailed(err)
	}
	return c.flushLocked()
}

// lockWithin takes the write lock for a write that must be done by
// deadline, the wait for the lock included (lockBy), and sets that write
// deadline. It returns with the lock held; after an error the write must
// not start: the Client failed already, or the bound passed while waiting
// (the stream is then given up, as the timer may yet set its deadline).
func (c *Client) lockWithin(deadline time.Time) error {
	expired := c.lockBy(deadline)
	switch {
	case c.werr != nil:
		return c.werr
	case c.closed.Load():
		return c.writeFailed(net.ErrClosed)
	case expired:
		return c.writeFailed(os.ErrDeadlineExceeded)
	case c.givenUp.Load():
		return c.writeFailed(errGivenUp)
	}
	c.setWriteDeadline(deadline)
	return nil
}

// lockBy takes the write lock, waiting for it at most until deadline.
// Another write may hold the Client, perhaps one with no bound of its own
// (a Send to a server that stopped reading): past the deadline that write
// is made to fail, which makes its error sticky and frees the lock, and
// the stream is given up (givenUp): every write that takes the lock before
// this one fails at once too, instead of setting a deadline of its own and
// holding the lock up to its own bound. It returns with the lock held, and
// reports whether the deadline passed as the lock came free: the timer may
// then yet set its past deadline, so the caller must give the stream up
// (unless it failed already).
func (c *Client) lockBy(deadline time.Time) (expired bool) {
	if c.wmu.TryLock() {
		return false
	}
	t := time.AfterFunc(time.Until(deadline), func() {
		c.givenUp.Store(true) // before the deadline: see setWriteDeadline
		c.nc.SetWriteDeadline(pastDeadline)
	})
	if c.opts.lockByWait != nil {
		c.opts.lockByWait()
	}
	c.wmu.Lock()
	return !t.Stop()
}

// errGivenUp fails the writes on a Client after another write waited for
// it past its bound (lockBy).
var errGivenUp = fmt.Errorf("another write on the Client waited for it past its bound: %w", os.ErrDeadlineExceeded)

func (c *Client) flushLocked() error {
	if err := c.bw.Flush(); err != nil {
		return c.writeFailed(err)
	}
	return nil
}

// writeFailed makes a write error sticky: a partly written frame leaves the
// stream unusable.
func (c *Client) writeFailed(err error) error {
	switch {
	case c.closed.Load():
		err = ErrClosed
	case errors.Is(err, os.ErrDeadlineExceeded):
		err = fmt.Errorf("relay: write: not done in time (the server is not reading, or the connection stalled): %w", err)
	default:
		err = fmt.Errorf("relay: write: %w", err)
	}
	c.werr = err
	return err
}

// Close closes the connection. Blocked Send and Recv calls return, and
// later calls return ErrClosed (Recv too, whatever it had buffered), except
// that a side that had already failed keeps returning its error: a Recv
// after a read error, a write after a failed write. It closes
// the socket under a TLS or WebSocket layer of this package at once, with no
// close_notify or close frame first: those would wait (up to 5 s and 1 s)
// for room in a socket that a server which stopped reading has filled. The
// server reads EOF either way.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.closed.Store(true)
		c.closeResult = closeSocket(c.nc)
	})
	return c.closeResult
}

// Recv returns the next message from the server. A *ReceivedPacket and its
// Data are valid only until the next call to Recv. Frames of unknown types,
// known frames too short to parse (except ServerInfo, whose malformed form
// is an error), and ServerKey frames are skipped; the exception is the
// server's first frame in fast start (see ServerPublicKey), a ServerKey
// frame that Recv checks: a malformed one is an error, and one with another
// key is ErrServerKeyMismatch. More than 4 MiB of frames skipped in a row
// (headers included) is an error, a *ProtocolError whose Reason is
// "skipped_frames_flood". Any error is permanent.
func (c *Client) Recv() (Message, error) {
	if c.rerr != nil {
		return nil, c.rerr
	}
	if c.closed.Load() {
		// Not the frames still buffered: after Close, ErrClosed.
		c.rerr = ErrClosed
		return nil, c.rerr
	}
	m, err := c.recv()
	if err != nil {
		if c.closed.Load() {
			err = ErrClosed
		}
		c.rerr = err
		c.releasePayload()
	}
	return m, err
}

func (c *Client) recv() (Message, error) {
	skipped := 0 // bytes of the frames skipped in a row, headers included
	for {
		if c.discard > 0 {
			c.br.Discard(c.discard)
			c.discard = 0
		}
		c.releasePayload()
		if c.opts.recvTimeout > 0 {
			c.setReadDeadline(time.Now().Add(c.opts.recvTimeout))
		}
		if c.maybeHTTP {
			c.maybeHTTP = false
			if err := c.skipHTTPResponse(); err != nil {
				return nil, err
			}
		}
		t, n, err := readFrameHeader(c.br)
		if err != nil {
			return nil, c.readErr(err)
		}
		if n > maxClientFrame {
			return nil, protoErr("frame_too_large", t, fmt.Sprintf("%d bytes, limit %d", n, maxClientFrame))
		}
		p, err := c.readPayload(t, int(n))
		if err != nil {
			return nil, c.readErr(err)
		}
		first := !c.sawFirst
		c.sawFirst = true
		m, err := c.parse(t, p, first)
		if err == nil && m != nil {
			return m, nil
		}
		if err != nil && err != errSkip {
			return nil, err
		}
		// Skipped. Each frame re-arms RecvTimeout: a server that sent
		// nothing else would hold Recv for good.
		if skipped += frameHeaderLen + int(n); skipped > maxSkippedBytes {
			return nil, protoErr("skipped_frames_flood", t,
				fmt.Sprintf("more than %d bytes of frames skipped (unknown types, too short, later ServerKeys) with no message between", maxSkippedBytes))
		}
	}
}

// maxSkippedBytes bounds the frames, headers included, that one Recv
// skips in a row: a server sends a KeepAlive at least a minute apart, and
// never megabytes of frames a client may not know between two messages.
const maxSkippedBytes = 4 << 20

func (c *Client) readErr(err error) error {
	if errors.Is(err, io.EOF) && !c.gotInfo {
		return fmt.Errorf("relay: server closed the connection before ServerInfo (login refused, wrong server key, or not a DERP server): %w", err)
	}
	return fmt.Errorf("relay: read: %w", err)
}

// readPayload returns the payload of the frame of type t whose header was
// just read, n bytes. If they fit in br's buffer they are returned in place
// and discarded on the next call. Otherwise only the bytes parse reads
// are kept (all of a packet's or a ServerInfo's, a Health's up to just
// past maxHealthLen, none of an unknown frame's) and the rest are
// discarded now; those of more than c.head's size are copied into a
// buffer lent until the next call (releasePayload), so that a client
// keeps no large buffer after a large packet.
func (c *Client) readPayload(t FrameType, n int) ([]byte, error) {
	if n <= c.br.Size() {
		p, err := c.br.Peek(n)
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		c.discard = n
		return p, nil
	}
	var p []byte
	switch keep := min(payloadKept(t), n); {
	case keep <= len(c.head):
		p = c.head[:keep]
	case keep <= len(bigPayload{}):
		c.big = bigPayloads.Get().(*bigPayload)
		p = c.big[:keep]
	default:
		// Only a server that sends more than a packet's worth in one
		// frame (up to maxClientFrame) gets here: the buffer is its
		// own, and dropped at the next call.
		c.buf = make([]byte, keep)
		p = c.buf
	}
	_, err := io.ReadFull(c.br, p)
	if err == nil && len(p) < n {
		_, err = c.br.Discard(n - len(p))
	}
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return p, err
}

// payloadKept returns how many bytes at most of a frame of type t's
// payload Recv reads (it ignores the rest): all of it for the frames it
// returns whole.
func payloadKept(t FrameType) int {
	switch t {
	case FrameRecvPacket, FrameServerInfo:
		return maxClientFrame
	case FrameHealth:
		return maxHealthLen + 1 // one more: parse tells a cut text
	case FrameServerKey:
		return serverKeyLen
	case FramePeerGone:
		return peerGoneLen
	case FramePeerPresent:
		return maxPeerPresentLen
	case FramePing, FramePong:
		return minPingLen
	case FrameRestarting:
		return restartingLen
	}
	return 0 // KeepAlive, or unknown: nothing
}

// maxHealthLen bounds the text of a Health that Recv returns: a frame may
// carry 1 MiB, for people to read. It fits a bigPayload.
const maxHealthLen = 64 << 10

// maxPeerPresentLen is the longest PeerPresent payload that parse reads
// all of: the flags, then a length byte and an app name.
const maxPeerPresentLen = peerPresentLen + 1 + 255

// bigPayload holds a payload too large for a Client's read buffer: up to a
// maximal packet with its source key.
type bigPayload [KeyLen + MaxPacketSize]byte

// bigPayloads lends bigPayload buffers to Clients, each from a Recv that
// needs one to the next Recv: few Clients receive large packets at any
// one time, and none holds 64 KiB for good after one did, while a stream
// of large packets allocates nothing.
var bigPayloads = sync.Pool{New: func() any { return new(bigPayload) }}

// releasePayload gives back the buffers of the last payload that did not
// fit br's buffer, which the message Recv returned last may hold.
func (c *Client) releasePayload() {
	if c.big == nil && c.buf == nil {
		return
	}
	c.pkt.Data = nil
	if c.big != nil {
		bigPayloads.Put(c.big)
		c.big = nil
	}
	c.buf = nil
}

func (c *Client) parse(t FrameType, p []byte, first bool) (Message, error) {
	switch t {
	case FrameServerKey:
		// In fast start the server's ServerKey frame arrives after we
		// already sent ClientInfo sealed to the key we assumed: check it,
		// so a wrong key is reported as such rather than as a box failure.
		// A later one is skipped unread, as Tailscale's client skips it.
		if !first {
			return nil, nil
		}
		k, err := parseServerKey(p)
		if err != nil {
			return nil, err
		}
		if k != c.serverKey {
			return nil, fmt.Errorf("%w: expected %s, server sent %s", ErrServerKeyMismatch, c.serverKey, k)
		}
		return nil, nil
	case FrameServerInfo:
		return c.parseServerInfo(p)
	case FrameRecvPacket:
		if err := parseRecvPacket(&c.pkt, p); err != nil {
			return nil, err
		}
		return &c.pkt, nil
	case FrameKeepAlive:
		return KeepAlive{}, nil
	case FramePeerGone:
		return parsePeerGone(p)
	case FramePeerPresent:
		return parsePeerPresent(p)
	case FramePing:
		b, err := parsePing8(p)
		return Ping(b), err
	case FramePong:
		b, err := parsePing8(p)
		return Pong(b), err
	case FrameHealth:
		if len(p) > maxHealthLen { // cut: see payloadKept
			return Health{Problem: cutHealth(p[:maxHealthLen])}, nil
		}
		return Health{Problem: string(p)}, nil
	case FrameRestarting:
		return parseRestarting(p)
	}
	return nil, nil // unknown frame type: skip
}

// cutHealth returns the start of a Health text cut at maxHealthLen, b,
// less a character the cut split, marked "…", in one allocation.
func cutHealth(b []byte) string {
	if i := lastRuneStart(b); !utf8.FullRune(b[i:]) {
		b = b[:i]
	}
	var sb strings.Builder
	sb.Grow(len(b) + len("…"))
	sb.Write(b)
	sb.WriteString("…")
	return sb.String()
}

// lastRuneStart returns where the last character of b starts, looking
// back at most utf8.UTFMax bytes.
func lastRuneStart(b []byte) int {
	i := len(b) - 1
	for i > 0 && i > len(b)-utf8.UTFMax && !utf8.RuneStart(b[i]) {
		i--
	}
	return max(i, 0)
}

func (c *Client) parseServerInfo(p []byte) (Message, error) {
	if len(p) < nonceLen {
		return nil, protoErr("short_server_info", FrameServerInfo, fmt.Sprintf("%d bytes", len(p)))
	}
	if len(p)-nonceLen > maxInfoLen {
		return nil, protoErr("server_info_too_large", FrameServerInfo, fmt.Sprintf("%d bytes", len(p)))
	}
	msg, ok := openBox(nil, c.box, p)
	if !ok {
		return nil, &ProtocolError{Reason: "bad_server_info_box", Frame: FrameServerInfo,
			Detail: "box does not open: the server does not own key " + c.serverKey.String(), Err: ErrServerKeyMismatch}
	}
	var info serverInfoJSON
	if err := json.Unmarshal(msg, &info); err != nil {
		return nil, &ProtocolError{Reason: "bad_server_info_json", Frame: FrameServerInfo, Err: err}
	}
	c.gotInfo = true
	c.wmu.Lock()
	c.limiter = newTokenBucket(info.TokenBucketBytesPerSecond, info.TokenBucketBytesBurst, time.Now())
	c.wmu.Unlock()
	return ServerInfo(info), nil
}

// skipHTTPResponse reads and checks an HTTP response at the start of the
// stream if there is one: a server that answers a fast-start request with a
// 101 anyway (an old server, or a proxy in between) still works.
func (c *Client) skipHTTPResponse() error {
	var resp *http.Response
	for i := 0; ; i++ {
		b, err := c.br.Peek(5)
		if err != nil || !bytes.Equal(b, []byte("HTTP/")) {
			return nil // not HTTP; the frame reader reports any error
		}
		if err := checkHeaderSize(c.br); err != nil {
			return fmt.Errorf("relay: reading unexpected HTTP response to fast start: %w", err)
		}
		if resp, err = http.ReadResponse(c.br, nil); err != nil {
			return fmt.Errorf("relay: reading unexpected HTTP response to fast start: %w", err)
		}
		if !isInterim(resp.StatusCode) {
			break
		}
		// Interim responses (see readResponse) may precede a 101, or
		// the DERP stream itself if something in between passes fast
		// start through: the loop skips them either way.
		if i == maxInterimResponses {
			return fmt.Errorf("relay: reading unexpected HTTP response to fast start: more than %d interim responses (the last %q)", maxInterimResponses, resp.Status)
		}
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return fmt.Errorf("%w with %w", errFastStartAnswered, newHTTPError(resp))
	}
	if h := resp.Header.Get(PublicKeyHeader); h != "" {
		if k, err := ParsePublicKey(h); err == nil && k != c.serverKey {
			return fmt.Errorf("%w: expected %s, server sent %s", ErrServerKeyMismatch, c.serverKey, k)
		}
	}
	return nil
}

// newHTTPError describes an answer other than the 101 a dial waited for,
// with the start of its body and, for a redirect, where to: redirects are
// not followed, and the body of one often does not say. Its Error quotes
// both, so that a server cannot put line breaks into whatever logs it.
func newHTTPError(resp *http.Response) *HTTPError {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	e := &HTTPError{StatusCode: resp.StatusCode, Status: resp.Status, Body: string(bytes.TrimSpace(body))}
	if loc := resp.Header.Get("Location"); loc != "" && resp.StatusCode/100 == 3 {
		e.Location = clip(loc, 256)
	}
	return e
}

// errFastStartAnswered means the fast-start request got an HTTP answer
// other than 101: the server refused it, or something between (a reverse
// proxy) does not pass fast start through.
var errFastStartAnswered = errors.New("relay: server answered fast start")

// tokenBucket is the client's copy of the server's announced receive limit.
type tokenBucket struct {
	rate   float64 // bytes per second
	burst  float64
	tokens float64
	last   time.Time
}

// newTokenBucket returns nil (no limit) for a zero rate. A burst smaller than
// one maximal frame would drop every large packet forever, so it is raised
// to that.
func newTokenBucket(rate, burst int, now time.Time) *tokenBucket {
	if rate <= 0 {
		return nil
	}
	const minBurst = frameHeaderLen + KeyLen + MaxPacketSize
	if burst < minBurst {
		burst = minBurst
	}
	return &tokenBucket{rate: float64(rate), burst: float64(burst), tokens: float64(burst), last: now}
}

func (b *tokenBucket) refill(now time.Time) {
	if d := now.Sub(b.last); d > 0 {
		b.tokens = min(b.burst, b.tokens+d.Seconds()*b.rate)
	}
	b.last = now
}

func (b *tokenBucket) allow(n int, now time.Time) bool {
	b.refill(now)
	if b.tokens < float64(n) {
		return false
	}
	b.tokens -= float64(n)
	return true
}

// wait returns how long until n tokens are available, taking them now
// (possibly going negative) so that the caller simply sleeps that long.
func (b *tokenBucket) reserve(n int, now time.Time) time.Duration {
	b.refill(now)
	b.tokens -= float64(n)
	if b.tokens >= 0 {
		return 0
	}
	return time.Duration(-b.tokens / b.rate * float64(time.Second))
}

// errHeaderTooLarge means an HTTP response's header did not end within the
// client's read buffer.
var errHeaderTooLarge = errors.New("HTTP response header larger than the read buffer")

// maxInterimResponses bounds the interim (1xx) responses a client skips
// before the response it waits for.
const maxInterimResponses = 8

// readResponse reads the response to req (nil: a GET) at the head of br,
// skipping interim responses (100 Continue, 103 Early Hints: any 1xx but
// 101), which RFC 9110 lets a server or proxy send before any final
// response. Each header must fit in br's buffer (see checkHeaderSize).
func readResponse(br *bufio.Reader, req *http.Request) (*http.Response, error) {
	for i := 0; ; i++ {
		if err := checkHeaderSize(br); err != nil {
			return nil, err
		}
		resp, err := http.ReadResponse(br, req)
		if err != nil {
			return nil, err
		}
		if !isInterim(resp.StatusCode) {
			return resp, nil
		}
		if i == maxInterimResponses {
			return nil, fmt.Errorf("more than %d interim responses (the last %q)", maxInterimResponses, resp.Status)
		}
	}
}

// isInterim reports whether status is that of an interim response: 1xx
// other than 101, which ends the HTTP exchange.
func isInterim(status int) bool {
	return status/100 == 1 && status != http.StatusSwitchingProtocols
}

// checkHeaderSize waits until the HTTP response at the head of br has its
// whole header buffered, so that http.ReadResponse cannot be made to buffer
// without limit by a hostile server: the header must fit in br's buffer.
// The header ends at the first empty line; lines end in CRLF or, as
// http.ReadResponse also accepts, a bare LF. A peer that hangs up before
// the empty line is io.ErrUnexpectedEOF (io.EOF if it sent nothing).
func checkHeaderSize(br *bufio.Reader) error {
	for {
		b, _ := br.Peek(br.Buffered()) // everything buffered so far
		if bytes.Contains(b, []byte("\n\r\n")) || bytes.Contains(b, []byte("\n\n")) {
			return nil
		}
		if _, err := br.Peek(br.Buffered() + 1); err == bufio.ErrBufferFull {
			return errHeaderTooLarge
		} else if err != nil {
			if err == io.EOF && br.Buffered() > 0 {
				err = io.ErrUnexpectedEOF // the peer hung up inside the header
			}
			return err
		}
	}
}
