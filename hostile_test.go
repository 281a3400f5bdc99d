package relay

// Hostile inputs, faults and limits against a live server. Each case of
// TestHostileInputs attacks one server (shared by the cases that need no
// special options) while a well-behaved pair of clients stays connected to
// it, and checks four things: the offending connection got the right error
// or close, the server counted it under the expected name, the pair still
// relays packets intact, and no session goroutine is left over.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const hostileMeshKey = "f00df00df00df00df00df00df00df00df00df00df00df00df00df00df00df00d"

// hostileEnv is a live server reachable through Accept over TCP and through
// net/http, with a well-behaved pair of clients a and b logged in.
type hostileEnv struct {
	s        *Server
	addr     string // DERP over TCP, through Accept
	httpAddr string // the same server behind an http.Server
	a, b     *Client
}

func newHostileEnv(t *testing.T, opts ...ServerOption) *hostileEnv {
	t.Helper()
	opts = append([]ServerOption{WithMeshKey(hostileMeshKey), WithLoginTimeout(time.Second)}, opts...)
	s := NewServer(mustKey(t), opts...)
	e := &hostileEnv{s: s, addr: tcpServer(t, s)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// ReadHeaderTimeout is the embedder's defence against slowloris: the
	// handler only runs once the headers are in.
	hs := &http.Server{Handler: s, ReadHeaderTimeout: 300 * time.Millisecond}
	served := make(chan struct{})
	go func() { hs.Serve(ln); close(served) }()
	t.Cleanup(func() { hs.Close(); <-served })
	e.httpAddr = ln.Addr().String()
	e.a, e.b = tcpClient(t, e.addr), tcpClient(t, e.addr)
	return e
}

// checkRelaying sends a random packet each way between a and b and checks
// that it arrives intact; a packet from anyone else is a failure.
func (e *hostileEnv) checkRelaying(t *testing.T) {
	t.Helper()
	for _, dir := range [][2]*Client{{e.a, e.b}, {e.b, e.a}} {
		from, to := dir[0], dir[1]
		pkt := make([]byte, 1200)
		rand.Read(pkt)
		sum := sha256.Sum256(pkt)
		if err := from.Send(to.PublicKey(), pkt); err != nil {
			t.Fatalf("well-behaved client cannot send: %v", err)
		}
		got, ok := recvMsg[*ReceivedPacket](t, to)
		if !ok {
			t.Fatal("well-behaved pair no longer relays")
		}
		if got.Source != from.PublicKey() || sha256.Sum256(got.Data) != sum {
			t.Fatalf("well-behaved pair got %d bytes from %s, want their own 1200", len(got.Data), got.Source.ShortString())
		}
	}
}

// rawConn is a hand-driven client connection for sending what no Client
// would.
type rawConn struct {
	nc     net.Conn
	br     *bufio.Reader
	priv   PrivateKey
	server PublicKey
}

// dial connects to the server over TCP and reads its ServerKey frame.
func (e *hostileEnv) dial(t *testing.T) *rawConn {
	t.Helper()
	nc, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	r := &rawConn{nc: nc, br: bufio.NewReader(nc), priv: mustKey(t)}
	ft, p, err := r.readFrame()
	if err != nil || ft != FrameServerKey {
		t.Fatalf("reading ServerKey: %v %v", ft, err)
	}
	if r.server, err = parseServerKey(p); err != nil {
		t.Fatal(err)
	}
	return r
}

// dialLogin connects and logs in with the ClientInfo JSON js.
func (e *hostileEnv) dialLogin(t *testing.T, js string) *rawConn {
	t.Helper()
	r := e.dial(t)
	r.login(t, js)
	return r
}

func (r *rawConn) clientInfo(js string) []byte {
	return clientInfoFrame(r.priv, r.server, []byte(js))
}

// send writes bytes; errors are returned, not fatal, as the server may have
// closed the connection already.
func (r *rawConn) send(parts ...[]byte) error {
	r.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err := r.nc.Write(frames(parts...))
	return err
}

// closeWrite sends FIN: the server reads EOF at this point of the stream.
func (r *rawConn) closeWrite(t *testing.T) {
	if err := r.nc.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
}

func (r *rawConn) readFrame() (FrameType, []byte, error) {
	r.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	ft, n, err := readFrameHeader(r.br)
	if err != nil {
		return 0, nil, err
	}
	if n > maxClientFrame {
		return 0, nil, fmt.Errorf("%d-byte frame", n)
	}
	p := make([]byte, n)
	_, err = io.ReadFull(r.br, p)
	return ft, p, err
}

// login sends a valid ClientInfo and returns the ServerInfo.
func (r *rawConn) login(t *testing.T, js string) serverInfoJSON {
	t.Helper()
	if err := r.send(r.clientInfo(js)); err != nil {
		t.Fatal(err)
	}
	return r.awaitServerInfo(t)
}

func (r *rawConn) awaitServerInfo(t *testing.T) serverInfoJSON {
	t.Helper()
	for {
		ft, p, err := r.readFrame()
		if err != nil {
			t.Fatalf("waiting for ServerInfo: %v", err)
		}
		if ft != FrameServerInfo {
			continue
		}
		shared, _ := sharedKey(r.priv, r.server)
		msg, ok := openBox(nil, shared, p)
		if !ok {
			t.Fatal("ServerInfo box does not open")
		}
		var si serverInfoJSON
		if err := json.Unmarshal(msg, &si); err != nil {
			t.Fatal(err)
		}
		return si
	}
}

// expectClosed reads until the server closes the connection.
func (r *rawConn) expectClosed(t *testing.T) {
	t.Helper()
	r.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, r.br)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("the server did not close the connection")
	}
}

// expectAlive pings and waits for the matching Pong, skipping other frames.
func (r *rawConn) expectAlive(t *testing.T) {
	t.Helper()
	r.expectAlivePrefix(t, nil)
}

// expectAlivePrefix is expectAlive with the bytes of next sent right after
// the Ping, in the same write.
func (r *rawConn) expectAlivePrefix(t *testing.T, next []byte) {
	t.Helper()
	var data [8]byte
	rand.Read(data[:])
	if err := r.send(mkFrame(FramePing, data[:]), next); err != nil {
		t.Fatalf("connection should have survived: %v", err)
	}
	for {
		ft, p, err := r.readFrame()
		if err != nil {
			t.Fatalf("connection should have survived: %v", err)
		}
		if ft == FramePong && bytes.Equal(p, data[:]) {
			return
		}
	}
}

// expectPacket reads until a RecvPacket arrives and returns source and data.
func (r *rawConn) expectPacket(t *testing.T) (PublicKey, []byte) {
	t.Helper()
	for {
		ft, p, err := r.readFrame()
		if err != nil {
			t.Fatalf("waiting for a packet: %v", err)
		}
		if ft == FrameRecvPacket && len(p) >= KeyLen {
			return PublicKey(p[:KeyLen]), p[KeyLen:]
		}
	}
}

// counter reads a counter by name: "err:<Errors key>", "rej:<Rejected
// key>", "drop:<PacketsDropped key>" or a Stats field name.
func counter(st Stats, name string) int64 {
	kind, key, _ := strings.Cut(name, ":")
	switch kind {
	case "err":
		return st.Errors[key]
	case "rej":
		return st.Rejected[key]
	case "drop":
		return st.PacketsDropped[key]
	}
	switch name {
	case "UnknownFrames":
		return st.UnknownFrames
	case "PongsSent":
		return st.PongsSent
	case "PacketsReceived":
		return st.PacketsReceived
	case "PacketsSent":
		return st.PacketsSent
	case "RateLimitWaits":
		return st.RateLimitWaits
	case "WriteTimeouts":
		return st.WriteTimeouts
	case "UpgradeLogins":
		return st.UpgradeLogins
	case "Accepts":
		return st.Accepts
	case "TotalDupLogins":
		return st.TotalDupLogins
	}
	panic("unknown counter " + name)
}

// sessionGoroutines counts goroutines running this package's code other
// than test runners and session writers (a writer lingers briefly after its
// last write, and a session cannot end before its writer does).
func sessionGoroutines() int {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		// Readers of resumed parked sessions, and the parker's poller,
		// come and go with the pair's traffic; the Accept goroutine of
		// every session, parked or not, is counted.
		if strings.Contains(g, "fastderp/relay.") && !strings.Contains(g, "testing.tRunner") &&
			!strings.Contains(g, "testing.(*M)") && !strings.Contains(g, "(*sconn).writeLoop") &&
			!strings.Contains(g, "created by github.com/fastderp/relay.(*sconn).resumed") &&
			!strings.Contains(g, "created by github.com/fastderp/relay.(*sconn).unpark") &&
			!strings.Contains(g, "relay.(*parker).poll") {
			n++
		}
	}
	return n
}

// waitNoExtraSessions waits up to 5 s for sessionGoroutines to fall to
// baseline, and returns the goroutines' stacks if it does not.
func waitNoExtraSessions(baseline int) string {
	deadline := time.Now().Add(5 * time.Second)
	for sessionGoroutines() > baseline {
		if time.Now().After(deadline) {
			return leakedGoroutines()
		}
		time.Sleep(5 * time.Millisecond)
	}
	return ""
}

func waitForT(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not reached in 5s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type hostileCase struct {
	name string
	opts []ServerOption // non-nil: the case gets a server of its own
	// want lists counters (see counter) that must grow. Any "err:" key
	// not listed must not move.
	want []string
	run  func(t *testing.T, e *hostileEnv)
}

// withKey returns a ClientInfo frame whose claimed key is replaced by k
// (the box stays sealed with r's real key).
func (r *rawConn) clientInfoWithKey(js string, k []byte) []byte {
	f := r.clientInfo(js)
	copy(f[frameHeaderLen:frameHeaderLen+KeyLen], k)
	return f
}

func hexKey(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != KeyLen {
		panic("bad test key " + s)
	}
	return b
}

func hostileCases() []hostileCase {
	const okJSON = `{"version":2,"CanAckPings":true}`
	const meshJSON = `{"version":2,"meshKey":"` + hostileMeshKey + `"}`
	closedWith := func(js string, attack ...[]byte) func(t *testing.T, e *hostileEnv) {
		return func(t *testing.T, e *hostileEnv) {
			r := e.dialLogin(t, js)
			r.send(attack...)
			r.expectClosed(t)
		}
	}
	loginClosed := func(attack func(r *rawConn) []byte) func(t *testing.T, e *hostileEnv) {
		return func(t *testing.T, e *hostileEnv) {
			r := e.dial(t)
			r.send(attack(r))
			r.expectClosed(t)
		}
	}
	survives := func(js string, attack ...[]byte) func(t *testing.T, e *hostileEnv) {
		return func(t *testing.T, e *hostileEnv) {
			r := e.dialLogin(t, js)
			if err := r.send(attack...); err != nil {
				t.Fatal(err)
			}
			r.expectAlive(t)
		}
	}
	badJSON := func(js string) hostileCase {
		return hostileCase{"ClientInfo JSON " + js, nil, []string{"err:login:bad_client_info_json"},
			loginClosed(func(r *rawConn) []byte { return r.clientInfo(js) })}
	}
	badKey := func(name string, key func(good []byte) []byte) hostileCase {
		return hostileCase{"client key " + name, nil, []string{"err:login:bad_client_key"},
			loginClosed(func(r *rawConn) []byte {
				pub := r.priv.Public()
				return r.clientInfoWithKey(okJSON, key(pub[:]))
			})}
	}
	pAsKey := func(plus byte) []byte { // 2^255 - 19 + plus, little-endian
		k := bytes.Repeat([]byte{0xff}, KeyLen)
		k[0], k[31] = 0xed+plus, 0x7f
		return k
	}
	someone := func() []byte { k := mustKeyNoT().Public(); return k[:] }
	payload := func(n int) []byte { p := make([]byte, n); rand.Read(p); return p }
	sendPacket := func(dst []byte, n int) []byte { return mkFrame(FrameSendPacket, dst, payload(n)) }
	truncated := func(frame []byte) func(t *testing.T, e *hostileEnv) {
		return func(t *testing.T, e *hostileEnv) {
			r := e.dialLogin(t, okJSON)
			r.send(frame)
			r.closeWrite(t)
			r.expectClosed(t)
		}
	}

	return []hostileCase{
		// Lengths that lie.
		{"SendPacket length 4 GiB", nil, []string{"err:session:packet_too_large"},
			closedWith(okJSON, frameHeader(FrameSendPacket, 1<<32-1))},
		{"SendPacket one byte over the maximum", nil, []string{"err:session:packet_too_large"},
			closedWith(okJSON, sendPacket(someone(), MaxPacketSize+1))},
		{"SendPacket zero length", nil, []string{"err:session:short_send_packet"},
			closedWith(okJSON, frameHeader(FrameSendPacket, 0))},
		{"SendPacket 31 bytes", nil, []string{"err:session:short_send_packet"},
			closedWith(okJSON, mkFrame(FrameSendPacket, make([]byte, 31)))},
		{"SendPacket of exactly the maximum size is relayed", nil, []string{"PacketsSent"},
			func(t *testing.T, e *hostileEnv) {
				r := e.dialLogin(t, okJSON)
				pkt := payload(MaxPacketSize)
				if err := r.send(mkFrame(FrameSendPacket, kb(e.b.PublicKey()), pkt)); err != nil {
					t.Fatal(err)
				}
				got, ok := recvMsg[*ReceivedPacket](t, e.b)
				if !ok || got.Source != r.priv.Public() || !bytes.Equal(got.Data, pkt) {
					t.Fatal("maximal packet not relayed intact")
				}
				r.expectAlive(t)
			}},
		{"ForwardPacket one byte over the maximum (mesh)", nil, []string{"err:session:packet_too_large"},
			closedWith(meshJSON, mkFrame(FrameForwardPacket, someone(), kb(mustKeyNoT().Public()), payload(MaxPacketSize+1)))},
		{"ForwardPacket 63 bytes (mesh)", nil, []string{"err:session:short_forward_packet"},
			closedWith(meshJSON, mkFrame(FrameForwardPacket, make([]byte, 63)))},
		{"Ping 7 bytes", nil, []string{"err:session:bad_ping_length"},
			closedWith(okJSON, mkFrame(FramePing, make([]byte, 7)))},
		{"Ping 1001 bytes", nil, []string{"err:session:bad_ping_length"},
			closedWith(okJSON, mkFrame(FramePing, make([]byte, 1001)))},
		{"Ping 1000 bytes is answered", nil, []string{"PongsSent"},
			func(t *testing.T, e *hostileEnv) {
				r := e.dialLogin(t, okJSON)
				p := payload(1000)
				r.send(mkFrame(FramePing, p))
				for { // the Pong echoes the first 8 bytes
					ft, got, err := r.readFrame()
					if err != nil {
						t.Fatal(err)
					}
					if ft == FramePong {
						if !bytes.Equal(got, p[:8]) {
							t.Fatalf("Pong %x, want %x", got, p[:8])
						}
						return
					}
				}
			}},
		{"NotePreferred 0 bytes", nil, []string{"err:session:bad_note_preferred_length"},
			closedWith(okJSON, mkFrame(FrameNotePreferred, nil))},
		{"NotePreferred 2 bytes", nil, []string{"err:session:bad_note_preferred_length"},
			closedWith(okJSON, mkFrame(FrameNotePreferred, []byte{1, 1}))},
		{"WatchConns 1 byte (mesh)", nil, []string{"err:session:bad_watch_conns_length"},
			closedWith(meshJSON, mkFrame(FrameWatchConns, []byte{0}))},
		{"ClosePeer 31 bytes (mesh)", nil, []string{"err:session:bad_close_peer_length"},
			closedWith(meshJSON, mkFrame(FrameClosePeer, make([]byte, 31)))},
		{"ClosePeer 33 bytes (mesh)", nil, []string{"err:session:bad_close_peer_length"},
			closedWith(meshJSON, mkFrame(FrameClosePeer, make([]byte, 33)))},
		{"ClientInfo 55 bytes", nil, []string{"err:login:bad_client_info_length"},
			loginClosed(func(*rawConn) []byte { return mkFrame(FrameClientInfo, make([]byte, 55)) })},
		{"ClientInfo zero length", nil, []string{"err:login:bad_client_info_length"},
			loginClosed(func(*rawConn) []byte { return frameHeader(FrameClientInfo, 0) })},
		{"ClientInfo one byte over the 16 KiB cap", nil, []string{"err:login:bad_client_info_length"},
			loginClosed(func(r *rawConn) []byte {
				return frames(frameHeader(FrameClientInfo, 16<<10+1), make([]byte, 16<<10+1))
			})},
		{"ClientInfo length 4 GiB", nil, []string{"err:login:bad_client_info_length"},
			loginClosed(func(*rawConn) []byte { return frameHeader(FrameClientInfo, 1<<32-1) })},
		{"unknown frame over 1 MiB", nil, []string{"err:session:frame_too_large"},
			closedWith(okJSON, frameHeader(0x42, 1<<20+1))},
		{"unknown frame of exactly 1 MiB is skipped", nil, []string{"UnknownFrames"},
			survives(okJSON, mkFrame(0x42, make([]byte, 1<<20)))},

		// Truncated frames: the stream ends (FIN) inside a frame.
		{"header only, then EOF", nil, []string{"err:session:truncated_frame"},
			truncated(frameHeader(FrameSendPacket, 100))},
		{"half a frame header, then EOF", nil, []string{"err:session:truncated_frame"},
			truncated([]byte{byte(FrameSendPacket), 0, 0})},
		{"half a SendPacket to an unknown key, then EOF", nil, []string{"err:session:truncated_frame"},
			truncated(sendPacket(someone(), 1000)[:500])},
		{"half a Ping, then EOF", nil, []string{"err:session:truncated_frame"},
			truncated(mkFrame(FramePing, make([]byte, 100))[:50])},
		{"half an unknown frame, then EOF", nil, []string{"err:session:truncated_frame"},
			truncated(mkFrame(0x42, make([]byte, 100))[:50])},
		{"half a ClientInfo, then EOF", nil, []string{"err:login:io_error"},
			func(t *testing.T, e *hostileEnv) {
				r := e.dial(t)
				ci := r.clientInfo(okJSON)
				r.send(ci[:len(ci)/2])
				r.closeWrite(t)
				r.expectClosed(t)
			}},

		// Unknown frame types and frames in the wrong state.
		{"unknown frame types are skipped", nil, []string{"UnknownFrames"},
			survives(okJSON, mkFrame(0x0b, []byte("x")), mkFrame(0x0f, nil),
				mkFrame(0x16, []byte("future")), mkFrame(0xff, make([]byte, 300)))},
		{"server-to-client frames from a client are skipped", nil, []string{"UnknownFrames"},
			survives(okJSON, mkFrame(FrameServerKey, make([]byte, 40)), mkFrame(FrameServerInfo, make([]byte, 53)),
				mkFrame(FrameRecvPacket, make([]byte, 40)), mkFrame(FrameKeepAlive, nil),
				mkFrame(FramePeerGone, make([]byte, 33)), mkFrame(FramePeerPresent, make([]byte, 51)),
				mkFrame(FramePong, make([]byte, 8)), mkFrame(FrameHealth, []byte("sick")),
				mkFrame(FrameRestarting, make([]byte, 8)))},
		{"SendPacket before login", nil, []string{"err:login:unexpected_frame"},
			func(t *testing.T, e *hostileEnv) {
				r := e.dial(t)
				r.send(mkFrame(FrameSendPacket, kb(e.b.PublicKey()), []byte("sneaky")))
				r.expectClosed(t)
			}},
		{"a second ClientInfo after login is skipped", nil, []string{"UnknownFrames"},
			func(t *testing.T, e *hostileEnv) {
				r := e.dialLogin(t, okJSON)
				first := r.priv.Public()
				r2 := &rawConn{priv: mustKey(t), server: r.server}
				if err := r.send(r2.clientInfo(okJSON)); err != nil {
					t.Fatal(err)
				}
				// The session keeps its first identity.
				r.send(mkFrame(FrameSendPacket, kb(first), []byte("me")))
				if src, data := r.expectPacket(t); src != first || string(data) != "me" {
					t.Fatalf("after a second ClientInfo: packet from %s %q", src.ShortString(), data)
				}
				if e.s.IsClientConnected(r2.priv.Public()) {
					t.Fatal("second ClientInfo registered a second key")
				}
			}},

		// Keys: low-order and non-canonical client keys never log in.
		badKey("all zero", func([]byte) []byte { return make([]byte, KeyLen) }),
		badKey("1 (small order)", func([]byte) []byte { k := make([]byte, KeyLen); k[0] = 1; return k }),
		badKey("2^255-19 (non-canonical 0)", func([]byte) []byte { return pAsKey(0) }),
		badKey("2^255-18 (non-canonical 1)", func([]byte) []byte { return pAsKey(1) }),
		badKey("with bit 255 set on a good key", func(good []byte) []byte {
			k := bytes.Clone(good)
			k[31] |= 0x80
			return k
		}),
		badKey("e0eb7a7c… (order 8)", func([]byte) []byte {
			return hexKey("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
		}),
		badKey("5f9c95bc… (order 8)", func([]byte) []byte {
			return hexKey("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157")
		}),
		{"ClientInfo sealed with the wrong private key", nil, []string{"err:login:bad_client_info_box"},
			loginClosed(func(r *rawConn) []byte {
				victim := mustKeyNoT().Public()
				return r.clientInfoWithKey(okJSON, victim[:])
			})},
		{"ClientInfo sealed to the wrong server key", nil, []string{"err:login:bad_client_info_box"},
			loginClosed(func(r *rawConn) []byte {
				return clientInfoFrame(r.priv, mustKeyNoT().Public(), []byte(okJSON))
			})},
		{"replayed ClientInfo", nil, []string{"err:login:replayed_client_info"},
			func(t *testing.T, e *hostileEnv) {
				victim := e.dial(t)
				captured := victim.clientInfo(okJSON)
				victim.send(captured)
				victim.awaitServerInfo(t)
				attacker := e.dial(t)
				attacker.send(captured)
				attacker.expectClosed(t)
				victim.expectAlive(t)
			}},

		// Malformed JSON inside a valid box.
		badJSON(`{`),
		badJSON(`{"meshKey":""}`),
		badJSON(`{"meshKey":null}`),
		badJSON(`{"MESHKEY":null}`),
		badJSON(`{"meshKey":"` + hostileMeshKey[:63] + `"}`),
		badJSON(`{"meshKey":"` + strings.Repeat("zz", 32) + `"}`),
		badJSON(`{"version":2.5}`),
		badJSON(`[1,2]`),
		badJSON(`{"version":1e999}`),
		badJSON(`{"version":99999999999999999999}`),
		{"ClientInfo AppName not UTF-8", nil, []string{"err:login:bad_app_name"},
			loginClosed(func(r *rawConn) []byte { return r.clientInfo("{\"AppName\":\"\xff\xfe\"}") })},
		{"ClientInfo JSON nested 5000 deep (unknown members are ignored)", nil, []string{"PongsSent"},
			survives(`{"x":` + strings.Repeat("[", 5000) + strings.Repeat("]", 5000) + `}`)},
		{"duplicate meshKey members: the last one counts", nil, []string{"err:session:watch_not_mesh"},
			closedWith(`{"meshKey":"`+hostileMeshKey+`","meshKey":"`+strings.Repeat("ab", 32)+`"}`, mkFrame(FrameWatchConns, nil))},
		{"ClientInfo JSON null is all zero (accepted, as in Tailscale)", nil, []string{"PongsSent"},
			survives(`null`)},

		// Privileged frames from a non-mesh client.
		{"WatchConns from a non-mesh client", nil, []string{"err:session:watch_not_mesh"},
			closedWith(okJSON, mkFrame(FrameWatchConns, nil))},
		{"ClosePeer from a non-mesh client aimed at a peer", nil, []string{"err:session:close_peer_not_mesh"},
			func(t *testing.T, e *hostileEnv) {
				closedWith(okJSON, mkFrame(FrameClosePeer, kb(e.b.PublicKey())))(t, e)
			}},
		{"ForwardPacket from a non-mesh client", nil, []string{"err:session:forward_not_mesh"},
			func(t *testing.T, e *hostileEnv) {
				closedWith(okJSON, mkFrame(FrameForwardPacket, kb(e.a.PublicKey()), kb(e.b.PublicKey()), []byte("spoofed")))(t, e)
			}},
		{"a well-formed but wrong mesh key is not mesh", nil, []string{"err:session:watch_not_mesh"},
			closedWith(`{"meshKey":"`+strings.Repeat("ab", 32)+`"}`, mkFrame(FrameWatchConns, nil))},

		// Legitimate oddities.
		{"sending to itself", nil, []string{"PacketsSent"},
			func(t *testing.T, e *hostileEnv) {
				r := e.dialLogin(t, okJSON)
				me := r.priv.Public()
				r.send(mkFrame(FrameSendPacket, me[:], []byte("echo")))
				if src, data := r.expectPacket(t); src != me || string(data) != "echo" {
					t.Fatalf("got %q from %s", data, src.ShortString())
				}
			}},
		{"disco to an unknown key gets NotHere", nil, []string{"drop:unknown_dest/disco"},
			func(t *testing.T, e *hostileEnv) {
				r := e.dialLogin(t, okJSON)
				nobody := someone()
				r.send(mkFrame(FrameSendPacket, nobody, []byte(discoMagic), make([]byte, 80)))
				for {
					ft, p, err := r.readFrame()
					if err != nil {
						t.Fatal(err)
					}
					if ft == FramePeerGone {
						if g, _ := parsePeerGone(p); !bytes.Equal(g.Peer[:], nobody) || g.Reason != PeerGoneNotHere {
							t.Fatalf("PeerGone %+v", g)
						}
						return
					}
				}
			}},

		// HTTP.
		{"request without Upgrade", nil, []string{"rej:no_upgrade"},
			func(t *testing.T, e *hostileEnv) {
				if resp := httpRequest(t, e.httpAddr, "GET /derp HTTP/1.1\r\nHost: x\r\n\r\n"); resp.StatusCode != http.StatusUpgradeRequired {
					t.Fatalf("status %s", resp.Status)
				}
			}},
		{"request with Upgrade: h2c", nil, []string{"rej:no_upgrade"},
			func(t *testing.T, e *hostileEnv) {
				if resp := httpRequest(t, e.httpAddr, "GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"); resp.StatusCode != http.StatusUpgradeRequired {
					t.Fatalf("status %s", resp.Status)
				}
			}},
		{`Derp-Fast-Start: true takes the classic 101 path`, nil, []string{"UpgradeLogins"},
			func(t *testing.T, e *hostileEnv) {
				before := e.s.Stats().FastStartLogins
				nc, br := httpDial(t, e.httpAddr, "GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: true\r\n\r\n")
				resp, err := http.ReadResponse(br, nil)
				if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
					t.Fatalf("response %v %v", resp, err)
				}
				c, err := NewClient(mustKey(t), nc, bufio.NewReadWriter(br, bufio.NewWriter(nc)))
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if _, ok := recvMsg[ServerInfo](t, c); !ok {
					t.FailNow()
				}
				if e.s.Stats().FastStartLogins != before {
					t.Fatal("counted as a fast start")
				}
			}},
		{"HTTP headers that never finish (slowloris)", nil, nil,
			func(t *testing.T, e *hostileEnv) {
				before := e.s.Stats().Accepts
				nc, br := httpDial(t, e.httpAddr, "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nX-Slow: ")
				start := time.Now()
				nc.SetReadDeadline(time.Now().Add(5 * time.Second))
				io.Copy(io.Discard, br)
				if d := time.Since(start); d > 3*time.Second {
					t.Fatalf("http.Server with ReadHeaderTimeout took %v to drop a slowloris", d)
				}
				if e.s.Stats().Accepts != before {
					t.Fatal("a request without complete headers reached the relay")
				}
			}},
		{"fast-start request, then silence", nil, []string{"err:login:io_error_timeout"},
			func(t *testing.T, e *hostileEnv) {
				nc, br := httpDial(t, e.httpAddr, "GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n")
				nc.SetReadDeadline(time.Now().Add(5 * time.Second))
				io.Copy(io.Discard, br) // ServerKey, then the close after the 1 s login deadline
			}},

		// Stalls and floods.
		{"login that never finishes", nil, []string{"err:login:io_error_timeout"},
			func(t *testing.T, e *hostileEnv) {
				r := e.dial(t)
				start := time.Now()
				r.expectClosed(t)
				if d := time.Since(start); d < 900*time.Millisecond {
					t.Fatalf("closed after %v, before the login deadline", d)
				}
			}},
		{"login that stalls inside ClientInfo", nil, []string{"err:login:io_error_timeout"},
			func(t *testing.T, e *hostileEnv) {
				r := e.dial(t)
				ci := r.clientInfo(okJSON)
				r.send(ci[:len(ci)-1])
				r.expectClosed(t)
			}},
		{"a client that never reads", nil, []string{"drop:queue_head/other"},
			func(t *testing.T, e *hostileEnv) {
				cc, sc := net.Pipe()
				go e.s.Accept(context.Background(), sc, nil, "192.0.2.7:7")
				stuck := loginClient(t, cc, mustKey(t)) // then never reads again
				start := time.Now()
				for i := range 500 {
					if err := e.a.Send(stuck.PublicKey(), []byte(fmt.Sprint(i))); err != nil {
						t.Fatal(err)
					}
				}
				e.checkRelaying(t) // others are not held up behind the stuck queue
				if d := time.Since(start); d > 2*time.Second {
					t.Fatalf("500 sends to a stuck client and a round trip took %v", d)
				}
				waitForT(t, "queue_head drops", func() bool { return e.s.Stats().PacketsDropped["queue_head/other"] >= 400 })
				stuck.Close()
			}},
		{"a flood over the rate limit is paced, not dropped", []ServerOption{WithRateLimit(128<<10, 0)}, []string{"RateLimitWaits"},
			func(t *testing.T, e *hostileEnv) {
				r := e.dial(t)
				si := r.login(t, okJSON)
				if si.TokenBucketBytesPerSecond != 128<<10 || si.TokenBucketBytesBurst != minRateBurst {
					t.Fatalf("ServerInfo announced %+v", si)
				}
				me := r.priv.Public()
				go r.send(sendPacket(me[:], 60000), sendPacket(me[:], 60000), sendPacket(me[:], 60000))
				for range 3 { // nothing is dropped: all three come back
					if src, data := r.expectPacket(t); src != me || len(data) != 60000 {
						t.Fatalf("got %d bytes from %s", len(data), src.ShortString())
					}
				}
			}},

		{"a flood of 1 MiB unknown frames is paced at its full size", []ServerOption{WithRateLimit(2<<20, 0)}, []string{"RateLimitWaits"},
			func(t *testing.T, e *hostileEnv) {
				r := e.dialLogin(t, okJSON)
				start := time.Now()
				junk := mkFrame(0x42, make([]byte, 1<<20))
				if err := r.send(junk, junk, junk); err != nil {
					t.Fatal(err)
				}
				r.expectAlive(t) // the Ping queues behind the junk
				// 3 MiB at 2 MiB/s after a 64 KiB burst: about 1.5 s. Paying
				// only for a packet's worth per frame would take 0.1 s.
				if d := time.Since(start); d < time.Second {
					t.Fatalf("3 MiB passed a 2 MiB/s limit in %v", d)
				}
			}},

		// A length the frame's type does not allow is refused unread: it
		// must not first buy the wait of a frame that long.
		{"SendPacket length 4 GiB under a rate limit is refused at once", []ServerOption{WithRateLimit(1024, 0)}, []string{"err:session:packet_too_large"},
			closedWith(okJSON, frameHeader(FrameSendPacket, 1<<32-1))},
		{"unknown frame over 1 MiB under a rate limit is refused at once", []ServerOption{WithRateLimit(1024, 0)}, []string{"err:session:frame_too_large"},
			closedWith(okJSON, frameHeader(0x42, maxUnknownFrame+1))},
		// A client not of the mesh may send no ForwardPacket at all:
		// whatever its length, it is refused unread, so it buys no wait
		// but its header's, even on an empty bucket (a maximal packet
		// empties it).
		{"ForwardPacket from a non-mesh client on an empty bucket is refused at once", []ServerOption{WithRateLimit(1024, 0)}, []string{"err:session:forward_not_mesh"},
			closedWith(okJSON, sendPacket(someone(), MaxPacketSize), frameHeader(FrameForwardPacket, maxForwardFrame))},
		// A frame is paid for as its bytes come: a client that sends the
		// header of a long frame and hangs up does not keep its session
		// (goroutine, connection slot, key) for the wait the whole frame
		// would have bought.
		{"header of a 1 MiB unknown frame, then EOF, under a rate limit ends at once", []ServerOption{WithRateLimit(1024, 0)}, []string{"err:session:truncated_frame"},
			func(t *testing.T, e *hostileEnv) {
				r := e.dialLogin(t, okJSON)
				r.send(frameHeader(0x42, maxUnknownFrame))
				r.closeWrite(t)
				r.expectClosed(t)
			}},
		// The wait for a frame on an empty bucket (a maximal packet
		// empties it) notices the client hanging up without the rest of
		// the frame (here 64 s of wait at 1 KiB/s), on Linux over plain
		// TCP. A client that sent the whole frame before its FIN has it
		// relayed after the wait.
		{"header of a maximal SendPacket on an empty bucket, then EOF, under a rate limit ends at once", []ServerOption{WithRateLimit(1024, 0)}, []string{"err:session:truncated_frame"},
			func(t *testing.T, e *hostileEnv) {
				if runtime.GOOS != "linux" {
					t.Skip("the kernel's view of the socket is read on Linux only")
				}
				r := e.dialLogin(t, okJSON)
				f := sendPacket(someone(), MaxPacketSize)
				r.send(f, f[:frameHeaderLen+1000])
				r.closeWrite(t)
				r.expectClosed(t)
			}},
		{"a whole SendPacket on an empty bucket, then EOF, under a rate limit is relayed", []ServerOption{WithRateLimit(20<<10, 0)}, []string{"RateLimitWaits"},
			func(t *testing.T, e *hostileEnv) {
				r := e.dialLogin(t, okJSON)
				b := e.b.PublicKey()
				last := append([]byte("last words"), make([]byte, MaxPacketSize-10)...)
				// The second maximal packet waits 3.2 s, and the FIN
				// comes long before that.
				r.send(sendPacket(someone(), MaxPacketSize), mkFrame(FrameSendPacket, b[:], last))
				r.closeWrite(t)
				if m, ok := recvMsg[*ReceivedPacket](t, e.b); !ok || !bytes.Equal(m.Data, last) {
					t.Fatal("the last packet was not relayed")
				}
			}},
		{"a flood of empty frames over the rate limit is paced", []ServerOption{WithRateLimit(1024, 0)}, []string{"RateLimitWaits"},
			func(t *testing.T, e *hostileEnv) { floodPaced(t, e, mkFrame(0x42, nil)) }},
		{"a flood of NotePreferred over the rate limit is paced", []ServerOption{WithRateLimit(1024, 0)}, []string{"RateLimitWaits"},
			func(t *testing.T, e *hostileEnv) { floodPaced(t, e, mkFrame(FrameNotePreferred, []byte{1})) }},

		// A hostile server, seen from a client.
		{"wrong magic from a proxy (client side)", nil, []string{"err:login:io_error"},
			func(t *testing.T, e *hostileEnv) {
				proxy := corruptingProxy(t, e.addr, 5) // first byte of the magic
				nc, err := net.Dial("tcp", proxy)
				if err != nil {
					t.Fatal(err)
				}
				defer nc.Close()
				_, err = NewClient(mustKey(t), nc, nil)
				if ProtocolErrorReason(err) != "bad_magic" {
					t.Fatalf("client error %v, want bad_magic", err)
				}
			}},
		{"ServerInfo that does not open (client side)", nil, nil,
			func(t *testing.T, e *hostileEnv) {
				server, client := mustKey(t), mustKey(t)
				err := clientAgainst(t, client, frames(mkFrame(FrameServerKey, appendServerKey(nil, server.Public())),
					serverInfoFrame(mustKey(t), client.Public(), []byte(`{"version":2}`))))
				if ProtocolErrorReason(err) != "bad_server_info_box" || !errors.Is(err, ErrServerKeyMismatch) {
					t.Fatalf("client error %v", err)
				}
			}},
		{"frame over 1 MiB to a client (client side)", nil, nil,
			func(t *testing.T, e *hostileEnv) {
				server, client := mustKey(t), mustKey(t)
				err := clientAgainst(t, client, frames(mkFrame(FrameServerKey, appendServerKey(nil, server.Public())),
					serverInfoFrame(server, client.Public(), []byte(`{"version":2}`)), frameHeader(FrameRecvPacket, 1<<20+1)))
				if ProtocolErrorReason(err) != "frame_too_large" {
					t.Fatalf("client error %v", err)
				}
			}},
	}
}

func mustKeyNoT() PrivateKey {
	k, err := GeneratePrivateKey()
	if err != nil {
		panic(err)
	}
	return k
}

// clientAgainst runs a classic-login client against a fake server that
// sends stream, and returns the error that ended its Recv loop.
func clientAgainst(t *testing.T, priv PrivateKey, stream []byte) error {
	cc, sc := net.Pipe()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); io.Copy(io.Discard, sc) }()
	go func() { defer wg.Done(); sc.Write(stream) }()
	defer wg.Wait()
	defer sc.Close()
	defer cc.Close()
	c, err := NewClient(priv, cc, nil)
	if err != nil {
		return err
	}
	_, err = recvUntilErr(t, c)
	return err
}

func httpDial(t *testing.T, addr, req string) (net.Conn, *bufio.Reader) {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	if _, err := io.WriteString(nc, req); err != nil {
		t.Fatal(err)
	}
	return nc, bufio.NewReader(nc)
}

func httpRequest(t *testing.T, addr, req string) *http.Response {
	t.Helper()
	nc, br := httpDial(t, addr, req)
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp
}

// corruptingProxy forwards one connection to addr, flipping the byte at
// offset off of the server's stream.
func corruptingProxy(t *testing.T, addr string, off int) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		down, err := ln.Accept()
		if err != nil {
			return
		}
		defer down.Close()
		up, err := net.Dial("tcp", addr)
		if err != nil {
			return
		}
		defer up.Close()
		wg.Add(1)
		go func() { defer wg.Done(); io.Copy(up, down); up.Close() }()
		head := make([]byte, off+1)
		if _, err := io.ReadFull(up, head); err != nil {
			return
		}
		head[off] ^= 0xff
		down.Write(head)
		io.Copy(down, up)
	}()
	return ln.Addr().String()
}

func TestHostileInputs(t *testing.T) {
	cases := hostileCases()
	if len(cases) < 30 {
		t.Fatalf("only %d hostile inputs", len(cases))
	}
	shared := newHostileEnv(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := shared
			if tc.opts != nil {
				e = newHostileEnv(t, tc.opts...)
			}
			baseline := sessionGoroutines()
			before := e.s.Stats()
			// Registered first, so it runs after the case's own cleanups
			// have closed its connections.
			t.Cleanup(func() {
				if t.Failed() {
					return
				}
				if sessionGoroutines() > baseline {
					if leaked := waitNoExtraSessions(baseline); leaked != "" {
						t.Fatalf("session goroutines left after the case (baseline %d):\n%s", baseline, leaked)
					}
				}
				// The case's connections are closed; a parked session
				// notices the hang-up only when the poller wakes it.
				deadline := time.Now().Add(5 * time.Second)
				for e.s.Stats().CurrentConnections != 2 && time.Now().Before(deadline) {
					time.Sleep(time.Millisecond)
				}
				if n := e.s.Stats().CurrentConnections; n != 2 {
					t.Errorf("%d connections 5 s after the case, want the pair's 2", n)
				}
			})
			tc.run(t, e)
			for _, w := range tc.want {
				waitForT(t, w+" moved", func() bool { return counter(e.s.Stats(), w) > counter(before, w) })
			}
			after := e.s.Stats()
			for k, v := range after.Errors {
				if v != before.Errors[k] && !contains(tc.want, "err:"+k) {
					t.Errorf("unexpected error counted: %s (%d → %d)", k, before.Errors[k], v)
				}
			}
			e.checkRelaying(t)
		})
	}
}

// floodPaced sends 1 MiB of copies of the frame f (a frame with little or
// no payload) over a 1 KiB/s rate limit and waits for the server to pace
// them: every frame costs its header at least, and frames exempt from the
// wait (NotePreferred) still may not be sent without limit. It then lifts
// the limit and checks that the session read the rest and is alive.
func floodPaced(t *testing.T, e *hostileEnv, f []byte) {
	t.Helper()
	r := e.dialLogin(t, `{"version":2}`)
	var data [8]byte
	rand.Read(data[:])
	var flood []byte
	for len(flood) < 1<<20 {
		flood = append(flood, f...)
	}
	flood = append(flood, mkFrame(FramePing, data[:])...)
	before := e.s.Stats().RateLimitWaits
	sent := make(chan error, 1)
	go func() {
		r.nc.SetWriteDeadline(time.Now().Add(time.Minute))
		_, err := r.nc.Write(flood)
		sent <- err
	}()
	waitForT(t, "the flood paced", func() bool { return e.s.Stats().RateLimitWaits > before })
	e.s.SetRateLimit(0, 0) // forgives the debt: the rest is read at once
	if err := <-sent; err != nil {
		t.Fatalf("sending the flood: %v", err)
	}
	for {
		ft, p, err := r.readFrame()
		if err != nil {
			t.Fatalf("connection should have survived: %v", err)
		}
		if ft == FramePong && bytes.Equal(p, data[:]) {
			return
		}
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// TestFaultConnectionReset: a client's TCP connection is reset (RST) in the
// middle of a frame. The server counts an I/O error for that session only.
func TestFaultConnectionReset(t *testing.T) {
	e := newHostileEnv(t)
	r := e.dialLogin(t, `{"version":2}`)
	frame := mkFrame(FrameSendPacket, kb(e.b.PublicKey()), make([]byte, 5000))
	r.send(frame[:2500])
	time.Sleep(50 * time.Millisecond) // let the server start reading the payload
	r.nc.(*net.TCPConn).SetLinger(0)
	r.nc.Close()
	waitForT(t, "io error counted", func() bool {
		st := e.s.Stats()
		return st.Errors["session:io_error"]+st.Errors["session:truncated_frame"] == 1
	})
	e.checkRelaying(t)
}

// TestFaultServerClosedUnderLoad closes a server while 20 clients are busy
// sending to each other: every client sees ServerRestarting and then EOF,
// and nothing panics or leaks.
func TestFaultServerClosedUnderLoad(t *testing.T) {
	s := NewServer(mustKey(t), WithRestartNotice(time.Second, 10*time.Second))
	addr := tcpServer(t, s)
	const n = 20
	clients := make([]*Client, n)
	for i := range clients {
		clients[i] = tcpClient(t, addr)
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	restarting := make([]bool, n)
	errs := make([]error, n)
	for i, c := range clients {
		wg.Add(2)
		go func() { // sender
			defer wg.Done()
			pkt := make([]byte, 1000)
			for j := 0; !stop.Load(); j++ {
				if c.Send(clients[(i+1+j%(n-1))%n].PublicKey(), pkt) != nil {
					return
				}
			}
		}()
		go func() { // receiver
			defer wg.Done()
			c.opts.recvTimeout = 10 * time.Second
			for {
				m, err := c.Recv()
				if err != nil {
					errs[i] = err
					c.Close() // as a real client does before reconnecting
					return
				}
				if _, ok := m.(ServerRestarting); ok {
					restarting[i] = true
				}
			}
		}()
	}
	waitForT(t, "load", func() bool { return s.Stats().PacketsSent > 2000 })
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return under load")
	}
	stop.Store(true)
	wg.Wait()
	for i := range clients {
		if !restarting[i] {
			t.Errorf("client %d saw no ServerRestarting before %v", i, errs[i])
		}
		if !errors.Is(errs[i], io.EOF) && !errors.Is(errs[i], net.ErrClosed) && !isConnReset(errs[i]) {
			t.Errorf("client %d ended with %v", i, errs[i])
		}
	}
	if st := s.Stats(); st.CurrentConnections != 0 {
		t.Errorf("%d connections after Close", st.CurrentConnections)
	}
}

func isConnReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset")
}

// TestFaultWriteBlocksForever: a client whose connection accepts no write at
// all (nothing ever reads the other end of its pipe) is dropped when the
// write deadline fires; the others keep relaying.
func TestFaultWriteBlocksForever(t *testing.T) {
	e := newHostileEnv(t, WithWriteTimeout(200*time.Millisecond))
	cc, sc := net.Pipe()
	done := make(chan struct{})
	go func() { e.s.Accept(context.Background(), sc, nil, "192.0.2.8:8"); close(done) }()
	priv := mustKey(t)
	// Log in by hand and never read again: not even ServerInfo is read, so
	// the server's very first write blocks.
	go io.CopyN(io.Discard, cc, int64(frameHeaderLen+serverKeyLen))
	time.Sleep(10 * time.Millisecond)
	shared, _ := sharedKey(priv, e.s.PublicKey())
	pub := priv.Public()
	cc.Write(mkFrame(FrameClientInfo, sealBox(pub[:], shared, []byte(`{"version":2}`))))
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("session with a blocked writer did not end")
	}
	if st := e.s.Stats(); st.WriteTimeouts != 1 || e.s.IsClientConnected(pub) {
		t.Fatalf("write timeouts %d, still connected %v", st.WriteTimeouts, e.s.IsClientConnected(pub))
	}
	cc.Close()
	e.checkRelaying(t)
}

// TestMaxConnectionsTotal: the connection over the limit is closed at once,
// before any byte is written, and counted; a slot freed is reusable.
func TestMaxConnectionsTotal(t *testing.T) {
	e := newHostileEnv(t, WithMaxConnections(3, 0)) // the pair holds two
	third := e.dial(t)                              // logging in counts too
	over, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer over.Close()
	over.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := over.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("connection over the limit read %d bytes, %v", n, err)
	}
	if got := e.s.Stats().Rejected["too_many_connections"]; got != 1 {
		t.Fatalf("rejected %d", got)
	}
	third.nc.Close()
	waitForT(t, "slot freed", func() bool { return e.s.stats.sessions.Load() == 2 })
	e.dialLogin(t, `{}`).expectAlive(t)
	e.checkRelaying(t)
}

// TestMaxConnectionsPerIP: the per-IP limit counts IPv4 and IPv4-mapped
// IPv6 addresses as one, and other addresses are not affected.
func TestMaxConnectionsPerIP(t *testing.T) {
	checkPerIPLimit(t, "one IP", [3]string{"192.0.2.1:1", "[::ffff:192.0.2.1]:2", "192.0.2.1:3"}, "192.0.2.2:4", "192.0.2.1:5",
		"relay: too many connections: limit 2 per IP")
}

// TestMaxConnectionsPerIPv6Prefix: an IPv6 host holds a whole /64 (SLAAC
// privacy addresses, or any address it assigns itself), so the per-IP
// limit counts the connections of each /64 together, as one IPv4 address.
// Another /64 (next to it) has slots of its own.
func TestMaxConnectionsPerIPv6Prefix(t *testing.T) {
	checkPerIPLimit(t, "one IPv6 /64",
		[3]string{"[2001:db8:1:2::1]:1", "[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:2", "[2001:db8:1:2::3]:3"},
		"[2001:db8:1:3::1]:4", "[2001:db8:1:2::5]:5", "relay: too many connections: limit 2 per IPv6 /64")
}

// checkPerIPLimit runs a server with a per-IP limit of 2: of three
// connections from what counts as one address (same), the third is refused
// at once, for the reason refusal says; one from other is not; once the
// first has gone, again (counted as same) logs in.
func checkPerIPLimit(t *testing.T, what string, same [3]string, other, again, refusal string) {
	t.Helper()
	s := newTestServer(t, WithMaxConnections(0, 2))
	accept := func(remote string) (net.Conn, chan struct{}) {
		cc, sc := net.Pipe()
		done := make(chan struct{})
		go func() { s.Accept(context.Background(), sc, nil, remote); close(done) }()
		t.Cleanup(func() { cc.Close(); <-done })
		return cc, done
	}
	c1, _ := accept(same[0])
	loginClient(t, c1, mustKey(t))
	c2, _ := accept(same[1])
	loginClient(t, c2, mustKey(t))
	_, done := accept(same[2])
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatalf("third connection from %s not refused at once", what)
	}
	if got := s.Stats().Rejected["too_many_connections"]; got != 1 {
		t.Fatalf("rejected %d", got)
	}
	if err := s.admitConn(parseRemote(same[2]).Addr()); err == nil || err.Error() != refusal {
		t.Fatalf("a fourth connection from %s: %v, want %q", what, err, refusal)
	}
	c4, _ := accept(other)
	loginClient(t, c4, mustKey(t))
	c1.Close()
	waitForT(t, "slot freed", func() bool { return s.stats.sessions.Load() == 2 })
	c5, _ := accept(again)
	loginClient(t, c5, mustKey(t))
	if err := s.ConsistencyCheck(); err != nil {
		t.Fatal(err)
	}
}

// TestDefaultsSafeForOpenInternet pins the defaults that bound what one
// hostile client can cost: every login ends within 10 s, a client that does
// not read is dropped within 2 s of a blocked write, a pre-login client can
// make the server buffer at most 16 KiB, and at most 2×32 packets wait for
// any one client.
func TestDefaultsSafeForOpenInternet(t *testing.T) {
	s := newTestServer(t)
	c := s.cfg
	if c.loginTimeout != 10*time.Second || c.writeTimeout != 2*time.Second || c.maxClientInfo != 16<<10 ||
		c.queueDepth != 32 || c.keepAlive != 60*time.Second || c.meshWriteTimeout != 30*time.Second ||
		c.linkWriteTimeout != 5*time.Second || c.linkPingAfter != 5*time.Second || c.linkPongWait != 5*time.Second {
		t.Fatalf("defaults changed: %+v", c)
	}
	if maxUnknownFrame != 1<<20 {
		t.Fatalf("maxUnknownFrame %d", maxUnknownFrame)
	}
	// The login deadline ends a connection that never says anything.
	s2 := newTestServer(t, WithLoginTimeout(50*time.Millisecond))
	cc, sc := net.Pipe()
	defer cc.Close()
	go io.Copy(io.Discard, cc)
	done := make(chan struct{})
	go func() { s2.Accept(context.Background(), sc, nil, "192.0.2.1:1"); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("login deadline did not fire")
	}
	if got := s2.Stats().Errors["login:io_error_timeout"]; got != 1 {
		t.Fatalf("errors %v", s2.Stats().Errors)
	}
}

// mkFrame returns a whole frame whose payload is the concatenation of parts.
func mkFrame(t FrameType, parts ...[]byte) []byte { return appendFrame(nil, t, frames(parts...)) }

// TestLoad2000Clients runs 2,000 clients on one server over TCP. Every
// client sends packets to random others; every packet the server did not
// count as dropped must arrive exactly once and intact, and the heap must
// stay bounded. Then, in the same run, it measures how much a receiver
// that stops reading (while another client keeps sending to it) costs 100
// echoing pairs: their throughput in the rounds with the stalled receiver
// must be at least half their throughput in the rounds without it. What
// this guards is isolation: a stalled receiver that held up a shared reader,
// lock or writer would cut the others' throughput to near nothing. The
// median ratio of the paired 30 ms rounds is normally 0.97–1.06 here, but
// under -race on a busy 2-core machine it was once 0.898; the bound is
// far below that, so that a machine's noise does not fail CI, and far above
// what a shared stall gives. BenchmarkSideBySide measures speed.
func TestLoad2000Clients(t *testing.T) {
	if testing.Short() {
		t.Skip("load test skipped with -short")
	}
	const (
		nClients = 2000
		perSend  = 10 // packets each client sends in the delivery phase
	)
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	baseHeap := ms.HeapInuse

	s := NewServer(mustKey(t), WithWriteTimeout(10*time.Second))
	addr := tcpServer(t, s)
	clients := make([]*Client, nClients)
	index := make(map[PublicKey]int, nClients)
	for i := range clients {
		clients[i] = tcpClient(t, addr)
		index[clients[i].PublicKey()] = i
	}

	// Receivers: every client reads all the time, except the one told to
	// stall, and checks each delivery-phase packet.
	var (
		seen      = make([]atomic.Bool, nClients*perSend)
		received  atomic.Int64
		dups      atomic.Int64
		corrupt   atomic.Int64
		measured  atomic.Int64 // echoes back to the measured senders
		stopLoad  atomic.Bool
		stalled   atomic.Bool
		closing   atomic.Bool
		recvErr   atomic.Value
		resume    = make(chan struct{}, 1)
		recvGroup sync.WaitGroup
	)
	for i, c := range clients {
		recvGroup.Add(1)
		go func() {
			defer recvGroup.Done()
			c.opts.recvTimeout = time.Minute // replaces the login's 5 s deadline
			for {
				if i == 0 && stalled.Load() {
					<-resume
				}
				m, err := c.Recv()
				if err != nil {
					if !closing.Load() {
						recvErr.Store(fmt.Errorf("client %d: %w", i, err))
					}
					return
				}
				p, ok := m.(*ReceivedPacket)
				if !ok {
					continue
				}
				switch {
				case len(p.Data) >= 16 && binary.BigEndian.Uint32(p.Data) == 0x10ad10ad:
					from, seq := int(binary.BigEndian.Uint32(p.Data[4:])), int(binary.BigEndian.Uint32(p.Data[8:]))
					if from >= nClients || seq >= perSend || clients[from].PublicKey() != p.Source ||
						binary.BigEndian.Uint32(p.Data[12:]) != crc32.ChecksumIEEE(p.Data[16:]) {
						corrupt.Add(1)
						continue
					}
					if seen[from*perSend+seq].Swap(true) {
						dups.Add(1)
					}
					received.Add(1)
				case len(p.Data) > 0 && p.Data[0] == 'm': // echo it
					p.Data[0] = 'e'
					c.Send(p.Source, p.Data)
				case len(p.Data) > 0 && p.Data[0] == 'e': // count it, send the next
					measured.Add(1)
					if !stopLoad.Load() {
						p.Data[0] = 'm'
						c.Send(p.Source, p.Data)
					}
				}
			}
		}()
	}

	// Memory sampler.
	var peakHeap atomic.Uint64
	stopSampler := make(chan struct{})
	samplerDone := make(chan struct{})
	go func() {
		defer close(samplerDone)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peakHeap.Load() {
				peakHeap.Store(ms.HeapInuse)
			}
			select {
			case <-stopSampler:
				return
			case <-tick.C:
			}
		}
	}()

	// Delivery phase: all 2,000 clients send at once.
	dropped := func() int64 {
		var n int64
		for _, v := range s.Stats().PacketsDropped {
			n += v
		}
		return n
	}
	drops0 := dropped()
	var sent atomic.Int64
	var sendGroup sync.WaitGroup
	for i, c := range clients {
		sendGroup.Add(1)
		go func() {
			defer sendGroup.Done()
			buf := make([]byte, 16+300)
			for seq := range perSend {
				dst := (i + 1 + (seq*7919+i*104729)%(nClients-1)) % nClients
				body := buf[16 : 16+50+(seq*37+i)%250]
				rand.Read(body)
				binary.BigEndian.PutUint32(buf, 0x10ad10ad)
				binary.BigEndian.PutUint32(buf[4:], uint32(i))
				binary.BigEndian.PutUint32(buf[8:], uint32(seq))
				binary.BigEndian.PutUint32(buf[12:], crc32.ChecksumIEEE(body))
				if c.Send(clients[dst].PublicKey(), buf[:16+len(body)]) == nil {
					sent.Add(1)
				}
			}
		}()
	}
	sendGroup.Wait()
	deadline := time.Now().Add(60 * time.Second)
	for received.Load()+dropped()-drops0 != sent.Load() {
		if err := recvErr.Load(); err != nil {
			t.Fatalf("receiver failed: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("sent %d, received %d, dropped %d: %d packets unaccounted for",
				sent.Load(), received.Load(), dropped()-drops0, sent.Load()-received.Load()-(dropped()-drops0))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if dups.Load() != 0 || corrupt.Load() != 0 {
		t.Fatalf("%d duplicated and %d corrupted packets", dups.Load(), corrupt.Load())
	}
	t.Logf("delivery: %d clients, %d packets sent, %d received exactly once and intact, %d counted as dropped",
		nClients, sent.Load(), received.Load(), dropped()-drops0)

	// The heap is sampled while every client is busy; the sampler stops
	// here, as stopping the world for it would add noise to what follows.
	close(stopSampler)
	<-samplerDone

	// Stall phase: clients[1] sends 10,000 packets a second to clients[0],
	// which stops reading in every other round, while 100 pairs echo
	// packets with 8 in flight each (a closed loop, so nothing is dropped
	// and the echo rate is their throughput).
	var loadGroup sync.WaitGroup
	loadGroup.Add(1)
	go func() {
		defer loadGroup.Done()
		pkt := make([]byte, 512)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for !stopLoad.Load() {
			for range 50 {
				clients[1].Send(clients[0].PublicKey(), pkt)
			}
			<-tick.C
		}
	}()
	for i := 2; i < 102; i++ {
		pkt := make([]byte, 512)
		pkt[0] = 'm'
		for range 8 {
			clients[i].Send(clients[i+100].PublicKey(), pkt)
		}
	}
	// Rounds come in adjacent pairs, one with and one without the stall
	// (in alternating order), so that both see the same background load;
	// the median of the pairs' ratios ignores bursts of outside noise.
	const pairs, roundLen = 40, 30 * time.Millisecond
	round := func(stall bool) int64 {
		stalled.Store(stall)
		if !stall {
			select {
			case resume <- struct{}{}:
			default:
			}
		}
		time.Sleep(10 * time.Millisecond) // let the state settle
		m0 := measured.Load()
		time.Sleep(roundLen)
		return measured.Load() - m0
	}
	var normal, withStall int64
	ratios := make([]float64, 0, pairs)
	for i := range pairs {
		var a, b int64
		if i%2 == 0 {
			a, b = round(false), round(true)
		} else {
			b, a = round(true), round(false)
		}
		normal, withStall = normal+a, withStall+b
		if a > 0 {
			ratios = append(ratios, float64(b)/float64(a))
		}
	}
	stopLoad.Store(true)
	stalled.Store(false)
	select {
	case resume <- struct{}{}:
	default:
	}
	loadGroup.Wait()
	runtime.ReadMemStats(&ms) // the stalled receiver's backlog included
	peakHeap.Store(max(peakHeap.Load(), ms.HeapInuse))
	slices.Sort(ratios)
	ratio := 0.0
	if len(ratios) > 0 {
		ratio = ratios[len(ratios)/2]
	}
	t.Logf("throughput of 100 echoing pairs: %d echoes in %v without a stalled receiver, %d with; median ratio of %d paired rounds %.3f; queue drops %d",
		normal, pairs*roundLen, withStall, len(ratios), ratio, s.Stats().PacketsDropped["queue_head/other"])
	if len(ratios) < pairs/2 || ratio < 0.5 {
		t.Errorf("a stalled receiver cost the others %.1f%% of their throughput (limit 50%%)", 100*(1-ratio))
	}
	if n := s.Stats().WriteTimeouts; n != 0 {
		t.Errorf("%d write timeouts", n)
	}

	grow := int64(peakHeap.Load()) - int64(baseHeap)
	t.Logf("heap: %d MiB before, peak %d MiB (%d KiB per client)", baseHeap>>20, peakHeap.Load()>>20, grow/1024/nClients)
	if perClient := grow / nClients; perClient > 256<<10 {
		t.Errorf("heap grew by %d KiB per client", perClient>>10)
	}
	if err := recvErr.Load(); err != nil {
		t.Errorf("receiver failed: %v", err)
	}
	closing.Store(true)
	for _, c := range clients {
		c.Close()
	}
	recvGroup.Wait()
	s.Close()
}

// TestTCPUserTimeoutVanishedClient makes two clients vanish for real: they
// live in a network namespace of the test's own, whose link then goes down,
// so nothing they would send arrives and no RST ever comes. Each server has
// one packet for its client that stays unacknowledged. With
// WithTCPUserTimeout(3 s) the session ends; with zero (the kernel's
// default, minutes of retransmissions) it is still up at that moment.
// Linux, as root, with iproute2 and network namespaces; otherwise skipped.
func TestTCPUserTimeoutVanishedClient(t *testing.T) {
	if urls := os.Getenv("RELAY_VANISH_URLS"); urls != "" {
		vanishClient(urls) // the test binary again, inside the namespace
		return
	}
	ns, hostIP, _, ip := vanishNetns(t)
	peer := ns + "p"

	serve := func(ut time.Duration) (*Server, string) {
		s := newTestServer(t, WithTCPUserTimeout(ut))
		ln, err := net.Listen("tcp", hostIP+":0")
		if err != nil {
			t.Fatal(err)
		}
		hs := &http.Server{Handler: s}
		go hs.Serve(ln)
		t.Cleanup(func() { hs.Close() })
		return s, "http://" + ln.Addr().String() + "/derp"
	}
	bounded, boundedURL := serve(3 * time.Second)
	unbounded, unboundedURL := serve(0)

	stdout := runInNetns(t, ns, "RELAY_VANISH_URLS="+boundedURL+" "+unboundedURL)
	var keys []PublicKey
	sc := bufio.NewScanner(stdout)
	for len(keys) < 2 && sc.Scan() {
		if h, ok := strings.CutPrefix(sc.Text(), "KEY "); ok {
			k, err := ParsePublicKey(h)
			if err != nil {
				t.Fatal(err)
			}
			keys = append(keys, k)
		} else if strings.HasPrefix(sc.Text(), "ERR ") {
			t.Fatalf("client: %s", sc.Text())
		}
	}
	if len(keys) < 2 {
		t.Fatal("the clients in the namespace did not log in")
	}
	waitFor(t, func() bool { return bounded.IsClientConnected(keys[0]) && unbounded.IsClientConnected(keys[1]) })

	ip("netns", "exec", ns, "ip", "link", "set", peer, "down") // the clients vanish
	for i, u := range []string{boundedURL, unboundedURL} {
		sender, _, err := (&FastStart{}).Dial(context.Background(), u, mustKey(t))
		if err != nil {
			t.Fatal(err)
		}
		defer sender.Close()
		if err := sender.Send(keys[i], []byte("are you there?")); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	for bounded.IsClientConnected(keys[0]) {
		if time.Since(start) > 30*time.Second {
			t.Fatal("the session of a vanished client is still up 30 s after its server's unacknowledged packet, with TCP_USER_TIMEOUT 3 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("session ended %v after the unacknowledged packet", time.Since(start).Round(10*time.Millisecond))
	if !unbounded.IsClientConnected(keys[1]) {
		t.Error("without TCP_USER_TIMEOUT the vanished client's session ended as soon: something else ended it")
	}
}

// vanishNetns makes a network namespace of the test's own, joined to this
// one by a veth pair (hostIP here, peerIP there, the namespace's end named
// ns+"p"), for a peer that vanishes for real when that end goes down
// (ip("netns", "exec", ns, "ip", "link", "set", ns+"p", "down")): nothing it
// would send arrives, and no RST ever comes. Linux, as root, with iproute2
// and network namespaces; otherwise the test is skipped. Cleanup removes it.
func vanishNetns(t *testing.T) (ns, hostIP, peerIP string, ip func(args ...string)) {
	t.Helper()
	if runtime.GOOS != "linux" || os.Geteuid() != 0 {
		t.Skip("needs Linux and root for a network namespace")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2's ip")
	}
	id := (os.Getpid() + int(vanishNetnsSeq.Add(1))) % 100000
	ns, host, peer := fmt.Sprintf("rv%d", id), fmt.Sprintf("rv%dh", id), fmt.Sprintf("rv%dp", id)
	hostIP, peerIP = fmt.Sprintf("10.213.%d.1", id%250), fmt.Sprintf("10.213.%d.2", id%250)
	ip = func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Skipf("cannot make a network namespace here: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() }) // takes the veth pair with it
	ip("link", "add", host, "type", "veth", "peer", "name", peer)
	ip("link", "set", peer, "netns", ns)
	ip("addr", "add", hostIP+"/30", "dev", host)
	ip("link", "set", host, "up")
	ip("netns", "exec", ns, "ip", "addr", "add", peerIP+"/30", "dev", peer)
	ip("netns", "exec", ns, "ip", "link", "set", peer, "up")
	return ns, hostIP, peerIP, ip
}

var vanishNetnsSeq atomic.Int32

// runInNetns runs the current test again in the test binary, inside the
// network namespace ns, with env added to its environment (which tells
// that run to play the part inside), and returns its standard output. Its
// standard input is closed at cleanup, which tells it to exit.
func runInNetns(t *testing.T, ns, env string) io.Reader {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", ns, os.Args[0], "-test.run", "^"+t.Name()+"$")
	cmd.Env = append(os.Environ(), env)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); cmd.Process.Kill(); cmd.Wait() })
	return stdout
}

// vanishClient logs in to each of the space-separated DERP URLs, prints
// "KEY <public key>" for each, and waits for stdin to close.
func vanishClient(urls string) {
	for _, u := range strings.Fields(urls) {
		priv, err := GeneratePrivateKey()
		if err == nil {
			_, _, err = (&FastStart{}).Dial(context.Background(), u, priv)
		}
		if err != nil {
			fmt.Println("ERR", err)
			return
		}
		fmt.Println("KEY", priv.Public().String())
	}
	io.Copy(io.Discard, os.Stdin)
}

// TestMaxConnectionsPerIPNotForNonIPAddresses: connections whose remote
// address is not an IP (a Unix socket listener's, a pipe's) have no client
// IP to share, so the per-IP limit does not lump them together; they count
// against the total limit only.
func TestMaxConnectionsPerIPNotForNonIPAddresses(t *testing.T) {
	s := newTestServer(t, WithMaxConnections(3, 1))
	accept := func(remote string) chan struct{} {
		cc, sc := net.Pipe()
		done := make(chan struct{})
		go func() { s.Accept(context.Background(), sc, nil, remote); close(done) }()
		t.Cleanup(func() { cc.Close(); <-done })
		loginClient(t, cc, mustKey(t))
		return done
	}
	for _, remote := range []string{"@", "", "pipe"} {
		accept(remote)
	}
	if got := s.Stats().Rejected["too_many_connections"]; got != 0 {
		t.Fatalf("%d of 3 connections from non-IP addresses refused under a per-IP limit of 1", got)
	}
	// The total limit still holds.
	cc, sc := net.Pipe()
	defer cc.Close()
	done := make(chan struct{})
	go func() { s.Accept(context.Background(), sc, nil, "@"); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("a fourth connection over the total limit of 3 was not refused")
	}
	if got := s.Stats().Rejected["too_many_connections"]; got != 1 {
		t.Fatalf("rejected %d, want 1", got)
	}
}

// fakeServerClients logs n clients in to fake servers over pipes, each of
// which sends ServerInfo then stream(client's key) and holds the
// connection open, reading nothing more, until the test ends.
func fakeServerClients(t *testing.T, n int, stream func(PublicKey) []byte, opts ...ClientOption) []*Client {
	t.Helper()
	spriv := mustKey(t)
	done := make(chan struct{})
	var wg sync.WaitGroup
	t.Cleanup(func() { close(done); wg.Wait() })
	cs := make([]*Client, n)
	for i := range cs {
		cc, sc := net.Pipe()
		t.Cleanup(func() { cc.Close(); sc.Close() })
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, p, err := readRawFrame(sc) // the ClientInfo
			if err != nil || len(p) < KeyLen {
				return
			}
			cpub := PublicKey(p[:KeyLen])
			if _, err := sc.Write(frames(serverInfoFrame(spriv, cpub, []byte(`{"version":2}`)), stream(cpub))); err != nil {
				return
			}
			<-done
		}()
		opts := append([]ClientOption{ServerPublicKey(spriv.Public()), RecvTimeout(10 * time.Second)}, opts...)
		c, err := NewClient(mustKey(t), cc, nil, opts...)
		if err != nil {
			t.Fatal(err)
		}
		cs[i] = c
	}
	return cs
}

// TestClientKeepsNoLargeBuffer: a Client that received a large packet, or
// a frame of the largest size it accepts (1 MiB) whose payload it ignores
// or reads only the start of, keeps no buffer of that size once it has
// gone on to the next message. Tens of clients live in one process (one
// per DERP region) for weeks: one large packet each, or a hostile server's
// one frame, must not pin 64 KiB, or 1 MiB, per client for good.
func TestClientKeepsNoLargeBuffer(t *testing.T) {
	peer := mustKey(t).Public()
	small := mkFrame(FrameRecvPacket, peer[:], []byte("small"))
	for _, tc := range []struct {
		name string
		big  []byte
	}{
		{"max-packet", mkFrame(FrameRecvPacket, peer[:], make([]byte, MaxPacketSize))},
		{"unknown-frame", mkFrame(0x77, make([]byte, maxClientFrame))},
		{"peer-gone", mkFrame(FramePeerGone, appendPeerGone(nil, peer, PeerGoneNotHere), make([]byte, maxClientFrame-peerGoneLen))},
		{"ping", mkFrame(FramePing, make([]byte, maxClientFrame))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const n = 20
			var m0, m1 runtime.MemStats
			runtime.GC()
			runtime.GC() // empty the pools' victim caches too
			runtime.ReadMemStats(&m0)
			cs := fakeServerClients(t, n, func(PublicKey) []byte { return frames(tc.big, small) })
			for _, c := range cs {
				if _, ok := recvMsg[ServerInfo](t, c); !ok {
					t.Fatal("no ServerInfo")
				}
				for packets := 1; ; packets++ {
					got, ok := recvMsg[*ReceivedPacket](t, c)
					if !ok {
						t.Fatal("no small packet")
					}
					if string(got.Data) == "small" {
						break
					}
					if packets > 1 || len(got.Data) != MaxPacketSize {
						t.Fatalf("packet %d of %d bytes", packets, len(got.Data))
					}
				}
			}
			runtime.GC()
			runtime.GC()
			runtime.ReadMemStats(&m1)
			kib := float64(int64(m1.HeapAlloc)-int64(m0.HeapAlloc)) / n / 1024
			t.Logf("%.1f KiB of heap per client after the large frame", kib)
			if kib > 24 {
				t.Errorf("%.1f KiB of heap per client after a large frame and a small packet, want at most 24", kib)
			}
			runtime.KeepAlive(cs)
		})
	}
}
