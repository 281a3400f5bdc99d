package relay

// Fuzz targets for everything that reads bytes from the network: the frame
// codec, a server fed arbitrary streams (before and after login), a client
// fed arbitrary server streams, key parsing, the HTTP handler, the WebSocket
// decoder of both sides, the client's reading of the answers to its dials
// (upgrade, WebSocket and proxy CONNECT responses, the header-size guard),
// the ServerInfo JSON with the rate limit it announces, the ALPN list
// AppendMetaCert writes, and the replies of admission services
// (FuzzParseMetaCert is in metacert_test.go). Plain
// `go test` replays the seeds below and the corpora in testdata/fuzz; run one
// target with, for example,
//
//	go test -run XXX -fuzz '^FuzzServerStream$' -fuzztime 10m -parallel 1 .

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"go4.org/mem"
)

// fuzzKey returns a fixed private key, so that seeds holding sealed boxes
// stay valid from run to run.
func fuzzKey(seed byte) PrivateKey {
	var k PrivateKey
	for i := range k {
		k[i] = seed*31 + byte(i)*7
	}
	k.clamp()
	return k
}

const fuzzMeshKey = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

// clientInfoFrame returns a whole ClientInfo frame: priv's public key and js
// sealed from priv to server, with a fresh nonce.
func clientInfoFrame(priv PrivateKey, server PublicKey, js []byte) []byte {
	shared, err := sharedKey(priv, server)
	if err != nil {
		panic(err)
	}
	pub := priv.Public()
	return appendFrame(nil, FrameClientInfo, sealBox(pub[:], shared, js))
}

// serverInfoFrame returns a whole ServerInfo frame sealed from server to
// client.
func serverInfoFrame(server PrivateKey, client PublicKey, js []byte) []byte {
	shared, err := sharedKey(server, client)
	if err != nil {
		panic(err)
	}
	return appendFrame(nil, FrameServerInfo, sealBox(nil, shared, js))
}

func frames(fs ...[]byte) []byte { return bytes.Join(fs, nil) }

func frameHeader(t FrameType, n uint32) []byte {
	return binary.BigEndian.AppendUint32([]byte{byte(t)}, n)
}

// FuzzFrameDecoders feeds arbitrary bytes to the frame header reader and to
// every payload parser, and checks what they accept.
func FuzzFrameDecoders(f *testing.F) {
	k := fuzzKey(1).Public()
	f.Add([]byte{})
	f.Add(appendFrame(nil, FrameServerKey, appendServerKey(nil, k)))
	f.Add(appendFrame(nil, FramePeerGone, appendPeerGone(nil, k, PeerGoneNotHere)))
	f.Add(appendFrame(nil, FramePeerPresent, appendPeerPresent(nil, PeerPresent{Key: k, Addr: netip.MustParseAddrPort("192.0.2.1:443"), Flags: PeerIsProber})))
	f.Add(appendFrame(nil, FramePeerPresent, appendPeerPresent(nil, PeerPresent{Key: k, Addr: netip.MustParseAddrPort("[2001:db8::1]:1"), AppName: "tailscaled"})))
	f.Add(appendFrame(nil, FramePing, []byte("12345678")))
	f.Add(appendFrame(nil, FrameRestarting, appendRestarting(nil, time.Second, time.Minute)))
	f.Add(appendFrame(nil, FrameRecvPacket, append(k[:], "data"...)))
	f.Add(frameHeader(FrameSendPacket, 1<<31))
	f.Add([]byte{byte(FramePing), 0, 0})
	for _, js := range []string{`{"version":2,"CanAckPings":true}`, `{"meshKey":"` + fuzzMeshKey + `"}`,
		`{"meshKey":null}`, `{"meshKey":""}`, `{"MeshKey":"` + strings.ToUpper(fuzzMeshKey) + `"}`,
		`{"meshKey":"` + fuzzMeshKey + `","meshkey":null}`, `{"version":2.5}`, `null`, `{`, `[]`} {
		f.Add([]byte(js))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		checkPayload(t, data)
		br := bufio.NewReaderSize(bytes.NewReader(data), 16)
		for {
			ft, n, err := readFrameHeader(br)
			if err != nil {
				if err != io.EOF && err != io.ErrUnexpectedEOF {
					t.Fatalf("readFrameHeader: %v", err)
				}
				if err == io.EOF && br.Buffered() != 0 {
					t.Fatal("EOF with bytes left")
				}
				return
			}
			_ = ft.String()
			if n > maxClientFrame {
				return
			}
			p := make([]byte, n)
			if _, err := io.ReadFull(br, p); err != nil {
				return
			}
			checkPayload(t, p)
		}
	})
}

// checkPayload runs every parser on p and checks that what they accept
// encodes back to the same bytes.
func checkPayload(t *testing.T, p []byte) {
	if k, err := parseServerKey(p); err == nil {
		if got := appendServerKey(nil, k); !bytes.Equal(got, p[:serverKeyLen]) {
			t.Fatalf("ServerKey round trip: %x != %x", got, p[:serverKeyLen])
		}
	} else if len(p) >= serverKeyLen && string(p[:len(magic)]) == magic {
		t.Fatalf("ServerKey with magic refused: %v", err)
	} else if ProtocolErrorReason(err) == "" {
		t.Fatalf("ServerKey error without a reason: %v", err)
	}
	if g, err := parsePeerGone(p); err == nil {
		if len(p) > KeyLen && !bytes.Equal(appendPeerGone(nil, g.Peer, g.Reason), p[:peerGoneLen]) {
			t.Fatal("PeerGone round trip")
		}
		_ = g.Reason.String()
	} else if err != errSkip || len(p) >= KeyLen {
		t.Fatalf("PeerGone: %v on %d bytes", err, len(p))
	}
	if pp, err := parsePeerPresent(p); err == nil {
		again, err := parsePeerPresent(appendPeerPresent(nil, pp))
		if err != nil || again != pp {
			t.Fatalf("PeerPresent round trip: %+v != %+v (%v)", again, pp, err)
		}
		if !ValidAppName(pp.AppName) || (pp.AppName != "" && len(p) < peerPresentLen+1+len(pp.AppName)) {
			t.Fatalf("PeerPresent app name %q from %d bytes", pp.AppName, len(p))
		}
		if pp.Addr.IsValid() && pp.Addr.Addr().Is4In6() {
			t.Fatalf("PeerPresent address %v not unmapped", pp.Addr)
		}
		if len(p) < peerPresentLen && pp.Flags != 0 {
			t.Fatal("flags from a short PeerPresent")
		}
	} else if len(p) >= KeyLen {
		t.Fatalf("PeerPresent: %v", err)
	}
	if b, err := parsePing8(p); err == nil && !bytes.Equal(b[:], p[:8]) {
		t.Fatal("Ping payload")
	}
	if r, err := parseRestarting(p); err == nil {
		if !bytes.Equal(appendRestarting(nil, r.ReconnectIn, r.TryFor), p[:restartingLen]) {
			t.Fatal("Restarting round trip")
		}
	}
	var rp ReceivedPacket
	if err := parseRecvPacket(&rp, p); err == nil && (len(rp.Data) != len(p)-KeyLen || !bytes.Equal(rp.Source[:], p[:KeyLen])) {
		t.Fatal("RecvPacket split")
	}
	_ = looksLikeDisco(p)
	if len(p) >= KeyLen {
		_ = checkPeerKey(PublicKey(p[:KeyLen]))
	}
	var box [32]byte
	openBox(nil, &box, p)
	checkClientInfoJSON(t, p)
}

// checkClientInfoJSON checks the strictness of the ClientInfo parser: a
// meshKey member (any case) that is not 64 hex digits, including "" and
// null, rejects the whole document, as in Tailscale's server.
func checkClientInfoJSON(t *testing.T, p []byte) {
	var info clientInfoJSON
	err := json.Unmarshal(p, &info)
	if err != nil {
		return
	}
	dec := json.NewDecoder(bytes.NewReader(p))
	tok, _ := dec.Token()
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		if info.MeshKey != (meshKeyJSON{}) {
			t.Fatal("mesh key from a document that is not an object")
		}
		return
	}
	var last string
	sawKey := false
	for dec.More() {
		kt, err := dec.Token()
		if err != nil {
			t.Fatalf("accepted document does not tokenize: %v", err)
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			t.Fatalf("accepted document does not tokenize: %v", err)
		}
		if !strings.EqualFold(kt.(string), "meshKey") {
			continue
		}
		var s string
		if json.Unmarshal(raw, &s) != nil || string(raw) == "null" {
			t.Fatalf("accepted meshKey %s", raw)
		}
		if _, _, err := parseMeshKey(s); err != nil || s == "" {
			t.Fatalf("accepted meshKey %q", s)
		}
		last, sawKey = s, true
	}
	if !sawKey {
		if info.MeshKey != (meshKeyJSON{}) {
			t.Fatal("mesh key without a meshKey member")
		}
		return
	}
	want, _, _ := parseMeshKey(last)
	if [MeshKeyLen]byte(info.MeshKey) != want {
		t.Fatalf("mesh key %x, document says %q", info.MeshKey[:], last)
	}
}

// FuzzServerStream feeds a server arbitrary bytes over a net.Pipe, in four
// modes: the raw stream from the first byte (login phase); a ClientInfo
// sealed correctly around the fuzz bytes as its JSON; a valid login followed
// by the fuzz bytes as frames; the same as a mesh peer. The session must end
// when the stream does, Accept must return, and nothing may stay registered.
func FuzzServerStream(f *testing.F) {
	s := NewServer(fuzzKey(1), WithMeshKey(fuzzMeshKey), WithLoginTimeout(5*time.Second), WithWriteTimeout(5*time.Second))
	f.Cleanup(func() { s.Close() })
	client := fuzzKey(2)
	pub := client.Public()
	disco := append([]byte(discoMagic), make([]byte, 60)...)
	f.Add(byte(0), []byte{})
	f.Add(byte(0), clientInfoFrame(client, s.pub, []byte(`{"version":2}`)))
	f.Add(byte(0), frames(clientInfoFrame(client, s.pub, []byte(`{}`)), appendFrame(nil, FramePing, []byte("pingpong"))))
	f.Add(byte(0), frameHeader(FrameClientInfo, 1<<30))
	f.Add(byte(1), []byte(`{"version":2,"CanAckPings":true,"IsProber":true,"AppName":"x"}`))
	f.Add(byte(1), []byte(`{"meshKey":"`+fuzzMeshKey+`"}`))
	f.Add(byte(1), []byte(`{"meshKey":null}`))
	f.Add(byte(2), frames(
		appendFrame(nil, FrameSendPacket, append(pub[:], "to self"...)),
		appendFrame(nil, FrameSendPacket, append(kb(mustPub(3)), disco...)),
		appendFrame(nil, FrameNotePreferred, []byte{1}),
		appendFrame(nil, FramePing, []byte("12345678")),
		appendFrame(nil, 0x42, []byte("unknown")),
		appendFrame(nil, FrameClientInfo, make([]byte, 60)),
	))
	f.Add(byte(2), frames(appendFrame(nil, FrameWatchConns, nil)))
	f.Add(byte(2), frameHeader(FrameSendPacket, maxSendFrame+1))
	f.Add(byte(3), frames(
		appendFrame(nil, FrameWatchConns, nil),
		appendFrame(nil, FrameForwardPacket, frames(kb(mustPub(3)), pub[:], []byte("fwd"))),
		appendFrame(nil, FrameForwardPacket, frames(kb(mustPub(3)), kb(mustPub(4)), disco)),
		appendFrame(nil, FrameClosePeer, kb(mustPub(4))),
		appendFrame(nil, FrameClosePeer, pub[:]),
	))
	f.Fuzz(func(t *testing.T, mode byte, data []byte) {
		var stream []byte
		switch mode % 4 {
		case 0:
			stream = data
		case 1:
			stream = clientInfoFrame(client, s.pub, data)
		case 2:
			stream = append(clientInfoFrame(client, s.pub, []byte(`{"version":2}`)), data...)
		case 3:
			stream = append(clientInfoFrame(client, s.pub, []byte(`{"meshKey":"`+fuzzMeshKey+`"}`)), data...)
		}
		feedServer(t, s, stream)
		if s.IsClientConnected(pub) {
			t.Fatal("client still registered after its session ended")
		}
		st := s.Stats()
		if st.CurrentConnections != 0 || st.Watchers != 0 {
			t.Fatalf("after the session: %d connections, %d watchers", st.CurrentConnections, st.Watchers)
		}
		for k := range st.Errors { // every failure is counted under a stable name
			phase, reason, _ := strings.Cut(k, ":")
			if (phase != "login" && phase != "session") || !isMetricName(reason) {
				t.Fatalf("error counted as %q", k)
			}
		}
	})
}

// isMetricName reports whether s is a short snake_case name.
func isMetricName(s string) bool {
	if s == "" || len(s) > 40 {
		return false
	}
	for _, c := range s {
		if (c < 'a' || c > 'z') && c != '_' {
			return false
		}
	}
	return true
}

func mustPub(seed byte) PublicKey { return fuzzKey(seed).Public() }

// kb returns k as a new slice.
func kb(k PublicKey) []byte { return bytes.Clone(k[:]) }

// feedServer runs one server session over a net.Pipe whose client side
// writes stream, then closes, while draining whatever the server writes.
func feedServer(t *testing.T, s *Server, stream []byte) {
	cc, sc := net.Pipe()
	done := make(chan struct{})
	go func() { s.Accept(context.Background(), sc, nil, "192.0.2.1:4242"); close(done) }()
	drained := make(chan struct{})
	go func() { io.Copy(io.Discard, cc); close(drained) }()
	cc.SetWriteDeadline(time.Now().Add(10 * time.Second))
	cc.Write(stream) // fails early if the server ends the session
	cc.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Accept did not return after the stream ended")
	}
	<-drained
}

// FuzzClientStream feeds a Client arbitrary server bytes. mode bit 0
// prepends a valid ServerKey and ServerInfo (so the fuzz bytes reach the
// steady state), bit 1 selects the classic login (the key comes from the
// stream's ServerKey frame), bit 2 lets the stream start with an HTTP
// response (a fast-start request answered with a 101).
func FuzzClientStream(f *testing.F) {
	server, client := fuzzKey(3), fuzzKey(4)
	spub, cpub := server.Public(), client.Public()
	serverKey := appendFrame(nil, FrameServerKey, appendServerKey(nil, spub))
	serverInfo := serverInfoFrame(server, cpub, []byte(`{"version":2}`))
	someone := mustPub(5)
	steady := frames(
		appendFrame(nil, FrameRecvPacket, append(kb(someone), "hello"...)),
		appendFrame(nil, FramePeerGone, appendPeerGone(nil, someone, PeerGoneNotHere)),
		appendFrame(nil, FramePeerPresent, appendPeerPresent(nil, PeerPresent{Key: someone, Addr: netip.MustParseAddrPort("192.0.2.1:1"), Flags: PeerIsRegular, AppName: "app"})),
		appendFrame(nil, FrameKeepAlive, nil),
		appendFrame(nil, FramePing, []byte("abcdefgh")),
		appendFrame(nil, FramePong, []byte("abcdefgh")),
		appendFrame(nil, FrameHealth, []byte("problem")),
		appendFrame(nil, FrameRestarting, appendRestarting(nil, time.Second, time.Minute)),
		appendFrame(nil, 0x77, []byte("unknown")),
	)
	f.Add(byte(0), []byte{})
	f.Add(byte(0), frames(serverKey, serverInfo, steady))
	f.Add(byte(1), steady)
	f.Add(byte(1), frames(serverInfoFrame(server, cpub, []byte(`{"version":2,"TokenBucketBytesPerSecond":1000,"TokenBucketBytesBurst":10}`))))
	f.Add(byte(1), frames(appendFrame(nil, FrameServerInfo, make([]byte, 40)), frameHeader(FrameRecvPacket, maxClientFrame+1)))
	f.Add(byte(2), frames(serverKey, serverInfo, steady))
	f.Add(byte(2), appendFrame(nil, FrameServerKey, append([]byte("DERPXXXX"), spub[:]...)))
	f.Add(byte(4), frames([]byte("HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nDerp-Public-Key: "+spub.String()+"\r\n\r\n"), serverKey, serverInfo, steady))
	f.Add(byte(4), []byte("HTTP/1.1 426 Upgrade Required\r\nContent-Length: 5\r\n\r\nnope!"))
	// Interim responses before a 101 or the DERP stream itself, too
	// many of them, and refusals a dial names (redirects, bodies with
	// line breaks).
	f.Add(byte(4), frames([]byte("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </>\r\n\r\nHTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\n"), serverKey, serverInfo, steady))
	f.Add(byte(4), frames([]byte("HTTP/1.1 103 Early Hints\n\n"), serverKey, serverInfo))
	f.Add(byte(4), []byte(strings.Repeat("HTTP/1.1 100 Continue\r\n\r\n", maxInterimResponses+2)))
	f.Add(byte(4), []byte("HTTP/1.1 308 Permanent Redirect\r\nLocation: https://derp.example/derp/\r\nContent-Length: 12\r\n\r\nline1\nline2\n"))
	f.Add(byte(6), []byte("HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n4\r\na\r\nb\r\n0\r\n\r\n"))
	f.Fuzz(func(t *testing.T, mode byte, data []byte) {
		var stream []byte
		if mode&1 != 0 {
			stream = frames(serverKey, serverInfo)
		}
		stream = append(stream, data...)
		opts := []ClientOption{RecvTimeout(10 * time.Second), LoginTimeout(10 * time.Second)}
		if mode&2 == 0 {
			opts = append(opts, ServerPublicKey(spub))
		}
		if mode&4 != 0 {
			opts = append(opts, allowHTTPPrefix())
		}
		cc, sc := net.Pipe()
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); io.Copy(io.Discard, sc) }()
		go func() { defer wg.Done(); sc.Write(stream); sc.Close() }()
		defer wg.Wait()
		defer cc.Close()
		c, err := NewClient(client, cc, nil, opts...)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		defer c.Close()
		for n := 0; ; n++ {
			if n > len(stream)/frameHeaderLen+1 {
				t.Fatalf("%d messages from %d bytes", n, len(stream))
			}
			m, err := c.Recv()
			if err != nil {
				if _, again := c.Recv(); again != err {
					t.Fatalf("Recv error not sticky: %v, then %v", err, again)
				}
				if err.Error() == "" {
					t.Fatal("empty error")
				}
				return
			}
			switch m := m.(type) {
			case *ReceivedPacket:
				if len(m.Data) > maxClientFrame {
					t.Fatalf("%d-byte packet", len(m.Data))
				}
			case ServerInfo:
				if !c.gotInfo {
					t.Fatal("ServerInfo without gotInfo")
				}
			case nil:
				t.Fatal("nil message without error")
			}
		}
	})
}

// FuzzParsePublicKey checks that ParsePublicKey and ParsePublicKeyMem agree
// and that every key they accept prints back as the same digits.
func FuzzParsePublicKey(f *testing.F) {
	k := mustPub(6).String()
	for _, s := range []string{"", k, strings.ToUpper(k), k[:63], k + "0", "nodekey:" + k, "zz" + k[2:], k[:62] + "é"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		k1, err1 := ParsePublicKey(s)
		k2, err2 := ParsePublicKeyMem(mem.S(s))
		if k1 != k2 || (err1 == nil) != (err2 == nil) {
			t.Fatalf("ParsePublicKey = %v, %v; ParsePublicKeyMem = %v, %v", k1, err1, k2, err2)
		}
		k3, err3 := ParsePublicKeyMem(mem.B([]byte(s)))
		if k3 != k1 || (err3 == nil) != (err1 == nil) {
			t.Fatal("mem.B and mem.S disagree")
		}
		var viaText PublicKey
		errText := viaText.UnmarshalText([]byte("nodekey:" + s))
		if (errText == nil) != (err1 == nil) || viaText != k1 {
			t.Fatalf("UnmarshalText(nodekey:%q) = %v, %v", s, viaText, errText)
		}
		if err1 != nil {
			if !k1.IsZero() {
				t.Fatal("key returned with an error")
			}
			if !strings.HasPrefix(err1.Error(), "relay: parse public key: ") {
				t.Fatalf("error %q", err1)
			}
			return
		}
		if k1.String() != strings.ToLower(s) {
			t.Fatalf("String() = %q for input %q", k1.String(), s)
		}
		txt, _ := k1.MarshalText()
		var back PublicKey
		if err := back.UnmarshalText(txt); err != nil || back != k1 {
			t.Fatalf("text round trip: %v %v", back, err)
		}
		if _, err := ParsePrivateKey("privkey:" + s); err != nil {
			t.Fatalf("ParsePrivateKey refused what ParsePublicKey took: %v", err)
		}
	})
}

// FuzzServeHTTP sends arbitrary request bytes to a net/http server running
// the Server's handler over a net.Pipe. Nothing may panic (net/http would
// recover a handler panic, so it is caught and reported), and the connection
// must be finished with, by the HTTP server or by the DERP session, soon
// after the client side closes.
func FuzzServeHTTP(f *testing.F) {
	s := NewServer(fuzzKey(7), WithLoginTimeout(2*time.Second), WithWriteTimeout(2*time.Second))
	client := fuzzKey(8)
	var active atomic.Int64
	var panicked atomic.Value
	var states sync.Map // server-side net.Conn → chan struct{}, closed when HTTP is done with it
	var errLog syncBuffer
	hs := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			active.Add(1)
			defer active.Add(-1)
			defer func() {
				if p := recover(); p != nil {
					panicked.Store(p)
				}
			}()
			s.ServeHTTP(w, r)
		}),
		ReadHeaderTimeout: 2 * time.Second,
		IdleTimeout:       2 * time.Second,
		ErrorLog:          log.New(&errLog, "", 0),
		ConnState: func(nc net.Conn, st http.ConnState) {
			if st != http.StateClosed && st != http.StateHijacked {
				return
			}
			if ch, ok := states.LoadAndDelete(nc); ok {
				close(ch.(chan struct{}))
			}
		},
	}
	ln := newChanListener()
	served := make(chan struct{})
	go func() { hs.Serve(ln); close(served) }()
	f.Cleanup(func() { hs.Close(); <-served; s.Close() })

	ci := clientInfoFrame(client, s.pub, []byte(`{"version":2}`))
	req := func(extra string) []byte {
		return []byte("GET /derp HTTP/1.1\r\nHost: derp.example\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n" + extra + "\r\n")
	}
	f.Add(req(""))
	f.Add(frames(req(FastStartHeader+": 1\r\n"), ci, appendFrame(nil, FramePing, []byte("12345678"))))
	f.Add(frames(req(FastStartHeader+": true\r\n"+IdealNodeHeader+": x\r\n"), ci))
	f.Add([]byte("GET /derp HTTP/1.1\r\nHost: x\r\n\r\n"))
	f.Add([]byte("GET /derp HTTP/1.0\r\nUpgrade: websocket\r\n\r\n"))
	f.Add([]byte("HEAD /derp/probe HTTP/1.1\r\nHost: x\r\n\r\nPOST /derp/latency-check HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"))
	f.Add([]byte("GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: abc:def\r\n\r\n"))
	f.Add([]byte("GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: <script>\r\n\r\n"))
	f.Add([]byte("POST http://derp.example/derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"))
	f.Add([]byte("GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nUpgrade: websocket\r\n"))
	f.Add([]byte("\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"))
	wsReq := []byte("GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: derp\r\n\r\n")
	f.Add(frames(wsReq, wsFrame(0x82, ci, false), wsFrame(0x89, []byte("p"), false),
		wsFrame(0x02, appendFrame(nil, FramePing, []byte("1234")), false), wsFrame(0x80, []byte("5678"), false)))
	f.Add(frames(wsReq, wsFrame(0x81, []byte("text"), false)))
	// Refusals of a fast-start request whose frames follow it: no
	// Upgrade (426, closing), a body (400, closing), and the frames
	// then read as the next request by a server that did not close.
	f.Add(frames([]byte("GET /derp HTTP/1.1\r\nHost: x\r\n"+FastStartHeader+": 1\r\n\r\n"), ci))
	f.Add(frames([]byte("GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: derp\r\n"+FastStartHeader+": 1\r\nContent-Length: 2\r\n\r\nhi"), ci))
	f.Add([]byte("GET /derp HTTP/1.1\r\nHost: x\r\n" + FastStartHeader + ": 1\r\n\r\nGET /generate_204 HTTP/1.1\r\nHost: x\r\n\r\n"))
	f.Add([]byte("POST /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello"))
	f.Add(frames([]byte("GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: derp\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), ci))
	f.Fuzz(func(t *testing.T, data []byte) {
		s.replay.mu.Lock()
		s.replay.cur, s.replay.prev = map[[16]byte]struct{}{}, nil // the seeds reuse their ClientInfo
		s.replay.mu.Unlock()
		cc, sc := net.Pipe()
		finished := make(chan struct{})
		states.Store(sc, finished)
		drained := make(chan struct{})
		go func() { io.Copy(io.Discard, cc); close(drained) }()
		ln.conns <- sc
		cc.SetWriteDeadline(time.Now().Add(10 * time.Second))
		cc.Write(data)
		cc.Close()
		<-drained
		deadline := time.Now().Add(10 * time.Second)
		select {
		case <-finished:
		case <-time.After(10 * time.Second):
			t.Fatal("HTTP server still holds the connection 10s after the client closed it")
		}
		for active.Load() != 0 {
			if time.Now().After(deadline) {
				t.Fatal("handler still running 10s after the client closed the connection")
			}
			time.Sleep(time.Millisecond)
		}
		if p := panicked.Load(); p != nil {
			t.Fatalf("handler panicked: %v", p)
		}
		if l := errLog.String(); strings.Contains(l, "panic") {
			t.Fatalf("http server logged a panic: %s", l)
		}
	})
}

// chanListener is a net.Listener whose connections come from a channel.
type chanListener struct {
	conns chan net.Conn
	once  sync.Once
	done  chan struct{}
}

func newChanListener() *chanListener {
	return &chanListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error   { l.once.Do(func() { close(l.done) }); return nil }
func (l *chanListener) Addr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "192.0.2.9:9" }

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// wsFuzzConn is a net.Conn that reads from r and writes to w, with
// deadlines that do nothing.
type wsFuzzConn struct {
	net.Conn // nil: only the methods below are called
	r        io.Reader
	w        io.Writer
}

func (c wsFuzzConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c wsFuzzConn) Write(p []byte) (int, error)      { return c.w.Write(p) }
func (c wsFuzzConn) Close() error                     { return nil }
func (c wsFuzzConn) SetWriteDeadline(time.Time) error { return nil }
func (c wsFuzzConn) SetReadDeadline(time.Time) error  { return nil }
func (c wsFuzzConn) SetDeadline(time.Time) error      { return nil }
func (c wsFuzzConn) LocalAddr() net.Addr              { return pipeAddr{} }
func (c wsFuzzConn) RemoteAddr() net.Addr             { return pipeAddr{} }

// FuzzWebSocketRead feeds arbitrary bytes to the WebSocket decoder of a
// server and then of a client (which wants unmasked frames). It must never
// panic or read more payload than it was given; every read ends with
// io.EOF (a close frame), io.ErrUnexpectedEOF (a cut frame) or a
// *ProtocolError, and what the decoder writes back is whole frames, masked
// by the client and not by the server.
func FuzzWebSocketRead(f *testing.F) {
	f.Add(wsFrame(0x82, []byte("hello"), false))
	f.Add(append(wsFrame(0x02, []byte("hel"), false), append(wsFrame(0x89, []byte("ping"), false), wsFrame(0x80, []byte("lo"), false)...)...))
	f.Add(wsFrame(0x82, make([]byte, 300), false))
	f.Add(wsFrame(0x82, make([]byte, 70000), false)[:100])
	f.Add(wsFrame(0x88, binary.BigEndian.AppendUint16(nil, 1000), false))
	f.Add(wsFrame(0x81, []byte("text"), false))
	f.Add(wsFrame(0x82, []byte("unmasked"), true))
	f.Add([]byte{0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4})
	f.Add(frames(wsFrame(0x02, []byte("hel"), true), wsFrame(0x89, []byte("ping"), true), wsFrame(0x80, []byte("lo"), true), wsFrame(0x88, []byte{3, 232, 'b', 'y', 'e'}, true)))
	f.Add(frames(wsFrame(0x82, make([]byte, 200), true), wsFrame(0x8a, nil, true), wsFrame(0x88, []byte{1}, true)))
	// Framing enough to be paid for: pings, and a message of empty pieces.
	f.Add(bytes.Repeat(wsFrame(0x89, make([]byte, wsMaxControl), false), 5))
	f.Add(frames(wsFrame(0x02, []byte("a"), false), bytes.Repeat(wsFrame(0x00, nil, false), 60), wsFrame(0x80, []byte("b"), false)))
	f.Fuzz(func(t *testing.T, data []byte) {
		checkWSRead(t, data, false)
		checkWSRead(t, data, true)
	})
}

func checkWSRead(t *testing.T, data []byte, client bool) {
	var out bytes.Buffer
	in := bytes.NewReader(data)
	c := newWSConn(wsFuzzConn{r: in, w: &out}, nil, client)
	// As a server session does: its writer sends the pongs, here at
	// once, so that out is complete when Read returns.
	c.onPong = func() { c.wmu.Lock(); c.unlockWrite() }
	var charged int
	if !client {
		// A server session pays for the framing it reads (its rate limit).
		c.pace = func(n int) error {
			if n < wsPaceBytes {
				t.Fatalf("paid for %d bytes of framing at once, want at least %d", n, wsPaceBytes)
			}
			charged += n
			return nil
		}
	}
	var got int
	buf := make([]byte, 1000)
	var err error
	for err == nil {
		var n int
		n, err = c.Read(buf)
		got += n
	}
	var pe *ProtocolError
	var closed *wsClosedError // a client's, at a close frame that says why
	if err != io.EOF && err != io.ErrUnexpectedEOF && !errors.As(err, &pe) && !(client && errors.As(err, &closed) && errors.Is(err, io.EOF)) {
		t.Fatalf("client %v: read ended with %v", client, err)
	}
	if got > len(data) {
		t.Fatalf("client %v: read %d payload bytes from %d input bytes", client, got, len(data))
	}
	// Every byte consumed is payload returned or framing counted: none
	// escapes the server's rate limit.
	if !client && got+charged+c.framing+c.br.Buffered()+in.Len() != len(data) {
		t.Fatalf("of %d input bytes: %d payload, %d framing paid for, %d counted, %d buffered, %d unread",
			len(data), got, charged, c.framing, c.br.Buffered(), in.Len())
	}
	// The replies (pongs and at most one close) parse as whole frames.
	r := out.Bytes()
	for len(r) > 0 {
		hlen := 2
		if client {
			hlen += 4
		}
		if len(r) < 2 || (r[1]&0x80 != 0) != client || r[1]&0x7f > wsMaxControl || len(r) < hlen+int(r[1]&0x7f) {
			t.Fatalf("client %v: bad reply frames %x", client, out.Bytes())
		}
		op, p := r[0]&0x0f, bytes.Clone(r[hlen:hlen+int(r[1]&0x7f)])
		if client {
			wsMask(p, [4]byte(r[2:6]), 0)
		}
		r = r[hlen+len(p):]
		if op != wsClose {
			continue
		}
		// RFC 6455 7.4: a close frame carries a code an endpoint may send
		// and a UTF-8 reason.
		if len(p) < 2 || !wsSendableCloseCode(binary.BigEndian.Uint16(p)) || !utf8.Valid(p[2:]) {
			t.Fatalf("client %v: close frame %x in reply to %x", client, p, data)
		}
	}
}

// wsSendableCloseCode reports whether RFC 6455 (with the codes IANA added
// since) lets an endpoint send code in a close frame.
func wsSendableCloseCode(code uint16) bool {
	return code >= 1000 && code <= 1014 && code != 1004 && code != 1005 && code != 1006 || code >= 3000 && code <= 4999
}

// FuzzWebSocketRoundTrip writes the input, cut into pieces, through a
// client wsConn and reads it back through a server wsConn.
func FuzzWebSocketRoundTrip(f *testing.F) {
	f.Add([]byte("hello"), uint16(3))
	f.Add(make([]byte, 70000), uint16(40000))
	f.Add([]byte{}, uint16(0))
	f.Fuzz(func(t *testing.T, data []byte, cut uint16) {
		var wire bytes.Buffer
		w := newWSConn(wsFuzzConn{w: &wire}, nil, true)
		step := int(cut)%(len(data)+1) + 1
		for rest := data; ; {
			n := min(step, len(rest))
			if _, err := w.Write(rest[:n]); err != nil {
				t.Fatal(err)
			}
			if rest = rest[n:]; len(rest) == 0 {
				break
			}
		}
		w.Close()
		r := newWSConn(wsFuzzConn{r: &wire, w: io.Discard}, nil, false)
		got, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("read back %d bytes, wrote %d", len(got), len(data))
		}
	})
}

// dialFuzzConn is a server that answers whatever the client writes with a
// fixed script, delivered at most chunk bytes a read, then io.EOF. In the
// script, "{accept}" becomes the Sec-WebSocket-Accept for the key of the
// request the client wrote before its first read, and "{key}" the server's
// public key in hex.
type dialFuzzConn struct {
	net.Conn // nil: only the methods below are called
	script   []byte
	key      PublicKey
	chunk    int

	mu     sync.Mutex
	out    bytes.Buffer // what the client wrote, up to its first read
	in     *bytes.Reader
	closed bool
}

func (c *dialFuzzConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, net.ErrClosed
	}
	if c.in == nil {
		c.out.Write(p)
	}
	return len(p), nil
}

func (c *dialFuzzConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, net.ErrClosed
	}
	if c.in == nil {
		c.in = bytes.NewReader(c.expand())
	}
	if len(p) > c.chunk {
		p = p[:c.chunk]
	}
	return c.in.Read(p)
}

// expand returns the script with its placeholders filled in.
func (c *dialFuzzConn) expand() []byte {
	var accept string
	if _, rest, ok := bytes.Cut(c.out.Bytes(), []byte("Sec-WebSocket-Key: ")); ok {
		key, _, _ := bytes.Cut(rest, []byte("\r\n"))
		accept = wsAcceptKey(string(key))
	}
	s := bytes.ReplaceAll(c.script, []byte("{accept}"), []byte(accept))
	return bytes.ReplaceAll(s, []byte("{key}"), []byte(c.key.String()))
}

func (c *dialFuzzConn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	return nil
}

func (c *dialFuzzConn) SetWriteDeadline(time.Time) error { return nil }
func (c *dialFuzzConn) SetReadDeadline(time.Time) error  { return nil }
func (c *dialFuzzConn) SetDeadline(time.Time) error      { return nil }
func (c *dialFuzzConn) LocalAddr() net.Addr              { return pipeAddr{} }
func (c *dialFuzzConn) RemoteAddr() net.Addr             { return pipeAddr{} }

// FuzzDialResponse plays the server's (or proxy's) side of a dial with
// arbitrary bytes: the answer to the classic upgrade request (mode%4 0), to
// a WebSocket upgrade (1), to a proxy's CONNECT (2), and to a fast-start
// request made with an assumed key (3); mode/4 sets how many bytes each
// read returns (1 to 64), so that the header-size guard loops. Every
// attempt must end (the bytes run out), with an error that starts with
// "relay: " or with a connection that only an answer of the right status
// (after at most maxInterimResponses interim ones) could have made; a
// Client made must then read the rest of the bytes without a panic. An
// error holds no line break (what the server sent is quoted), and one
// that refuses a redirect names where to.
func FuzzDialResponse(f *testing.F) {
	server, client := fuzzKey(3), fuzzKey(4)
	spub, cpub := server.Public(), client.Public()
	serverKey := appendFrame(nil, FrameServerKey, appendServerKey(nil, spub))
	serverInfo := serverInfoFrame(server, cpub, []byte(`{"version":2}`))
	up := "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\n"
	ws := "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: derp\r\n\r\n"
	f.Add(byte(0), frames([]byte(up+"Derp-Public-Key: {key}\r\n\r\n"), serverKey, serverInfo))
	f.Add(byte(4), frames([]byte(up+"\r\n"), serverKey, serverInfo, appendFrame(nil, FramePing, []byte("12345678"))))
	f.Add(byte(8), frames([]byte(strings.ReplaceAll(up, "\r\n", "\n")+"\n"), serverKey))
	f.Add(byte(0), []byte("HTTP/1.1 426 Upgrade Required\r\nContent-Length: 28\r\n\r\nDERP requires an upgrade.\r\n"))
	f.Add(byte(0), []byte("HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"))
	f.Add(byte(4), []byte("HTTP/1.1 101 OK\r\nX: "+strings.Repeat("a", 100)+"\r\n"))
	f.Add(byte(0), frames([]byte(up+"Derp-Public-Key: "+mustPub(9).String()+"\r\n\r\n"), serverKey))
	f.Add(byte(1), frames([]byte(ws), wsFrame(0x82, serverKey, true), wsFrame(0x82, serverInfo, true), wsFrame(0x89, []byte("p"), true)))
	f.Add(byte(5), frames([]byte(ws), wsFrame(0x02, serverKey[:10], true), wsFrame(0x80, serverKey[10:], true), wsFrame(0x88, nil, true)))
	f.Add(byte(1), []byte(strings.Replace(ws, "derp", "chat", 1)))
	f.Add(byte(1), []byte(strings.Replace(ws, "{accept}", "dGhlIHNhbXBsZSBub25jZQ==", 1)))
	f.Add(byte(1), frames([]byte(ws), wsFrame(0x82, serverKey, false)))
	f.Add(byte(2), []byte("HTTP/1.1 200 Connection established\r\n\r\n"))
	f.Add(byte(6), []byte("HTTP/1.0 200 OK\r\nProxy-Agent: x\r\n\r\nextra"))
	f.Add(byte(2), []byte("HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n"))
	f.Add(byte(3), frames(serverKey, serverInfo))
	f.Add(byte(3), frames([]byte(up+"Derp-Public-Key: {key}\r\n\r\n"), serverKey, serverInfo))
	f.Add(byte(7), frames(appendFrame(nil, FrameServerKey, appendServerKey(nil, mustPub(9)))))
	f.Add(byte(3), []byte("HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\n\r\nbad"))
	// Interim responses before the answer, on every path, and more of
	// them than a client skips.
	interim := "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </derp>; rel=preload\r\n\r\n"
	f.Add(byte(0), frames([]byte(interim+up+"Derp-Public-Key: {key}\r\n\r\n"), serverKey, serverInfo))
	f.Add(byte(5), frames([]byte(interim+ws), wsFrame(0x82, serverKey, true), wsFrame(0x82, serverInfo, true)))
	f.Add(byte(2), []byte(interim+"HTTP/1.1 200 Connection established\r\n\r\n"))
	f.Add(byte(3), frames([]byte(interim), serverKey, serverInfo))
	f.Add(byte(7), frames([]byte(interim+up+"\r\n"), serverKey, serverInfo))
	f.Add(byte(0), []byte(strings.Repeat("HTTP/1.1 100 Continue\r\n\r\n", maxInterimResponses+1)+up+"\r\n"))
	f.Add(byte(3), []byte(strings.Repeat("HTTP/1.1 102 Processing\n\n", maxInterimResponses+1)))
	f.Add(byte(2), []byte("HTTP/1.1 100 Continue\r\nContent-Length: 4\r\n\r\nbodyHTTP/1.1 200 OK\r\n\r\n"))
	// Redirects (their Location goes into the error) and refusal
	// bodies with line breaks (quoted in the error).
	f.Add(byte(0), []byte("HTTP/1.1 301 Moved Permanently\r\nLocation: https://derp.example/derp/\r\nContent-Length: 21\r\n\r\nmoved\nfake: log line\r\n"))
	f.Add(byte(1), []byte("HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\n\r\n"))
	f.Add(byte(3), []byte(interim+"HTTP/1.1 308 Permanent Redirect\r\nLocation: https://x/"+strings.Repeat("y", 300)+"\r\nContent-Length: 0\r\n\r\n"))
	f.Add(byte(2), []byte("HTTP/1.1 307 Temporary Redirect\r\nLocation: http://proxy2.example/\r\n\r\n"))
	f.Add(byte(3), []byte("HTTP/1.1 400 Bad Request\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nline1\n\r\n6\r\nline2\r\r\n0\r\n\r\n"))
	f.Add(byte(4), []byte("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 600\r\n\r\n"+strings.Repeat("busy\n", 120)))
	f.Add(byte(0), []byte("HTTP/1.1 500 a\rfake\r\n\r\n"))
	f.Add(byte(1), []byte("HTTP/1.1 500 a\rfake\r\n\r\n"))
	f.Add(byte(2), []byte("HTTP/1.1 500 a\rfake\r\n\r\n"))
	f.Add(byte(3), []byte("HTTP/1.1 500 a\rfake\r\n\r\n"))
	f.Add(byte(0), []byte("HTTP/1.1 500 x\r\nBad\rKey: v\r\n\r\n"))
	f.Fuzz(func(t *testing.T, mode byte, script []byte) {
		nc := &dialFuzzConn{script: script, key: spub, chunk: int(mode/4) + 1}
		u := &url.URL{Scheme: "http", Host: "derp.example", Path: "/derp"}
		var fs FastStart
		opts := []ClientOption{RecvTimeout(10 * time.Second), LoginTimeout(10 * time.Second)}
		var c *Client
		var err error
		done := make(chan struct{})
		go func() {
			defer close(done)
			switch mode % 4 {
			case 0:
				c, _, err = fs.upgrade(nc, u, client, Handshake{}, opts, nil)
			case 1:
				c, _, err = fs.webSocket(nc, u, client, Handshake{}, opts, nil)
			case 2:
				dial := func(context.Context, string, string) (net.Conn, error) { return nc, nil }
				_, err = fs.dialProxy(context.Background(), dial, &url.URL{Scheme: "http", Host: "proxy.example:3128"}, "derp.example:443", nil)
			case 3:
				var hs Handshake
				hs.ServerKey = spub
				c, _, err = fs.fastStart(nc, u, client, hs, true, opts, nil)
			}
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("dial did not end 10s after the server's bytes ran out")
		}
		// The answer as net/http reads it, after the interim responses
		// a client skips.
		var resp *http.Response
		var rerr error
		sbr := bufio.NewReader(bytes.NewReader(nc.expand()))
		for i := 0; i <= maxInterimResponses; i++ {
			resp, rerr = http.ReadResponse(sbr, &http.Request{Method: http.MethodConnect})
			if rerr != nil || !isInterim(resp.StatusCode) {
				break
			}
			if i == maxInterimResponses {
				rerr = errors.New("too many interim responses")
			}
		}
		if err != nil {
			if c != nil {
				t.Fatal("a Client with an error")
			}
			if !strings.HasPrefix(err.Error(), "relay: ") {
				t.Fatalf("error %q", err)
			}
			// What the server sent is quoted: it cannot break the
			// error (and the log lines it goes into) into lines.
			if strings.ContainsAny(err.Error(), "\r\n") {
				t.Fatalf("line break in error %q", err)
			}
			// A refused redirect says where to.
			refused := strings.Contains(err.Error(), " refused: ") || errors.Is(err, errFastStartAnswered)
			if refused && rerr == nil && resp.StatusCode/100 == 3 && resp.Header.Get("Location") != "" && !strings.Contains(err.Error(), "redirected to") {
				t.Fatalf("redirect with Location %q refused without naming it: %q", resp.Header.Get("Location"), err)
			}
			return
		}
		// Only the right answer connects: check it with net/http.
		switch mode % 4 {
		case 0, 1:
			if rerr != nil || resp.StatusCode != http.StatusSwitchingProtocols {
				t.Fatalf("connected after %v (%v)", resp, rerr)
			}
		case 2:
			if rerr != nil || resp.StatusCode/100 != 2 {
				t.Fatalf("CONNECT succeeded after %v (%v)", resp, rerr)
			}
			return
		}
		defer c.Close()
		if mode%4 == 3 && c.ServerPublicKey() != spub {
			t.Fatalf("connected to server key %v, assumed %v", c.ServerPublicKey(), spub)
		}
		for n := 0; ; n++ {
			if n > len(script)/2+2 {
				t.Fatalf("%d messages from %d bytes", n, len(script))
			}
			m, err := c.Recv()
			if err != nil {
				if !strings.HasPrefix(err.Error(), "relay: ") {
					t.Fatalf("Recv error %q", err)
				}
				break
			}
			// Only spub can seal a ServerInfo to cpub.
			if _, ok := m.(ServerInfo); ok && c.ServerPublicKey() != spub {
				t.Fatalf("ServerInfo accepted from server key %v", c.ServerPublicKey())
			}
		}
	})
}

// FuzzHeaderSizeGuard checks checkHeaderSize, which stands between a
// hostile server (or proxy) and http.ReadResponse, with buffers of 16 to
// 271 bytes filled a few bytes at a time: it accepts only a header that is
// whole in the buffer (ended by an empty line, CRLF or bare LF), so that
// http.ReadResponse then never consumes more than that; it refuses a
// longer one with errHeaderTooLarge once the buffer is full; and a header
// the data cuts short is io.ErrUnexpectedEOF, not a clean io.EOF.
func FuzzHeaderSizeGuard(f *testing.F) {
	f.Add(byte(0), byte(0), []byte("HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\nDERP"))
	f.Add(byte(200), byte(3), []byte("HTTP/1.1 101 Switching Protocols\nUpgrade: DERP\n\nDERP"))
	f.Add(byte(10), byte(1), []byte("HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\tc\r\n\r\n"))
	f.Add(byte(0), byte(7), []byte("HTTP/1.1 200 OK\r\nX: "+strings.Repeat("a", 300)+"\r\n\r\n"))
	f.Add(byte(30), byte(2), []byte("HTTP/1.1 200 OK\r\n \r\n\r\n"))
	f.Add(byte(30), byte(2), []byte("HTTP/1.1 200 OK\r\nA: b\r\r\n\r\n"))
	f.Add(byte(200), byte(5), []byte("HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n"))
	f.Add(byte(0), byte(0), []byte{})
	f.Add(byte(40), byte(3), []byte("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\n"))
	f.Add(byte(0), byte(1), []byte("HTTP/1.1 103 Early Hints\n\nHTTP/1.1 301 Moved\r\nLocation: /x\r\n\r\n"))
	f.Fuzz(func(t *testing.T, size, chunk byte, data []byte) {
		src := &countingReader{r: bytes.NewReader(data), chunk: int(chunk%16) + 1}
		br := bufio.NewReaderSize(src, 16+int(size))
		err := checkHeaderSize(br)
		buffered, _ := br.Peek(br.Buffered())
		end := headerEnd(buffered)
		switch {
		case err == nil:
			if end < 0 {
				t.Fatalf("accepted %q, which has no empty line", buffered)
			}
		case errors.Is(err, errHeaderTooLarge):
			if end >= 0 || br.Buffered() != br.Size() {
				t.Fatalf("refused %q as too large with a %d-byte buffer", buffered, br.Size())
			}
			return
		default:
			// The data ran out: cleanly if there was none.
			want := io.ErrUnexpectedEOF
			if len(data) == 0 {
				want = io.EOF
			}
			if err != want || end >= 0 || src.n != len(data) {
				t.Fatalf("%v after %d of %d bytes, header end at %d", err, src.n, len(data), end)
			}
			return
		}
		before := src.n - br.Buffered() // what was consumed before the response
		resp, err := http.ReadResponse(br, nil)
		consumed := src.n - br.Buffered() - before
		if consumed > end {
			t.Fatalf("ReadResponse consumed %d bytes of %q, whose header ends at %d (%v)", consumed, data, end, err)
		}
		if err == nil && consumed != end {
			t.Fatalf("ReadResponse consumed %d bytes of %q for a header of %d", consumed, data, end)
		}
		if err == nil {
			resp.Body.Close()
		}
	})
}

// headerEnd returns the length of the HTTP header at the start of b, up to
// and including its empty line, or -1 if b holds no empty line.
func headerEnd(b []byte) int {
	for i, c := range b {
		if c != '\n' {
			continue
		}
		if bytes.HasPrefix(b[i+1:], []byte("\n")) {
			return i + 2
		}
		if bytes.HasPrefix(b[i+1:], []byte("\r\n")) {
			return i + 3
		}
	}
	return -1
}

// countingReader reads at most chunk bytes at a time from r and counts
// them in n.
type countingReader struct {
	r     io.Reader
	chunk int
	n     int
}

func (c *countingReader) Read(p []byte) (int, error) {
	if len(p) > c.chunk {
		p = p[:c.chunk]
	}
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// FuzzServerInfo seals arbitrary JSON into the server's ServerInfo: the
// client must return exactly what encoding/json makes of it or a
// bad_server_info_json error, and a rate limit it announces, whatever its
// values, must still let a first packet of any size through (the burst is
// at least one maximal packet) and never make Send fail with anything but
// ErrRateLimited.
func FuzzServerInfo(f *testing.F) {
	server, client := fuzzKey(3), fuzzKey(4)
	spub, cpub := server.Public(), client.Public()
	f.Add([]byte(`{"version":2}`), uint16(100))
	f.Add([]byte(`{"version":2,"TokenBucketBytesPerSecond":1,"TokenBucketBytesBurst":1}`), uint16(65535))
	f.Add([]byte(`{"TokenBucketBytesPerSecond":9223372036854775807,"TokenBucketBytesBurst":9223372036854775807}`), uint16(1))
	f.Add([]byte(`{"TokenBucketBytesPerSecond":-1,"TokenBucketBytesBurst":-9223372036854775808}`), uint16(0))
	f.Add([]byte(`{"TokenBucketBytesPerSecond":1e3}`), uint16(0))
	f.Add([]byte(`{"tokenbucketbytespersecond":"x"}`), uint16(0))
	f.Add([]byte(`null`), uint16(0))
	f.Fuzz(func(t *testing.T, js []byte, size uint16) {
		stream := serverInfoFrame(server, cpub, js)
		nc := &dialFuzzConn{script: stream, chunk: len(stream) + 1}
		c, err := NewClient(client, nc, nil, ServerPublicKey(spub))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		m, err := c.Recv()
		var want serverInfoJSON
		if jerr := json.Unmarshal(js, &want); jerr != nil {
			if ProtocolErrorReason(err) != "bad_server_info_json" {
				t.Fatalf("Recv = %v, %v for JSON that does not decode (%v)", m, err, jerr)
			}
			return
		}
		if err != nil || m != ServerInfo(want) {
			t.Fatalf("Recv = %#v, %v; want %#v", m, err, ServerInfo(want))
		}
		pkt := make([]byte, int(size)%(MaxPacketSize+1))
		if err := c.Send(cpub, pkt); err != nil {
			t.Fatalf("first Send of %d bytes under %s: %v", len(pkt), js, err)
		}
		for range 3 {
			if err := c.Send(cpub, pkt); err != nil && err != ErrRateLimited {
				t.Fatalf("Send under %s: %v", js, err)
			}
		}
	})
}

// FuzzNextProtos checks the ALPN list AppendMetaCert gives a DERP listener:
// no "h2", exactly one "http/1.1", every other protocol kept in order, the
// same list again when applied twice, and the caller's slice untouched.
func FuzzNextProtos(f *testing.F) {
	f.Add("h2\x00http/1.1")
	f.Add("")
	f.Add("acme-tls/1\x00h2\x00h2\x00http/1.1\x00http/1.1\x00x")
	f.Fuzz(func(t *testing.T, list string) {
		var in []string
		if list != "" {
			in = strings.Split(list, "\x00")
		}
		orig := slices.Clone(in)
		out := metaCertNextProtos(in)
		if !slices.Equal(in, orig) {
			t.Fatalf("input changed to %q", in)
		}
		var others, wantOthers []string
		n := 0
		for _, p := range out {
			switch p {
			case "h2":
				t.Fatalf("%q gives %q", in, out)
			case "http/1.1":
				n++
			default:
				others = append(others, p)
			}
		}
		for _, p := range in {
			if p != "h2" && p != "http/1.1" {
				wantOthers = append(wantOthers, p)
			}
		}
		if n != 1 || !slices.Equal(others, wantOthers) {
			t.Fatalf("%q gives %q", in, out)
		}
		if again := metaCertNextProtos(out); !slices.Equal(again, out) {
			t.Fatalf("%q gives %q, then %q", in, out, again)
		}
	})
}

// roundTripFunc is an http.RoundTripper made of a function.
type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// FuzzAdmissionReply feeds an AdmissionService arbitrary replies: from an
// admission service at a URL (which may be across the network) and from
// tailscaled's LocalAPI. A login is admitted only by a 200 whose JSON says
// so ({"Allow":true} in the first 4 KiB; a whois about the very key asked),
// or, with FailOpen, by a service that cannot be reached (a reply that is
// not HTTP); whatever else the reply holds refuses it, with an error whose
// text has no line break (it goes into the log line of the failed login).
func FuzzAdmissionReply(f *testing.F) {
	key := fuzzKey(5).Public()
	nodeKey := "nodekey:" + key.String()
	f.Add(byte(0), []byte("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"Allow\":true}"))
	f.Add(byte(0), []byte("HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"allow\":false}"))
	f.Add(byte(1), []byte("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"All\r\n9\r\now\":true}\r\n0\r\n\r\n"))
	f.Add(byte(0), []byte("HTTP/1.1 200 OK\r\n\r\n{\"Allow\":true,\"Allow\":false}"))
	f.Add(byte(0), []byte("HTTP/1.1 200 OK\r\n\r\n{\"Allow\":1}"))
	f.Add(byte(0), []byte("HTTP/1.1 200 OK\r\n\r\n"+strings.Repeat(" ", 4090)+"{\"Allow\":true}"))
	f.Add(byte(1), []byte("HTTP/1.1 403 Forbidden\r\n\r\n{\"Allow\":true}"))
	f.Add(byte(1), []byte("HTTP/1.1 200 OK\r\nX: \x1b[31m\r\n\r\n{\"Allow\":true}"))
	f.Add(byte(1), []byte("garbage"))
	f.Add(byte(2), []byte("HTTP/1.1 200 OK\r\n\r\n{\"Node\":{\"Key\":\""+nodeKey+"\"}}"))
	f.Add(byte(2), []byte("HTTP/1.1 200 OK\r\n\r\n{\"Node\":{\"Key\":\""+strings.ToUpper(nodeKey)+"\"}}"))
	f.Add(byte(2), []byte("HTTP/1.1 200 OK\r\n\r\n{\"node\":{\"key\":\""+nodeKey+"\"}} trailing"))
	f.Add(byte(2), []byte("HTTP/1.1 200 OK\r\n\r\n{\"Node\":null}"))
	f.Add(byte(3), []byte("HTTP/1.1 404 Not Found\r\n\r\nno such node\n"))
	f.Add(byte(3), []byte("HTTP/1.1 400 Bad Request\r\n\r\ninvalid 'addr' parameter\n"))
	f.Fuzz(func(t *testing.T, mode byte, reply []byte) {
		failOpen, tailscaled := mode&1 != 0, mode&2 != 0
		var (
			replied bool
			status  int
			body    []byte
		)
		rt := roundTripFunc(func(req *http.Request) (*http.Response, error) {
			if req.Body != nil {
				io.Copy(io.Discard, req.Body)
				req.Body.Close()
			}
			resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(reply)), req)
			if err != nil {
				return nil, err
			}
			replied, status = true, resp.StatusCode
			// What the service reads of the body is what a reader
			// gets here, until the first error.
			body, _ = io.ReadAll(resp.Body)
			resp.Body = io.NopCloser(bytes.NewReader(body))
			return resp, nil
		})
		as := &AdmissionService{URL: "http://admission.invalid/check", FailOpen: failOpen, Client: &http.Client{Transport: rt}}
		if tailscaled {
			as.Tailscaled = "/nonexistent/tailscaled.sock"
			as.once.Do(func() {
				as.slots = make(chan struct{}, maxAdmissionRequests)
				as.local = &http.Client{Transport: rt}
			})
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		err := as.Admit(ctx, Admission{Key: key, RemoteAddr: "192.0.2.1:41641"})
		if err != nil && strings.ContainsAny(err.Error(), "\r\n") {
			t.Fatalf("error with a line break: %q", err)
		}
		if !replied { // not an HTTP reply: unreachable
			if (err == nil) != failOpen {
				t.Fatalf("unreachable service (FailOpen %v): Admit = %v", failOpen, err)
			}
			return
		}
		var allow bool
		if tailscaled {
			var who struct{ Node *struct{ Key string } }
			allow = status == http.StatusOK && json.Unmarshal(body, &who) == nil && who.Node != nil && who.Node.Key == nodeKey
		} else {
			var v struct{ Allow bool }
			allow = status == http.StatusOK && json.NewDecoder(io.LimitReader(bytes.NewReader(body), 4096)).Decode(&v) == nil && v.Allow
		}
		if (err == nil) != allow {
			t.Fatalf("status %d, body %q (FailOpen %v, tailscaled %v): Admit = %v, want admitted %v", status, body, failOpen, tailscaled, err, allow)
		}
	})
}
