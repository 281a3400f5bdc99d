package relay

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// DERP over WebSocket (RFC 6455) is for clients that can open nothing else,
// such as browsers: the DERP byte stream travels in the payloads of binary
// messages, cut anywhere, under the subprotocol "derp". Tailscale's servers
// accept it (derpserver.AddWebSocketSupport) and its js/wasm client speaks
// it. There is no fast start: a WebSocket client waits for the 101.

// WebSocketProtocol is the WebSocket subprotocol that carries DERP.
const WebSocketProtocol = "derp"

const (
	wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11" // RFC 6455, section 1.3

	wsContinuation = 0x0
	wsText         = 0x1
	wsBinary       = 0x2
	wsClose        = 0x8
	wsPing         = 0x9
	wsPong         = 0xa

	wsMaxControl = 125 // payload bound of control frames

	// Close codes (RFC 6455, section 7.4.1).
	wsCloseNormal        = 1000
	wsCloseProtocolError = 1002
	wsCloseUnsupported   = 1003
	wsCloseInvalidData   = 1007
	wsClosePolicy        = 1008

	// wsMaxFrame bounds the payload of a message this side writes: larger
	// writes are cut into several messages. (The DERP stream may be cut
	// anywhere, and coder/websocket, which Tailscale uses at both ends,
	// refuses messages over 32 KiB by default.)
	wsMaxFrame = 32 << 10
	// wsMaxHeader is the longest frame header: 2 bytes, a 64-bit length
	// and a mask.
	wsMaxHeader = 14
	// wsCloseWait bounds how long Close waits to send its close frame.
	wsCloseWait = time.Second
	// wsPongsPerSecond bounds the pings answered: the server's rate
	// limit paces the pings read, not the pongs written, and RFC 6455
	// allows answering only some pings.
	wsPongsPerSecond = 10
	// wsMaxLoginFraming bounds the framing (frame headers, control
	// frames) a server reads before its session starts, when no rate
	// limit paces it: as much as the ClientInfo itself may be, and a
	// thousand times what a client needs to send one.
	wsMaxLoginFraming = 16 << 10
	// wsMaxFraming bounds the framing (frame headers, control frames,
	// empty frames) a client reads that DERP bytes have not paid for,
	// within wsFramingWindow: a flood of frames that carry none would
	// otherwise keep a Recv reading them until its RecvTimeout, or
	// forever. It is a rate, so that an idle session under a proxy that
	// pings now and then never reaches it; a server that floods gets 16
	// KiB a second. Each DERP byte pays for wsFramingCredit bytes of
	// framing, so that a server cannot reset the count with one byte
	// now and then and have 16 KiB of framing read per DERP byte (64 GiB
	// through the frames one Recv may skip), while a proxy that pings
	// before every 5-byte KeepAlive is still paid for.
	wsMaxFraming    = 16 << 10
	wsFramingWindow = time.Second
	wsFramingCredit = 64
	// wsPaceBytes is how many bytes of framing a server session's reader
	// reads before it pays for them (wsConn.pace).
	wsPaceBytes = 256
)

// isWebSocketDERP reports whether r asks for DERP over WebSocket: an
// Upgrade: websocket request offering the derp subprotocol. (Old Tailscale
// clients sent "Upgrade: WebSocket" and then spoke DERP directly; they
// offer no subprotocol.)
func isWebSocketDERP(r *http.Request) bool {
	return strings.EqualFold(r.Header.Get("Upgrade"), "websocket") &&
		hasToken(r.Header.Values("Sec-WebSocket-Protocol"), WebSocketProtocol)
}

// hasToken reports whether a comma-separated header list holds tok
// (case-insensitively).
func hasToken(values []string, tok string) bool {
	for _, v := range values {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), tok) {
				return true
			}
		}
	}
	return false
}

// wsAcceptKey is the Sec-WebSocket-Accept value for a Sec-WebSocket-Key.
func wsAcceptKey(key string) string {
	h := sha1.Sum([]byte(key + wsGUID))
	return base64.StdEncoding.EncodeToString(h[:])
}

// validWSKey reports whether key is the base64 of 16 bytes.
func validWSKey(key string) bool {
	b, err := base64.StdEncoding.DecodeString(key)
	return err == nil && len(b) == 16
}

// serveWebSocket completes a WebSocket handshake for DERP and starts the
// session over it. Any origin is allowed: DERP authenticates by key, not
// by cookie.
func (s *Server) serveWebSocket(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Sec-WebSocket-Version") != "13" {
		s.stats.countRejected("websocket_version")
		w.Header().Set("Sec-WebSocket-Version", "13")
		http.Error(w, "WebSocket version 13 required", http.StatusUpgradeRequired)
		return
	}
	key := r.Header.Get("Sec-WebSocket-Key")
	if r.Method != http.MethodGet || !hasToken(r.Header.Values("Connection"), "upgrade") || !validWSKey(key) {
		s.stats.countRejected("websocket_handshake")
		http.Error(w, "bad WebSocket handshake (want GET with Connection: Upgrade and a 16-byte Sec-WebSocket-Key)", http.StatusBadRequest)
		return
	}
	nc, brw, ok := s.hijack(w, r)
	if !ok {
		return
	}
	s.stats.webSockets.Add(1) // before the 101, which a test may act on at once
	fmt.Fprintf(brw.Writer, "HTTP/1.1 101 Switching Protocols\r\n"+
		"Upgrade: websocket\r\n"+
		"Connection: Upgrade\r\n"+
		"Sec-WebSocket-Accept: %s\r\n"+
		"Sec-WebSocket-Protocol: %s\r\n\r\n", wsAcceptKey(key), WebSocketProtocol)
	// The 101 goes out at the start of the login, under its deadline
	// and where Close can cut it: a client that does not read it holds
	// a connection slot meanwhile.
	wc := newWSConn(nc, brw.Reader, false)
	ctx := context.WithoutCancel(r.Context())
	ao := acceptOpts{notIdeal: r.Header.Get(IdealNodeHeader) != "", detached: true, admitted: true, upgrade: brw.Writer}
	go s.accept(ctx, wc, nil, r.RemoteAddr, ao)
}

// wsConn is a net.Conn whose bytes travel in WebSocket binary messages
// over another connection. Reads return the payloads of binary messages
// in order, whatever their sizes, answer pings and end with io.EOF at a
// close frame (a client's, at one with a status other than a normal
// closure or with a reason, with a *wsClosedError naming them, which
// wraps io.EOF); a text message or a malformed frame ends them with a
// *ProtocolError, after a close frame that says why, and so does, for a
// client, more than wsMaxFraming of framing within wsFramingWindow that
// payload bytes (wsFramingCredit bytes of framing each) have not paid for.
// Writes send messages of at most 32 KiB.
type wsConn struct {
	net.Conn                // the connection under the WebSocket
	br        *bufio.Reader // reads of Conn; may hold bytes already; nil while released
	pooledBuf bool          // br came from wsReadBufs
	client    bool          // this side masks its frames and expects unmasked ones
	// held is what br still held when it was released (the start of a
	// frame); the next br reads it before Conn.
	held []byte

	// Read state, owned by the reader.
	remain  uint64 // payload bytes left in the current data frame
	mask    [4]byte
	maskOff int  // position of the next payload byte in the mask
	masked  bool // the current data frame is masked
	inMsg   bool // a fragmented binary message is open
	rerr    error
	pongs   int       // pings that may still be answered before pongsAt+1s
	pongsAt time.Time // start of the current second of pongs

	wmu       sync.Mutex
	closeSent bool
	// werr is set when a pong's write failed: it may have left the
	// stream inside the pong's frame, and over a plain connection, which
	// a failed write does not break (TLS breaks for good), the next
	// frame would follow the cut one, so every later write fails.
	werr error

	// The pong due for the latest ping, sent by unlockWrite.
	pongMu  sync.Mutex
	pong    [wsMaxControl]byte
	pongLen int
	pongDue atomic.Bool
	// onPong, if set (a server session, by its reader), is called when a
	// pong falls due: the session's writer sends it, under the write
	// deadline it sets for each batch. Before that (the login) the
	// server's reader sends it if no write is under way; a client's pongs
	// are sent by a goroutine, and pongWriter says one is on its way.
	onPong     func()
	pongWriter atomic.Bool

	// pace, if set (a server session, by its reader), is called by the
	// reader with the bytes of framing (frame headers, control frames)
	// read since its last call, at least wsPaceBytes of them: the session
	// makes the client pay for them under its rate limit, which counts
	// DERP bytes, and may wait. framing counts them meanwhile.
	pace    func(n int) error
	framing int
	// framingAt is when a client's framing count started (see charge).
	framingAt time.Time

	// The write deadline our user set, which the client's pong writer
	// puts back after its own: a deadline the user left set after its
	// last write may have passed since, and a write that fails on it
	// breaks a TLS connection for good.
	dlMu   sync.Mutex
	userWD time.Time
}

// SetWriteDeadline sets the write deadline of the connection below.
func (c *wsConn) SetWriteDeadline(t time.Time) error {
	c.dlMu.Lock()
	defer c.dlMu.Unlock()
	c.userWD = t
	return c.Conn.SetWriteDeadline(t)
}

// SetDeadline sets the read and write deadlines of the connection below.
func (c *wsConn) SetDeadline(t time.Time) error {
	c.dlMu.Lock()
	defer c.dlMu.Unlock()
	c.userWD = t
	return c.Conn.SetDeadline(t)
}

// writeOwnPongLocked sends the pong due under a write deadline of its own
// (wsCloseWait), then puts our user's back.
func (c *wsConn) writeOwnPongLocked() {
	c.dlMu.Lock()
	c.Conn.SetWriteDeadline(time.Now().Add(wsCloseWait))
	c.dlMu.Unlock()
	c.writePongLocked()
	c.dlMu.Lock()
	c.Conn.SetWriteDeadline(c.userWD)
	c.dlMu.Unlock()
}

func newWSConn(nc net.Conn, br *bufio.Reader, client bool) *wsConn {
	if br == nil {
		br = bufio.NewReader(nc)
	}
	return &wsConn{Conn: nc, br: br, client: client}
}

// wsReadBufs holds the read buffers of parked server sessions' WebSocket
// connections, which give theirs back (releaseReadBuffer).
var wsReadBufs = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4096) }}

// releaseReadBuffer drops the read buffer, so that an idle connection holds
// none; the next Read takes one from the pool. The bytes it still holds (at
// most an incomplete frame header, or control frame, which the read that
// timed out was waiting to complete) are kept in held meanwhile. Only the
// reader may call it, between reads.
func (c *wsConn) releaseReadBuffer() {
	if c.br == nil {
		return
	}
	if n := c.br.Buffered(); n > 0 {
		if n > wsMaxHeader+wsMaxControl {
			return // not waiting for a frame to complete: keep the buffer
		}
		b, _ := c.br.Peek(n)
		// held is empty unless br never read from Conn, and then it
		// comes after br's bytes.
		c.held = append(append(make([]byte, 0, n+len(c.held)), b...), c.held...)
	}
	if c.pooledBuf {
		c.br.Reset(nil)
		wsReadBufs.Put(c.br)
	}
	c.br, c.pooledBuf = nil, false
}

// wsHeldReader reads c.held, then c.Conn: what a read buffer taken while
// held has bytes reads from.
type wsHeldReader struct{ c *wsConn }

func (r wsHeldReader) Read(p []byte) (int, error) {
	if len(r.c.held) == 0 {
		return r.c.Conn.Read(p)
	}
	n := copy(p, r.c.held)
	if r.c.held = r.c.held[n:]; len(r.c.held) == 0 {
		r.c.held = nil
	}
	return n, nil
}

func (c *wsConn) Read(p []byte) (int, error) {
	if c.br == nil {
		c.br = wsReadBufs.Get().(*bufio.Reader)
		if c.held != nil {
			c.br.Reset(wsHeldReader{c})
		} else {
			c.br.Reset(c.Conn)
		}
		c.pooledBuf = true
	}
	for c.remain == 0 {
		if c.rerr != nil {
			return 0, c.rerr
		}
		if err := c.nextFrame(); err != nil {
			return 0, err
		}
		if len(p) == 0 {
			return 0, nil
		}
	}
	if uint64(len(p)) > c.remain {
		p = p[:c.remain]
	}
	n, err := c.br.Read(p)
	if c.masked {
		c.maskOff = wsMask(p[:n], c.mask, c.maskOff)
	}
	c.remain -= uint64(n)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF // the peer hung up inside a frame
	}
	return n, err
}

// wsFail is a WebSocket protocol violation: the close code to send and
// the error to return.
func (c *wsConn) wsFail(code uint16, reason, detail string) error {
	c.rerr = &ProtocolError{Reason: reason, Detail: "websocket: " + detail}
	c.writeClose(code, detail)
	return c.rerr
}

// nextFrame consumes the next frame header (and whole control frames). A
// frame is consumed only once all of its header (and, for a control frame,
// its payload) has arrived, so a read deadline in the middle loses nothing.
func (c *wsConn) nextFrame() error {
	h, err := c.br.Peek(2)
	if err != nil {
		return c.readErr(err, len(h))
	}
	fin, rsv, op := h[0]&0x80 != 0, h[0]&0x70, h[0]&0x0f
	masked, n := h[1]&0x80 != 0, uint64(h[1]&0x7f)
	hlen := 2
	switch n {
	case 126:
		hlen += 2
	case 127:
		hlen += 8
	}
	if masked {
		hlen += 4
	}
	if h, err = c.br.Peek(hlen); err != nil {
		return c.readErr(err, len(h))
	}
	switch n {
	case 126:
		n = uint64(binary.BigEndian.Uint16(h[2:]))
	case 127:
		n = binary.BigEndian.Uint64(h[2:])
	}
	var mask [4]byte
	if masked {
		copy(mask[:], h[hlen-4:])
	}
	switch {
	case rsv != 0:
		return c.wsFail(wsCloseProtocolError, "websocket_bad_frame", "reserved bits set, but no extension was negotiated")
	case n>>63 != 0:
		return c.wsFail(wsCloseProtocolError, "websocket_bad_frame", "frame length has its top bit set")
	case masked && c.client:
		return c.wsFail(wsCloseProtocolError, "websocket_bad_frame", "masked frame from the server")
	case !masked && !c.client:
		return c.wsFail(wsCloseProtocolError, "websocket_bad_frame", "unmasked frame from the client")
	}
	if op >= wsClose {
		return c.controlFrame(op, fin, n, hlen, mask)
	}
	switch op {
	case wsBinary:
		if c.inMsg {
			return c.wsFail(wsCloseProtocolError, "websocket_bad_frame", "new message before the previous one ended")
		}
	case wsContinuation:
		if !c.inMsg {
			return c.wsFail(wsCloseProtocolError, "websocket_bad_frame", "continuation frame outside a message")
		}
	case wsText:
		return c.wsFail(wsCloseUnsupported, "websocket_text_message", "text message (DERP needs binary messages)")
	default:
		return c.wsFail(wsCloseProtocolError, "websocket_bad_frame", fmt.Sprintf("unknown opcode %#x", op))
	}
	if err := c.charge(hlen, n); err != nil {
		return err
	}
	c.br.Discard(hlen)
	c.inMsg = !fin
	c.remain, c.mask, c.maskOff, c.masked = n, mask, 0, masked
	return nil
}

// controlFrame handles a close, ping or pong frame whose header is hlen
// bytes long and not yet consumed.
func (c *wsConn) controlFrame(op byte, fin bool, n uint64, hlen int, mask [4]byte) error {
	if !fin || n > wsMaxControl {
		return c.wsFail(wsCloseProtocolError, "websocket_bad_frame", "fragmented or oversized control frame")
	}
	b, err := c.br.Peek(hlen + int(n))
	if err != nil {
		return c.readErr(err, len(b))
	}
	if err := c.charge(len(b), 0); err != nil {
		return err
	}
	var payload [wsMaxControl]byte
	p := payload[:copy(payload[:], b[hlen:])]
	c.br.Discard(len(b))
	if !c.client {
		wsMask(p, mask, 0)
	}
	switch op {
	case wsPing:
		if now := time.Now(); now.Sub(c.pongsAt) >= time.Second {
			c.pongs, c.pongsAt = wsPongsPerSecond, now
		}
		if c.pongs == 0 {
			return nil
		}
		c.pongs--
		// Once a session runs, the reader does not write: a peer that
		// does not read would stall our reading too, and a write
		// deadline left over from the last write could fail the pong
		// halfway, which under TLS breaks the connection for good. The
		// pong is left to whoever holds wmu next, which sends it before
		// letting go.
		c.pongMu.Lock()
		c.pongLen = copy(c.pong[:], p)
		c.pongMu.Unlock()
		c.pongDue.Store(true)
		switch {
		case c.onPong != nil:
			c.onPong()
		case !c.client:
			// A server connection before its session starts: the
			// login's deadline bounds the write, and the pong goes out
			// before a close frame the reader may echo next.
			if c.wmu.TryLock() {
				c.unlockWrite()
			}
		case c.pongWriter.CompareAndSwap(false, true):
			go func() {
				c.wmu.Lock()
				c.pongWriter.Store(false)
				if !c.closeSent {
					c.writeOwnPongLocked()
				}
				c.unlockWrite()
			}()
		}
		return nil
	case wsPong:
		return nil
	case wsClose:
		code := uint16(wsCloseNormal)
		switch {
		case len(p) == 1:
			return c.wsFail(wsCloseProtocolError, "websocket_bad_frame", "close frame with a 1-byte payload")
		case len(p) >= 2:
			code = binary.BigEndian.Uint16(p)
			if !wsValidCloseCode(code) {
				// Echoing it would send a code no endpoint may send
				// (1005, 1006 and 1015 mean "none" and "abnormal
				// closure" to the other side's application).
				return c.wsFail(wsCloseProtocolError, "websocket_bad_frame", fmt.Sprintf("close frame with status code %d, which no endpoint may send", code))
			}
			if !utf8.Valid(p[2:]) {
				return c.wsFail(wsCloseInvalidData, "websocket_bad_frame", "close frame whose reason is not UTF-8")
			}
		}
		// Echo the status, as RFC 6455 asks, then end like TCP would.
		c.writeClose(code, "")
		c.rerr = io.EOF
		if c.client && (code != wsCloseNormal || len(p) > 2) {
			// The server said why: the client's error says so too.
			c.rerr = &wsClosedError{code: code, reason: string(p[2:])}
		}
		return c.rerr
	}
	return c.wsFail(wsCloseProtocolError, "websocket_bad_frame", fmt.Sprintf("unknown control opcode %#x", op))
}

// charge counts n bytes of framing about to be consumed, and has them paid
// for (pace) once they add up to wsPaceBytes. Framing carries no DERP
// byte: without it, a flood of pings or of empty frames would be read at
// any speed under any rate limit. payload is the DERP bytes the frame
// carries (a client's framing is charged only for frames without). An
// error (the session ended while it waited) ends the reads.
func (c *wsConn) charge(n int, payload uint64) error {
	if c.client {
		// A client's reads, which the server's writes pace: DERP bytes
		// are the application's to take, but a flood of frames that
		// carry none would keep one read going without end. Only such
		// frames are counted, less what the DERP bytes between pay
		// (time is read once per run of them, not per packet), and
		// only within a window, so that slow pings between rare DERP
		// frames never reach the bound.
		if payload > 0 {
			if c.framing > 0 {
				paid := min(payload, uint64(c.framing)) * wsFramingCredit
				c.framing -= int(min(paid, uint64(c.framing)))
			}
			return nil
		}
		if c.framing == 0 {
			c.framingAt = time.Now()
		}
		if c.framing += n; c.framing > wsMaxFraming {
			if now := time.Now(); now.Sub(c.framingAt) >= wsFramingWindow {
				c.framing, c.framingAt = n, now
				return nil
			}
			return c.wsFail(wsClosePolicy, "websocket_framing_flood",
				fmt.Sprintf("more than %d bytes of framing (frame headers, control frames) from the server within %v that DERP bytes did not pay for (%d bytes each)", wsMaxFraming, wsFramingWindow, wsFramingCredit))
		}
		return nil
	}
	if c.pace == nil {
		// A server's login, which nothing paces: it reads at most one
		// ClientInfo of DERP bytes, but empty frames and pings, which
		// carry none, would be read until the login timeout.
		if c.framing += n; c.framing > wsMaxLoginFraming {
			return c.wsFail(wsClosePolicy, "websocket_login_framing",
				fmt.Sprintf("more than %d bytes of framing (frame headers, control frames) before the login", wsMaxLoginFraming))
		}
		return nil
	}
	if c.framing += n; c.framing < wsPaceBytes {
		return nil
	}
	n, c.framing = c.framing, 0
	if err := c.pace(n); err != nil {
		c.rerr = err
		return err
	}
	return nil
}

// wsClosedError ends a client's reads at a close frame from the server
// that says more than a plain normal closure: a status other than 1000, or
// a reason. It is io.EOF to errors.Is, as the end of the stream it is.
type wsClosedError struct {
	code   uint16
	reason string // valid UTF-8, at most 123 bytes
}

func (e *wsClosedError) Error() string {
	s := "websocket close from the server: status " + strconv.Itoa(int(e.code))
	if e.reason != "" {
		s += " " + strconv.Quote(e.reason) // a line of its own, whatever it holds
	}
	return s + ": " + io.EOF.Error()
}

func (e *wsClosedError) Unwrap() error { return io.EOF }

// wsValidCloseCode reports whether an endpoint may send code in a close
// frame: RFC 6455's codes and those IANA registered since, up to 1014,
// except the reserved 1004 and 1005, 1006 and 1015, which stand for no
// code; or a code of the registered (3000-3999) or private (4000-4999)
// ranges.
func wsValidCloseCode(code uint16) bool {
	switch {
	case code == 1004 || code == 1005 || code == 1006:
		return false
	case code >= 1000 && code <= 1014, code >= 3000 && code <= 4999:
		return true
	}
	return false
}

// readErr is the error for a read that stopped after got bytes of a frame
// header: a hang-up there is unexpected; other errors (deadlines) pass.
func (c *wsConn) readErr(err error, got int) error {
	if err == io.EOF && got > 0 {
		err = io.ErrUnexpectedEOF
	}
	if !isTimeout(err) {
		c.rerr = err
	}
	return err
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// wsMask XORs p with mask starting at mask position off, and returns the
// position after p.
func wsMask(p []byte, mask [4]byte, off int) int {
	if len(p) >= 16 {
		// Eight bytes at a time, with the mask rotated to off.
		var m8 [8]byte
		for i := range m8 {
			m8[i] = mask[(off+i)&3]
		}
		m := binary.LittleEndian.Uint64(m8[:])
		for len(p) >= 8 {
			binary.LittleEndian.PutUint64(p, binary.LittleEndian.Uint64(p)^m)
			p = p[8:]
		}
	}
	for i := range p {
		p[i] ^= mask[off&3]
		off++
	}
	return off & 3
}

// wsWriteBufs holds the scratch buffers of writes, so that an idle
// connection holds none.
var wsWriteBufs = sync.Pool{New: func() any { return new([]byte) }}

// Write sends p as binary messages of at most wsMaxFrame bytes.
func (c *wsConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.unlockWrite()
	if c.closeSent {
		return 0, net.ErrClosed
	}
	if c.werr != nil {
		return 0, c.werr
	}
	written := 0
	for {
		chunk := p[written:]
		if len(chunk) > wsMaxFrame {
			chunk = chunk[:wsMaxFrame]
		}
		if _, err := c.writeFrameLocked(wsBinary, chunk); err != nil {
			return written, err
		}
		written += len(chunk)
		if written == len(p) {
			return written, nil
		}
	}
}

// unlockWrite sends the pong due, if any, and unlocks wmu. It looks again
// after unlocking, so that a pong left while it held wmu is not stranded.
func (c *wsConn) unlockWrite() {
	for {
		if !c.closeSent {
			c.writePongLocked()
		}
		c.wmu.Unlock()
		if !c.pongDue.Load() || !c.wmu.TryLock() {
			return
		}
	}
}

// writePongLocked sends the pong due, if any, unless a write failed
// before. If the write fails, so do all later ones (werr).
func (c *wsConn) writePongLocked() {
	if !c.pongDue.Swap(false) || c.werr != nil {
		return
	}
	var p [wsMaxControl]byte
	c.pongMu.Lock()
	n := copy(p[:], c.pong[:c.pongLen])
	c.pongMu.Unlock()
	if _, err := c.writeFrameLocked(wsPong, p[:n]); err != nil {
		c.werr = fmt.Errorf("websocket: a pong was not written, which leaves the stream unusable: %w", err)
	}
}

// writeFrameLocked writes one unfragmented frame of opcode op.
func (c *wsConn) writeFrameLocked(op byte, p []byte) (int, error) {
	return c.writeRawLocked(0x80|op, p)
}

// writeRawLocked writes a frame whose first header byte is b0, with one
// write on the connection below.
func (c *wsConn) writeRawLocked(b0 byte, p []byte) (int, error) {
	bp := wsWriteBufs.Get().(*[]byte)
	defer wsWriteBufs.Put(bp)
	if need := wsMaxHeader + len(p); cap(*bp) < need {
		// Sized for any frame, once: letting append grow it would
		// allocate again at every larger write.
		*bp = make([]byte, 0, max(need, wsMaxHeader+wsMaxFrame))
	}
	b := append((*bp)[:0], b0, 0)
	var maskBit byte
	if c.client {
		maskBit = 0x80
	}
	switch n := len(p); {
	case n < 126:
		b[1] = maskBit | byte(n)
	case n <= 0xffff:
		b[1] = maskBit | 126
		b = binary.BigEndian.AppendUint16(b, uint16(n))
	default:
		b[1] = maskBit | 127
		b = binary.BigEndian.AppendUint64(b, uint64(n))
	}
	start := len(b)
	if c.client {
		var mask [4]byte
		rand.Read(mask[:])
		b = append(b, mask[:]...)
		start = len(b)
		b = append(b, p...)
		wsMask(b[start:], mask, 0)
	} else {
		b = append(b, p...)
	}
	*bp = b
	n, err := c.Conn.Write(b)
	return max(n-start, 0), err
}

// writeClose sends a close frame with code, once, without waiting for a
// writer that is stuck.
func (c *wsConn) writeClose(code uint16, reason string) {
	if !c.wmu.TryLock() {
		return
	}
	defer c.wmu.Unlock()
	if c.closeSent {
		return
	}
	c.closeSent = true
	p := binary.BigEndian.AppendUint16(make([]byte, 0, wsMaxControl), code)
	if len(reason) > wsMaxControl-2 {
		// Cut at a character's start: a reason must be UTF-8.
		n := wsMaxControl - 2
		for n > 0 && !utf8.RuneStart(reason[n]) {
			n--
		}
		reason = reason[:n]
	}
	p = append(p, reason...)
	c.Conn.SetWriteDeadline(time.Now().Add(wsCloseWait))
	c.writePongLocked() // pings answered before the close
	if c.werr == nil {
		c.writeFrameLocked(wsClose, p)
	}
}

// Close sends a normal close frame, if it can at once, and closes the
// connection below.
func (c *wsConn) Close() error {
	c.writeClose(wsCloseNormal, "")
	return c.Conn.Close()
}
