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
	"math/rand/v2"
	"net"
	"net/http"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"
)

// TestWebSocketSessions relays packets between clients that reach the
// server over WebSocket (TLS and plain) and a client that uses DERP's own
// upgrade, with packets large enough to be cut into several frames.
func TestWebSocketSessions(t *testing.T) {
	for _, plain := range []bool{false, true} {
		t.Run(fmt.Sprintf("plain=%v", plain), func(t *testing.T) {
			s := newTestServer(t)
			srv := serveDERP(t, s, derpServeOpts{plain: plain})
			ws := &FastStart{TLSConfig: srv.ClientTLS, WebSocket: true}
			a, hs := dialFast(t, ws, srv.URL)
			b, _ := dialFast(t, ws, srv.URL)
			d, _ := dialFast(t, &FastStart{TLSConfig: srv.ClientTLS}, srv.URL)
			if hs.Path != UpgradePath || !strings.Contains(hs.Reason, "WebSocket") ||
				hs.ServerKey != s.PublicKey() || hs.KeySource != "server-key-frame" {
				t.Errorf("handshake %+v, want the upgrade path over WebSocket with the server's key", hs)
			}
			if want := uint16(0); plain && hs.TLSVersion != want || !plain && hs.TLSVersion != tls.VersionTLS13 {
				t.Errorf("TLS version %#x", hs.TLSVersion)
			}
			relayBothWays(t, a, b)
			relayBothWays(t, a, d)
			big := bytes.Repeat([]byte("0123456789abcdef"), MaxPacketSize/16)
			for _, p := range [][2]*Client{{a, b}, {d, b}, {b, d}} {
				if err := p[0].Send(p[1].PublicKey(), big); err != nil {
					t.Fatal(err)
				}
				got, ok := recvMsg[*ReceivedPacket](t, p[1])
				if !ok {
					t.FailNow()
				}
				if !bytes.Equal(got.Data, big) || got.Source != p[0].PublicKey() {
					t.Fatalf("received %d bytes from %s, want %d from %s", len(got.Data), got.Source.ShortString(), len(big), p[0].PublicKey().ShortString())
				}
			}
			// d takes the fast path over TLS 1.3 (meta cert), and the
			// upgrade path over plain HTTP (no known key).
			wantUpgrade, wantFast := int64(2), int64(1)
			if plain {
				wantUpgrade, wantFast = 3, 0
			}
			if st := s.Stats(); st.WebSocketAccepts != 2 || st.UpgradeLogins != wantUpgrade || st.FastStartLogins != wantFast {
				t.Errorf("stats: %d WebSocket accepts, %d upgrade and %d fast-start logins; want 2, %d, %d",
					st.WebSocketAccepts, st.UpgradeLogins, st.FastStartLogins, wantUpgrade, wantFast)
			}
		})
	}
}

// wsDial opens a raw WebSocket connection to a plain-HTTP DERP server with
// the given extra request headers, and returns the connection and the
// response.
func wsDial(t *testing.T, addr string, hdr map[string]string) (net.Conn, *bufio.Reader, *http.Response) {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	h := map[string]string{
		"Connection":             "Upgrade",
		"Upgrade":                "websocket",
		"Sec-WebSocket-Version":  "13",
		"Sec-WebSocket-Key":      "dGhlIHNhbXBsZSBub25jZQ==",
		"Sec-WebSocket-Protocol": "chat, derp",
	}
	for k, v := range hdr {
		h[k] = v
	}
	var req strings.Builder
	fmt.Fprintf(&req, "GET /derp HTTP/1.1\r\nHost: %s\r\n", addr)
	for k, v := range h {
		if v != "" {
			fmt.Fprintf(&req, "%s: %s\r\n", k, v)
		}
	}
	req.WriteString("\r\n")
	if _, err := io.WriteString(nc, req.String()); err != nil {
		t.Fatal(err)
	}
	nc.SetDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(nc)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	return nc, br, resp
}

// TestWebSocketHandshake checks the server's answers to WebSocket upgrade
// requests, right and wrong.
func TestWebSocketHandshake(t *testing.T) {
	s := newTestServer(t)
	srv := serveDERP(t, s, derpServeOpts{plain: true})

	_, _, resp := wsDial(t, srv.Addr, nil)
	if resp.StatusCode != http.StatusSwitchingProtocols ||
		resp.Header.Get("Sec-WebSocket-Accept") != "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" || // RFC 6455's example
		resp.Header.Get("Sec-WebSocket-Protocol") != "derp" || resp.Header.Get("Upgrade") != "websocket" {
		t.Errorf("good handshake: %s %v", resp.Status, resp.Header)
	}
	_, _, resp = wsDial(t, srv.Addr, map[string]string{"Sec-WebSocket-Version": "8"})
	if resp.StatusCode != http.StatusUpgradeRequired || resp.Header.Get("Sec-WebSocket-Version") != "13" {
		t.Errorf("version 8: %s %v, want 426 with Sec-WebSocket-Version: 13", resp.Status, resp.Header)
	}
	for _, h := range []map[string]string{
		{"Sec-WebSocket-Key": "c2hvcnQ="},
		{"Sec-WebSocket-Key": ""},
		{"Connection": "keep-alive"},
	} {
		_, _, resp = wsDial(t, srv.Addr, h)
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%v: %s, want 400", h, resp.Status)
		}
	}
	// Without the derp subprotocol it is an old Tailscale client that
	// says "Upgrade: WebSocket" and speaks DERP: it gets DERP's 101.
	_, _, resp = wsDial(t, srv.Addr, map[string]string{"Sec-WebSocket-Protocol": "chat", "Upgrade": "WebSocket"})
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "DERP" ||
		resp.Header.Get(PublicKeyHeader) != s.PublicKey().String() {
		t.Errorf("no derp subprotocol: %s %v, want DERP's 101", resp.Status, resp.Header)
	}
	if st := s.Stats(); st.WebSocketAccepts != 1 || st.Rejected["websocket_version"] != 1 || st.Rejected["websocket_handshake"] != 3 {
		t.Errorf("stats: %d accepts, rejected %v", st.WebSocketAccepts, st.Rejected)
	}
}

// wsFrame builds a client frame: b0 is the first header byte; the payload
// is masked with a fixed key unless unmasked.
func wsFrame(b0 byte, payload []byte, unmasked bool) []byte {
	b := []byte{b0, 0}
	switch n := len(payload); {
	case n < 126:
		b[1] = byte(n)
	case n <= 0xffff:
		b[1] = 126
		b = binary.BigEndian.AppendUint16(b, uint16(n))
	default:
		b[1] = 127
		b = binary.BigEndian.AppendUint64(b, uint64(n))
	}
	if unmasked {
		return append(b, payload...)
	}
	b[1] |= 0x80
	mask := [4]byte{0x12, 0x34, 0x56, 0x78}
	b = append(b, mask[:]...)
	start := len(b)
	b = append(b, payload...)
	wsMask(b[start:], mask, 0)
	return b
}

// readServerFrames reads unmasked server frames until the connection ends,
// and returns their opcodes and payloads.
func readServerFrames(t *testing.T, br *bufio.Reader) (ops []byte, payloads [][]byte) {
	t.Helper()
	for {
		var h [2]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			return ops, payloads
		}
		if h[1]&0x80 != 0 {
			t.Errorf("server frame is masked")
			return
		}
		n := uint64(h[1] & 0x7f)
		switch n {
		case 126:
			var l [2]byte
			io.ReadFull(br, l[:])
			n = uint64(binary.BigEndian.Uint16(l[:]))
		case 127:
			var l [8]byte
			io.ReadFull(br, l[:])
			n = binary.BigEndian.Uint64(l[:])
		}
		p := make([]byte, n)
		if _, err := io.ReadFull(br, p); err != nil {
			return ops, payloads
		}
		ops = append(ops, h[0]&0x0f)
		payloads = append(payloads, p)
	}
}

// TestWebSocketHostile sends broken WebSocket streams after a good
// handshake: each ends only its own connection, with a close frame whose
// code says why, and a session of another client keeps working.
func TestWebSocketHostile(t *testing.T) {
	s := newTestServer(t)
	srv := serveDERP(t, s, derpServeOpts{plain: true})
	fs := &FastStart{WebSocket: true}
	a, _ := dialFast(t, fs, srv.URL)
	b, _ := dialFast(t, fs, srv.URL)

	tests := []struct {
		name     string
		send     []byte
		wantCode uint16
	}{
		{"text message", wsFrame(0x81, []byte("hello"), false), 1003},
		{"unmasked frame", wsFrame(0x82, []byte("hello"), true), 1002},
		{"reserved bit", wsFrame(0xc2, []byte("hello"), false), 1002},
		{"continuation first", wsFrame(0x80, []byte("hello"), false), 1002},
		{"new message inside one", append(wsFrame(0x02, []byte("he"), false), wsFrame(0x82, []byte("llo"), false)...), 1002},
		{"fragmented ping", wsFrame(0x09, []byte("x"), false), 1002},
		{"oversized ping", wsFrame(0x89, make([]byte, 126), false), 1002},
		{"one-byte close", wsFrame(0x88, []byte{3}, false), 1002},
		{"unknown opcode", wsFrame(0x83, nil, false), 1002},
		{"unknown control opcode", wsFrame(0x8b, nil, false), 1002},
		{"length top bit", []byte{0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4}, 1002},
		{"close", wsFrame(0x88, binary.BigEndian.AppendUint16(nil, 1001), false), 1001},
		{"empty close", wsFrame(0x88, nil, false), 1000},
		// A code no endpoint may send is not echoed (RFC 6455 7.4).
		{"close 1005", wsFrame(0x88, binary.BigEndian.AppendUint16(nil, 1005), false), 1002},
		{"close 0", wsFrame(0x88, []byte{0, 0, 'x'}, false), 1002},
		{"close 2999", wsFrame(0x88, binary.BigEndian.AppendUint16(nil, 2999), false), 1002},
		{"close 4999", wsFrame(0x88, binary.BigEndian.AppendUint16(nil, 4999), false), 4999},
		{"close reason not UTF-8", wsFrame(0x88, []byte{3, 232, 0xff, 0xfe}, false), 1007},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nc, br, resp := wsDial(t, srv.Addr, nil)
			if resp.StatusCode != http.StatusSwitchingProtocols {
				t.Fatalf("handshake: %s", resp.Status)
			}
			if _, err := nc.Write(tt.send); err != nil {
				t.Fatal(err)
			}
			ops, payloads := readServerFrames(t, br)
			if len(ops) == 0 || ops[len(ops)-1] != wsClose || len(payloads[len(ops)-1]) < 2 {
				t.Fatalf("server sent opcodes %v, want a close frame last", ops)
			}
			if code := binary.BigEndian.Uint16(payloads[len(ops)-1]); code != tt.wantCode {
				t.Errorf("close code %d (%q), want %d", code, payloads[len(ops)-1][2:], tt.wantCode)
			}
		})
	}
	relayBothWays(t, a, b)
}

// TestWebSocketPing checks that the server answers a WebSocket ping with a
// pong carrying the same payload, and that pongs and empty frames between
// the pieces of a message change nothing.
func TestWebSocketPing(t *testing.T) {
	s := newTestServer(t)
	srv := serveDERP(t, s, derpServeOpts{plain: true})
	nc, br, _ := wsDial(t, srv.Addr, nil)
	nc.Write(wsFrame(0x89, []byte("are you there"), false))
	// The server's first message is its ServerKey frame; then the pong.
	var sawPong bool
	for !sawPong {
		var h [2]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			t.Fatal(err)
		}
		p := make([]byte, h[1]&0x7f)
		io.ReadFull(br, p)
		if h[0]&0x0f == wsPong {
			sawPong = true
			if string(p) != "are you there" {
				t.Errorf("pong payload %q", p)
			}
		}
	}
}

// TestWebSocketPingFlood checks that a flood of pings gets a bounded
// number of pongs, and that the stream goes on to the close frame after
// it.
func TestWebSocketPingFlood(t *testing.T) {
	s := newTestServer(t)
	srv := serveDERP(t, s, derpServeOpts{plain: true})
	nc, br, _ := wsDial(t, srv.Addr, nil)
	var flood []byte
	for range 1000 {
		flood = append(flood, wsFrame(0x89, []byte("p"), false)...)
	}
	nc.Write(flood)
	// Then a close frame, whose echo ends the count.
	nc.Write(wsFrame(0x88, binary.BigEndian.AppendUint16(nil, 1000), false))
	ops, _ := readServerFrames(t, br)
	pongs := bytes.Count(ops, []byte{wsPong})
	if len(ops) == 0 || ops[len(ops)-1] != wsClose {
		t.Errorf("server sent opcodes %v, want a close frame last", ops)
	}
	// The flood takes far less than a second to arrive, but allow for
	// a slow machine crossing into a second window.
	if pongs < 1 || pongs > 2*wsPongsPerSecond {
		t.Errorf("%d pongs for 1000 pings, want 1 to %d", pongs, 2*wsPongsPerSecond)
	}
}

// TestWSConnStream round-trips random writes through a client and a
// server wsConn, with pongs and empty frames in between, and reads of
// random sizes under short deadlines that expire in the middle of headers,
// with the read buffer given back between reads now and then.
func TestWSConnStream(t *testing.T) {
	cc, sc := net.Pipe()
	defer cc.Close()
	defer sc.Close()
	client := newWSConn(cc, nil, true)
	server := newWSConn(sc, nil, false)
	rng := rand.New(rand.NewPCG(1, 2))
	var want bytes.Buffer
	done := make(chan error, 1)
	go func() {
		rng := rand.New(rand.NewPCG(3, 4))
		for i := range 300 {
			n := rng.IntN(3 * wsMaxFrame / 2)
			if i%7 == 0 {
				n = 0
			}
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(rng.Uint32())
			}
			want.Write(p)
			if _, err := client.Write(p); err != nil {
				done <- err
				return
			}
			if i%5 == 0 {
				client.wmu.Lock()
				client.writeFrameLocked(wsPong, []byte("unsolicited"))
				client.wmu.Unlock()
			}
		}
		done <- client.Close()
	}()
	// The server answers pings by writing, so someone must read the
	// client's side: here nobody pings, so the server writes nothing
	// until the close echo, which the pipe needs read.
	go io.Copy(io.Discard, client.br)
	var got bytes.Buffer
	buf := make([]byte, 40000)
	for {
		sc.SetReadDeadline(time.Now().Add(time.Duration(rng.IntN(50)) * time.Microsecond))
		n, err := server.Read(buf[:1+rng.IntN(len(buf)-1)])
		got.Write(buf[:n])
		if rng.IntN(3) == 0 {
			server.releaseReadBuffer() // as a parking session does
		}
		if err == io.EOF {
			break
		}
		if err != nil && !isTimeout(err) {
			t.Fatalf("server read: %v", err)
		}
	}
	if err := <-done; err != nil && !errors.Is(err, net.ErrClosed) {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), want.Bytes()) {
		t.Fatalf("server read %d bytes, client wrote %d (equal prefix: %v)", got.Len(), want.Len(), bytes.HasPrefix(want.Bytes(), got.Bytes()))
	}
}

// TestWSMask checks the word-at-a-time mask against the byte loop.
func TestWSMask(t *testing.T) {
	mask := [4]byte{1, 2, 3, 250}
	for n := range 40 {
		for off := range 4 {
			p := make([]byte, n)
			for i := range p {
				p[i] = byte(i * 7)
			}
			want := bytes.Clone(p)
			for i := range want {
				want[i] ^= mask[(off+i)&3]
			}
			if end := wsMask(p, mask, off); end != (off+n)&3 || !bytes.Equal(p, want) {
				t.Fatalf("n=%d off=%d: got %x (end %d), want %x (end %d)", n, off, p, end, want, (off+n)&3)
			}
		}
	}
}

// TestWebSocketDialErrors checks that the client refuses servers that do
// not complete the handshake properly.
func TestWebSocketDialErrors(t *testing.T) {
	tests := []struct {
		name    string
		reply   func(w http.ResponseWriter, r *http.Request)
		wantErr string
	}{
		{"not upgraded", func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "no websockets here", http.StatusForbidden)
		}, `"403 Forbidden": "no websockets here"`},
		{"wrong accept", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Upgrade", "websocket")
			w.Header().Set("Connection", "Upgrade")
			w.Header().Set("Sec-WebSocket-Accept", "bm9wZQ==")
			w.Header().Set("Sec-WebSocket-Protocol", "derp")
			w.WriteHeader(http.StatusSwitchingProtocols)
		}, "wrong Sec-WebSocket-Accept"},
		{"no subprotocol", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Upgrade", "websocket")
			w.Header().Set("Connection", "Upgrade")
			w.Header().Set("Sec-WebSocket-Accept", wsAcceptKey(r.Header.Get("Sec-WebSocket-Key")))
			w.WriteHeader(http.StatusSwitchingProtocols)
		}, `server chose subprotocol ""`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestServer(t)
			srv := serveDERP(t, s, derpServeOpts{plain: true, handler: http.HandlerFunc(tt.reply)})
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, _, err := (&FastStart{WebSocket: true}).Dial(ctx, srv.URL, mustKey(t))
			if err == nil {
				c.Close()
				t.Fatal("Dial succeeded")
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}

// TestWebSocketRestartAndStall checks the session life cycle over
// WebSocket: a stalled WebSocket reader is evicted by the write timeout
// without disturbing others, and Server.Close sends ServerRestarting and
// then a close frame, which the client reads as the end of the stream.
func TestWebSocketRestartAndStall(t *testing.T) {
	// A write timeout long enough that a healthy session's writer, off
	// the CPU for a while on a loaded machine, does not time out instead.
	s := NewServer(mustKey(t), WithWriteTimeout(500*time.Millisecond), WithRestartNotice(time.Second, 10*time.Second))
	defer s.Close()
	srv := serveDERP(t, s, derpServeOpts{plain: true})
	fs := &FastStart{WebSocket: true}
	stalled, _ := dialFast(t, fs, srv.URL)
	sender, _ := dialFast(t, fs, srv.URL)
	other, _ := dialFast(t, fs, srv.URL)

	big := make([]byte, 60000)
	deadline := time.Now().Add(10 * time.Second)
	for s.Stats().WriteTimeouts == 0 {
		if time.Now().After(deadline) {
			t.Fatal("stalled WebSocket reader never timed out")
		}
		sender.Send(stalled.PublicKey(), big)
		time.Sleep(time.Millisecond)
	}
	waitFor(t, func() bool { return !s.IsClientConnected(stalled.PublicKey()) })
	relayBothWays(t, sender, other)

	s.Close()
	msgs, err := recvUntilErr(t, other)
	var restarting bool
	for _, m := range msgs {
		_, ok := m.(ServerRestarting)
		restarting = restarting || ok
	}
	if !restarting || !errors.Is(err, io.EOF) {
		t.Errorf("after Close: messages %v, error %v; want ServerRestarting, then EOF", msgs, err)
	}
}

// TestWSConnNoAlloc checks that writing and reading WebSocket messages
// allocates nothing once warm, on both sides: the client masks into a
// pooled scratch buffer, and large payloads are cut into several messages.
func TestWSConnNoAlloc(t *testing.T) {
	var wire bytes.Buffer
	client := newWSConn(wsFuzzConn{w: &wire}, nil, true)
	server := newWSConn(wsFuzzConn{r: &wire, w: io.Discard}, nil, false)
	pkt := make([]byte, 40000) // two messages
	buf := make([]byte, 16<<10)
	roundTrip := func() {
		if _, err := client.Write(pkt); err != nil {
			t.Fatal(err)
		}
		for got := 0; got < len(pkt); {
			n, err := server.Read(buf)
			if err != nil {
				t.Fatal(err)
			}
			got += n
		}
	}
	roundTrip()
	if raceEnabled() {
		t.Skip("sync.Pool drops items at random under the race detector")
	}
	if allocs := testing.AllocsPerRun(100, roundTrip); allocs != 0 {
		t.Errorf("%v allocations per round trip", allocs)
	}
}

// raceEnabled reports whether the test binary was built with -race.
func raceEnabled() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// TestWebSocketParks checks that idle WebSocket sessions park like any
// other, and that parked sessions wake for packets and pings.
func TestWebSocketParks(t *testing.T) {
	if !parkSupported {
		t.Skip("sessions park only on Linux")
	}
	s := newTestServer(t, WithIdlePark(time.Millisecond))
	srv := serveDERP(t, s, derpServeOpts{plain: true})
	fs := &FastStart{WebSocket: true}
	a, _ := dialFast(t, fs, srv.URL)
	b, _ := dialFast(t, fs, srv.URL)
	for round := range 3 {
		waitFor(t, func() bool { return s.Stats().CurrentParked == 2 })
		relayBothWays(t, a, b)
		if round == 1 {
			a.SendPing([8]byte{'w', 's'})
			if p, ok := recvMsg[Pong](t, a); !ok || p != (Pong{'w', 's'}) {
				t.Fatalf("pong %x", p)
			}
		}
	}
	if st := s.Stats(); st.Parks < 6 {
		t.Errorf("%d parks, want at least 6", st.Parks)
	}
}

// TestWSConnPongWhileWriting checks that a ping does not make the reader
// wait for a write under way: the pong goes out when the writer lets go.
func TestWSConnPongWhileWriting(t *testing.T) {
	var out bytes.Buffer
	c := newWSConn(wsFuzzConn{r: bytes.NewReader(wsFrame(0x89, []byte("hi"), false)), w: &out}, nil, false)
	c.wmu.Lock() // a write under way
	done := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 10))
		done <- err
	}()
	select {
	case err := <-done:
		if err != io.EOF {
			t.Fatalf("Read: %v, want EOF after the ping", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the reader waited for the writer")
	}
	if out.Len() != 0 {
		t.Fatalf("pong written while the writer held the lock: %x", out.Bytes())
	}
	c.unlockWrite()
	if got, want := out.Bytes(), []byte{0x8a, 2, 'h', 'i'}; !bytes.Equal(got, want) {
		t.Fatalf("after the write: %x, want the pong %x", got, want)
	}
}

// A WebSocket session over TLS that has been idle for longer than the
// write timeout answers a ping and goes on relaying: the pong goes out
// under a fresh write deadline, not the expired one of the last write,
// which would fail it halfway and leave the TLS stream broken.
func TestWebSocketPongAfterIdleTLS(t *testing.T) {
	s := newTestServer(t, WithWriteTimeout(300*time.Millisecond))
	srv := serveDERP(t, s, derpServeOpts{})
	ws := &FastStart{TLSConfig: srv.ClientTLS, WebSocket: true}
	a, _ := dialFast(t, ws, srv.URL)
	b, _ := dialFast(t, ws, srv.URL)
	relayBothWays(t, a, b)
	time.Sleep(900 * time.Millisecond) // the last write's deadline passes
	wc := a.nc.(*wsConn)
	wc.wmu.Lock()
	_, err := wc.writeFrameLocked(wsPing, []byte("hi"))
	wc.wmu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // the pong is written
	relayBothWays(t, a, b)
}

// A WebSocket session parked while the start of the next WebSocket frame
// header waits (the client sent a message and the first byte of the next
// frame) holds no read buffer: those bytes wait in the connection, and the
// frame completes when the rest arrives.
func TestWebSocketParkedInsideFrameHeaderHoldsNoBuffer(t *testing.T) {
	if !parkSupported {
		t.Skip("sessions park only on Linux")
	}
	s := newTestServer(t, WithIdlePark(10*time.Millisecond))
	srv := serveDERP(t, s, derpServeOpts{plain: true})
	c, _ := dialFast(t, &FastStart{WebSocket: true}, srv.URL)
	var sc *sconn
	for _, x := range s.snapshotConns() {
		sc = x
	}
	ping := func(data string, next []byte) {
		t.Helper()
		c.wmu.Lock()
		_, err := c.nc.(*wsConn).Conn.Write(append(wsFrame(0x82, mkFrame(FramePing, []byte(data)), false), next...))
		c.wmu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
		if p, ok := recvMsg[Pong](t, c); !ok || string(p[:]) != data {
			t.Fatalf("pong %q, want %q", p, data)
		}
	}
	second := wsFrame(0x82, mkFrame(FramePing, []byte("complete")), false)
	ping("1st byte", second[:1])
	waitFor(t, func() bool { return s.Stats().CurrentParked == 1 })
	sc.mu.Lock() // the reader parked under it
	held := sc.br.nc.(*wsConn).br != nil
	sc.mu.Unlock()
	if held {
		t.Error("a parked WebSocket session holds a read buffer")
	}
	c.wmu.Lock()
	_, err := c.nc.(*wsConn).Conn.Write(second[1:])
	c.wmu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if p, ok := recvMsg[Pong](t, c); !ok || string(p[:]) != "complete" {
		t.Fatalf("pong %q, want that of the completed frame", p)
	}
}

// TestWebSocketClientPongAfterIdle: a Client leaves Send's write deadline
// set after its last Send (renewing it costs a syscall per packet), and over
// WebSocket a goroutine answers the server's (or a middlebox's) pings. Once
// the client has not sent for longer than that deadline, a ping's pong must
// not be written under it: the write would fail at once, and under TLS a
// failed write breaks the connection for good, so the next Send would fail
// with "the server is not reading" and the client would reconnect.
func TestWebSocketClientPongAfterIdle(t *testing.T) {
	s := newTestServer(t)
	cc, sc := net.Pipe()
	defer cc.Close()
	cert, _ := testCert(t, "derp.test")
	srv := newWSConn(tls.Server(sc, &tls.Config{Certificates: []tls.Certificate{cert}}), nil, false)
	cli := newWSConn(tls.Client(cc, &tls.Config{InsecureSkipVerify: true}), nil, true)
	done := make(chan struct{})
	go func() { s.Accept(context.Background(), srv, nil, "192.0.2.1:1"); close(done) }()
	defer func() { s.Close(); <-done }()
	priv := mustKey(t)
	c := loginClient(t, cli, priv)
	defer c.Close() // before the server's Close, which would wait for it
	msgs := make(chan Message, 8)
	go func() {
		for {
			m, err := c.Recv()
			if err != nil {
				close(msgs)
				return
			}
			msgs <- m
		}
	}()
	next := func() Message {
		t.Helper()
		select {
		case m, ok := <-msgs:
			if !ok {
				t.Fatal("Recv failed")
			}
			return m
		case <-time.After(10 * time.Second):
			t.Fatal("nothing received")
		}
		return nil
	}
	if err := c.Send(priv.Public(), []byte("before")); err != nil {
		t.Fatal(err)
	}
	next()
	// As if Send's deadline had passed while the client was idle.
	c.wmu.Lock()
	c.sendBy = time.Now().Add(-time.Second)
	c.setWriteDeadline(c.sendBy)
	c.wmu.Unlock()
	// A ping, then a KeepAlive: once the client has received the
	// KeepAlive, it has read the ping and started its pong.
	srv.wmu.Lock()
	srv.writeFrameLocked(wsPing, []byte("are you there"))
	srv.writeFrameLocked(wsBinary, appendFrame(nil, FrameKeepAlive, nil))
	srv.wmu.Unlock()
	if m := next(); m != (KeepAlive{}) {
		t.Fatalf("got %#v, want KeepAlive", m)
	}
	waitFor(t, func() bool {
		if cli.pongWriter.Load() || cli.pongDue.Load() || !cli.wmu.TryLock() {
			return false
		}
		cli.wmu.Unlock()
		return true
	})
	if err := c.Send(priv.Public(), []byte("after")); err != nil {
		t.Fatalf("Send after the pong: %v", err)
	}
	if m, ok := next().(*ReceivedPacket); !ok || string(m.Data) != "after" {
		t.Fatalf("got %#v, want the packet sent after the pong", m)
	}
}

// TestWSConnFailedPongFailsLaterWrites: a pong whose write timed out
// partway (the server stopped reading for longer than the pong's second)
// leaves the stream inside a frame; over plain TCP, unlike TLS, the
// connection itself stays writable, so later writes must fail rather than
// go out after the cut frame, where the server would read them as the
// rest of the pong and the frame after as garbage.
func TestWSConnFailedPongFailsLaterWrites(t *testing.T) {
	cc, sc := net.Pipe()
	defer sc.Close()
	defer cc.Close()
	wc := newWSConn(cc, nil, true)
	go sc.Write(wsFrame(0x80|wsPing, bytes.Repeat([]byte("p"), 100), true))
	go func() {
		var b [1]byte
		wc.Read(b[:]) // answers the ping, then waits until the test ends
	}()
	// The server takes the pong's first 10 bytes, then reads nothing.
	var head [10]byte
	if _, err := io.ReadFull(sc, head[:]); err != nil {
		t.Fatal(err)
	}
	if head[0] != 0x80|wsPong {
		t.Fatalf("first byte %#x, want a pong", head[0])
	}
	// The pong writer gives up after its second, and lets go of wmu.
	waitForWithin(t, 10*time.Second, func() bool {
		if wc.pongWriter.Load() || !wc.wmu.TryLock() {
			return false
		}
		wc.wmu.Unlock()
		return true
	})
	go io.Copy(io.Discard, sc) // the server reads again
	n, err := wc.Write([]byte("a DERP frame"))
	if err == nil {
		t.Fatalf("Write after a pong cut short: wrote %d bytes and no error; the server reads them as the rest of the pong", n)
	}
	t.Logf("Write after a pong cut short: %v", err)
}

// TestWebSocketIdleClientMemory: an idle WebSocket client holds one read
// buffer sized for the upgrade's HTTP response (16 KiB), under the
// WebSocket framing, and a small one above it: frames larger than that
// are read through it with no more copies. It held two of 16 KiB.
func TestWebSocketIdleClientMemory(t *testing.T) {
	srvPriv := mustKey(t)
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		cc, sc := net.Pipe()
		mu.Lock()
		conns = append(conns, cc, sc)
		mu.Unlock()
		go func() {
			scriptedWSLogin(sc, srvPriv)
			// Then the server goroutine ends, leaving the pipe open.
		}()
		return cc, nil
	}
	f := &FastStart{WebSocket: true, DialContext: dial}
	const n = 20
	var m0, m1 runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m0)
	cs := make([]*Client, n)
	for i := range cs {
		c, _, err := f.Dial(context.Background(), "http://derp.invalid/derp", mustKey(t))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, ok := recvMsg[ServerInfo](t, c); !ok {
			t.Fatal("no ServerInfo")
		}
		cs[i] = c
	}
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m1)
	kib := float64(int64(m1.HeapAlloc)-int64(m0.HeapAlloc)) / n / 1024
	t.Logf("%.1f KiB of heap per idle WebSocket client", kib)
	if kib > 34 {
		t.Errorf("%.1f KiB of heap per idle WebSocket client, want at most 34", kib)
	}
	runtime.KeepAlive(cs)
}

// A WebSocket server that ends the session with a close frame saying why
// (a status other than a plain normal closure, or a reason) has the client
// report it: the error names the status and the reason, and still wraps
// io.EOF, as the end of the stream it is. Without a reason or status a
// normal closure stays a plain io.EOF.
func TestWebSocketClientReportsCloseReason(t *testing.T) {
	srv := mustKey(t)
	for _, tt := range []struct {
		name  string
		close []byte // the close frame's payload
		want  []string
	}{
		{"policy", append([]byte{0x03, 0xf0}, "not in this tailnet"...), []string{"1008", `"not in this tailnet"`}},
		{"going away", []byte{0x03, 0xe9}, []string{"1001"}},
		{"normal with reason", append([]byte{0x03, 0xe8}, "bye"...), []string{"1000", `"bye"`}},
		{"normal", []byte{0x03, 0xe8}, nil},
		{"no status", nil, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dial := scriptedPipeDialer(t, func(sc net.Conn, br *bufio.Reader) {
				req, err := http.ReadRequest(br)
				if err != nil {
					return
				}
				fmt.Fprintf(sc, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
					"Sec-WebSocket-Accept: %s\r\nSec-WebSocket-Protocol: %s\r\n\r\n", wsAcceptKey(req.Header.Get("Sec-WebSocket-Key")), WebSocketProtocol)
				sk := appendFrame(nil, FrameServerKey, appendServerKey(nil, srv.Public()))
				sc.Write(append([]byte{0x80 | wsBinary, byte(len(sk))}, sk...))
				go io.Copy(io.Discard, br) // the ClientInfo, the echoed close
				sc.Write(append([]byte{0x80 | wsClose, byte(len(tt.close))}, tt.close...))
			})
			c, _, err := (&FastStart{WebSocket: true, DialContext: dial}).Dial(context.Background(), "http://derp.invalid/derp", mustKey(t))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_, err = c.Recv()
			t.Logf("Recv: %v", err)
			if !errors.Is(err, io.EOF) {
				t.Errorf("Recv: %v, want an error wrapping io.EOF", err)
			}
			for _, w := range tt.want {
				if err == nil || !strings.Contains(err.Error(), w) {
					t.Errorf("Recv: %v, want it to say %s", err, w)
				}
			}
			if tt.want == nil && (err == nil || !strings.HasSuffix(err.Error(), ": EOF")) {
				t.Errorf("Recv: %v, want a plain EOF", err)
			}
		})
	}
}

// A close frame's reason is cut to fit the 125-byte control frame at a
// character boundary: a reason cut inside a character is not UTF-8, which
// the peer must take as a protocol violation (RFC 6455 §5.5.1, §8.1), as
// our own reader does.
func TestWebSocketCloseReasonCutWholeCharacters(t *testing.T) {
	for _, reason := range []string{
		strings.Repeat("é", 100),      // 2-byte characters: 123 bytes would cut one
		strings.Repeat("€", 50),       // 3-byte characters
		"x" + strings.Repeat("😀", 40), // 4-byte characters after one byte
		strings.Repeat("a", 200),      // ASCII: cut at 123
		"short and ASCII",
	} {
		var wire bytes.Buffer
		newWSConn(wsFuzzConn{w: &wire}, nil, false).writeClose(wsCloseProtocolError, reason)
		b := wire.Bytes() // a server's frame: unmasked, length < 126
		if len(b) < 4 || b[0] != 0x80|wsClose || int(b[1]) != len(b)-2 {
			t.Fatalf("not one close frame: % x", b)
		}
		got := string(b[4:])
		want := reason
		for len(want) > wsMaxControl-2 || !utf8.ValidString(want) {
			want = want[:len(want)-1]
		}
		if got != want {
			t.Errorf("reason %.12q… (%d bytes) was sent as %.12q… (%d bytes, UTF-8: %v): want its longest prefix of whole characters that fits (%d bytes)",
				reason, len(reason), got, len(got), utf8.ValidString(got), len(want))
		}
	}
}

// TestWebSocketFramingFloodPaced: under a rate limit, the WebSocket framing
// a client sends is paid for like DERP bytes. A flood of pings, or of empty
// pieces of a message, carries no DERP byte at all, and the server read it
// at once under any limit.
func TestWebSocketFramingFloodPaced(t *testing.T) {
	for _, tc := range []struct {
		name  string
		frame []byte
		// after ends the flood (an open message must end before the next).
		after []byte
	}{
		{"pings", wsFrame(0x89, make([]byte, wsMaxControl), false), nil},
		{"empty pieces of a message", wsFrame(0x00, nil, false), wsFrame(0x80, nil, false)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestServer(t, WithRateLimit(1024, 0))
			srv := serveDERP(t, s, derpServeOpts{plain: true})
			c, nc := wsTestClientConn(t, srv.Addr)
			flood := wsFrame(0x02, nil, false) // a message opens
			if tc.after == nil {
				flood = wsFrame(0x82, nil, false)
			}
			for len(flood) < 1<<20 {
				flood = append(flood, tc.frame...)
			}
			flood = append(flood, tc.after...)
			before := s.Stats().RateLimitWaits
			sent := make(chan error, 1)
			go func() {
				nc.SetWriteDeadline(time.Now().Add(time.Minute))
				_, err := nc.Write(flood)
				nc.SetWriteDeadline(time.Time{})
				sent <- err
			}()
			waitFor(t, func() bool { return s.Stats().RateLimitWaits > before })
			s.SetRateLimit(0, 0) // forgives the debt: the rest is read at once
			if err := <-sent; err != nil {
				t.Fatalf("sending the flood: %v", err)
			}
			// The session survived and reads on.
			if err := c.SendPing([8]byte{9}); err != nil {
				t.Fatal(err)
			}
			if p, ok := recvMsg[Pong](t, c); !ok || p != (Pong{9}) {
				t.Fatalf("pong %v after the flood", p)
			}
		})
	}
}

// TestWebSocketFramingPaceNotIdle: a wait for the rate limit inside a
// WebSocket read (for the framing read) is not silence from the client. A
// session whose reader cannot park and that checks its client's liveness
// (WithIdleTimeout) counts its idle time from the end of the wait, as it
// does over TCP, where the wait comes between reads: the bytes the client
// sent meanwhile are read, not taken for an idle client's.
func TestWebSocketFramingPaceNotIdle(t *testing.T) {
	s := newTestServer(t, WithRateLimit(100, 0), WithIdlePark(0), WithIdleTimeout(time.Second))
	srv := serveDERP(t, s, derpServeOpts{plain: true})
	nc, br, resp := wsDial(t, srv.Addr, nil)
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake: %s", resp.Status)
	}
	nc.SetDeadline(time.Time{})
	c, err := NewClient(mustKey(t), newWSConn(nc, br, true), nil, CanAckPings(true))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, ok := recvMsg[ServerInfo](t, c); !ok {
		t.FailNow()
	}
	// 502 pings of 131 bytes are paid for 262 bytes at a time: the 251st
	// payment is 189 bytes more than the burst, a wait of nearly 2 s at
	// 100 bytes/s, longer than the idle timeout.
	ping := wsFrame(0x89, make([]byte, wsMaxControl), false)
	before := s.Stats().RateLimitWaits
	if _, err := nc.Write(bytes.Repeat(ping, 502)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return s.Stats().RateLimitWaits > before })
	// The server waits inside its read; this Ping reaches the socket
	// meanwhile, and is answered once the wait is over.
	if err := c.SendPing([8]byte{5}); err != nil {
		t.Fatal(err)
	}
	if p, ok := recvMsg[Pong](t, c); !ok || p != (Pong{5}) {
		t.Fatalf("pong %v after the wait; errors %v", p, s.Stats().Errors)
	}
}

// TestWebSocketFramingBeforeLoginBounded: before its ClientInfo, a
// WebSocket client cannot make the server read without end: empty frames
// and pings carry no DERP byte, so the login's bound on the ClientInfo
// (16 KiB) does not stop them, and no rate limit paces a login. The
// server ends such a login with a close frame (1008) once the framing
// exceeds the largest ClientInfo, instead of reading it until the login
// timeout.
func TestWebSocketFramingBeforeLoginBounded(t *testing.T) {
	for _, tc := range []struct {
		name  string
		frame []byte
		first []byte
	}{
		{"empty continuation frames", wsFrame(0x00, nil, false), wsFrame(0x02, nil, false)},
		{"empty binary messages", wsFrame(0x82, nil, false), nil},
		{"pings", wsFrame(0x89, make([]byte, 125), false), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := NewServer(mustKey(t), WithLoginTimeout(5*time.Minute))
			srv := serveDERP(t, s, derpServeOpts{plain: true})
			nc, br, resp := wsDial(t, srv.Addr, nil)
			if resp.StatusCode != http.StatusSwitchingProtocols {
				t.Fatalf("handshake: %s", resp.Status)
			}
			frames := make(chan []byte, 1)
			go func() {
				ops, payloads := readServerFrames(t, br)
				if len(ops) > 0 && ops[len(ops)-1] == wsClose {
					frames <- payloads[len(ops)-1]
				}
				close(frames)
			}()
			var chunk []byte
			for len(chunk) < 64<<10 {
				chunk = append(chunk, tc.frame...)
			}
			nc.SetWriteDeadline(time.Now().Add(time.Minute))
			if _, err := nc.Write(tc.first); err != nil {
				t.Fatal(err)
			}
			const total = 32 << 20
			var err error
			sent := 0
			for sent < total && err == nil {
				var n int
				n, err = nc.Write(chunk)
				sent += n
			}
			if err == nil || isTimeout(err) {
				t.Fatalf("wrote %d MiB of WebSocket framing and no ClientInfo (%v): the server still reads", sent>>20, err)
			}
			if p, ok := <-frames; !ok || len(p) < 2 || binary.BigEndian.Uint16(p) != 1008 {
				t.Errorf("server's close frame %q, want status 1008", p)
			}
			if n := s.Stats().Errors["login:websocket_login_framing"]; n != 1 {
				t.Errorf("Errors[login:websocket_login_framing] = %d, want 1 (%v)", n, s.Stats().Errors)
			}
		})
	}
}
