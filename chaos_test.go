package relay

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// ---------------------------------------------------------------------------
// Packet format of TestChaos, so that receivers can detect
// corruption: [disco prefix (62 bytes) if disco] "CHAOS\x00\x01\x02" src(32)
// crc32(rest)(4) rest. Packets shorter than the header are all 0xA5.

const chaosMagic = "CHAOS\x00\x01\x02"
const chaosHdr = len(chaosMagic) + KeyLen + 4

func chaosPacket(r *rand.Rand, src PublicKey, disco bool, size int) []byte {
	var p []byte
	if disco {
		p = append(p, discoMagic...)
		p = append(p, bytes.Repeat([]byte{0x5a}, minDiscoLen-len(discoMagic))...)
		size = max(size, minDiscoLen+chaosHdr)
		size -= len(p)
	} else if size < chaosHdr {
		return bytes.Repeat([]byte{0xa5}, size)
	}
	rest := make([]byte, size-chaosHdr)
	for i := range rest {
		rest[i] = byte(r.Uint32())
	}
	p = append(p, chaosMagic...)
	p = append(p, src[:]...)
	p = binary.BigEndian.AppendUint32(p, crc32.ChecksumIEEE(rest))
	return append(p, rest...)
}

// checkChaosPacket returns "" or what is wrong with a received packet.
func checkChaosPacket(from PublicKey, p []byte) string {
	if len(p) >= minDiscoLen && string(p[:len(discoMagic)]) == discoMagic {
		p = p[minDiscoLen:]
		if len(p) < chaosHdr {
			return fmt.Sprintf("short disco packet (%d bytes after prefix)", len(p))
		}
	}
	if len(p) < chaosHdr {
		for _, b := range p {
			if b != 0xa5 {
				return fmt.Sprintf("small packet of %d bytes holds %#x", len(p), b)
			}
		}
		return ""
	}
	if string(p[:len(chaosMagic)]) != chaosMagic {
		return fmt.Sprintf("bad magic %q (len %d)", p[:len(chaosMagic)], len(p))
	}
	var src PublicKey
	copy(src[:], p[len(chaosMagic):])
	if src != from {
		return fmt.Sprintf("packet says it is from %s, server says %s", src.ShortString(), from.ShortString())
	}
	sum := binary.BigEndian.Uint32(p[len(chaosMagic)+KeyLen:])
	if crc32.ChecksumIEEE(p[chaosHdr:]) != sum {
		return fmt.Sprintf("crc mismatch, len %d", len(p))
	}
	return ""
}

// ---------------------------------------------------------------------------

type chaosHarness struct {
	t    *testing.T
	stop chan struct{}

	a, b       *Server
	aTLSURL    string // https, fast start
	aPlainURL  string // http
	aTCPAddr   string // raw DERP through Accept
	bURL       string // http
	clientTLS  *tls.Config
	keys       []PrivateKey // shared pool: duplicates
	pubs       []PublicKey
	unknown    []PublicKey
	goroutines sync.WaitGroup
	alive      atomic.Int64

	// counters
	sessions, dialFails, pktsSent, pktsRecv, pingsAnswered atomic.Int64
	illegalSessions, rcRounds, rcGens, watchRounds         atomic.Int64
	consistencyOK                                          atomic.Int64
	closingA                                               atomic.Bool
	dialFailsEarly                                         atomic.Int64
	silent, rawSessions                                    atomic.Int64
	restartNotices                                         atomic.Int64

	mu        sync.Mutex
	problems  []string
	corrupted []string
}

func (h *chaosHarness) problem(format string, args ...any) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.problems) < 50 {
		h.problems = append(h.problems, fmt.Sprintf(format, args...))
	}
}

func (h *chaosHarness) corrupt(format string, args ...any) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.corrupted) < 50 {
		h.corrupted = append(h.corrupted, fmt.Sprintf(format, args...))
	}
}

func (h *chaosHarness) goFn(f func()) {
	h.alive.Add(1)
	h.goroutines.Go(func() {
		defer h.alive.Add(-1)
		f()
	})
}

func (h *chaosHarness) stopped() bool {
	select {
	case <-h.stop:
		return true
	default:
		return false
	}
}

func (h *chaosHarness) sleep(d time.Duration) bool {
	select {
	case <-h.stop:
		return false
	case <-time.After(d):
		return true
	}
}

func (h *chaosHarness) randDst(r *rand.Rand) PublicKey {
	if r.IntN(5) == 0 {
		return h.unknown[r.IntN(len(h.unknown))]
	}
	return h.pubs[r.IntN(len(h.pubs))]
}

func (h *chaosHarness) randSize(r *rand.Rand) int {
	switch r.IntN(10) {
	case 0:
		return r.IntN(chaosHdr) // tiny, maybe empty
	case 1:
		return r.IntN(MaxPacketSize + 1)
	case 2:
		return 16<<10 + r.IntN(16<<10)
	default:
		return chaosHdr + r.IntN(1400)
	}
}

// isCorruptErr reports whether a client's Recv error is a protocol error
// (a corrupted or unexpected frame) rather than the connection ending.
func isCorruptErr(err error) bool {
	return ProtocolErrorReason(err) != "" || errors.Is(err, ErrServerKeyMismatch)
}

// dial logs a client in over one of the transports.
func (h *chaosHarness) dial(r *rand.Rand, onB bool, priv PrivateKey, opts []ClientOption) (c *Client, how string, cancel func(), raw net.Conn, err error) {
	cancel = func() {}
	if onB {
		ctx, cc := context.WithTimeout(context.Background(), 5*time.Second)
		defer cc()
		c, _, err = (&FastStart{WebSocket: r.IntN(3) == 0}).Dial(ctx, h.bURL, priv, opts...)
		return c, "B-http", cancel, nil, err
	}
	switch r.IntN(7) {
	case 0, 1: // net.Pipe through Accept, with a context that may end
		cc, sc := net.Pipe()
		ctx, cfn := context.WithCancel(context.Background())
		cancel = cfn
		addr := "127.0.0.1:" + fmt.Sprint(1000+r.IntN(1000))
		h.goFn(func() { h.a.Accept(ctx, sc, nil, addr) })
		c, err = NewClient(priv, cc, nil, opts...)
		if err != nil {
			cc.Close()
		}
		return c, "pipe", cancel, cc, err
	case 2: // TCP through Accept
		nc, err := net.DialTimeout("tcp", h.aTCPAddr, 5*time.Second)
		if err != nil {
			return nil, "tcp", cancel, nil, err
		}
		nc.SetDeadline(time.Now().Add(5 * time.Second))
		c, err = NewClient(priv, nc, nil, opts...)
		nc.SetDeadline(time.Time{})
		if err != nil {
			nc.Close()
		}
		return c, "tcp", cancel, nc, err
	case 3: // TLS fast start
		ctx, cc := context.WithTimeout(context.Background(), 5*time.Second)
		defer cc()
		c, _, err = (&FastStart{TLSConfig: h.clientTLS}).Dial(ctx, h.aTLSURL, priv, opts...)
		return c, "tls-fast", cancel, nil, err
	case 4: // TLS upgrade
		ctx, cc := context.WithTimeout(context.Background(), 5*time.Second)
		defer cc()
		c, _, err = (&FastStart{TLSConfig: h.clientTLS, DisableFastStart: true}).Dial(ctx, h.aTLSURL, priv, opts...)
		return c, "tls-upgrade", cancel, nil, err
	case 5: // WebSocket over TLS or plain
		ctx, cc := context.WithTimeout(context.Background(), 5*time.Second)
		defer cc()
		url := h.aTLSURL
		if r.IntN(2) == 0 {
			url = h.aPlainURL
		}
		c, _, err = (&FastStart{TLSConfig: h.clientTLS, WebSocket: true}).Dial(ctx, url, priv, opts...)
		return c, "ws", cancel, nil, err
	default: // plain HTTP upgrade
		ctx, cc := context.WithTimeout(context.Background(), 5*time.Second)
		defer cc()
		c, _, err = (&FastStart{}).Dial(ctx, h.aPlainURL, priv, opts...)
		return c, "http", cancel, nil, err
	}
}

// readLoop receives until an error, checking every packet; answer says
// whether server pings are answered.
func (h *chaosHarness) readLoop(c *Client, how string, answer bool, illegal *atomic.Bool, closing *atomic.Bool) {
	first := true
	restarted := false
	for {
		m, err := c.Recv()
		if err == nil && restarted {
			h.corrupt("%s client: %T after ServerRestarting", how, m)
		}
		if _, ok := m.(ServerRestarting); ok && err == nil {
			restarted = true
			h.restartNotices.Add(1)
		}
		if err != nil {
			if isCorruptErr(err) && !illegal.Load() {
				h.corrupt("%s client %s: Recv: %v", how, c.PublicKey().ShortString(), err)
			}
			return
		}
		if first {
			first = false
			if _, ok := m.(ServerInfo); !ok {
				h.corrupt("%s client: first message %T, not ServerInfo", how, m)
			} else {
				h.sessions.Add(1)
			}
			continue
		}
		switch m := m.(type) {
		case *ReceivedPacket:
			h.pktsRecv.Add(1)
			if why := checkChaosPacket(m.Source, m.Data); why != "" {
				h.corrupt("%s client: bad packet: %s", how, why)
			}
		case Ping:
			if answer {
				if c.SendPong([8]byte(m)) == nil {
					h.pingsAnswered.Add(1)
				}
			}
		case ServerInfo:
			h.corrupt("%s client: second ServerInfo", how)
		}
	}
}

// clientSession is one random client life.
func (h *chaosHarness) clientSession(r *rand.Rand, onB bool) {
	var priv PrivateKey
	if r.IntN(3) == 0 {
		priv, _ = GeneratePrivateKey()
	} else {
		priv = h.keys[r.IntN(len(h.keys))]
	}
	canAck := r.IntN(2) == 0
	opts := []ClientOption{RecvTimeout(3 * time.Second), CanAckPings(canAck)}
	c, how, cancel, raw, err := h.dial(r, onB, priv, opts)
	defer cancel()
	if err != nil {
		h.dialFails.Add(1)
		if !h.closingA.Load() && h.dialFailsEarly.Add(1) <= 5 {
			h.t.Logf("dial %s failed: %v", how, err)
		}
		h.sleep(time.Duration(r.IntN(20)) * time.Millisecond)
		return
	}
	read := r.IntN(10) < 7
	answer := r.IntN(10) < 7
	mode := "normal"
	switch x := r.IntN(20); {
	case x < 2:
		mode = "silent" // says nothing after login: parks, idle timeout
	case x < 5 && raw != nil:
		mode = "raw"   // frames split across park delays, maybe cut
		answer = false // the reader must not write
	}
	var illegal, closing atomic.Bool
	readDone := make(chan struct{})
	if read {
		h.goFn(func() {
			defer close(readDone)
			h.readLoop(c, how, answer, &illegal, &closing)
		})
	} else {
		close(readDone)
	}
	life := time.Duration(20+r.IntN(800)) * time.Millisecond
	end := time.Now().Add(life)
	idle := r.IntN(4) == 0 // mostly idle: parks and wakes
	switch mode {
	case "silent":
		h.silent.Add(1)
		h.sleep(time.Duration(r.IntN(1500)) * time.Millisecond)
		end = time.Now()
	case "raw":
		h.rawSessions.Add(1)
		for time.Now().Before(end) && !h.stopped() {
			pkt := chaosPacket(r, priv.Public(), r.IntN(3) == 0, h.randSize(r))
			dst := h.randDst(r)
			frame := appendFrame(nil, FrameSendPacket, append(dst[:], pkt...))
			cut := r.IntN(len(frame) + 1)
			truncate := r.IntN(15) == 0
			if _, err := raw.Write(frame[:cut]); err != nil {
				break
			}
			if truncate {
				illegal.Store(true)
				break
			}
			h.sleep(time.Duration(r.IntN(15)) * time.Millisecond)
			if _, err := raw.Write(frame[cut:]); err != nil {
				break
			}
			h.pktsSent.Add(1)
			h.sleep(time.Duration(r.IntN(10)) * time.Millisecond)
		}
		end = time.Now()
	}
	for time.Now().Before(end) && !h.stopped() {
		switch x := r.IntN(100); {
		case x < 70:
			n := 1 + r.IntN(8)
			for range n {
				pkt := chaosPacket(r, priv.Public(), r.IntN(3) == 0, h.randSize(r))
				if err := c.Send(h.randDst(r), pkt); err == nil {
					h.pktsSent.Add(1)
				}
			}
		case x < 78:
			c.SendPing([8]byte{byte(r.Uint32())})
		case x < 85:
			c.NotePreferred(r.IntN(2) == 0)
		case x < 86 && how == "pipe":
			cancel() // the Accept context ends
		case x < 87:
			illegal.Store(true) // not a mesh peer
			h.illegalSessions.Add(1)
			c.WatchConnectionChanges()
		}
		if idle {
			h.sleep(time.Duration(5+r.IntN(40)) * time.Millisecond)
		} else {
			h.sleep(time.Duration(r.IntN(4)) * time.Millisecond)
		}
	}
	closing.Store(true)
	c.Close()
	select {
	case <-readDone:
	case <-time.After(10 * time.Second):
		h.problem("%s client reader did not return 10s after Close", how)
		<-readDone
	}
}

// meshWatcher logs in with the mesh key, watches repeatedly, closes peers
// and forwards packets.
func (h *chaosHarness) meshWatcher(r *rand.Rand) {
	for !h.stopped() {
		h.watchRounds.Add(1)
		priv, _ := GeneratePrivateKey()
		var c *Client
		var err error
		if r.IntN(2) == 0 {
			cc, sc := net.Pipe()
			h.goFn(func() { h.a.Accept(context.Background(), sc, nil, "127.0.0.1:9") })
			c, err = NewClient(priv, cc, nil, MeshKey(testMeshKey), RecvTimeout(3*time.Second))
			if err != nil {
				cc.Close()
			}
		} else {
			ctx, cc := context.WithTimeout(context.Background(), 5*time.Second)
			c, _, err = (&FastStart{TLSConfig: h.clientTLS}).Dial(ctx, h.aTLSURL, priv, MeshKey(testMeshKey), RecvTimeout(3*time.Second))
			cc()
		}
		if err != nil {
			h.dialFails.Add(1)
			h.sleep(10 * time.Millisecond)
			continue
		}
		read := r.IntN(5) != 0
		var illegal, closing atomic.Bool
		readDone := make(chan struct{})
		if read {
			h.goFn(func() {
				defer close(readDone)
				h.readLoop(c, "mesh", true, &illegal, &closing)
			})
		} else {
			close(readDone)
		}
		end := time.Now().Add(time.Duration(100+r.IntN(1500)) * time.Millisecond)
		for time.Now().Before(end) && !h.stopped() {
			switch x := r.IntN(10); {
			case x < 4:
				c.WatchConnectionChanges()
			case x < 5:
				c.ClosePeer(h.pubs[r.IntN(len(h.pubs))])
			default:
				src := h.pubs[r.IntN(len(h.pubs))]
				c.ForwardPacket(src, h.randDst(r), chaosPacket(r, src, r.IntN(3) == 0, h.randSize(r)))
			}
			h.sleep(time.Duration(r.IntN(30)) * time.Millisecond)
		}
		closing.Store(true)
		c.Close()
		<-readDone
	}
}

// rcRound runs one ReconnectingClient used from several goroutines and
// closed while they run.
func (h *chaosHarness) rcRound(r *rand.Rand) {
	h.rcRounds.Add(1)
	priv, _ := GeneratePrivateKey()
	if r.IntN(2) == 0 {
		priv = h.keys[r.IntN(len(h.keys))]
	}
	url := h.aTLSURL
	if r.IntN(3) == 0 {
		url = h.aPlainURL
	}
	rc := &ReconnectingClient{
		URL:         url,
		Fallbacks:   []string{h.bURL},
		PrivateKey:  priv,
		Dialer:      &FastStart{TLSConfig: h.clientTLS, WebSocket: r.IntN(4) == 0},
		Options:     []ClientOption{CanAckPings(true), RecvTimeout(3 * time.Second)},
		MinBackoff:  5 * time.Millisecond,
		MaxBackoff:  100 * time.Millisecond,
		DialTimeout: 3 * time.Second,
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	loops := 0
	run := func(name string, f func() error) {
		loops++
		wg.Go(func() {
			for {
				err := f()
				if errors.Is(err, ErrClosed) || ctx.Err() != nil {
					return
				}
			}
		})
	}
	run("recv", func() error {
		m, err := rc.Recv(ctx)
		if err != nil {
			if isCorruptErr(err) {
				h.corrupt("rc Recv: %v", err)
			}
			return err
		}
		if p, ok := m.(*ReceivedPacket); ok {
			h.pktsRecv.Add(1)
			if why := checkChaosPacket(p.Source, p.Data); why != "" {
				h.corrupt("rc: bad packet: %s", why)
			}
		}
		return nil
	})
	pingRand := rand.New(rand.NewPCG(r.Uint64(), 3))
	run("ping", func() error {
		pctx, pc := context.WithTimeout(ctx, time.Second)
		defer pc()
		_, err := rc.Ping(pctx)
		time.Sleep(time.Duration(pingRand.IntN(20)) * time.Millisecond)
		return err
	})
	prand := rand.New(rand.NewPCG(r.Uint64(), 1))
	run("pref", func() error {
		v := prand.IntN(2) == 0
		err := rc.NotePreferred(v)
		time.Sleep(10 * time.Millisecond)
		return err
	})
	srand := rand.New(rand.NewPCG(r.Uint64(), 2))
	run("send", func() error {
		sctx, sc := context.WithTimeout(ctx, 2*time.Second)
		defer sc()
		err := rc.Send(sctx, h.randDst(srand), chaosPacket(srand, priv.Public(), srand.IntN(3) == 0, h.randSize(srand)))
		if err == nil {
			h.pktsSent.Add(1)
		}
		time.Sleep(time.Duration(srand.IntN(10)) * time.Millisecond)
		return err
	})
	h.sleep(time.Duration(200+r.IntN(3000)) * time.Millisecond)
	h.rcGens.Add(int64(rc.Generation()))
	closeDone := make(chan struct{})
	go func() { rc.Close(); close(closeDone) }()
	waited := make(chan struct{})
	go func() { wg.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(10 * time.Second):
		h.problem("ReconnectingClient: %d loops still running 10s after Close", loops)
		cancel()
		<-waited
	}
	<-closeDone
}

func (h *chaosHarness) operator(r *rand.Rand) {
	for h.sleep(time.Duration(20+r.IntN(150)) * time.Millisecond) {
		switch r.IntN(4) {
		case 0, 1:
			h.a.ClosePeer(h.pubs[r.IntN(len(h.pubs))])
		case 2:
			h.a.SetRateLimit(256<<10+r.IntN(1<<20), 64<<10+r.IntN(64<<10))
		case 3:
			h.a.SetRateLimit(0, 0)
		}
	}
}

func checkGauges(st Stats) string {
	var bad []string
	for name, v := range map[string]int64{
		"CurrentConnections": st.CurrentConnections, "CurrentHomeConnections": st.CurrentHomeConnections,
		"CurrentNotIdealConns": st.CurrentNotIdealConns, "CurrentDupKeys": st.CurrentDupKeys,
		"CurrentDupConns": st.CurrentDupConns, "Watchers": st.Watchers, "CurrentParked": st.CurrentParked,
	} {
		if v < 0 {
			bad = append(bad, fmt.Sprintf("%s=%d", name, v))
		}
	}
	for k, v := range st.PacketsDropped {
		if v < 0 {
			bad = append(bad, fmt.Sprintf("dropped[%s]=%d", k, v))
		}
	}
	return strings.Join(bad, " ")
}

func (h *chaosHarness) poller(s *Server, name string) {
	for h.sleep(time.Millisecond * 7) {
		n := 0
		for si := range s.Sessions() {
			n++
			if si.PacketsSent < 0 || si.PacketsReceived < 0 {
				h.problem("%s: session with negative counters: %+v", name, si)
			}
		}
		st := s.Stats()
		if bad := checkGauges(st); bad != "" {
			h.problem("%s: negative gauges during chaos: %s", name, bad)
		}
		_ = s.ExpVar().String()
		s.WritePrometheus(io.Discard)
		if err := s.ConsistencyCheck(); err != nil {
			h.problem("%s: ConsistencyCheck during chaos: %v", name, err)
		} else {
			h.consistencyOK.Add(1)
		}
	}
}

// TestChaos drives two meshed servers with everything at once for a few
// seconds (CHAOS_DUR=20s for longer): clients over every transport logging
// in and out with duplicate keys, sending, reading or not, answering pings
// or not, parking and waking, mesh watchers, an operator, reconnecting
// clients, then Close under traffic. It checks for corrupted packets,
// frames after the Restarting notice, consistency, gauges back at zero and
// goroutines left behind (run it with -race).
func TestChaos(t *testing.T) {
	dur := 3 * time.Second
	if v := os.Getenv("CHAOS_DUR"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("CHAOS_DUR=%q: %v", v, err)
		}
		dur = d
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	baseG := runtime.NumGoroutine()

	h := &chaosHarness{t: t, stop: make(chan struct{})}
	for range 12 {
		k := mustKey(t)
		h.keys = append(h.keys, k)
		h.pubs = append(h.pubs, k.Public())
	}
	for range 4 {
		h.unknown = append(h.unknown, mustKey(t).Public())
	}

	listen := func() net.Listener {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		return ln
	}
	lnTLS, lnPlain, lnTCP, lnB := listen(), listen(), listen(), listen()
	h.aTLSURL = "https://" + lnTLS.Addr().String() + "/derp"
	h.aPlainURL = "http://" + lnPlain.Addr().String() + "/derp"
	h.aTCPAddr = lnTCP.Addr().String()
	h.bURL = "http://" + lnB.Addr().String() + "/derp"

	cert, pool := testCert(t, "chaos")
	h.clientTLS = &tls.Config{RootCAs: pool, CurvePreferences: []tls.CurveID{tls.X25519}}
	meshDialer := &FastStart{TLSConfig: h.clientTLS}
	common := []ServerOption{
		WithMeshKey(testMeshKey),
		WithMeshPeers(h.aTLSURL, h.bURL),
		WithMeshDialer(meshDialer),
		WithIdlePark(3 * time.Millisecond),
		WithIdleTimeout(400 * time.Millisecond),
		WithKeepAlive(120 * time.Millisecond),
		WithQueueDepth(4),
		WithWriteTimeout(500 * time.Millisecond),
		WithRestartNotice(50*time.Millisecond, 200*time.Millisecond),
		WithLoginTimeout(2 * time.Second),
	}
	h.a = NewServer(mustKey(t), common...)
	h.b = NewServer(mustKey(t), common...)

	var http1 http.Protocols
	http1.SetHTTP1(true)
	tlsCfg := &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}}
	AppendMetaCert(tlsCfg, h.a.MetaCert())
	hsTLS := &http.Server{Handler: h.a, ErrorLog: quietLog, Protocols: &http1}
	hsPlain := &http.Server{Handler: h.a, ErrorLog: quietLog, Protocols: &http1}
	hsB := &http.Server{Handler: h.b, ErrorLog: quietLog, Protocols: &http1}
	var srvWG sync.WaitGroup
	srvWG.Go(func() { hsTLS.Serve(tls.NewListener(lnTLS, tlsCfg)) })
	srvWG.Go(func() { hsPlain.Serve(lnPlain) })
	srvWG.Go(func() { hsB.Serve(lnB) })
	var tcpConnsMu sync.Mutex
	var tcpConns []net.Conn
	srvWG.Go(func() {
		for {
			nc, err := lnTCP.Accept()
			if err != nil {
				return
			}
			tcpConnsMu.Lock()
			tcpConns = append(tcpConns, nc)
			tcpConnsMu.Unlock()
			srvWG.Go(func() { h.a.Accept(context.Background(), nc, nil, nc.RemoteAddr().String()) })
		}
	})

	rng := func(i uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, i)) }
	id := uint64(0)
	next := func() uint64 { id++; return id }
	for range 14 {
		r := rng(next())
		h.goFn(func() {
			for !h.stopped() {
				h.clientSession(r, false)
			}
		})
	}
	for range 4 {
		r := rng(next())
		h.goFn(func() {
			for !h.stopped() {
				h.clientSession(r, true)
			}
		})
	}
	for range 2 {
		r := rng(next())
		h.goFn(func() { h.meshWatcher(r) })
	}
	for range 3 {
		r := rng(next())
		h.goFn(func() {
			for !h.stopped() {
				h.rcRound(r)
			}
		})
	}
	{
		r := rng(next())
		h.goFn(func() { h.operator(r) })
	}
	h.goFn(func() { h.poller(h.a, "A") })
	h.goFn(func() { h.poller(h.b, "B") })

	time.Sleep(dur)

	// Before Close, with traffic flowing.
	if err := h.a.ConsistencyCheck(); err != nil {
		t.Errorf("A: ConsistencyCheck before Close: %v", err)
	}
	if err := h.b.ConsistencyCheck(); err != nil {
		t.Errorf("B: ConsistencyCheck before Close: %v", err)
	}
	stBefore := h.a.Stats()

	// Close A while traffic flows, then B.
	h.closingA.Store(true)
	closeStart := time.Now()
	closeDone := make(chan time.Duration, 2)
	go func() { h.a.Close(); closeDone <- time.Since(closeStart) }()
	time.Sleep(300 * time.Millisecond)
	go func() { h.b.Close(); closeDone <- time.Since(closeStart) }()
	time.Sleep(300 * time.Millisecond)
	close(h.stop)
	for i := range 2 {
		select {
		case d := <-closeDone:
			t.Logf("Close %d returned after %v", i, d)
		case <-time.After(20 * time.Second):
			t.Errorf("Server.Close did not return within 20s")
			dumpRelayGoroutines(t)
		}
	}

	waited := make(chan struct{})
	go func() { h.goroutines.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(20 * time.Second):
		t.Errorf("%d test goroutines still running 20s after stop", h.alive.Load())
		dumpRelayGoroutines(t)
	}

	hsTLS.Close()
	hsPlain.Close()
	hsB.Close()
	lnTCP.Close()
	tcpConnsMu.Lock()
	for _, c := range tcpConns {
		c.Close()
	}
	tcpConnsMu.Unlock()
	srvDone := make(chan struct{})
	go func() { srvWG.Wait(); close(srvDone) }()
	select {
	case <-srvDone:
	case <-time.After(10 * time.Second):
		t.Errorf("Accept calls / HTTP servers did not return within 10s")
		dumpRelayGoroutines(t)
	}

	for _, x := range []struct {
		name string
		s    *Server
	}{{"A", h.a}, {"B", h.b}} {
		st := x.s.Stats()
		if st.CurrentConnections != 0 || st.CurrentParked != 0 || st.Watchers != 0 ||
			st.CurrentDupConns != 0 || st.CurrentDupKeys != 0 || st.CurrentHomeConnections != 0 || st.CurrentNotIdealConns != 0 {
			t.Errorf("%s after Close: conns %d parked %d watchers %d dupConns %d dupKeys %d home %d notIdeal %d",
				x.name, st.CurrentConnections, st.CurrentParked, st.Watchers, st.CurrentDupConns, st.CurrentDupKeys,
				st.CurrentHomeConnections, st.CurrentNotIdealConns)
		}
		if bad := checkGauges(st); bad != "" {
			t.Errorf("%s after Close: negative gauges: %s", x.name, bad)
		}
		if err := x.s.ConsistencyCheck(); err != nil {
			t.Errorf("%s after Close: ConsistencyCheck: %v", x.name, err)
		}
	}

	if leaked := waitNoLeaks(5 * time.Second); leaked != "" {
		t.Errorf("goroutines of package relay left behind:\n%s", leaked)
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > baseG+2 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > baseG+2 {
		t.Errorf("%d goroutines at the end, %d at the start", n, baseG)
		dumpRelayGoroutines(t)
	}

	stA, stB := h.a.Stats(), h.b.Stats()
	t.Logf("A before close: conns=%d parked=%d", stBefore.CurrentConnections, stBefore.CurrentParked)
	t.Logf("client sessions with ServerInfo %d, dial failures %d (%d before Close), packets sent %d received %d, pongs sent %d, illegal sessions %d",
		h.sessions.Load(), h.dialFails.Load(), h.dialFailsEarly.Load(), h.pktsSent.Load(), h.pktsRecv.Load(), h.pingsAnswered.Load(), h.illegalSessions.Load())
	t.Logf("silent sessions %d, raw sessions %d, restart notices seen %d", h.silent.Load(), h.rawSessions.Load(), h.restartNotices.Load())
	t.Logf("RC rounds %d (generations %d), watcher rounds %d, consistency checks ok %d",
		h.rcRounds.Load(), h.rcGens.Load(), h.watchRounds.Load(), h.consistencyOK.Load())
	for _, x := range []struct {
		n  string
		st Stats
	}{{"A", stA}, {"B", stB}} {
		st := x.st
		t.Logf("%s: accepts %d parks %d recv %d sent %d fwdIn %d fwdOut %d pingsSent %d pongsRecv %d writeTimeouts %d rateWaits %d dupTotal %d ws %d fast %d upgrade %d",
			x.n, st.Accepts, st.Parks, st.PacketsReceived, st.PacketsSent, st.PacketsForwardedIn, st.PacketsForwardedOut,
			st.PingsSent, st.PongsReceived, st.WriteTimeouts, st.RateLimitWaits, st.TotalDupLogins, st.WebSocketAccepts, st.FastStartLogins, st.UpgradeLogins)
		t.Logf("%s errors: %v", x.n, st.Errors)
		var drops []string
		for k, v := range st.PacketsDropped {
			if v != 0 {
				drops = append(drops, fmt.Sprintf("%s=%d", k, v))
			}
		}
		t.Logf("%s drops: %v", x.n, drops)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, p := range h.problems {
		t.Errorf("problem: %s", p)
	}
	for _, c := range h.corrupted {
		t.Errorf("client saw corruption: %s", c)
	}
}

func dumpRelayGoroutines(t *testing.T) {
	buf := make([]byte, 8<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "fastderp/relay") {
			out = append(out, g)
		}
	}
	s := strings.Join(out, "\n\n")
	if len(s) > 60000 {
		s = s[:60000]
	}
	t.Logf("goroutines:\n%s", s)
}
