package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Tests of our Client against a hostile or broken server: bad input ends
// that connection only, with an error that says what was wrong, in bounded
// memory and CPU.

// wsServerFrame builds a server's (unmasked) WebSocket frame.
func wsServerFrame(b0 byte, payload []byte) []byte { return wsFrame(b0, payload, true) }

// wsFakeServer returns a DialContext whose connections reach a fake
// WebSocket DERP server: it answers the upgrade with a correct 101, reads
// and drops whatever the client sends, and then plays script, which writes
// the server's bytes.
func wsFakeServer(t *testing.T, script func(sc net.Conn)) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return scriptedPipeDialer(t, func(sc net.Conn, br *bufio.Reader) {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		fmt.Fprintf(sc, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
			"Sec-WebSocket-Accept: %s\r\nSec-WebSocket-Protocol: %s\r\n\r\n", wsAcceptKey(req.Header.Get("Sec-WebSocket-Key")), WebSocketProtocol)
		go io.Copy(io.Discard, br) // the ClientInfo, pongs, a close frame
		script(sc)
	})
}

// wsFlood writes frame over and over, in chunks, until the client hangs up
// or limit bytes went, and returns how many bytes the client took.
func wsFlood(sc net.Conn, first, frame []byte, limit int) int {
	sent, _ := sc.Write(first)
	var chunk []byte
	for len(chunk) < 4<<10 {
		chunk = append(chunk, frame...)
	}
	for sent < limit {
		n, err := sc.Write(chunk)
		sent += n
		if err != nil {
			break
		}
	}
	return sent
}

// TestWebSocketClientFramingFloodEnds: a WebSocket server that sends
// endless frames that carry no DERP byte (empty messages, empty pieces of
// a message, pings, pongs) would keep the client's read loop spinning
// within one Recv until its RecvTimeout, or forever without one. The
// client ends the connection once it has read more framing with no DERP
// byte between than wsMaxFraming (within wsFramingWindow, which a flood
// through a pipe takes a small part of), with an error that says so,
// before the login or after it. (The server writes through a pipe, so
// what it got written is what the client read, plus its read buffer.)
func TestWebSocketClientFramingFloodEnds(t *testing.T) {
	srv := mustKey(t)
	sk := appendFrame(nil, FrameServerKey, appendServerKey(nil, srv.Public()))
	const limit = 4 << 20 // what an unbounded client would take
	for _, tc := range []struct {
		name         string
		first, frame []byte
		beforeLogin  bool
	}{
		{name: "empty binary messages", frame: wsServerFrame(0x82, nil)},
		{name: "empty continuation frames", first: wsServerFrame(0x02, nil), frame: wsServerFrame(0x00, nil)},
		{name: "empty pings", frame: wsServerFrame(0x89, nil)},
		{name: "full pings", frame: wsServerFrame(0x89, make([]byte, wsMaxControl))},
		{name: "pongs", frame: wsServerFrame(0x8a, []byte("unsolicited"))},
		{name: "empty frames before the ServerKey", frame: wsServerFrame(0x82, nil), beforeLogin: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var took atomic.Int64
			dial := wsFakeServer(t, func(sc net.Conn) {
				if !tc.beforeLogin {
					sc.Write(wsServerFrame(0x82, sk))
				}
				took.Store(int64(wsFlood(sc, tc.first, tc.frame, limit)))
			})
			c, _, err := (&FastStart{WebSocket: true, DialContext: dial}).Dial(context.Background(), "http://derp.invalid/derp", mustKey(t), RecvTimeout(0))
			if err == nil {
				defer c.Close()
				_, err = c.Recv()
			}
			t.Logf("error: %v", err)
			var pe *ProtocolError
			if !errors.As(err, &pe) || pe.Reason != "websocket_framing_flood" {
				t.Errorf("error %v, want a *ProtocolError with Reason websocket_framing_flood", err)
			}
			if c != nil {
				c.Close()
			}
			// The script ends once the client hangs up (or after limit).
			waitFor(t, func() bool { return took.Load() != 0 })
			if n := took.Load(); n > wsMaxFraming+2*clientReadBuf+8<<10 {
				t.Errorf("the client read %d bytes of framing without a DERP byte, want at most about %d", n, wsMaxFraming)
			}
		})
	}
}

// TestWebSocketClientFramingAmidPayloadKept: framing that DERP bytes pay
// for never trips the client's bound, however much of it there is in all:
// a server (or a proxy in between) that pings before every KeepAlive, and
// splits each into one-byte pieces, keeps its connection.
func TestWebSocketClientFramingAmidPayloadKept(t *testing.T) {
	srv := mustKey(t)
	sk := appendFrame(nil, FrameServerKey, appendServerKey(nil, srv.Public()))
	ka := appendFrame(nil, FrameKeepAlive, nil)
	var unit []byte
	unit = append(unit, wsServerFrame(0x89, make([]byte, wsMaxControl))...)
	unit = append(unit, wsServerFrame(0x82, nil)...)
	unit = append(unit, wsServerFrame(0x02, ka[:1])...)
	for _, b := range ka[1 : len(ka)-1] {
		unit = append(unit, wsServerFrame(0x00, nil)...)
		unit = append(unit, wsServerFrame(0x00, []byte{b})...)
	}
	unit = append(unit, wsServerFrame(0x80, ka[len(ka)-1:])...)
	const n = 4 * wsMaxFraming / 127 // several bounds' worth of pings
	dial := wsFakeServer(t, func(sc net.Conn) {
		sc.Write(wsServerFrame(0x82, sk))
		for range n {
			if _, err := sc.Write(unit); err != nil {
				return
			}
		}
		sc.Write(wsServerFrame(0x88, []byte{0x03, 0xe8}))
	})
	c, _, err := (&FastStart{WebSocket: true, DialContext: dial}).Dial(context.Background(), "http://derp.invalid/derp", mustKey(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range n {
		m, err := c.Recv()
		if err != nil {
			t.Fatalf("Recv %d: %v", i, err)
		}
		if _, ok := m.(KeepAlive); !ok {
			t.Fatalf("Recv %d: %T, want KeepAlive", i, m)
		}
	}
	if _, err := c.Recv(); !errors.Is(err, io.EOF) || strings.Contains(err.Error(), "framing") {
		t.Fatalf("Recv after the KeepAlives: %v, want EOF", err)
	}
}

// TestDialProxyAnswerWithinLoginTimeout: through a Proxy, LoginTimeout
// bounds the wait for the proxy's answer to the CONNECT (and the TLS
// handshake with an https proxy) as it bounds the DERP server's answer to
// the upgrade: a proxy that takes the connection and says nothing, or drips
// an endless header, must not hold a dial whose ctx has no deadline
// forever.
func TestDialProxyAnswerWithinLoginTimeout(t *testing.T) {
	_, pool := testCert(t, "stalling proxy")
	for _, tc := range []struct {
		name   string
		tls    bool
		script func(nc net.Conn, br *bufio.Reader)
	}{
		{name: "CONNECT never answered", script: func(nc net.Conn, br *bufio.Reader) {
			if _, err := http.ReadRequest(br); err == nil {
				io.Copy(io.Discard, br)
			}
		}},
		{name: "CONNECT answer dripped", script: func(nc net.Conn, br *bufio.Reader) {
			if _, err := http.ReadRequest(br); err != nil {
				return
			}
			ans := "HTTP/1.1 200 Connection established\r\nX-Drip: " + strings.Repeat("a", maxProxyResponse)
			for i := range len(ans) {
				if _, err := nc.Write([]byte{ans[i]}); err != nil {
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
		}},
		{name: "https proxy never answers the ClientHello", tls: true, script: func(nc net.Conn, br *bufio.Reader) {
			io.Copy(io.Discard, br)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			acceptLoop(t, ln, func(nc net.Conn) {
				defer nc.Close()
				tc.script(nc, bufio.NewReader(nc))
			})
			proxy := &url.URL{Scheme: "http", Host: ln.Addr().String()}
			if tc.tls {
				proxy.Scheme = "https"
			}
			f := &FastStart{Proxy: http.ProxyURL(proxy), TLSConfig: &tls.Config{RootCAs: pool}}
			checkDialBounded(t, "Dial", "for the proxy", time.Minute, func() error {
				c, _, err := f.Dial(context.Background(), "http://derp.invalid/derp", mustKey(t), LoginTimeout(300*time.Millisecond))
				if c != nil {
					c.Close()
				}
				return err
			})
		})
	}
}

// TestWebSocketClientRefusesUnofferedExtension: a server whose 101 names
// an extension the client did not offer (RFC 6455 §4.1 has the client
// fail such a connection) is refused at the handshake, with an error that
// names the extension, not later with "reserved bits set, but no
// extension was negotiated" at its first compressed frame, which blames
// the wrong side of the handshake.
func TestWebSocketClientRefusesUnofferedExtension(t *testing.T) {
	srv := mustKey(t)
	sk := appendFrame(nil, FrameServerKey, appendServerKey(nil, srv.Public()))
	dial := scriptedPipeDialer(t, func(sc net.Conn, br *bufio.Reader) {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		fmt.Fprintf(sc, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
			"Sec-WebSocket-Accept: %s\r\nSec-WebSocket-Protocol: %s\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
			wsAcceptKey(req.Header.Get("Sec-WebSocket-Key")), WebSocketProtocol)
		go io.Copy(io.Discard, br)
		// A "compressed" ServerKey frame: RSV1 set.
		sc.Write(append([]byte{0x80 | 0x40 | wsBinary, byte(len(sk))}, sk...))
	})
	c, _, err := (&FastStart{WebSocket: true, DialContext: dial}).Dial(context.Background(), "http://derp.invalid/derp", mustKey(t))
	if err == nil {
		c.Close()
		t.Fatal("dial succeeded")
	}
	t.Log(err)
	var pe *ProtocolError
	if !errors.As(err, &pe) || pe.Reason != "websocket_handshake" || !strings.Contains(err.Error(), "permessage-deflate") {
		t.Errorf("dial error %v, want a websocket_handshake *ProtocolError naming permessage-deflate", err)
	}
}

// TestWebSocketClientSlowPingsKept: the client's bound on framing with no
// DERP byte between is a rate, not a total: an idle session (a server
// whose keepalives are off, or slow) under a proxy that pings now and
// then reads more than the bound in all over time, and keeps its
// connection. Here 4 KiB of pings (32 pings of 125 bytes) arrive every
// 400 ms, five times: 20 KiB in a row, at most 12 KiB within any second
// (the pipe makes the client read each burst as it is written).
func TestWebSocketClientSlowPingsKept(t *testing.T) {
	srv := mustKey(t)
	sk := appendFrame(nil, FrameServerKey, appendServerKey(nil, srv.Public()))
	ka := appendFrame(nil, FrameKeepAlive, nil)
	var burst []byte
	for range 32 {
		burst = append(burst, wsServerFrame(0x89, make([]byte, wsMaxControl))...)
	}
	const bursts = 5
	if bursts*len(burst) <= wsMaxFraming || 3*len(burst) > wsMaxFraming {
		t.Fatalf("bursts of %d bytes do not test a bound of %d", len(burst), wsMaxFraming)
	}
	dial := wsFakeServer(t, func(sc net.Conn) {
		sc.Write(wsServerFrame(0x82, sk))
		for i := range bursts {
			if i > 0 {
				time.Sleep(400 * time.Millisecond) // paces the sender; nothing is timed
			}
			if _, err := sc.Write(burst); err != nil {
				return
			}
		}
		sc.Write(wsServerFrame(0x82, ka))
		sc.Write(wsServerFrame(0x88, []byte{0x03, 0xe8}))
	})
	c, _, err := (&FastStart{WebSocket: true, DialContext: dial}).Dial(context.Background(), "http://derp.invalid/derp", mustKey(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if m, err := c.Recv(); err != nil {
		t.Fatalf("Recv: %v, want the KeepAlive after %d bytes of slow pings", err, bursts*len(burst))
	} else if _, ok := m.(KeepAlive); !ok {
		t.Fatalf("Recv: %T, want KeepAlive", m)
	}
}

// TestMeshPeerNoticesLogBounded: a mesh peer (compromised, or buggy) that
// sends Health frames of up to a frame's 1 MiB, or ServerRestarting
// frames, as fast as the link reads them, must not make this server write
// lines of that size or at that rate: the Health text is cut, a Health the
// same as the last is logged at Debug, and the lines are logged at Info at
// most as logPeer's are (a burst, then 10 a second), the rest at Debug.
func TestMeshPeerNoticesLogBounded(t *testing.T) {
	const repeats, frames = 50, 2000
	peer := &scriptedServer{priv: mustKey(t)}
	pong := make(chan struct{})
	var once sync.Once
	peer.script = func(_ int, sc net.Conn, br *bufio.Reader, _ PublicKey) {
		go func() { // the link's WatchConns and Pings; the Pong to ours
			for {
				ft, p, err := readRawFrame(br)
				if err != nil {
					return
				}
				if ft == FramePong && string(p) == "healthy!" {
					once.Do(func() { close(pong) })
				}
			}
		}()
		var b []byte
		b = appendFrame(b, FrameHealth, bytes.Repeat([]byte("x\n"), (maxClientFrame-frameHeaderLen)/2))
		for range repeats {
			b = appendFrame(b, FrameHealth, []byte("same problem"))
		}
		for i := range frames {
			if i%2 == 0 {
				b = appendFrame(b, FrameHealth, fmt.Appendf(nil, "problem %d\n%s", i, strings.Repeat("y", 1000)))
			} else {
				b = appendFrame(b, FrameRestarting, make([]byte, restartingLen))
			}
		}
		b = appendFrame(b, FramePing, []byte("healthy!"))
		if _, err := sc.Write(b); err != nil {
			return
		}
		peer.stall()
	}
	h := &recHandler{}
	start := time.Now()
	// Over TCP: the link writes its WatchConns before it reads the
	// ServerInfo, which a pipe would not take.
	newTestServer(t, WithMeshKey(testMeshKey), WithMeshPeers("http://peer.invalid/derp"),
		WithMeshDialer(&FastStart{DialContext: peer.dialTCP}), WithLogger(slog.New(h)))
	t.Cleanup(peer.close)
	select {
	case <-pong:
	case <-time.After(time.Minute):
		t.Fatal("the mesh link did not answer the Ping after the notices in a minute")
	}
	took := time.Since(start) // the frames came within it
	var lines, same, total, longest int
	for _, r := range h.infoRecords() {
		if r.Message != "relay: mesh peer health" && r.Message != "relay: mesh peer restarting" {
			continue
		}
		size := len(r.Message)
		r.Attrs(func(a slog.Attr) bool {
			size += len(a.Key) + len(a.Value.String())
			if a.Key == "problem" && a.Value.String() == "same problem" {
				same++
			}
			return true
		})
		lines++
		total += size
		longest = max(longest, size)
	}
	allowed := logLineBurst + int(took.Seconds()*logLineRate) + 1
	t.Logf("%d notices in %v: %d lines at Info, %d bytes, the longest %d", 1+repeats+frames, took, lines, total, longest)
	if longest > 512 {
		t.Errorf("a line of %d bytes for one Health frame", longest)
	}
	if same != 1 {
		t.Errorf("%d lines at Info for %d Health frames in a row with the same problem, want 1", same, repeats)
	}
	if lines > allowed {
		t.Errorf("%d lines at Info for %d notices in %v, want at most %d", lines, 1+repeats+frames, took, allowed)
	}
}

// skipFloodLogin logs a Client in to a fake server over a pipe and reads
// its ServerInfo; the server then writes unit over and over, up to limit
// bytes, and closes flooded. Through a pipe, what is written was read.
func skipFloodLogin(t *testing.T, unit []byte, limit int) (c *Client, flooded <-chan struct{}) {
	srv, priv := mustKey(t), mustKey(t)
	cc, sc := net.Pipe()
	t.Cleanup(func() { cc.Close(); sc.Close() })
	go io.Copy(io.Discard, sc) // the ClientInfo
	done := make(chan struct{})
	go func() {
		login := append(appendFrame(nil, FrameServerKey, appendServerKey(nil, srv.Public())),
			serverInfoFrame(srv, priv.Public(), []byte(`{}`))...)
		if _, err := sc.Write(login); err != nil {
			return
		}
		var chunk []byte
		for len(chunk) < 32<<10 {
			chunk = append(chunk, unit...)
		}
		for sent := 0; sent < limit; sent += len(chunk) {
			if _, err := sc.Write(chunk); err != nil {
				return
			}
		}
		close(done)
	}()
	c, err := NewClient(priv, cc, nil)
	if err != nil {
		t.Fatal(err)
	}
	if m, err := c.Recv(); err != nil {
		t.Fatalf("Recv: %v, want the ServerInfo", err)
	} else if _, ok := m.(ServerInfo); !ok {
		t.Fatalf("Recv: %T, want the ServerInfo", m)
	}
	return c, done
}

// TestClientRecvEndsSkippedFlood: a server that sends nothing but frames
// Recv skips (of unknown types, too short to parse, ServerKey frames after
// the first) would hold Recv forever, RecvTimeout or not: each frame
// re-arms it. Recv returns a *ProtocolError once it has skipped
// maxSkippedBytes in a row, long before it reads all of limit.
func TestClientRecvEndsSkippedFlood(t *testing.T) {
	const limit = 64 << 20
	for _, tc := range []struct {
		name string
		unit []byte
	}{
		{"empty frames of an unknown type", appendFrame(nil, 0x7f, nil)},
		{"large frames of an unknown type", appendFrame(nil, 0x7f, make([]byte, 64<<10))},
		{"short PeerGone frames", appendFrame(nil, FramePeerGone, make([]byte, KeyLen-1))},
		{"later ServerKey frames", appendFrame(nil, FrameServerKey, make([]byte, serverKeyLen))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, flooded := skipFloodLogin(t, tc.unit, limit)
			type result struct {
				m   Message
				err error
			}
			got := make(chan result, 1)
			go func() {
				m, err := c.Recv()
				got <- result{m, err}
			}()
			var r result
			select {
			case r = <-got:
			case <-flooded:
				c.Close()
				<-got
				t.Fatalf("Recv read %d MiB of frames it skips, and reads on", limit>>20)
			case <-time.After(2 * time.Minute):
				t.Fatal("Recv neither returned nor read the flood in 2 minutes")
			}
			t.Logf("Recv: %v", r.err)
			var pe *ProtocolError
			if !errors.As(r.err, &pe) || pe.Reason != "skipped_frames_flood" {
				t.Fatalf("Recv: %T %v, want a *ProtocolError with Reason skipped_frames_flood", r.m, r.err)
			}
		})
	}
}

// TestClientRecvSkippedAmidMessagesKept: frames Recv skips never end the
// connection when a message comes before the bound, however many there
// are in all: the bound is for the frames skipped in a row.
func TestClientRecvSkippedAmidMessagesKept(t *testing.T) {
	var unit []byte
	for len(unit) < maxSkippedBytes-64<<10 {
		unit = appendFrame(unit, 0x7f, make([]byte, 32<<10))
	}
	unit = appendFrame(unit, FrameKeepAlive, nil)
	const n = 4
	c, _ := skipFloodLogin(t, unit, n*len(unit))
	for i := range n {
		m, err := c.Recv()
		if err != nil {
			t.Fatalf("Recv %d, after %d bytes: %v", i, i*len(unit), err)
		}
		if _, ok := m.(KeepAlive); !ok {
			t.Fatalf("Recv %d: %T, want KeepAlive", i, m)
		}
	}
}

// TestDialRegionTLSAnswerBounded: DialRegionTLS gives each node but the
// last a share of ctx, and the last (or a region's only node) all of it:
// with no deadline on ctx, a node that takes the connection and never
// answers the ClientHello (or a Proxy that never answers the CONNECT)
// held the call forever. LoginTimeout's default bounds each wait for an
// answer, as in Dial.
func TestDialRegionTLSAnswerBounded(t *testing.T) {
	for _, tc := range []struct {
		name  string
		proxy bool
		nodes int
	}{
		{name: "one node", nodes: 1},
		{name: "last of two nodes", nodes: 2},
		{name: "proxy", proxy: true, nodes: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mute := func(ctx context.Context, network, addr string) (net.Conn, error) {
				cc, sc := net.Pipe()
				t.Cleanup(func() { cc.Close(); sc.Close() })
				go io.Copy(io.Discard, sc) // the ClientHello or the CONNECT
				return cc, nil
			}
			f := &FastStart{DialContext: mute, regionAnswer: 300 * time.Millisecond}
			if tc.proxy {
				f.Proxy = http.ProxyURL(&url.URL{Scheme: "http", Host: "proxy.invalid:3128"})
			}
			r := &Region{RegionID: 1}
			for i := range tc.nodes {
				r.Nodes = append(r.Nodes, &Node{Name: fmt.Sprint(i), HostName: "derp.invalid", IPv4: "192.0.2.1", IPv6: "none"})
			}
			checkDialBounded(t, "DialRegionTLS", "for the node", 30*time.Second, func() error {
				tc, _, err := f.DialRegionTLS(context.Background(), r)
				if tc != nil {
					tc.Close()
				}
				return err
			})
		})
	}
}

// TestClientHealthCut: a server's Health text may run to a frame's 1 MiB;
// a Client made a buffer of it and then a string of as much, for a text
// meant for people to read. It keeps the first maxHealthLen bytes (cut at
// a character, marked "…") in memory bounded by that, drops the rest, and
// reads on.
func TestClientHealthCut(t *testing.T) {
	long := strings.Repeat("a", maxHealthLen-1) + "é" + strings.Repeat("b", maxClientFrame-maxHealthLen-1)
	exact := strings.Repeat("c", maxHealthLen)
	var unit []byte
	unit = appendFrame(unit, FrameHealth, []byte(long))
	unit = appendFrame(unit, FrameHealth, []byte(exact))
	unit = appendFrame(unit, FrameKeepAlive, nil)
	c, _ := skipFloodLogin(t, unit, len(unit))
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	m, err := c.Recv()
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	h, ok := m.(Health)
	if !ok {
		t.Fatalf("Recv: %T, want Health", m)
	}
	if want := strings.Repeat("a", maxHealthLen-1) + "…"; h.Problem != want {
		t.Errorf("a Health of %d bytes: Problem of %d bytes (%q...), want the first %d bytes up to the cut character, and …",
			len(long), len(h.Problem), clip(h.Problem, 20), maxHealthLen-1)
	}
	if n := after.TotalAlloc - before.TotalAlloc; n > 4*maxHealthLen {
		t.Errorf("Recv of a Health of %d bytes allocated %d bytes", len(long), n)
	}
	if m, err := c.Recv(); err != nil || m.(Health).Problem != exact {
		t.Errorf("Recv of a Health of %d bytes: %v, want it whole", len(exact), err)
	}
	if m, err := c.Recv(); err != nil {
		t.Errorf("Recv after the Health frames: %v", err)
	} else if _, ok := m.(KeepAlive); !ok {
		t.Errorf("Recv after the Health frames: %T, want KeepAlive", m)
	}
}

// meshPeerNoticeRecords runs a mesh link to a scripted peer that sends
// frames, then a Ping, and returns the link's log records once the Pong
// to that Ping came back (every frame before it was read and logged).
func meshPeerNoticeRecords(t *testing.T, frames []byte) []slog.Record {
	t.Helper()
	peer := &scriptedServer{priv: mustKey(t)}
	pong := make(chan struct{})
	var once sync.Once
	peer.script = func(_ int, sc net.Conn, br *bufio.Reader, _ PublicKey) {
		go func() {
			for {
				ft, p, err := readRawFrame(br)
				if err != nil {
					return
				}
				if ft == FramePong && string(p) == "noticed!" {
					once.Do(func() { close(pong) })
				}
			}
		}()
		if _, err := sc.Write(appendFrame(frames, FramePing, []byte("noticed!"))); err != nil {
			return
		}
		peer.stall()
	}
	h := &recHandler{}
	newTestServer(t, WithMeshKey(testMeshKey), WithMeshPeers("http://peer.invalid/derp"),
		WithMeshDialer(&FastStart{DialContext: peer.dialTCP}), WithLogger(slog.New(h)))
	t.Cleanup(peer.close)
	select {
	case <-pong:
	case <-time.After(time.Minute):
		t.Fatal("the mesh link did not answer the Ping after the notices in a minute")
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.recs)
}

// TestMeshPeerHealthCutSaysBytes: a mesh peer's Health text longer than
// maxLoggedHealth is logged cut, and then problemBytes gives its length,
// however little longer it is (WithLogger's doc).
func TestMeshPeerHealthCutSaysBytes(t *testing.T) {
	var b []byte
	lengths := []int{maxLoggedHealth, maxLoggedHealth + 1, maxLoggedHealth + 2, maxLoggedHealth + 3, 1000}
	for i, n := range lengths {
		b = appendFrame(b, FrameHealth, fmt.Appendf(nil, "%d%s", i, strings.Repeat("z", n-1)))
	}
	got := map[int]int64{} // text length, from its first byte: problemBytes (-1: none)
	for _, r := range meshPeerNoticeRecords(t, b) {
		if r.Message != "relay: mesh peer health" || r.Level != slog.LevelInfo {
			continue
		}
		i, size := -1, int64(-1)
		r.Attrs(func(a slog.Attr) bool {
			switch a.Key {
			case "problem":
				i = int(a.Value.String()[0] - '0')
			case "problemBytes":
				size = a.Value.Int64()
			}
			return true
		})
		if i >= 0 && i < len(lengths) {
			got[lengths[i]] = size
		}
	}
	for _, n := range lengths {
		want := int64(n)
		if n <= maxLoggedHealth {
			want = -1
		}
		if size, ok := got[n]; !ok {
			t.Errorf("no Info line for a %d-byte Health", n)
		} else if size != want {
			t.Errorf("a %d-byte Health logged with problemBytes %d, want %d (-1: none)", n, size, want)
		}
	}
}

// TestMeshPeerRestartLoggedAfterHealthFlood: a mesh peer that sent more
// Health notices than the link's log budget holds, then says it is
// restarting, must still have that said at Info: the first
// ServerRestarting of a connection is what an operator needs to explain
// the link going down.
func TestMeshPeerRestartLoggedAfterHealthFlood(t *testing.T) {
	var b []byte
	for i := range 3 * logLineBurst {
		b = appendFrame(b, FrameHealth, fmt.Appendf(nil, "problem %d", i))
	}
	restart := make([]byte, restartingLen)
	binary.BigEndian.PutUint32(restart, 1234) // reconnect in, ms
	b = appendFrame(b, FrameRestarting, restart)
	b = appendFrame(b, FrameRestarting, restart) // the second may be held back
	infos, debugs := 0, 0
	for _, r := range meshPeerNoticeRecords(t, b) {
		if r.Message != "relay: mesh peer restarting" {
			continue
		}
		if r.Level == slog.LevelInfo {
			infos++
		} else {
			debugs++
		}
	}
	if infos == 0 {
		t.Errorf("the peer's ServerRestarting after %d Health notices logged at Info 0 times (%d at Debug), want at least once", 3*logLineBurst, debugs)
	}
}

// TestWebSocketClientFramingBetweenSingleBytesEnds: a WebSocket server
// that puts one DERP byte between runs of framing just under the bound
// (empty messages, here) would have each byte reset the count, and make
// the client read about 16 KiB of framing per DERP byte: through frames
// Recv skips (unknown types, 5 bytes each), up to 4 MiB of them, one Recv
// would read some 64 GiB, re-arming RecvTimeout at every frame. DERP
// bytes pay for a bounded amount of framing each instead, and the
// connection ends with the flood error within a few runs.
func TestWebSocketClientFramingBetweenSingleBytesEnds(t *testing.T) {
	srv := mustKey(t)
	sk := appendFrame(nil, FrameServerKey, appendServerKey(nil, srv.Public()))
	const limit = 16 << 20 // what an unbounded client would take
	var run []byte
	for len(run)+2 < wsMaxFraming {
		run = append(run, wsServerFrame(0x82, nil)...)
	}
	unknown := appendFrame(nil, FrameType(0x7f), nil)
	var took atomic.Int64
	dial := wsFakeServer(t, func(sc net.Conn) {
		sc.Write(wsServerFrame(0x82, sk))
		sent := 0
		for i := 0; sent < limit; i++ {
			n, err := sc.Write(append(run, wsServerFrame(0x82, unknown[i%len(unknown):][:1])...))
			sent += n
			if err != nil {
				break
			}
		}
		took.Store(int64(sent))
	})
	c, _, err := (&FastStart{WebSocket: true, DialContext: dial}).Dial(context.Background(), "http://derp.invalid/derp", mustKey(t), RecvTimeout(0))
	if err == nil {
		_, err = c.Recv()
		c.Close()
	}
	t.Logf("error: %v", err)
	waitFor(t, func() bool { return took.Load() != 0 })
	var pe *ProtocolError
	if !errors.As(err, &pe) || pe.Reason != "websocket_framing_flood" {
		t.Errorf("error %v after %d bytes from the server, want a *ProtocolError with Reason websocket_framing_flood", err, took.Load())
	}
	if n := took.Load(); n > 4*wsMaxFraming+2*clientReadBuf {
		t.Errorf("the client read %d bytes of framing with a DERP byte every %d, want at most about %d", n, len(run), 4*wsMaxFraming)
	}
}

// checkDialBounded runs dial, which a peer that never answers holds, and
// fails the test unless it ends within patience (far past its 300 ms
// bound) with an error that names LoginTimeout and wraps
// os.ErrDeadlineExceeded. dial closes what it opened; name and waitingFor
// word the failures.
func checkDialBounded(t *testing.T, name, waitingFor string, patience time.Duration, dial func() error) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- dial() }()
	select {
	case err := <-done:
		t.Log(err)
		if !errors.Is(err, os.ErrDeadlineExceeded) || !strings.Contains(fmt.Sprint(err), "LoginTimeout") {
			t.Fatalf("%s failed with %v, want an error that names LoginTimeout and wraps os.ErrDeadlineExceeded", name, err)
		}
	case <-time.After(patience):
		t.Fatalf("%s still waiting %s %v after its bound (300ms)", name, waitingFor, patience)
	}
}
