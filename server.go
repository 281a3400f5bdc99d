package relay

// The server's packet path:
//
//	 client A's conn                                      client B's conn
//	┌──────────────┐   route: shard RLock,   ┌───────────────────────────┐
//	│ reader (the  │   map lookup, active    │ B.mu: outbox              │
//	│ Accept call) │──conn pointer──────────▶│   disco ring | other ring │
//	│ header, dst, │   copy once into a      │   pong, peer gone, mesh   │
//	│ payload      │   pooled packet         │   updates, health, ...    │
//	└──────────────┘                         └────────────┬──────────────┘
//	                                                      │ first item starts
//	                                                      ▼ a writer goroutine
//	                                         ┌───────────────────────────┐
//	                                         │ writer: take everything   │
//	                                         │ under B.mu, write it with │
//	                                         │ a pooled bufio.Writer,    │
//	                                         │ flush once per burst,     │
//	                                         │ exit when the outbox is   │
//	                                         │ empty                     │
//	                                         └───────────────────────────┘
//
// Locking: a routing shard's mu is never held while taking a conn's mu
// except in register/unregister, which take shard.mu then conn.mu; the
// writer takes conn.mu alone, and takes shard locks only after releasing it.
// Readers never block on a slow receiver: enqueue only appends to a bounded
// ring under the receiver's mutex and, when the ring is full, drops the
// oldest packet. An idle client costs its reader goroutine and its read
// buffer; the writer goroutine and write buffer exist only while there is
// something to write.

import (
	"bufio"
	"context"
	"crypto/subtle"
	"encoding/binary"
	"encoding/json"
	"errors"
	"expvar"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Server is a DERP relay server. Create it with NewServer, hand it
// connections with Accept or serve it over HTTP with ServeHTTP, and Close it
// when done. All methods are safe for concurrent use.
type Server struct {
	priv     PrivateKey
	pub      PublicKey
	cfg      serverConfig
	log      *slog.Logger
	metaCert []byte

	shards [numShards]routeShard

	mu       sync.Mutex
	conns    map[*sconn]struct{}
	watchers map[*sconn]struct{}
	perIP    map[netip.Addr]int
	closed   bool
	sessions sync.WaitGroup

	replay nonceGuard
	stats  serverCounters
	mesh   meshState
}

const numShards = 64

type routeShard struct {
	mu sync.RWMutex
	m  map[PublicKey]*keyEntry
}

// keyEntry is the set of local connections of one key.
type keyEntry struct {
	active atomic.Pointer[sconn] // receives packets for the key
	// Guarded by the shard's mu:
	conns      []*sconn // oldest first
	recipients map[*sconn]struct{}
}

func (s *Server) shard(k PublicKey) *routeShard { return &s.shards[k[0]%numShards] }

// ServerOption configures NewServer.
type ServerOption func(*serverConfig)

type serverConfig struct {
	logger           *slog.Logger
	meshKey          [MeshKeyLen]byte
	hasMeshKey       bool
	admit            func(ctx context.Context, a Admission) error
	rateBytesPerSec  int
	rateBurst        int
	loginTimeout     time.Duration
	writeTimeout     time.Duration
	meshWriteTimeout time.Duration
	queueDepth       int
	keepAlive        time.Duration
	maxConns         int
	maxConnsPerIP    int
	maxClientInfo    int
	restartDelay     time.Duration
	restartTryFor    time.Duration
	meshPeers        []string
}

// Admission describes a client asking to log in, for the admission hook.
type Admission struct {
	Key        PublicKey
	Info       ClientInfo
	RemoteAddr string // as given to Accept; for HTTP, the request's RemoteAddr
}

// WithLogger sets the server's logger. The default discards everything.
// The server never logs packet contents or private keys.
func WithLogger(l *slog.Logger) ServerOption {
	return func(c *serverConfig) { c.logger = l }
}

// WithMeshKey sets the region's mesh key, 64 hex digits shared by the
// servers of a region. Clients that present it may watch connections, close
// peers and forward packets. NewServer panics on a malformed key, as it is a
// configuration error that must not silently disable meshing.
func WithMeshKey(k string) ServerOption {
	return func(c *serverConfig) {
		mk, ok, err := parseMeshKey(k)
		if err != nil {
			panic("relay: WithMeshKey: " + err.Error())
		}
		c.meshKey, c.hasMeshKey = mk, ok
	}
}

// WithAdmission sets a hook that decides whether a client may log in. It is
// called after the client proved it owns its key and before it is
// registered, except for mesh peers; a non-nil error refuses the login and
// is logged. ctx ends with the login deadline.
func WithAdmission(f func(ctx context.Context, a Admission) error) ServerOption {
	return func(c *serverConfig) { c.admit = f }
}

// WithRateLimit limits how fast each non-mesh client may send, in bytes per
// second of frame payload, with the given burst (raised to at least one
// maximal SendPacket). The limit is announced to clients in ServerInfo and
// enforced by reading more slowly, so TCP flow control slows the sender and
// nothing is dropped. Zero bytesPerSec, the default, means no limit.
func WithRateLimit(bytesPerSec, burst int) ServerOption {
	return func(c *serverConfig) { c.rateBytesPerSec, c.rateBurst = bytesPerSec, burst }
}

// WithLoginTimeout bounds the whole login: writing ServerKey, reading
// ClientInfo and the admission hook. Default 10 s.
func WithLoginTimeout(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.loginTimeout = d }
}

// WithWriteTimeout bounds each burst of writes to a client; a client that
// does not read for that long is disconnected. Default 2 s; zero means no
// limit (dangerous on the open internet). Mesh peers get 30 s.
func WithWriteTimeout(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.writeTimeout = d }
}

// WithQueueDepth sets how many packets may wait for each client in each of
// its two queues (disco and other). When a queue is full the oldest packet is
// dropped. Default 32.
func WithQueueDepth(n int) ServerOption {
	return func(c *serverConfig) { c.queueDepth = n }
}

// WithKeepAlive sets the interval of KeepAlive frames; each session adds a
// random jitter of up to 5 s. Default 60 s. Clients give up after 120 s of
// silence, so do not raise it past 110 s.
func WithKeepAlive(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.keepAlive = d }
}

// WithMaxConnections limits the number of sessions (logged in or logging
// in) in total and per remote IP address; zero means no limit. Defaults:
// no total limit, no per-IP limit.
func WithMaxConnections(total, perIP int) ServerOption {
	return func(c *serverConfig) { c.maxConns, c.maxConnsPerIP = total, perIP }
}

// WithRestartNotice sets what Close tells clients in its ServerRestarting
// frame: each client is asked to wait a random delay up to spread before
// reconnecting (so clients do not all come back at once), and to keep trying
// for tryFor. Defaults: 5 s and 30 s.
func WithRestartNotice(spread, tryFor time.Duration) ServerOption {
	return func(c *serverConfig) { c.restartDelay, c.restartTryFor = spread, tryFor }
}

// NewServer returns a server whose DERP key is priv.
func NewServer(priv PrivateKey, opts ...ServerOption) *Server {
	cfg := serverConfig{
		loginTimeout:     10 * time.Second,
		writeTimeout:     2 * time.Second,
		meshWriteTimeout: 30 * time.Second,
		queueDepth:       32,
		keepAlive:        60 * time.Second,
		maxClientInfo:    16 << 10,
		restartDelay:     2 * time.Second,
		restartTryFor:    5 * time.Second,
	}
	for _, o := range opts {
		if o != nil {
			o(&cfg)
		}
	}
	if cfg.queueDepth < 1 {
		cfg.queueDepth = 1
	}
	if cfg.rateBytesPerSec > 0 && cfg.rateBurst < maxSendFrame {
		cfg.rateBurst = maxSendFrame
	}
	s := &Server{
		priv:     priv,
		pub:      priv.Public(),
		cfg:      cfg,
		log:      cfg.logger,
		conns:    map[*sconn]struct{}{},
		watchers: map[*sconn]struct{}{},
		perIP:    map[netip.Addr]int{},
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	for i := range s.shards {
		s.shards[i].m = map[PublicKey]*keyEntry{}
	}
	s.replay.init()
	s.stats.init()
	mc, err := MintMetaCert(s.pub, ProtocolVersion)
	if err != nil {
		panic("relay: minting meta cert: " + err.Error()) // only fails if crypto/rand does
	}
	s.metaCert = mc
	s.initMesh()
	return s
}

// PublicKey returns the server's DERP public key.
func (s *Server) PublicKey() PublicKey { return s.pub }

// MetaCert returns the DER of the server's meta cert, to be presented as the
// last certificate of its TLS chain (see AppendMetaCert).
func (s *Server) MetaCert() []byte { return s.metaCert }

// HasMeshKey reports whether the server was given a mesh key.
func (s *Server) HasMeshKey() bool { return s.cfg.hasMeshKey }

// sconn is one client session on the server.
type sconn struct {
	s          *Server
	nc         net.Conn
	br         *bufio.Reader
	key        PublicKey
	remote     string
	remoteAddr netip.AddrPort
	info       ClientInfo
	isMesh     bool
	notIdeal   bool
	fastStart  bool
	connNum    int64
	start      time.Time
	entry      *keyEntry
	ctx        context.Context
	cancel     context.CancelFunc

	dup atomic.Bool // another connection has the same key

	// Reader-owned state.
	preferred  bool
	notHere    tokenBucket
	rateLimit  *tokenBucket
	rateWaited int64
	recvPkts   atomic.Int64
	recvBytes  atomic.Int64

	// Writer-side counters.
	sentPkts  atomic.Int64
	sentBytes atomic.Int64

	mu sync.Mutex // guards everything below
	// outbox
	disco, other pktRing
	pong         [8]byte
	hasPong      bool
	keepAlive    bool
	peerGone     []peerGoneItem
	meshUpdates  []PeerPresent // Key, Addr, Flags; Flags==0 means gone
	health       *string
	restarting   *ServerRestarting
	serverInfo   []byte // the ServerInfo frame, until written
	closeAfter   bool   // close the conn after writing the outbox (server Close)
	writing      bool   // a writer goroutine is running
	parked       bool   // the writer is waiting on wake for more to write
	wake         chan struct{}
	closed       bool // session over: enqueue drops
	registered   bool // in the routing table
	sentFrom     map[PublicKey]struct{}
	lastSrc      PublicKey
	watching     bool
	writers      sync.WaitGroup
	keepTimer    *time.Timer
}

type peerGoneItem struct {
	key    PublicKey
	reason PeerGoneReason
}

// maxPendingControl bounds queued control frames (PeerGone notices) per
// client; beyond it they are dropped, as a client that does not read cannot
// use them anyway.
const maxPendingControl = 4096

// Accept runs one DERP session over nc, which the server now owns: it logs
// the client in, relays its packets until the connection ends, ctx is done or
// the server is closed, and closes nc. brw must buffer nc; bytes already
// buffered in it are read first and bytes written but not flushed (such as
// an HTTP 101 response) leave with the ServerKey frame. remoteAddr ("ip:port")
// is used for per-IP limits, admission and PeerPresent.
func (s *Server) Accept(ctx context.Context, nc net.Conn, brw *bufio.ReadWriter, remoteAddr string) {
	s.accept(ctx, nc, brw, remoteAddr, acceptOpts{})
}

type acceptOpts struct {
	notIdeal  bool
	fastStart bool
}

func (s *Server) accept(ctx context.Context, nc net.Conn, brw *bufio.ReadWriter, remoteAddr string, ao acceptOpts) {
	s.stats.accepts.Add(1)
	if brw == nil {
		brw = bufio.NewReadWriter(bufio.NewReader(nc), bufio.NewWriter(nc))
	}
	ap, _ := netip.ParseAddrPort(remoteAddr)
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	if err := s.admitConn(ap.Addr()); err != nil {
		s.stats.countRejected("too_many_connections")
		s.log.Info("relay: refusing connection", "remote", remoteAddr, "err", err)
		nc.Close()
		return
	}
	defer s.releaseConn(ap.Addr())

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	defer stop()

	c := &sconn{
		s:          s,
		nc:         nc,
		br:         brw.Reader,
		remote:     remoteAddr,
		remoteAddr: ap,
		notIdeal:   ao.notIdeal,
		fastStart:  ao.fastStart,
		connNum:    s.stats.connNum.Add(1),
		ctx:        ctx,
		cancel:     cancel,
		notHere:    tokenBucket{rate: 1, burst: 3, tokens: 3, last: time.Now()},
	}
	s.mu.Lock()
	s.conns[c] = struct{}{} // so that Close can cut a login short
	s.mu.Unlock()
	if err := s.login(ctx, c, brw.Writer); err != nil {
		s.stats.countLoginError(err)
		s.log.Info("relay: login failed", "remote", remoteAddr, "err", err)
		nc.Close()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		return
	}
	if !s.register(c) {
		nc.Close()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		return
	}
	err := c.readLoop()
	quiet := ctx.Err() != nil // the caller or Close ended the session
	s.unregister(c)
	c.shutdown()
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !quiet {
		s.stats.countSessionError(err)
		s.log.Info("relay: session ended", "remote", remoteAddr, "key", c.key.ShortString(), "err", err)
	}
}

func (s *Server) admitConn(ip netip.Addr) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if s.cfg.maxConns > 0 && int(s.stats.sessions.Load()) >= s.cfg.maxConns {
		return fmt.Errorf("%w: server limit %d", ErrTooManyConnections, s.cfg.maxConns)
	}
	if s.cfg.maxConnsPerIP > 0 && s.perIP[ip] >= s.cfg.maxConnsPerIP {
		return fmt.Errorf("%w: limit %d per IP", ErrTooManyConnections, s.cfg.maxConnsPerIP)
	}
	s.perIP[ip]++
	s.stats.sessions.Add(1)
	s.sessions.Add(1)
	return nil
}

func (s *Server) releaseConn(ip netip.Addr) {
	s.mu.Lock()
	if s.perIP[ip]--; s.perIP[ip] <= 0 {
		delete(s.perIP, ip)
	}
	s.mu.Unlock()
	s.stats.sessions.Add(-1)
	s.sessions.Done()
}

// login runs the server side of the handshake: ServerKey out, ClientInfo in,
// admission, ServerInfo out.
func (s *Server) login(ctx context.Context, c *sconn, bw *bufio.Writer) error {
	deadline := time.Now().Add(s.cfg.loginTimeout)
	if s.cfg.loginTimeout > 0 {
		c.nc.SetDeadline(deadline)
	}
	var kb [serverKeyLen]byte
	if err := writeFrame(bw, FrameServerKey, appendServerKey(kb[:0], s.pub)); err != nil {
		return fmt.Errorf("send server key: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("send server key: %w", err)
	}
	t, n, err := readFrameHeader(c.br)
	if err != nil {
		return fmt.Errorf("receive client info: %w", err)
	}
	if t != FrameClientInfo {
		return protoErr("unexpected_frame", t, "want ClientInfo first")
	}
	if n < minClientInfoLen || int64(n) > int64(s.cfg.maxClientInfo) {
		return protoErr("bad_client_info_length", t, fmt.Sprintf("%d bytes, want %d..%d", n, minClientInfoLen, s.cfg.maxClientInfo))
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(c.br, payload); err != nil {
		return fmt.Errorf("receive client info: %w", err)
	}
	c.key = PublicKey(payload[:KeyLen])
	if err := checkPeerKey(c.key); err != nil {
		return &ProtocolError{Reason: "bad_client_key", Frame: t, Err: err}
	}
	shared, err := sharedKey(s.priv, c.key)
	if err != nil {
		return &ProtocolError{Reason: "bad_client_key", Frame: t, Err: err}
	}
	sealed := payload[KeyLen:]
	msg, ok := openBox(nil, shared, sealed)
	if !ok {
		return protoErr("bad_client_info_box", t, "box does not open with the claimed key "+c.key.ShortString())
	}
	var info clientInfoJSON
	if err := json.Unmarshal(msg, &info); err != nil {
		return &ProtocolError{Reason: "bad_client_info_json", Frame: t, Err: err}
	}
	if !s.replay.check([nonceLen]byte(sealed[:nonceLen]), time.Now()) {
		return &ProtocolError{Reason: "replayed_client_info", Frame: t, Err: ErrReplayedLogin}
	}
	c.info = ClientInfo{Version: info.Version, CanAckPings: info.CanAckPings, IsProber: info.IsProber, AppName: info.AppName}
	c.isMesh = s.cfg.hasMeshKey && info.MeshKey != nil &&
		subtle.ConstantTimeCompare(info.MeshKey[:], s.cfg.meshKey[:]) == 1
	if !c.isMesh && s.cfg.admit != nil {
		actx, cancel := context.WithDeadline(ctx, deadline)
		err := s.cfg.admit(actx, Admission{Key: c.key, Info: c.info, RemoteAddr: c.remote})
		cancel()
		if err != nil {
			return fmt.Errorf("%w: %s: %w", ErrLoginRejected, c.key.ShortString(), err)
		}
	}
	c.nc.SetDeadline(time.Time{})

	// ServerInfo is written by the writer goroutine as the first item of
	// the outbox, after the client is registered: a client that has seen
	// ServerInfo is reachable, and nothing can overtake it.
	si := serverInfoJSON{Version: ProtocolVersion}
	if !c.isMesh && s.cfg.rateBytesPerSec > 0 {
		si.TokenBucketBytesPerSecond = s.cfg.rateBytesPerSec
		si.TokenBucketBytesBurst = s.cfg.rateBurst
		c.rateLimit = &tokenBucket{rate: float64(s.cfg.rateBytesPerSec), burst: float64(s.cfg.rateBurst),
			tokens: float64(s.cfg.rateBurst), last: time.Now()}
	}
	js, _ := json.Marshal(si)
	c.serverInfo = appendFrame(nil, FrameServerInfo, sealBox(make([]byte, 0, nonceLen+boxOverhead+len(js)), shared, js))
	c.start = time.Now()
	return nil
}

func (c *sconn) writeTimeout() time.Duration {
	if c.isMesh {
		return c.s.cfg.meshWriteTimeout
	}
	return c.s.cfg.writeTimeout
}

// register adds c to the routing table and announces it to watchers.
func (s *Server) register(c *sconn) bool {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return false
	}
	s.mu.Unlock()

	sh := s.shard(c.key)
	sh.mu.Lock()
	e := sh.m[c.key]
	if e == nil {
		e = &keyEntry{}
		sh.m[c.key] = e
	}
	c.entry = e
	e.conns = append(e.conns, c)
	e.active.Store(c)
	var dups []*sconn
	if len(e.conns) > 1 {
		dups = append(dups, e.conns...)
		if len(e.conns) == 2 {
			s.stats.dupKeys.Add(1)
			s.stats.dupConns.Add(2)
		} else {
			s.stats.dupConns.Add(1)
		}
		s.stats.dupTotal.Add(1)
		for _, d := range e.conns {
			d.dup.Store(true)
		}
	}
	sh.mu.Unlock()

	s.stats.current.Add(1)
	if c.notIdeal {
		s.stats.notIdeal.Add(1)
	}
	if c.fastStart {
		s.stats.fastStarts.Add(1)
	} else {
		s.stats.upgrades.Add(1)
	}
	if len(dups) > 0 {
		msg := fmt.Sprintf("another connection (%d in all) is using this node key %s on this relay; only the one that sent last receives packets", len(dups), c.key.ShortString())
		for _, d := range dups {
			d.setHealth(msg)
		}
		s.log.Info("relay: duplicate key", "key", c.key.ShortString(), "conns", len(dups))
	}
	c.startKeepAlive()
	c.mu.Lock()
	c.registered = true
	c.kickLocked() // ServerInfo
	c.mu.Unlock()
	s.broadcastPresent(c)
	s.log.Debug("relay: client connected", "remote", c.remote, "key", c.key.ShortString(), "mesh", c.isMesh, "fastStart", c.fastStart)
	return true
}

// unregister removes c from the routing table. If it was the key's last
// connection, every client that received packets from it is told PeerGone.
func (s *Server) unregister(c *sconn) {
	s.mu.Lock()
	delete(s.conns, c)
	if _, ok := s.watchers[c]; ok {
		delete(s.watchers, c)
		s.stats.watchers.Add(-1)
	}
	s.mu.Unlock()

	sh := s.shard(c.key)
	sh.mu.Lock()
	e := c.entry
	for i, x := range e.conns {
		if x == c {
			e.conns = append(e.conns[:i], e.conns[i+1:]...)
			break
		}
	}
	var alone *sconn
	var gone map[*sconn]struct{}
	switch len(e.conns) {
	case 0:
		delete(sh.m, c.key)
		gone = e.recipients
		e.active.Store(nil)
	case 1:
		alone = e.conns[0]
		alone.dup.Store(false)
		e.active.Store(alone)
		s.stats.dupKeys.Add(-1)
		s.stats.dupConns.Add(-2)
	default:
		if e.active.Load() == c {
			e.active.Store(e.conns[len(e.conns)-1])
		}
		s.stats.dupConns.Add(-1)
	}
	sh.mu.Unlock()

	s.stats.current.Add(-1)
	if c.notIdeal {
		s.stats.notIdeal.Add(-1)
	}
	if c.preferred {
		s.stats.home.Add(-1)
	}
	s.stats.addSession(c)
	if alone != nil {
		alone.setHealth("")
	}
	if gone != nil || len(e.conns) == 0 {
		if !s.meshHas(c.key) {
			for r := range gone {
				r.enqueuePeerGone(c.key, PeerGoneDisconnected)
			}
		}
		s.broadcastGone(c.key)
	}
}

// lookup returns the connection that receives packets for k, or nil.
func (s *Server) lookup(k PublicKey) *sconn {
	sh := s.shard(k)
	sh.mu.RLock()
	e := sh.m[k]
	sh.mu.RUnlock()
	if e == nil {
		return nil
	}
	return e.active.Load()
}

// startKeepAlive arms the session's keepalive timer. It runs no goroutine
// while waiting.
func (c *sconn) startKeepAlive() {
	d := c.s.cfg.keepAlive
	if d <= 0 {
		return
	}
	period := d + rand.N(5*time.Second)
	c.mu.Lock()
	c.keepTimer = time.AfterFunc(period, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.closed {
			return
		}
		c.keepAlive = true
		c.kickLocked()
		c.keepTimer.Reset(period)
	})
	c.mu.Unlock()
}

// shutdown ends the session's writer side: queued packets are counted as
// dropped and the connection is closed.
func (c *sconn) shutdown() {
	c.mu.Lock()
	c.closed = true
	if c.parked {
		c.parked = false
		select {
		case c.wake <- struct{}{}:
		default:
		}
	}
	if c.keepTimer != nil {
		c.keepTimer.Stop()
	}
	c.mu.Unlock()
	c.cancel()
	c.nc.Close()
	c.writers.Wait()
	c.mu.Lock()
	c.dropAllLocked(dropGone)
	c.mu.Unlock()
}

// readLoop reads and dispatches frames until the connection ends.
func (c *sconn) readLoop() error {
	for {
		t, n, err := readFrameHeader(c.br)
		if err != nil {
			return err
		}
		if c.rateLimit != nil {
			if err := c.paceRead(n); err != nil {
				return err
			}
		}
		if c.dup.Load() {
			c.noteDupActivity()
		}
		switch t {
		case FrameSendPacket:
			err = c.handleSendPacket(n)
		case FrameForwardPacket:
			err = c.handleForwardPacket(n)
		case FrameNotePreferred:
			err = c.handleNotePreferred(n)
		case FramePing:
			err = c.handlePing(n)
		case FrameWatchConns:
			err = c.handleWatchConns(n)
		case FrameClosePeer:
			err = c.handleClosePeer(n)
		default:
			err = c.skipFrame(t, n)
		}
		if err != nil {
			return err
		}
	}
}

// maxUnknownFrame bounds frames the server reads and discards (unknown
// types, a second ClientInfo, Pong, KeepAlive). Tailscale reads up to 4 GiB
// of such frames; no legitimate client sends more than a few bytes.
const maxUnknownFrame = 1 << 20

func (c *sconn) skipFrame(t FrameType, n uint32) error {
	if n > maxUnknownFrame {
		return protoErr("frame_too_large", t, fmt.Sprintf("%d bytes, limit %d for frames the server ignores", n, maxUnknownFrame))
	}
	c.s.stats.unknownFrames.Add(1)
	_, err := c.br.Discard(int(n))
	return err
}

// paceRead waits until the client's token bucket can pay for a frame of n
// bytes: waiting just stops reading, so TCP flow control slows the client.
func (c *sconn) paceRead(n uint32) error {
	cost := int(min(n, maxSendFrame))
	d := c.rateLimit.reserve(cost, time.Now())
	if d <= 0 {
		return nil
	}
	c.s.stats.rateWaits.Add(1)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-c.ctx.Done():
		return c.ctx.Err()
	}
}

// noteDupActivity makes c the active connection of its key: with duplicate
// connections, the one that sent last receives.
func (c *sconn) noteDupActivity() {
	if c.entry.active.Load() != c {
		sh := c.s.shard(c.key)
		sh.mu.Lock()
		if c.dup.Load() {
			c.entry.active.Store(c)
		}
		sh.mu.Unlock()
	}
}

func (c *sconn) handleSendPacket(n uint32) error {
	if n < KeyLen {
		return protoErr("short_send_packet", FrameSendPacket, fmt.Sprintf("%d bytes", n))
	}
	if n > maxSendFrame {
		return protoErr("packet_too_large", FrameSendPacket, fmt.Sprintf("%d-byte packet, limit %d", n-KeyLen, MaxPacketSize))
	}
	kb, err := c.br.Peek(KeyLen)
	if err != nil {
		return err
	}
	dst := PublicKey(kb)
	c.br.Discard(KeyLen)
	return c.s.routePacket(c, c.key, dst, int(n-KeyLen), false)
}

func (c *sconn) handleForwardPacket(n uint32) error {
	if !c.isMesh {
		return &ProtocolError{Reason: "forward_not_mesh", Frame: FrameForwardPacket, Err: ErrNotMesh}
	}
	if n < 2*KeyLen {
		return protoErr("short_forward_packet", FrameForwardPacket, fmt.Sprintf("%d bytes", n))
	}
	if n > maxForwardFrame {
		return protoErr("packet_too_large", FrameForwardPacket, fmt.Sprintf("%d-byte packet, limit %d", n-2*KeyLen, MaxPacketSize))
	}
	kb, err := c.br.Peek(2 * KeyLen)
	if err != nil {
		return err
	}
	src, dst := PublicKey(kb[:KeyLen]), PublicKey(kb[KeyLen:])
	c.br.Discard(2 * KeyLen)
	return c.s.routePacket(c, src, dst, int(n-2*KeyLen), true)
}

// routePacket reads an n-byte packet from c and delivers it to dst: to its
// local connection, else (for packets not already forwarded) through a mesh
// peer, else it is dropped and, if it is disco, the sender is told NotHere.
func (s *Server) routePacket(c *sconn, src, dst PublicKey, n int, forwarded bool) error {
	if dc := s.lookup(dst); dc != nil {
		p := getPacket(n)
		if _, err := io.ReadFull(c.br, p.buf[:n]); err != nil {
			putPacket(p)
			return err
		}
		p.n = n
		p.src = src
		if !forwarded {
			p.srcConn = c
		}
		disco := looksLikeDisco(p.buf[:n])
		if forwarded {
			s.stats.forwardedIn.Add(1)
		} else {
			c.recvPkts.Add(1)
			c.recvBytes.Add(int64(n))
		}
		dc.enqueue(p, disco)
		return nil
	}
	var head [minDiscoLen]byte
	m := copy(head[:], peekUpTo(c.br, min(n, minDiscoLen)))
	disco := looksLikeDisco(head[:m]) && n >= minDiscoLen
	if !forwarded && s.meshForward(src, dst, c.br, n) {
		c.recvPkts.Add(1)
		c.recvBytes.Add(int64(n))
		return nil
	}
	if _, err := c.br.Discard(n); err != nil {
		return err
	}
	if !forwarded {
		c.recvPkts.Add(1)
		c.recvBytes.Add(int64(n))
	}
	reason := dropUnknownDest
	if forwarded {
		reason = dropUnknownDestOnFwd
	}
	s.stats.drop(reason, disco, n)
	if disco && c.notHere.allow(1, time.Now()) {
		c.enqueuePeerGone(dst, PeerGoneNotHere)
	}
	return nil
}

func peekUpTo(br *bufio.Reader, n int) []byte {
	b, _ := br.Peek(min(n, br.Size()))
	return b
}

func (c *sconn) handleNotePreferred(n uint32) error {
	if n != 1 {
		return protoErr("bad_note_preferred_length", FrameNotePreferred, fmt.Sprintf("%d bytes, want 1", n))
	}
	b, err := c.br.ReadByte()
	if err != nil {
		return err
	}
	v := b != 0
	if v == c.preferred {
		return nil
	}
	c.preferred = v
	if v {
		c.s.stats.home.Add(1)
	} else {
		c.s.stats.home.Add(-1)
	}
	if time.Since(c.start) > 5*time.Second {
		if v {
			c.s.stats.homeMovesIn.Add(1)
		} else {
			c.s.stats.homeMovesOut.Add(1)
		}
	}
	return nil
}

func (c *sconn) handlePing(n uint32) error {
	if n < minPingLen || n > maxServerPingLen {
		return protoErr("bad_ping_length", FramePing, fmt.Sprintf("%d bytes, want 8..%d", n, maxServerPingLen))
	}
	b, err := c.br.Peek(8)
	if err != nil {
		return err
	}
	data := [8]byte(b)
	if _, err := c.br.Discard(int(n)); err != nil {
		return err
	}
	c.s.stats.gotPing.Add(1)
	c.mu.Lock()
	if !c.hasPong && !c.closed {
		c.pong, c.hasPong = data, true
		c.kickLocked()
	}
	c.mu.Unlock()
	return nil
}

func (c *sconn) handleWatchConns(n uint32) error {
	if !c.isMesh {
		return &ProtocolError{Reason: "watch_not_mesh", Frame: FrameWatchConns, Err: ErrNotMesh}
	}
	if n != 0 {
		return protoErr("bad_watch_conns_length", FrameWatchConns, fmt.Sprintf("%d bytes, want 0", n))
	}
	if c.key == c.s.pub {
		return nil // a server watching itself: nothing to learn
	}
	c.s.addWatcher(c)
	return nil
}

func (c *sconn) handleClosePeer(n uint32) error {
	if !c.isMesh {
		return &ProtocolError{Reason: "close_peer_not_mesh", Frame: FrameClosePeer, Err: ErrNotMesh}
	}
	if n != KeyLen {
		return protoErr("bad_close_peer_length", FrameClosePeer, fmt.Sprintf("%d bytes, want %d", n, KeyLen))
	}
	b, err := c.br.Peek(KeyLen)
	if err != nil {
		return err
	}
	k := PublicKey(b)
	c.br.Discard(KeyLen)
	c.s.closePeer(k)
	return nil
}

// closePeer closes every local connection of k.
func (s *Server) closePeer(k PublicKey) {
	sh := s.shard(k)
	sh.mu.RLock()
	var conns []*sconn
	if e := sh.m[k]; e != nil {
		conns = append(conns, e.conns...)
	}
	sh.mu.RUnlock()
	s.log.Info("relay: closing peer on mesh request", "key", k.ShortString(), "conns", len(conns))
	for _, c := range conns {
		c.nc.Close()
	}
}

// addWatcher subscribes c to connection changes, starting with a
// PeerPresent for every key connected here.
func (s *Server) addWatcher(c *sconn) {
	s.mu.Lock()
	if _, ok := s.watchers[c]; !ok {
		s.watchers[c] = struct{}{}
		s.stats.watchers.Add(1)
	}
	var present []PeerPresent
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.RLock()
		for _, e := range sh.m {
			if a := e.active.Load(); a != nil {
				present = append(present, a.presence())
			}
		}
		sh.mu.RUnlock()
	}
	// Queue the flood while holding s.mu so that no live update for a
	// newer login can be queued before it.
	c.mu.Lock()
	c.watching = true
	if !c.closed {
		c.meshUpdates = append(c.meshUpdates, present...)
		c.kickLocked()
	}
	c.mu.Unlock()
	s.mu.Unlock()
}

func (c *sconn) presence() PeerPresent {
	var f PeerPresentFlags
	if c.isMesh {
		f |= PeerIsMeshPeer
	}
	if c.info.IsProber {
		f |= PeerIsProber
	}
	if c.notIdeal {
		f |= PeerIsNotIdeal
	}
	if f == 0 {
		f = PeerIsRegular
	}
	return PeerPresent{Key: c.key, Addr: c.remoteAddr, Flags: f}
}

func (s *Server) broadcastPresent(c *sconn) {
	s.broadcast(c.presence())
}

func (s *Server) broadcastGone(k PublicKey) {
	s.broadcast(PeerPresent{Key: k}) // Flags 0: gone
}

func (s *Server) broadcast(u PeerPresent) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for w := range s.watchers {
		w.mu.Lock()
		if !w.closed {
			w.meshUpdates = append(w.meshUpdates, u)
			w.kickLocked()
		}
		w.mu.Unlock()
	}
}

// setHealth queues a Health frame; "" clears an earlier problem.
func (c *sconn) setHealth(msg string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.health = &msg
	c.kickLocked()
}

func (c *sconn) enqueuePeerGone(k PublicKey, r PeerGoneReason) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || len(c.peerGone) >= maxPendingControl {
		return
	}
	if r == PeerGoneDisconnected {
		delete(c.sentFrom, k) // a later return of k must register again
		if c.lastSrc == k {
			c.lastSrc = PublicKey{}
		}
	}
	c.peerGone = append(c.peerGone, peerGoneItem{k, r})
	c.kickLocked()
}

// enqueue queues a packet for c, dropping the oldest queued packet of the
// same class if the queue is full. It never blocks on c's writer.
func (c *sconn) enqueue(p *packet, disco bool) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		c.s.stats.drop(dropGone, disco, p.n)
		putPacket(p)
		return
	}
	q := &c.other
	if disco {
		q = &c.disco
	}
	if q.buf == nil {
		q.buf = make([]*packet, c.s.cfg.queueDepth)
	}
	old := q.push(p)
	c.kickLocked()
	c.mu.Unlock()
	if old != nil {
		c.s.stats.drop(dropQueueHead, disco, old.n)
		putPacket(old)
	}
}

// kickLocked wakes the writer goroutine, or starts it if it is not running.
func (c *sconn) kickLocked() {
	if c.writing {
		if c.parked {
			c.parked = false
			select {
			case c.wake <- struct{}{}:
			default:
			}
		}
		return
	}
	if c.closed {
		return
	}
	if c.wake == nil {
		c.wake = make(chan struct{}, 1)
	}
	c.writing = true
	c.writers.Add(1)
	go c.writeLoop()
}

// writerLinger is how long a writer with nothing to write waits for more
// before exiting: long enough that a busy receiver keeps one writer (no
// goroutine started per burst), short enough that idle clients hold none.
const writerLinger = 500 * time.Millisecond

// writerState is what a running writer borrows from a pool.
type writerState struct {
	bw      *bufio.Writer
	pkts    []*packet
	discos  int // the first discos entries of pkts are disco
	control []byte
	newSrcs []*sconn
}

var writerPool = sync.Pool{New: func() any {
	return &writerState{bw: bufio.NewWriterSize(nil, 32<<10)}
}}

func (c *sconn) writeLoop() {
	defer c.writers.Done()
	ws := writerPool.Get().(*writerState)
	ws.bw.Reset(c.nc)
	linger := time.NewTimer(writerLinger)
	defer func() {
		linger.Stop()
		ws.bw.Reset(nil)
		ws.pkts = ws.pkts[:0]
		ws.newSrcs = ws.newSrcs[:0]
		writerPool.Put(ws)
	}()
	for {
		c.mu.Lock()
		closeAfter := c.closeAfter
		if !c.takeLocked(ws) {
			if closeAfter || c.closed || !c.park(linger) {
				c.writing = false
				c.mu.Unlock()
				if closeAfter {
					c.nc.Close()
				}
				return
			}
			c.mu.Unlock()
			continue
		}
		c.mu.Unlock()
		c.registerRecipients(ws)
		err := c.writeBatch(ws)
		for i, p := range ws.pkts {
			putPacket(p)
			ws.pkts[i] = nil
		}
		ws.pkts = ws.pkts[:0]
		if err != nil {
			c.writeFailed(err)
			c.mu.Lock()
			c.writing = false
			c.mu.Unlock()
			return
		}
	}
}

// park waits, with c.mu held on entry and exit, until kickLocked wakes the
// writer or the linger timer fires. It reports whether there may be more to
// write.
func (c *sconn) park(linger *time.Timer) bool {
	c.parked = true
	linger.Reset(writerLinger)
	c.mu.Unlock()
	select {
	case <-c.wake:
		c.mu.Lock()
		return true
	case <-linger.C:
		c.mu.Lock()
		if c.parked {
			c.parked = false
			return false
		}
		return true // woken at the same time; the token in wake is harmless
	}
}

// takeLocked moves everything queued into ws: control frames are encoded
// into ws.control, packets are moved (disco first). It reports whether
// there was anything.
func (c *sconn) takeLocked(ws *writerState) bool {
	ws.control = append(ws.control[:0], c.serverInfo...)
	c.serverInfo = nil
	for _, g := range c.peerGone {
		ws.control = appendFrame(ws.control, FramePeerGone, appendPeerGone(nil, g.key, g.reason))
	}
	c.peerGone = c.peerGone[:0]
	for _, u := range c.meshUpdates {
		if u.Flags == 0 {
			ws.control = appendFrame(ws.control, FramePeerGone, appendPeerGone(nil, u.Key, PeerGoneDisconnected))
		} else {
			ws.control = appendFrame(ws.control, FramePeerPresent, appendPeerPresent(nil, u.Key, u.Addr, u.Flags))
		}
	}
	if cap(c.meshUpdates) > 1024 {
		c.meshUpdates = nil
	} else {
		c.meshUpdates = c.meshUpdates[:0]
	}
	if c.hasPong {
		ws.control = appendFrame(ws.control, FramePong, c.pong[:])
		c.hasPong = false
		c.s.stats.sentPong.Add(1)
	}
	if c.health != nil {
		ws.control = appendFrame(ws.control, FrameHealth, []byte(*c.health))
		c.health = nil
	}
	if c.keepAlive {
		ws.control = appendFrame(ws.control, FrameKeepAlive, nil)
		c.keepAlive = false
	}
	for p := c.disco.pop(); p != nil; p = c.disco.pop() {
		ws.pkts = append(ws.pkts, p)
	}
	ws.discos = len(ws.pkts)
	for p := c.other.pop(); p != nil; p = c.other.pop() {
		ws.pkts = append(ws.pkts, p)
	}
	for _, p := range ws.pkts {
		if p.srcConn != nil && p.src != c.lastSrc {
			c.lastSrc = p.src
			if _, ok := c.sentFrom[p.src]; !ok {
				if c.sentFrom == nil {
					c.sentFrom = map[PublicKey]struct{}{}
				}
				c.sentFrom[p.src] = struct{}{}
				ws.newSrcs = append(ws.newSrcs, p.srcConn)
			}
		}
	}
	if c.restarting != nil {
		ws.control = appendFrame(ws.control, FrameRestarting, appendRestarting(nil, c.restarting.ReconnectIn, c.restarting.TryFor))
		c.restarting = nil
	}
	return len(ws.control) > 0 || len(ws.pkts) > 0
}

// registerRecipients records that c received packets from new sources, so
// that c is told PeerGone when they leave.
func (c *sconn) registerRecipients(ws *writerState) {
	for _, src := range ws.newSrcs {
		sh := c.s.shard(src.key)
		sh.mu.Lock()
		if e := sh.m[src.key]; e != nil {
			if e.recipients == nil {
				e.recipients = map[*sconn]struct{}{}
			}
			e.recipients[c] = struct{}{}
		}
		sh.mu.Unlock()
	}
	clear(ws.newSrcs)
	ws.newSrcs = ws.newSrcs[:0]
}

func appendFrame(b []byte, t FrameType, payload []byte) []byte {
	b = append(b, byte(t))
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

func (c *sconn) writeBatch(ws *writerState) error {
	if wt := c.writeTimeout(); wt > 0 {
		c.nc.SetWriteDeadline(time.Now().Add(wt))
	}
	bw := ws.bw
	// Control frames other than Restarting first: they are small and
	// time-sensitive (Pong). Restarting was appended last to control, but
	// packets queued before Close should still go out before it, so split.
	ctl := ws.control
	var tail []byte
	if n := len(ctl); n >= frameHeaderLen+restartingLen && FrameType(ctl[n-frameHeaderLen-restartingLen]) == FrameRestarting {
		tail = ctl[n-frameHeaderLen-restartingLen:]
		ctl = ctl[:n-frameHeaderLen-restartingLen]
	}
	if _, err := bw.Write(ctl); err != nil {
		return err
	}
	var bytes int64
	for _, p := range ws.pkts {
		var src *PublicKey
		if !p.src.IsZero() {
			src = &p.src
		}
		if err := writePacketFrame(bw, FrameRecvPacket, src, p.buf[:p.n]); err != nil {
			c.s.stats.drop(dropWriteError, false, p.n)
			return err
		}
		bytes += int64(p.n)
	}
	if _, err := bw.Write(tail); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	if n := len(ws.pkts); n > 0 {
		c.sentPkts.Add(int64(n))
		c.sentBytes.Add(bytes)
	}
	return nil
}

// writeFailed ends the session after a write error.
func (c *sconn) writeFailed(err error) {
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		c.s.stats.writeTimeouts.Add(1)
		c.s.log.Info("relay: write timeout, dropping client", "remote", c.remote, "key", c.key.ShortString())
	}
	c.nc.Close()
}

func (c *sconn) dropAllLocked(r dropReason) {
	for _, q := range []*pktRing{&c.disco, &c.other} {
		disco := q == &c.disco
		for p := q.pop(); p != nil; p = q.pop() {
			c.s.stats.drop(r, disco, p.n)
			putPacket(p)
		}
		q.buf = nil
	}
	c.peerGone, c.meshUpdates, c.sentFrom = nil, nil, nil
}

// Close tells every client that the server is restarting, with a random
// reconnect delay each so they do not all return at once, then ends every
// session and waits for them. Accept calls after Close close their
// connection at once.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	conns := make([]*sconn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	s.closeMesh()
	for _, c := range conns {
		c.mu.Lock()
		if !c.closed && c.registered {
			var delay time.Duration
			if s.cfg.restartDelay > 0 {
				delay = rand.N(s.cfg.restartDelay)
			}
			c.restarting = &ServerRestarting{ReconnectIn: delay, TryFor: s.cfg.restartTryFor}
			c.closeAfter = true
			c.kickLocked()
		}
		c.mu.Unlock()
	}
	// Give writers a moment to deliver the notice (each closes its
	// connection after writing it, which ends the session), then cut
	// whatever is left. No session can start after s.closed is set, so
	// waiting on s.sessions is safe here.
	done := make(chan struct{})
	go func() {
		s.sessions.Wait()
		close(done)
	}()
	t := time.NewTimer(2 * time.Second)
	defer t.Stop()
	select {
	case <-done:
		return nil
	case <-t.C:
	}
	s.mu.Lock()
	for c := range s.conns {
		c.nc.Close()
	}
	s.mu.Unlock()
	<-done
	return nil
}

// IsClientConnected reports whether a client with key k is logged in here.
func (s *Server) IsClientConnected(k PublicKey) bool { return s.lookup(k) != nil }

// pktRing is a fixed-size FIFO of packets.
type pktRing struct {
	buf  []*packet
	head int
	n    int
}

// push appends p; if the ring is full it first removes and returns the
// oldest packet.
func (r *pktRing) push(p *packet) (old *packet) {
	if r.n == len(r.buf) {
		old = r.buf[r.head]
		r.buf[r.head] = nil
		r.head = (r.head + 1) % len(r.buf)
		r.n--
	}
	r.buf[(r.head+r.n)%len(r.buf)] = p
	r.n++
	return old
}

func (r *pktRing) pop() *packet {
	if r.n == 0 {
		return nil
	}
	p := r.buf[r.head]
	r.buf[r.head] = nil
	r.head = (r.head + 1) % len(r.buf)
	r.n--
	return p
}

// packet is a relayed packet, owned by one queue at a time.
type packet struct {
	src     PublicKey
	srcConn *sconn // the local sender, or nil for forwarded packets
	n       int
	buf     []byte
	class   int8
}

// Packets come from pools by size class so that a small packet does not pin
// 64 KiB and nothing is allocated per packet in the steady state.
var packetClasses = [...]int{256, 2048, 16 << 10, MaxPacketSize}

var packetPools [len(packetClasses)]sync.Pool

func getPacket(n int) *packet {
	for i, size := range packetClasses {
		if n <= size {
			if p, _ := packetPools[i].Get().(*packet); p != nil {
				return p
			}
			return &packet{buf: make([]byte, size), class: int8(i)}
		}
	}
	panic("relay: packet larger than MaxPacketSize")
}

func putPacket(p *packet) {
	p.srcConn = nil
	p.n = 0
	packetPools[p.class].Put(p)
}

// nonceGuard remembers the nonces of recent ClientInfo boxes so that a
// captured login cannot be replayed. It keeps two generations of at most
// maxNonces each, rotated every half hour, so a nonce is remembered for
// between 30 and 60 minutes and memory stays bounded. Under a flood of more
// than maxNonces logins per half hour the window shrinks accordingly.
type nonceGuard struct {
	mu        sync.Mutex
	cur, prev map[[16]byte]struct{}
	rotated   time.Time
}

const (
	maxNonces     = 1 << 18
	nonceInterval = 30 * time.Minute
)

func (g *nonceGuard) init() {
	g.cur = map[[16]byte]struct{}{}
	g.rotated = time.Now()
}

// check records nonce and reports whether it was new.
func (g *nonceGuard) check(nonce [nonceLen]byte, now time.Time) bool {
	k := [16]byte(nonce[:16])
	g.mu.Lock()
	defer g.mu.Unlock()
	if now.Sub(g.rotated) > nonceInterval || len(g.cur) >= maxNonces {
		g.prev, g.cur, g.rotated = g.cur, make(map[[16]byte]struct{}, len(g.cur)/2), now
	}
	if _, ok := g.cur[k]; ok {
		return false
	}
	if _, ok := g.prev[k]; ok {
		return false
	}
	g.cur[k] = struct{}{}
	return true
}

// ServeHTTP serves DERP over HTTP: an upgrade request on any path other than
// the probe paths starts a session; "Derp-Fast-Start: 1" makes the server
// skip the 101 response. /derp/probe and /derp/latency-check answer latency
// probes and /generate_204 captive-portal checks, if they are routed here.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/derp/probe", "/derp/latency-check":
		ServeProbe(w, r)
		return
	case "/generate_204":
		ServeNoContent(w, r)
		return
	}
	up := strings.ToLower(r.Header.Get("Upgrade"))
	if up != "derp" && up != "websocket" {
		if up != "" {
			s.log.Info("relay: unexpected Upgrade header", "upgrade", up, "remote", r.RemoteAddr)
		}
		s.stats.countRejected("no_upgrade")
		http.Error(w, "DERP requires connection upgrade", http.StatusUpgradeRequired)
		return
	}
	if r.ProtoMajor != 1 {
		s.stats.countRejected("not_http1")
		http.Error(w, "DERP requires HTTP/1.1 (the server negotiated "+r.Proto+"; disable HTTP/2 for this listener, see relay.AppendMetaCert)", http.StatusHTTPVersionNotSupported)
		return
	}
	fastStart := r.Header.Get(FastStartHeader) == "1"
	nc, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		s.stats.countRejected("hijack_failed")
		s.log.Info("relay: hijack failed", "remote", r.RemoteAddr, "err", err)
		http.Error(w, "HTTP does not support general TCP support", http.StatusInternalServerError)
		return
	}
	if !fastStart {
		fmt.Fprintf(brw.Writer, "HTTP/1.1 101 Switching Protocols\r\n"+
			"Upgrade: DERP\r\n"+
			"Connection: Upgrade\r\n"+
			"Derp-Version: %d\r\n"+
			"Derp-Public-Key: %s\r\n\r\n", ProtocolVersion, s.pub)
	}
	// The request's context is not canceled when a hijacked connection
	// closes; the session ends on its own.
	s.accept(context.WithoutCancel(r.Context()), nc, brw, r.RemoteAddr, acceptOpts{
		notIdeal:  r.Header.Get(IdealNodeHeader) != "",
		fastStart: fastStart,
	})
}

// ServeProbe answers DERP latency probes (/derp/probe, /derp/latency-check):
// 200 with an empty body for GET and HEAD, 405 otherwise.
func ServeProbe(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		w.Header().Set("Access-Control-Allow-Origin", "*")
	default:
		http.Error(w, "bogus probe method", http.StatusMethodNotAllowed)
	}
}

// ServeNoContent answers captive-portal checks (/generate_204) with 204 and,
// for a well-formed X-Tailscale-Challenge header, the matching
// X-Tailscale-Response.
func ServeNoContent(w http.ResponseWriter, r *http.Request) {
	if c := r.Header.Get("X-Tailscale-Challenge"); c != "" && validChallenge(c) {
		w.Header().Set("X-Tailscale-Response", "response "+c)
	}
	w.Header().Set("Cache-Control", "no-cache, no-store, must-revalidate, no-transform, max-age=0")
	w.WriteHeader(http.StatusNoContent)
}

func validChallenge(c string) bool {
	if len(c) > 64 {
		return false
	}
	for i := 0; i < len(c); i++ {
		b := c[i]
		if !('a' <= b && b <= 'z' || 'A' <= b && b <= 'Z' || '0' <= b && b <= '9' || b == '.' || b == '-' || b == '_' || b == ':') {
			return false
		}
	}
	return true
}

// dropReason says why a packet was dropped; the names are those of
// Tailscale's metrics.
type dropReason int

const (
	dropUnknownDest dropReason = iota
	dropUnknownDestOnFwd
	dropGone
	dropQueueHead
	dropQueueTail
	dropWriteError
	dropDupClient
	numDropReasons
)

var dropReasonNames = [numDropReasons]string{
	"unknown_dest", "unknown_dest_on_fwd", "gone_disconnected", "queue_head", "queue_tail", "write_error", "dup_client",
}

type serverCounters struct {
	accepts, connNum, sessions, current, home, notIdeal atomic.Int64
	dupKeys, dupConns, dupTotal, watchers               atomic.Int64
	fastStarts, upgrades                                atomic.Int64
	gotPing, sentPong, unknownFrames, rateWaits         atomic.Int64
	homeMovesIn, homeMovesOut, writeTimeouts            atomic.Int64
	forwardedIn, forwardedOut                           atomic.Int64
	dropPkts, dropBytes                                 [numDropReasons][2]atomic.Int64

	// Traffic of ended sessions; live sessions keep their own counters.
	mu                             sync.Mutex
	closedRecvPkts, closedRecvByts int64
	closedSentPkts, closedSentByts int64
	errors                         map[string]int64 // login/session failures by reason
	rejected                       map[string]int64
}

func (sc *serverCounters) init() {
	sc.errors = map[string]int64{}
	sc.rejected = map[string]int64{}
}

func (sc *serverCounters) drop(r dropReason, disco bool, n int) {
	k := 0
	if disco {
		k = 1
	}
	sc.dropPkts[r][k].Add(1)
	sc.dropBytes[r][k].Add(int64(n))
}

func (sc *serverCounters) addSession(c *sconn) {
	sc.mu.Lock()
	sc.closedRecvPkts += c.recvPkts.Load()
	sc.closedRecvByts += c.recvBytes.Load()
	sc.closedSentPkts += c.sentPkts.Load()
	sc.closedSentByts += c.sentBytes.Load()
	sc.mu.Unlock()
}

func errorReason(err error, fallback string) string {
	if r := ProtocolErrorReason(err); r != "" {
		return r
	}
	switch {
	case errors.Is(err, ErrLoginRejected):
		return "login_rejected"
	case errors.Is(err, ErrReplayedLogin):
		return "replayed_client_info"
	case errors.Is(err, ErrClosed):
		return "server_closed"
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return fallback + "_timeout"
	}
	return fallback
}

func (sc *serverCounters) countLoginError(err error) {
	sc.mu.Lock()
	sc.errors["login:"+errorReason(err, "io_error")]++
	sc.mu.Unlock()
}

func (sc *serverCounters) countSessionError(err error) {
	sc.mu.Lock()
	sc.errors["session:"+errorReason(err, "io_error")]++
	sc.mu.Unlock()
}

func (sc *serverCounters) countRejected(reason string) {
	sc.mu.Lock()
	sc.rejected[reason]++
	sc.mu.Unlock()
}

// Stats is a snapshot of a server's counters. Counters only grow; gauges
// ("Current…") go up and down.
type Stats struct {
	Accepts                   int64 // sessions handed to Accept or ServeHTTP
	CurrentConnections        int64 // logged-in sessions
	CurrentHomeConnections    int64 // sessions that said this server is their home
	CurrentNotIdealConns      int64 // sessions whose upgrade request had Ideal-Node
	CurrentDupKeys            int64 // keys with more than one session
	CurrentDupConns           int64 // sessions sharing a key with another
	TotalDupLogins            int64 // logins of a key that was already connected
	Watchers                  int64 // mesh peers watching connections
	FastStartLogins           int64 // sessions that skipped the 101 (Derp-Fast-Start: 1)
	UpgradeLogins             int64 // sessions through a 101 or Accept
	PacketsReceived           int64 // packets received from local clients
	BytesReceived             int64 // their bytes, without framing
	PacketsSent               int64 // packets written to clients
	BytesSent                 int64 // their bytes, without framing
	PacketsForwardedIn        int64 // packets received from mesh peers
	PacketsForwardedOut       int64 // packets forwarded to mesh peers
	PingsReceived, PongsSent  int64
	HomeMovesIn, HomeMovesOut int64 // NotePreferred changes after the first 5 s
	WriteTimeouts             int64 // sessions ended by the write deadline
	UnknownFrames             int64 // frames read and ignored
	RateLimitWaits            int64 // frames whose read waited for the rate limit
	// PacketsDropped and BytesDropped count drops by reason ("unknown_dest",
	// "unknown_dest_on_fwd", "gone_disconnected", "queue_head", "queue_tail",
	// "write_error", "dup_client") and kind ("disco", "other"), as
	// "reason/kind". Every combination is present, zero or not.
	PacketsDropped map[string]int64
	BytesDropped   map[string]int64
	// Errors counts failed logins ("login:<reason>") and sessions ended by
	// a protocol violation or I/O error ("session:<reason>").
	Errors map[string]int64
	// Rejected counts connections refused before login by reason.
	Rejected map[string]int64
}

// Stats returns a snapshot of the server's counters.
func (s *Server) Stats() Stats {
	sc := &s.stats
	st := Stats{
		Accepts:                sc.accepts.Load(),
		CurrentConnections:     sc.current.Load(),
		CurrentHomeConnections: sc.home.Load(),
		CurrentNotIdealConns:   sc.notIdeal.Load(),
		CurrentDupKeys:         sc.dupKeys.Load(),
		CurrentDupConns:        sc.dupConns.Load(),
		TotalDupLogins:         sc.dupTotal.Load(),
		Watchers:               sc.watchers.Load(),
		FastStartLogins:        sc.fastStarts.Load(),
		UpgradeLogins:          sc.upgrades.Load(),
		PacketsForwardedIn:     sc.forwardedIn.Load(),
		PacketsForwardedOut:    sc.forwardedOut.Load(),
		PingsReceived:          sc.gotPing.Load(),
		PongsSent:              sc.sentPong.Load(),
		HomeMovesIn:            sc.homeMovesIn.Load(),
		HomeMovesOut:           sc.homeMovesOut.Load(),
		WriteTimeouts:          sc.writeTimeouts.Load(),
		UnknownFrames:          sc.unknownFrames.Load(),
		RateLimitWaits:         sc.rateWaits.Load(),
		PacketsDropped:         map[string]int64{},
		BytesDropped:           map[string]int64{},
		Errors:                 map[string]int64{},
		Rejected:               map[string]int64{},
	}
	for r := range numDropReasons {
		for k, kind := range []string{"other", "disco"} {
			name := dropReasonNames[r] + "/" + kind
			st.PacketsDropped[name] = sc.dropPkts[r][k].Load()
			st.BytesDropped[name] = sc.dropBytes[r][k].Load()
		}
	}
	s.mu.Lock()
	sc.mu.Lock()
	st.PacketsReceived, st.BytesReceived = sc.closedRecvPkts, sc.closedRecvByts
	st.PacketsSent, st.BytesSent = sc.closedSentPkts, sc.closedSentByts
	for c := range s.conns {
		st.PacketsReceived += c.recvPkts.Load()
		st.BytesReceived += c.recvBytes.Load()
		st.PacketsSent += c.sentPkts.Load()
		st.BytesSent += c.sentBytes.Load()
	}
	for k, v := range sc.errors {
		st.Errors[k] = v
	}
	for k, v := range sc.rejected {
		st.Rejected[k] = v
	}
	sc.mu.Unlock()
	s.mu.Unlock()
	return st
}

// ExpVar returns an expvar.Var whose String is the JSON of Stats, for
// publishing with expvar.Publish.
func (s *Server) ExpVar() expvar.Var {
	return expvar.Func(func() any { return s.Stats() })
}

// meshState is the server's view of the other servers of its region.
type meshState struct{}

func (s *Server) initMesh()              {}
func (s *Server) closeMesh()             {}
func (s *Server) meshHas(PublicKey) bool { return false }

// meshForward reads an n-byte packet from br and forwards it to dst through
// a mesh peer, reporting whether one was found.
func (s *Server) meshForward(src, dst PublicKey, br *bufio.Reader, n int) bool { return false }
