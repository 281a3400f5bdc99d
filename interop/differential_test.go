package interop

// Differential tests: the same scripted raw frames go to Tailscale's server
// and to ours, and what each sends back, and whether it closes the
// connection, are compared case by case.

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/nacl/box"
	"tailscale.com/derp/derpserver"
	"tailscale.com/types/key"

	"github.com/fastderp/relay"
)

// diffTimeout bounds every wait of a differential case for the server to
// answer or close; it is a hang detector, never a measure of speed.
const diffTimeout = 10 * time.Second

// diffTarget is one of the two servers under differential test.
type diffTarget struct {
	name     string // "tailscale" or "ours"
	addr     string // TCP address whose connections go to the server's Accept
	httpAddr string // host:port of plain HTTP routing /derp, /derp/ and /generate_204 to the server
	pub      relay.PublicKey
	meshKey  string // hex
	// close closes the server.
	close func() error
	// again starts another server of the same kind, with the same mesh key.
	again func(t *testing.T) *diffTarget
	// errors returns our server's error counters (nil for Tailscale's).
	errors func() map[string]int64
}

// startDiffTargets starts Tailscale's server and ours with the same mesh
// key, each behind an accept loop and a plain HTTP server.
func startDiffTargets(t *testing.T) []*diffTarget {
	t.Helper()
	var mk [32]byte
	rand.Read(mk[:])
	meshKey := hex.EncodeToString(mk[:])
	return []*diffTarget{startTSTarget(t, meshKey), startOurTarget(t, meshKey)}
}

// startTSTarget starts Tailscale's server, mounted as derper mounts it:
// WebSocket support in front of the handler, and ServeNoContent at
// /generate_204.
func startTSTarget(t *testing.T, meshKey string) *diffTarget {
	t.Helper()
	tsPriv := key.NewNode()
	theirs := derpserver.New(tsPriv, t.Logf)
	if err := theirs.SetMeshKey(meshKey); err != nil {
		t.Fatal(err)
	}
	tsMux := http.NewServeMux()
	tsHandler := derpserver.AddWebSocketSupport(theirs, derpserver.Handler(theirs))
	tsMux.Handle("/derp", tsHandler)
	tsMux.Handle("/derp/", tsHandler)
	tsMux.HandleFunc("/generate_204", derpserver.ServeNoContent)
	ts := &diffTarget{
		name:    "tailscale",
		addr:    tsAcceptLoop(t, theirs),
		pub:     relayKey(tsPriv.Public()),
		meshKey: meshKey,
		close:   theirs.Close,
		again:   func(t *testing.T) *diffTarget { return startTSTarget(t, meshKey) },
	}
	tsHTTP := httptest.NewServer(tsMux)
	t.Cleanup(tsHTTP.Close)
	ts.httpAddr = tsHTTP.Listener.Addr().String()
	return ts
}

// startOurTarget starts our server, which serves every path itself.
func startOurTarget(t *testing.T, meshKey string) *diffTarget {
	t.Helper()
	ours := newOurServer(t, relay.WithMeshKey(meshKey))
	ourMux := http.NewServeMux()
	ourMux.Handle("/derp", ours)
	ourMux.Handle("/derp/", ours)
	ourMux.Handle("/generate_204", ours)
	our := &diffTarget{
		name:    "ours",
		addr:    acceptLoop(t, ours.Accept, ours.Close),
		pub:     ours.PublicKey(),
		meshKey: meshKey,
		close:   ours.Close,
		again:   func(t *testing.T) *diffTarget { return startOurTarget(t, meshKey) },
		errors:  func() map[string]int64 { return ours.Stats().Errors },
	}
	ourHTTP := httptest.NewServer(ourMux)
	t.Cleanup(ourHTTP.Close)
	our.httpAddr = ourHTTP.Listener.Addr().String()
	return our
}

// rawFrame returns a frame of type t with payload p.
func rawFrame(t relay.FrameType, p []byte) []byte {
	f := make([]byte, frameHdrLen, frameHdrLen+len(p))
	f[0] = byte(t)
	binary.BigEndian.PutUint32(f[1:], uint32(len(p)))
	return append(f, p...)
}

// cat concatenates frames.
func cat(frames ...[]byte) []byte { return bytes.Join(frames, nil) }

// sealedClientInfo returns a ClientInfo frame for priv whose box holds js,
// sealed to sealTo.
func sealedClientInfo(priv relay.PrivateKey, sealTo relay.PublicKey, js string) []byte {
	pub := priv.Public()
	var nonce [24]byte
	rand.Read(nonce[:])
	p := append(pub[:], nonce[:]...)
	p = box.Seal(p, []byte(js), &nonce, (*[32]byte)(&sealTo), (*[32]byte)(&priv))
	return rawFrame(relay.FrameClientInfo, p)
}

// sendTo returns a SendPacket frame for dst.
func sendTo(dst relay.PublicKey, pkt []byte) []byte {
	return rawFrame(relay.FrameSendPacket, append(dst[:len(dst):len(dst)], pkt...))
}

// rawSession is a DERP connection driven frame by frame.
type rawSession struct {
	t      *testing.T
	target *diffTarget
	nc     net.Conn
	br     *bufio.Reader
	priv   relay.PrivateKey
	pub    relay.PublicKey
	names  map[relay.PublicKey]string
	addrs  map[netip.AddrPort]string // names of client addresses in PeerPresent
	marker int
}

// dialDiff connects to target's Accept (via "tcp"), or to its HTTP handler
// with the 101 upgrade ("http") or fast start ("fast"), and reads the
// ServerKey frame. The session's key is priv's (a fresh one if zero).
func dialDiff(t *testing.T, target *diffTarget, via string, priv relay.PrivateKey) *rawSession {
	t.Helper()
	if priv == (relay.PrivateKey{}) {
		priv = newPriv(t)
	}
	addr := target.addr
	if via != "tcp" {
		addr = target.httpAddr
	}
	nc, err := net.DialTimeout("tcp", addr, diffTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	s := &rawSession{t: t, target: target, nc: nc, br: bufio.NewReader(nc), priv: priv, pub: priv.Public(),
		names: map[relay.PublicKey]string{priv.Public(): "self", target.pub: "server"},
		addrs: map[netip.AddrPort]string{addrPortOf(t, nc.LocalAddr()): "its address"}}
	nc.SetDeadline(time.Now().Add(diffTimeout))
	defer nc.SetDeadline(time.Time{})
	switch via {
	case "http", "fast":
		req := "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
		if via == "fast" {
			req += "Derp-Fast-Start: 1\r\n"
		}
		if _, err := io.WriteString(nc, req+"\r\n"); err != nil {
			t.Fatal(err)
		}
		if via == "http" {
			res, err := http.ReadResponse(s.br, nil)
			if err != nil || res.StatusCode != http.StatusSwitchingProtocols {
				t.Fatalf("%s: upgrade: %v %v", target.name, res, err)
			}
		}
	}
	ft, p, err := s.readFrame()
	if err != nil || ft != relay.FrameServerKey || len(p) != 40 || relay.PublicKey(p[8:]) != target.pub {
		t.Fatalf("%s: first frame %v %x, %v; want ServerKey of %v", target.name, ft, p, err, target.pub)
	}
	return s
}

// login sends a ClientInfo with js, waits for the ServerInfo and returns
// the frames that came with it.
func (s *rawSession) login(js string) []string {
	s.t.Helper()
	r := s.run(sealedClientInfo(s.priv, s.target.pub, js))
	if r.closed || len(r.frames) == 0 || !strings.HasPrefix(r.frames[0], "ServerInfo") {
		s.t.Fatalf("%s: login %s: %v", s.target.name, js, r)
	}
	return r.frames[1:]
}

func (s *rawSession) readFrame() (relay.FrameType, []byte, error) {
	var h [frameHdrLen]byte
	if _, err := io.ReadFull(s.br, h[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(h[1:])
	if n > 1<<20 {
		return 0, nil, fmt.Errorf("frame %#x of %d bytes", h[0], n)
	}
	p := make([]byte, n)
	_, err := io.ReadFull(s.br, p)
	return relay.FrameType(h[0]), p, err
}

// diffResult is what a server did with a script: the frames it sent
// (ServerInfo, if any, first; the rest sorted, since a writer may order
// independent frames either way; KeepAlives left out), and whether it
// closed the connection.
type diffResult struct {
	frames []string
	closed bool
}

func (r diffResult) String() string {
	s := "[" + strings.Join(r.frames, ", ") + "]"
	if r.closed {
		s += " then closed"
	} else {
		s += " and open"
	}
	return s
}

// run writes script and then two marker packets to the session's own key,
// the second only once the first came back: every frame the server sent in
// answer to the script has arrived by the time the second marker has (a
// Pong or PeerGone queued before the first marker is written in the same
// writer pass as it or earlier). A connection that ends first is closed.
func (s *rawSession) run(script []byte) diffResult {
	s.t.Helper()
	var r diffResult
	for i := 0; i < 2 && !r.closed; i++ {
		s.marker++
		marker := fmt.Appendf(nil, "marker-%d", s.marker)
		s.nc.SetDeadline(time.Now().Add(diffTimeout))
		_, err := s.nc.Write(cat(script, sendTo(s.pub, marker)))
		script = nil
		for err == nil {
			var ft relay.FrameType
			var p []byte
			ft, p, err = s.readFrame()
			if err != nil {
				break
			}
			if ft == relay.FrameRecvPacket && len(p) >= 32 && relay.PublicKey(p[:32]) == s.pub && bytes.Equal(p[32:], marker) {
				break
			}
			if ft != relay.FrameKeepAlive {
				r.frames = append(r.frames, s.describe(ft, p))
			}
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				s.t.Fatalf("%s: neither answered nor closed within %v; got %v", s.target.name, diffTimeout, r)
			}
			if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) &&
				!errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
				s.t.Fatalf("%s: %v", s.target.name, err)
			}
			r.closed = true
		}
	}
	s.nc.SetDeadline(time.Time{})
	first := 0
	if len(r.frames) > 0 && strings.HasPrefix(r.frames[0], "ServerInfo") {
		first = 1
	}
	for _, f := range r.frames[first:] {
		if strings.HasPrefix(f, "ServerInfo") {
			s.t.Errorf("%s: ServerInfo after other frames: %v", s.target.name, r.frames)
		}
	}
	slices.Sort(r.frames[first:])
	return r
}

// runAwait is run for frames that may come after both markers: it reads
// on, a marker pair at a time, until at least min of the frames start
// with prefix, the connection ends or diffTimeout passes. Tailscale's
// server before v1.104 queues each NotHere PeerGone from a goroutine of
// its own, which a busy machine may run after the markers.
func (s *rawSession) runAwait(script []byte, prefix string, min int) diffResult {
	s.t.Helper()
	r := s.run(script)
	count := func() (n int) {
		for _, f := range r.frames {
			if strings.HasPrefix(f, prefix) {
				n++
			}
		}
		return n
	}
	late := false
	for deadline := time.Now().Add(diffTimeout); !r.closed && count() < min && time.Now().Before(deadline); {
		more := s.run(nil)
		r.frames, r.closed, late = append(r.frames, more.frames...), more.closed, true
	}
	if late {
		slices.Sort(r.frames)
	}
	return r
}

// runWatch sends WatchConns and reports what follows, waiting for the
// first frame beyond the markers if need be: Tailscale's server before
// v1.104 wakes its writer for the flood from a goroutine of its own, so the
// flood may come after them.
func (s *rawSession) runWatch() string {
	s.t.Helper()
	r := s.run(rawFrame(relay.FrameWatchConns, nil))
	for deadline := time.Now().Add(diffTimeout); !r.closed && len(r.frames) == 0 && time.Now().Before(deadline); {
		r = s.run(nil)
	}
	return r.String()
}

// describe names a frame from the server, keys by their role in the test.
func (s *rawSession) describe(ft relay.FrameType, p []byte) string {
	name := func(b []byte) string {
		k := relay.PublicKey(b)
		if n, ok := s.names[k]; ok {
			return n
		}
		return k.ShortString()
	}
	switch {
	case ft == relay.FrameServerInfo:
		if len(p) < 24 {
			return fmt.Sprintf("ServerInfo(%d bytes)", len(p))
		}
		js, ok := box.Open(nil, p[24:], (*[24]byte)(p[:24]), (*[32]byte)(&s.target.pub), (*[32]byte)(&s.priv))
		if !ok {
			return "ServerInfo(box does not open)"
		}
		return "ServerInfo(" + string(js) + ")"
	case ft == relay.FrameRecvPacket && len(p) >= 32:
		return fmt.Sprintf("RecvPacket(from %s, %q)", name(p[:32]), clip(p[32:], 24))
	case ft == relay.FramePeerGone && len(p) == 33:
		return fmt.Sprintf("PeerGone(%s, reason %d)", name(p[:32]), p[32])
	case ft == relay.FramePeerPresent && len(p) >= 51:
		ap := netip.AddrPortFrom(netip.AddrFrom16([16]byte(p[32:48])).Unmap(), binary.BigEndian.Uint16(p[48:50]))
		at, ok := s.addrs[ap]
		if !ok {
			at = ap.String()
		}
		return fmt.Sprintf("PeerPresent(%s at %s, flags %#x, %d bytes)", name(p[:32]), at, p[50], len(p))
	case ft == relay.FramePong && len(p) == 8:
		return fmt.Sprintf("Pong(%x)", p)
	case ft == relay.FrameHealth:
		return fmt.Sprintf("Health(%q)", p)
	}
	return fmt.Sprintf("%v(%d bytes)", ft, len(p))
}

func clip(b []byte, n int) []byte { return b[:min(len(b), n)] }

// diffCase is one scripted exchange. script runs it on a fresh setup of
// one server and returns what the server did, as text.
type diffCase struct {
	name   string
	script func(t *testing.T, srv *diffTarget) string
	// want is what both servers must do; wantTS and wantOurs, when set,
	// are what each must do where they deliberately differ.
	want, wantTS, wantOurs string
}

// frames returns a case that logs in a fresh session over TCP with
// {"version":2}, runs script (built for that session) and reports the result.
func frames(name string, script func(s *rawSession) []byte, want string) diffCase {
	return diffCase{name: name, want: want, script: func(t *testing.T, srv *diffTarget) string {
		s := dialDiff(t, srv, "tcp", relay.PrivateKey{})
		s.login(`{"version":2}`)
		s.names[unknownKey] = "unknown"
		return s.run(script(s)).String()
	}}
}

// awaitFrames is frames for a script that is answered with at least min
// NotHere PeerGone frames, which may come late (runAwait).
func awaitFrames(name string, min int, script func(s *rawSession) []byte, want string) diffCase {
	return diffCase{name: name, want: want, script: func(t *testing.T, srv *diffTarget) string {
		s := dialDiff(t, srv, "tcp", relay.PrivateKey{})
		s.login(`{"version":2}`)
		s.names[unknownKey] = "unknown"
		return s.runAwait(script(s), "PeerGone(unknown", min).String()
	}}
}

// loginWith returns a case that sends the frame mk builds as the session's
// first frame (over via) and reports what came back.
func loginWith(name, via string, mk func(s *rawSession) []byte, want string) diffCase {
	return diffCase{name: name, want: want, script: func(t *testing.T, srv *diffTarget) string {
		s := dialDiff(t, srv, via, relay.PrivateKey{})
		return s.run(mk(s)).String()
	}}
}

func clientInfoJS(js string) func(s *rawSession) []byte {
	return func(s *rawSession) []byte { return sealedClientInfo(s.priv, s.target.pub, js) }
}

// unknownKey is a key no test session uses.
var unknownKey = relay.PublicKey{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32}

const (
	andOpen    = " and open"
	thenClosed = " then closed"
	loggedIn   = `[ServerInfo({"version":2})] and open`
	refused    = `[] then closed`
)

func zeros(n int) []byte { return make([]byte, n) }

func TestDifferentialServers(t *testing.T) {
	checkNoLeaks(t)
	big := func(n int) []byte { return bytes.Repeat([]byte{0xa5}, n) }
	disco := discoPacket()
	cases := []diffCase{
		// Unknown, server-bound and server-only frame types are read and
		// discarded.
		frames("unknown type 0x30", func(s *rawSession) []byte { return rawFrame(0x30, []byte("future")) }, "[]"+andOpen),
		frames("unknown type 0x00", func(s *rawSession) []byte { return rawFrame(0, []byte("zero")) }, "[]"+andOpen),
		frames("unknown type 0xff empty", func(s *rawSession) []byte { return rawFrame(0xff, nil) }, "[]"+andOpen),
		frames("unknown type of 65568 bytes", func(s *rawSession) []byte { return rawFrame(0x30, zeros(65568)) }, "[]"+andOpen),
		{name: "unknown type of 65569 bytes", wantTS: tsUnknownFrame65569, wantOurs: "[]" + andOpen,
			script: framesScript(func(s *rawSession) []byte { return rawFrame(0x30, zeros(65569)) })},
		{name: "unknown type of 1 MiB + 1", wantTS: tsUnknownFrame1MiB1, wantOurs: "[]" + thenClosed,
			script: framesScript(func(s *rawSession) []byte { return rawFrame(0x30, zeros(1<<20+1)) })},
		frames("KeepAlive from the client", func(s *rawSession) []byte { return rawFrame(relay.FrameKeepAlive, nil) }, "[]"+andOpen),
		frames("ServerKey from the client", func(s *rawSession) []byte { return rawFrame(relay.FrameServerKey, zeros(40)) }, "[]"+andOpen),
		frames("second ClientInfo", func(s *rawSession) []byte {
			return sealedClientInfo(s.priv, s.target.pub, `{"version":2}`)
		}, "[]"+andOpen),
		frames("ServerInfo from the client", func(s *rawSession) []byte { return rawFrame(relay.FrameServerInfo, zeros(53)) }, "[]"+andOpen),
		frames("RecvPacket from the client", func(s *rawSession) []byte { return rawFrame(relay.FrameRecvPacket, zeros(40)) }, "[]"+andOpen),
		frames("PeerGone from the client", func(s *rawSession) []byte { return rawFrame(relay.FramePeerGone, zeros(33)) }, "[]"+andOpen),
		frames("PeerPresent from the client", func(s *rawSession) []byte { return rawFrame(relay.FramePeerPresent, zeros(51)) }, "[]"+andOpen),
		frames("Pong of 8 bytes", func(s *rawSession) []byte { return rawFrame(relay.FramePong, zeros(8)) }, "[]"+andOpen),
		frames("Pong of 0 bytes", func(s *rawSession) []byte { return rawFrame(relay.FramePong, nil) }, "[]"+andOpen),
		frames("Pong of 1000 bytes", func(s *rawSession) []byte { return rawFrame(relay.FramePong, zeros(1000)) }, "[]"+andOpen),
		{name: "Pong of 1001 bytes", wantTS: "[]" + andOpen, wantOurs: "[]" + thenClosed,
			script: framesScript(func(s *rawSession) []byte { return rawFrame(relay.FramePong, zeros(1001)) })},
		frames("Health from the client", func(s *rawSession) []byte { return rawFrame(relay.FrameHealth, []byte("hi")) }, "[]"+andOpen),
		frames("Restarting from the client", func(s *rawSession) []byte { return rawFrame(relay.FrameRestarting, zeros(8)) }, "[]"+andOpen),

		// SendPacket.
		frames("SendPacket of 0 bytes", func(s *rawSession) []byte { return rawFrame(relay.FrameSendPacket, nil) }, "[]"+thenClosed),
		frames("SendPacket of 31 bytes", func(s *rawSession) []byte { return rawFrame(relay.FrameSendPacket, s.pub[:31]) }, "[]"+thenClosed),
		frames("SendPacket to self, empty", func(s *rawSession) []byte { return sendTo(s.pub, nil) }, `[RecvPacket(from self, "")]`+andOpen),
		frames("SendPacket to self", func(s *rawSession) []byte { return sendTo(s.pub, []byte("hello me")) }, `[RecvPacket(from self, "hello me")]`+andOpen),
		frames("SendPacket to self, 65536 bytes", func(s *rawSession) []byte { return sendTo(s.pub, big(65536)) },
			fmt.Sprintf("[RecvPacket(from self, %q)]", big(24))+andOpen),
		frames("SendPacket to self, 65537 bytes", func(s *rawSession) []byte { return sendTo(s.pub, big(65537)) }, "[]"+thenClosed),
		frames("SendPacket to unknown, 65537 bytes", func(s *rawSession) []byte { return sendTo(unknownKey, big(65537)) }, "[]"+thenClosed),
		frames("SendPacket to unknown, not disco", func(s *rawSession) []byte {
			return bytes.Repeat(sendTo(unknownKey, []byte("data")), 4)
		}, "[]"+andOpen),
		frames("SendPacket to unknown, short disco", func(s *rawSession) []byte {
			return sendTo(unknownKey, disco[:61])
		}, "[]"+andOpen),
		awaitFrames("SendPacket to unknown, disco", 1, func(s *rawSession) []byte { return sendTo(unknownKey, disco) },
			"[PeerGone(unknown, reason 1)]"+andOpen),
		{name: "SendPacket to unknown, disco x6", want: "[PeerGone(unknown, reason 1) x3 to 5]" + andOpen,
			script: func(t *testing.T, srv *diffTarget) string {
				// One NotHere a second after a burst of 3: a reader that
				// lost its CPU for seconds between two packets could send
				// more than 3, but never 6.
				got := awaitFrames("", 3, func(s *rawSession) []byte { return bytes.Repeat(sendTo(unknownKey, disco), 6) }, "").script(t, srv)
				for n := 5; n >= 3; n-- {
					list := strings.Repeat("PeerGone(unknown, reason 1), ", n)
					got = strings.Replace(got, "["+list[:len(list)-2]+"]", "[PeerGone(unknown, reason 1) x3 to 5]", 1)
				}
				return got
			}},

		// Ping.
		frames("Ping of 0 bytes", func(s *rawSession) []byte { return rawFrame(relay.FramePing, nil) }, "[]"+thenClosed),
		frames("Ping of 7 bytes", func(s *rawSession) []byte { return rawFrame(relay.FramePing, []byte("1234567")) }, "[]"+thenClosed),
		frames("Ping of 8 bytes", func(s *rawSession) []byte { return rawFrame(relay.FramePing, []byte("12345678")) }, "[Pong(3132333435363738)]"+andOpen),
		frames("Ping of 9 bytes", func(s *rawSession) []byte { return rawFrame(relay.FramePing, []byte("123456789")) }, "[Pong(3132333435363738)]"+andOpen),
		frames("Ping of 1000 bytes", func(s *rawSession) []byte {
			return rawFrame(relay.FramePing, append([]byte("abcdefgh"), zeros(992)...))
		}, "[Pong(6162636465666768)]"+andOpen),
		frames("Ping of 1001 bytes", func(s *rawSession) []byte { return rawFrame(relay.FramePing, zeros(1001)) }, "[]"+thenClosed),

		// NotePreferred.
		frames("NotePreferred of 0 bytes", func(s *rawSession) []byte { return rawFrame(relay.FrameNotePreferred, nil) }, "[]"+thenClosed),
		frames("NotePreferred of 2 bytes", func(s *rawSession) []byte { return rawFrame(relay.FrameNotePreferred, []byte{1, 1}) }, "[]"+thenClosed),
		frames("NotePreferred 1, 0xff, 0", func(s *rawSession) []byte {
			return cat(rawFrame(relay.FrameNotePreferred, []byte{1}), rawFrame(relay.FrameNotePreferred, []byte{0xff}),
				rawFrame(relay.FrameNotePreferred, []byte{0}))
		}, "[]"+andOpen),

		// Mesh-only frames from a client without the mesh key.
		frames("WatchConns, not mesh", func(s *rawSession) []byte { return rawFrame(relay.FrameWatchConns, nil) }, "[]"+thenClosed),
		frames("WatchConns of 1 byte, not mesh", func(s *rawSession) []byte { return rawFrame(relay.FrameWatchConns, zeros(1)) }, "[]"+thenClosed),
		frames("ClosePeer, not mesh", func(s *rawSession) []byte { return rawFrame(relay.FrameClosePeer, unknownKey[:]) }, "[]"+thenClosed),
		frames("ClosePeer of 31 bytes, not mesh", func(s *rawSession) []byte { return rawFrame(relay.FrameClosePeer, zeros(31)) }, "[]"+thenClosed),
		frames("ForwardPacket, not mesh", func(s *rawSession) []byte {
			return rawFrame(relay.FrameForwardPacket, cat(unknownKey[:], s.pub[:], []byte("x")))
		}, "[]"+thenClosed),
		frames("ForwardPacket of 10 bytes, not mesh", func(s *rawSession) []byte { return rawFrame(relay.FrameForwardPacket, zeros(10)) }, "[]"+thenClosed),

		// Mesh-only frames from a mesh peer.
		{name: "mesh WatchConns", wantTS: watchSelf(tsPeerPresentLen), wantOurs: watchSelf(52),
			script: func(t *testing.T, srv *diffTarget) string {
				s := dialDiff(t, srv, "tcp", relay.PrivateKey{})
				s.login(`{"meshKey":"` + srv.meshKey + `","version":2}`)
				return s.runWatch()
			}},
		{name: "mesh WatchConns: addresses and flags", script: watchFlagsScript,
			wantTS: watchFlags(tsPeerPresentLen, tsSendsAppName), wantOurs: watchFlags(52, true)},
		meshFrames("mesh WatchConns of 1 byte", func(s *rawSession) []byte { return rawFrame(relay.FrameWatchConns, zeros(1)) }, "[]"+thenClosed),
		meshFrames("mesh ClosePeer of unknown", func(s *rawSession) []byte { return rawFrame(relay.FrameClosePeer, unknownKey[:]) }, "[]"+andOpen),
		{name: "mesh ClosePeer of a connected key", want: "mesh: [] and open; target: [] then closed", script: closePeerScript(false)},
		{name: "mesh ClosePeer of its own key", want: "mesh: [] then closed", script: closePeerScript(true)},
		meshFrames("mesh ClosePeer of 33 bytes", func(s *rawSession) []byte { return rawFrame(relay.FrameClosePeer, zeros(33)) }, "[]"+thenClosed),
		meshFrames("mesh ForwardPacket of 63 bytes", func(s *rawSession) []byte { return rawFrame(relay.FrameForwardPacket, zeros(63)) }, "[]"+thenClosed),
		meshFrames("mesh ForwardPacket to self", func(s *rawSession) []byte {
			return rawFrame(relay.FrameForwardPacket, cat(unknownKey[:], s.pub[:], []byte("fwd")))
		}, `[RecvPacket(from unknown, "fwd")]`+andOpen),
		meshFrames("mesh ForwardPacket from the zero key", func(s *rawSession) []byte {
			return rawFrame(relay.FrameForwardPacket, cat(zeros(32), s.pub[:], []byte("v1 layout")))
		}, "[RecvPacket(9 bytes)]"+andOpen), // the version 1 layout: no source key
		meshFrames("mesh ForwardPacket, 65537 bytes", func(s *rawSession) []byte {
			return rawFrame(relay.FrameForwardPacket, cat(unknownKey[:], s.pub[:], big(65537)))
		}, "[]"+thenClosed),
		awaitMeshFrames("mesh ForwardPacket to unknown, disco", 1, func(s *rawSession) []byte {
			return rawFrame(relay.FrameForwardPacket, cat(s.pub[:], unknownKey[:], disco))
		}, "[PeerGone(unknown, reason 1)]"+andOpen),

		// Login.
		loginWith("ClientInfo version 2", "tcp", clientInfoJS(`{"version":2}`), loggedIn),
		loginWith("ClientInfo version 1", "tcp", clientInfoJS(`{"version":1}`), loggedIn),
		loginWith("ClientInfo version 0", "tcp", clientInfoJS(`{}`), loggedIn),
		loginWith("ClientInfo version 99", "tcp", clientInfoJS(`{"version":99}`), loggedIn),
		loginWith("ClientInfo null", "tcp", clientInfoJS(`null`), loggedIn),
		loginWith("ClientInfo unknown fields", "tcp", clientInfoJS(`{"version":2,"CanAckPings":true,"Future":{"x":[1,2]},"v":"?"}`), loggedIn),
		loginWith("ClientInfo field names in other case", "tcp", clientInfoJS(`{"VERSION":2,"canackpings":false,"isprober":true}`), loggedIn),
		loginWith("ClientInfo version 2.0", "tcp", clientInfoJS(`{"version":2.0}`), refused),
		loginWith("ClientInfo version \"2\"", "tcp", clientInfoJS(`{"version":"2"}`), refused),
		loginWith("ClientInfo bad JSON", "tcp", clientInfoJS(`{"version":2`), refused),
		loginWith("ClientInfo empty JSON", "tcp", clientInfoJS(``), refused),
		loginWith("ClientInfo meshKey \"\"", "tcp", clientInfoJS(`{"meshKey":""}`), refused),
		loginWith("ClientInfo meshKey null", "tcp", clientInfoJS(`{"meshKey":null}`), refused),
		loginWith("ClientInfo meshKey short", "tcp", clientInfoJS(`{"meshKey":"abcd"}`), refused),
		loginWith("ClientInfo wrong meshKey", "tcp", clientInfoJS(`{"meshKey":"`+strings.Repeat("ab", 32)+`"}`), loggedIn),
		{name: "ClientInfo AppName of 33 bytes", wantTS: tsAppName33, wantOurs: refused,
			script: loginScript(clientInfoJS(`{"AppName":"` + strings.Repeat("a", 33) + `"}`))},
		loginWith("ClientInfo trailing garbage", "tcp", clientInfoJS(`{"version":2} x`), refused),
		loginWith("ClientInfo meshKey a number", "tcp", clientInfoJS(`{"meshKey":1234}`), refused),
		{name: "ClientInfo meshKey in upper case, then WatchConns", wantTS: watchSelf(tsPeerPresentLen), wantOurs: watchSelf(52),
			script: func(t *testing.T, srv *diffTarget) string {
				s := dialDiff(t, srv, "tcp", relay.PrivateKey{})
				s.login(`{"MeshKey":"` + strings.ToUpper(srv.meshKey) + `"}`)
				return s.runWatch()
			}},
		{name: "ClientInfo meshKey of zeros, then WatchConns", want: "[]" + thenClosed,
			script: func(t *testing.T, srv *diffTarget) string {
				s := dialDiff(t, srv, "tcp", relay.PrivateKey{})
				s.login(`{"meshKey":"` + strings.Repeat("0", 64) + `"}`)
				return s.run(rawFrame(relay.FrameWatchConns, nil)).String()
			}},
		{name: "ClientInfo from a small-order key", wantTS: "[ServerInfo(box does not open)]" + andOpen, wantOurs: refused,
			script: loginScript(func(s *rawSession) []byte {
				// X25519 with a point of small order (here u = 1) is zero
				// whatever the private key: anyone can seal this box, no
				// key is proven. (Tailscale's server seals its ServerInfo
				// with that zero secret too, which describe does not try.)
				// The zero key itself would crash Tailscale's Accept.
				weak := relay.PublicKey{1}
				s.pub, s.names[weak] = weak, "self"
				var nonce [24]byte
				rand.Read(nonce[:])
				return rawFrame(relay.FrameClientInfo, box.Seal(append(weak[:len(weak):len(weak)], nonce[:]...), []byte(`{}`), &nonce, (*[32]byte)(&weak), (*[32]byte)(&s.priv)))
			})},
		loginWith("ClientInfo sealed to another key", "tcp", func(s *rawSession) []byte {
			return sealedClientInfo(s.priv, unknownKey, `{"version":2}`)
		}, refused),
		loginWith("ClientInfo claiming another key", "tcp", func(s *rawSession) []byte {
			f := sealedClientInfo(s.priv, s.target.pub, `{"version":2}`)
			f[5] ^= 1
			return f
		}, refused),
		loginWith("ClientInfo of 55 bytes", "tcp", func(s *rawSession) []byte { return rawFrame(relay.FrameClientInfo, zeros(55)) }, refused),
		loginWith("ClientInfo of 56 bytes (no box tag)", "tcp", func(s *rawSession) []byte {
			return rawFrame(relay.FrameClientInfo, cat(s.pub[:], zeros(24)))
		}, refused),
		{name: "ClientInfo of 16 KiB + 1", wantTS: loggedIn, wantOurs: refused, script: loginScript(func(s *rawSession) []byte {
			return sealedClientInfo(s.priv, s.target.pub, `{"version":2,"pad":"`+strings.Repeat("x", 16<<10+1-72-22)+`"}`)
		})},
		loginWith("ClientInfo of 256 KiB + 1", "tcp", func(s *rawSession) []byte {
			return rawFrame(relay.FrameClientInfo, zeros(256<<10+1))
		}, refused),
		loginWith("SendPacket before ClientInfo", "tcp", func(s *rawSession) []byte { return sendTo(s.pub, []byte("early")) }, refused),
		loginWith("Ping before ClientInfo", "tcp", func(s *rawSession) []byte { return rawFrame(relay.FramePing, zeros(8)) }, refused),
		loginWith("frames before ServerInfo", "tcp", func(s *rawSession) []byte {
			return cat(sealedClientInfo(s.priv, s.target.pub, `{"version":2}`),
				rawFrame(relay.FrameNotePreferred, []byte{1}), sendTo(s.pub, []byte("early")), rawFrame(relay.FramePing, []byte("pingpong")))
		}, `[ServerInfo({"version":2}), Pong(70696e67706f6e67), RecvPacket(from self, "early")]`+andOpen),
		loginWith("fast start, frames before ServerInfo", "fast", func(s *rawSession) []byte {
			return cat(sealedClientInfo(s.priv, s.target.pub, `{"version":2}`), sendTo(s.pub, []byte("early")))
		}, `[ServerInfo({"version":2}), RecvPacket(from self, "early")]`+andOpen),
		loginWith("upgrade, then login", "http", clientInfoJS(`{"version":2}`), loggedIn),
		{name: "upgrade with ClientInfo and frames in the same write", script: pipelined(false),
			want: `101; ServerKey(server); [ServerInfo({"version":2}), RecvPacket(from self, "early")]` + andOpen},
		{name: "probe, then fast start on one connection", script: pipelined(true),
			want: `200; ServerKey(server); [ServerInfo({"version":2}), RecvPacket(from self, "early")]` + andOpen},
		{name: "frames written a byte at a time", want: `[RecvPacket(from self, "slow")]` + andOpen, script: func(t *testing.T, srv *diffTarget) string {
			s := dialDiff(t, srv, "tcp", relay.PrivateKey{})
			s.login(`{"version":2}`)
			for _, b := range cat(rawFrame(relay.FrameNotePreferred, []byte{1}), sendTo(s.pub, []byte("slow"))) {
				if _, err := s.nc.Write([]byte{b}); err != nil {
					t.Fatal(err)
				}
			}
			return s.run(nil).String()
		}},
		{name: "replayed ClientInfo", wantTS: loggedIn, wantOurs: refused, script: func(t *testing.T, srv *diffTarget) string {
			first := dialDiff(t, srv, "tcp", relay.PrivateKey{})
			ci := sealedClientInfo(first.priv, srv.pub, `{"version":2}`)
			first.run(ci)
			again := dialDiff(t, srv, "tcp", first.priv)
			return again.run(ci).String()
		}},

		// HTTP: the same request to each server's handler.
		httpCase("GET /derp without Upgrade", "GET /derp HTTP/1.1\r\nConnection: close\r\n", http426),
		httpCase("HEAD /derp without Upgrade", "HEAD /derp HTTP/1.1\r\nConnection: close\r\n", http426head),
		httpCase("GET /derp/other without Upgrade", "GET /derp/other HTTP/1.1\r\nConnection: close\r\n", http426),
		httpCase("Upgrade: h2c", "GET /derp HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n", http426),
		httpCase("Upgrade: DERP", "GET /derp HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n", http101),
		httpCase("Upgrade: dErP", "GET /derp HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: dErP\r\n", http101),
		httpCase("Upgrade: DERP, no Connection", "GET /derp HTTP/1.1\r\nUpgrade: DERP\r\n", http101),
		httpCase("POST with Upgrade: DERP", "POST /derp HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nContent-Length: 0\r\n", http101),
		// An upgrade request with a body: Tailscale's server reads the
		// body as the client's first frames ("bad frame type 0x68"); ours
		// refuses it, and closes the connection (net/http reads the
		// "Connection: close" out of the header).
		{name: "POST with Upgrade: DERP and a body", script: httpCase("", "POST /derp HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nContent-Length: 7\r\n\r\nhello", "").script,
			wantTS:   http101,
			wantOurs: `400 [Content-Length: 122] [Content-Type: text/plain; charset=utf-8] [X-Content-Type-Options: nosniff] "relay: a DERP upgrade request must not have a body (Content-Length or Transfer-Encoding): it would be read as DERP frames\n"`},
		httpCase("Upgrade: websocket, no subprotocol", "GET /derp HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n", http101),
		httpCase("WebSocket, subprotocol derp", wsReq("derp", 13), wsUpgraded),
		httpCase("WebSocket, subprotocols chat and derp", wsReq("chat, derp", 13), wsUpgraded),
		// Tailscale looks for the substring "derp" in the offered
		// subprotocols, accepts the WebSocket without one and then closes
		// it (1008); ours wants the token, and "Upgrade: websocket"
		// without it is old clients' raw DERP.
		{name: "WebSocket, subprotocol derpx", script: httpCase("", wsReq("derpx", 13), "").script,
			wantTS:   `101 [Connection: Upgrade] [Sec-Websocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=] [Upgrade: websocket]`,
			wantOurs: http101},
		// Refused by both, with statuses of their own (coder/websocket's
		// and ours; RFC 6455 suggests 426 for a version it does not speak).
		{name: "WebSocket, version 12", script: httpStatus(wsReq("derp", 12)), wantTS: "400", wantOurs: "426"},
		{name: "WebSocket, no key", script: httpStatus(strings.Replace(wsReq("derp", 13), "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "", 1)), want: "400"},
		{name: "WebSocket, no Connection: Upgrade", script: httpStatus(strings.Replace(wsReq("derp", 13), "Connection: Upgrade\r\n", "", 1)),
			wantTS: "426", wantOurs: "400"},
		httpCase("Upgrade: DERP, foo", "GET /derp HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: DERP, foo\r\n", http426),
		httpCase("Upgrade on /derp/other", "GET /derp/other HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n", http101),
		httpCase("Derp-Fast-Start: 1", "GET /derp HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n", "no HTTP response; ServerKey(server)"),
		httpCase("Derp-Fast-Start: true", "GET /derp HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: true\r\n", http101),
		httpCase("Derp-Fast-Start: 0", "GET /derp HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: 0\r\n", http101),
		httpCase("GET /derp/probe", "GET /derp/probe HTTP/1.1\r\nConnection: close\r\n", http200probe),
		httpCase("HEAD /derp/probe", "HEAD /derp/probe HTTP/1.1\r\nConnection: close\r\n", `200 [Access-Control-Allow-Origin: *] ""`),
		httpCase("GET /derp/latency-check", "GET /derp/latency-check HTTP/1.1\r\nConnection: close\r\n", http200probe),
		httpCase("GET /derp/probe with Upgrade: DERP", "GET /derp/probe HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n", http200probe),
		httpCase("POST /derp/probe", "POST /derp/probe HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\n",
			`405 [Content-Length: 19] [Content-Type: text/plain; charset=utf-8] [X-Content-Type-Options: nosniff] "bogus probe method\n"`),
		httpCase("GET /generate_204", "GET /generate_204 HTTP/1.1\r\nConnection: close\r\n", http204),
		httpCase("POST /generate_204 with a challenge", "POST /generate_204 HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\nX-Tailscale-Challenge: ts_1.2.3.4:x-Y\r\n",
			http204+" [X-Tailscale-Response: response ts_1.2.3.4:x-Y]"),
		httpCase("GET /generate_204, challenge of 64 bytes", "GET /generate_204 HTTP/1.1\r\nConnection: close\r\nX-Tailscale-Challenge: "+strings.Repeat("c", 64)+"\r\n",
			http204+" [X-Tailscale-Response: response "+strings.Repeat("c", 64)+"]"),
		httpCase("GET /generate_204, challenge of 65 bytes", "GET /generate_204 HTTP/1.1\r\nConnection: close\r\nX-Tailscale-Challenge: "+strings.Repeat("c", 65)+"\r\n", http204),
		httpCase("GET /generate_204, challenge with a space", "GET /generate_204 HTTP/1.1\r\nConnection: close\r\nX-Tailscale-Challenge: a b\r\n", http204),

		// After the server's Close. Tailscale's Accept does not check
		// for it: the session runs, on a server that has stopped tracking
		// it; ours refuses the connection, and ServeHTTP says why.
		{name: "Accept after the server's Close", wantTS: loggedIn, wantOurs: "ServerKey: EOF",
			script: func(t *testing.T, srv *diffTarget) string {
				srv = srv.again(t)
				srv.close()
				nc, err := net.DialTimeout("tcp", srv.addr, diffTimeout)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { nc.Close() })
				nc.SetDeadline(time.Now().Add(diffTimeout))
				s := &rawSession{t: t, target: srv, nc: nc, br: bufio.NewReader(nc), priv: newPriv(t)}
				s.pub = s.priv.Public()
				if ft, _, err := s.readFrame(); err != nil || ft != relay.FrameServerKey {
					return fmt.Sprintf("ServerKey: %v", err)
				}
				return s.run(sealedClientInfo(s.priv, srv.pub, `{"version":2}`)).String()
			}},
		{name: "upgrade after the server's Close", wantTS: http101, wantOurs: `503 [Content-Length: 31] [Content-Type: text/plain; charset=utf-8] [X-Content-Type-Options: nosniff] "relay: server is shutting down\n"`,
			script: func(t *testing.T, srv *diffTarget) string {
				srv = srv.again(t)
				srv.close()
				return httpCase("", "GET /derp HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n", "").script(t, srv)
			}},

		// Duplicate keys: the newest login receives, then whichever sent last.
		{name: "two logins with one key", script: dupScript,
			wantTS: `B login: [] A: [] B: [RecvPacket(from peer, "to K 1")] A: [RecvPacket(from peer, "to K 2")] B: [] ` +
				`A: [RecvPacket(from peer, "to K 3")] B: []`,
			wantOurs: `B login: [Health(dup 2)] A: [Health(dup 2)] B: [RecvPacket(from peer, "to K 1")] A: [RecvPacket(from peer, "to K 2")] B: [] ` +
				`A: [RecvPacket(from peer, "to K 3")] B: []`},
	}
	targets := startDiffTargets(t)
	var table []string
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			var got [2]string
			for i, srv := range targets {
				got[i] = c.script(t, srv)
			}
			wantTS, wantOurs := c.want, c.want
			if c.wantTS != "" {
				wantTS, wantOurs = c.wantTS, c.wantOurs
			}
			if got[0] != wantTS {
				t.Errorf("Tailscale's server: %s\n\twant %s", got[0], wantTS)
			}
			if got[1] != wantOurs {
				t.Errorf("our server: %s\n\twant %s", got[1], wantOurs)
			}
			verdict := "same"
			if got[0] != got[1] {
				verdict = "differs"
			}
			table = append(table, fmt.Sprintf("| %s | %s | %s | %s |", c.name, got[0], got[1], verdict))
		})
	}
	t.Logf("\n| case | Tailscale | ours | |\n| --- | --- | --- | --- |\n%s", strings.Join(table, "\n"))
	t.Logf("our server's errors: %v", targets[1].errors())
}

// framesScript is the script of frames (for cases whose want differs).
func framesScript(script func(s *rawSession) []byte) func(t *testing.T, srv *diffTarget) string {
	return frames("", script, "").script
}

// loginScript is the script of loginWith over TCP.
func loginScript(mk func(s *rawSession) []byte) func(t *testing.T, srv *diffTarget) string {
	return loginWith("", "tcp", mk, "").script
}

// watchSelf is what a mesh peer alone on a server is sent for WatchConns:
// itself, in a PeerPresent of n bytes (51, and 1 + the app name's length
// from servers that send it).
func watchSelf(n int) string {
	return fmt.Sprintf("[PeerPresent(self at its address, flags 0x2, %d bytes)]", n) + andOpen
}

// meshFrames is frames for a session logged in with the mesh key.
func meshFrames(name string, script func(s *rawSession) []byte, want string) diffCase {
	return diffCase{name: name, want: want, script: func(t *testing.T, srv *diffTarget) string {
		s := dialDiff(t, srv, "tcp", relay.PrivateKey{})
		s.login(`{"meshKey":"` + srv.meshKey + `","version":2}`)
		s.names[unknownKey] = "unknown"
		return s.run(script(s)).String()
	}}
}

// awaitMeshFrames is meshFrames for a script answered with at least min
// NotHere PeerGone frames (runAwait).
func awaitMeshFrames(name string, min int, script func(s *rawSession) []byte, want string) diffCase {
	return diffCase{name: name, want: want, script: func(t *testing.T, srv *diffTarget) string {
		s := dialDiff(t, srv, "tcp", relay.PrivateKey{})
		s.login(`{"meshKey":"` + srv.meshKey + `","version":2}`)
		s.names[unknownKey] = "unknown"
		return s.runAwait(script(s), "PeerGone(unknown", min).String()
	}}
}

// dupScript logs in A and then B with one key K, and a peer P. P sends to
// K (B, the newest, receives), A sends (and so receives the next packet
// for K), then B. Health texts are shortened to "dup N".
func dupScript(t *testing.T, srv *diffTarget) string {
	k := newPriv(t)
	a := dialDiff(t, srv, "tcp", k)
	a.login(`{"version":2}`)
	var out []string
	note := func(name string, frames []string) {
		for i, f := range frames {
			if strings.HasPrefix(f, "Health(") {
				frames[i] = "Health(dup ?)"
				if strings.Contains(f, "2 in all") {
					frames[i] = "Health(dup 2)"
				}
			}
		}
		out = append(out, name+": ["+strings.Join(frames, ", ")+"]")
	}
	b := dialDiff(t, srv, "tcp", k)
	note("B login", b.login(`{"version":2}`))
	p := dialDiff(t, srv, "tcp", relay.PrivateKey{})
	p.login(`{"version":2}`)
	for _, s := range []*rawSession{a, b} {
		s.names[p.pub] = "peer"
	}
	step := func(name string, s *rawSession) {
		r := s.run(nil)
		if r.closed {
			t.Fatalf("%s: %s closed", srv.name, name)
		}
		note(name, r.frames)
	}
	if r := p.run(sendTo(k.Public(), []byte("to K 1"))); r.closed || len(r.frames) != 0 {
		t.Fatalf("%s: peer: %v", srv.name, r)
	}
	step("A", a) // A sent (its markers): from now on A receives
	step("B", b) // ... and B, once its markers went to B
	// B sent last: the next packet for K is B's. Make A the active one.
	a.run(rawFrame(0x30, nil))
	if r := p.run(sendTo(k.Public(), []byte("to K 2"))); r.closed || len(r.frames) != 0 {
		t.Fatalf("%s: peer: %v", srv.name, r)
	}
	step("A", a)
	step("B", b)
	// Any frame makes a duplicate the active one, a Ping as well as a
	// packet: B sent last, now A pings.
	a.nc.SetDeadline(time.Now().Add(diffTimeout))
	if _, err := a.nc.Write(rawFrame(relay.FramePing, []byte("A pings!"))); err != nil {
		t.Fatal(err)
	}
	for {
		ft, p, err := a.readFrame()
		if err != nil {
			t.Fatalf("%s: A waiting for its Pong: %v", srv.name, err)
		}
		if ft == relay.FramePong {
			break
		}
		note("A before its Pong", []string{a.describe(ft, p)})
	}
	a.nc.SetDeadline(time.Time{})
	if r := p.run(sendTo(k.Public(), []byte("to K 3"))); r.closed || len(r.frames) != 0 {
		t.Fatalf("%s: peer: %v", srv.name, r)
	}
	step("A", a)
	step("B", b)
	return strings.Join(out, " ")
}

const (
	http426      = `426 [Content-Length: 33] [Content-Type: text/plain; charset=utf-8] [X-Content-Type-Options: nosniff] "DERP requires connection upgrade\n"`
	http426head  = `426 [Content-Length: 33] [Content-Type: text/plain; charset=utf-8] [X-Content-Type-Options: nosniff] ""`
	http101      = `101 [Connection: Upgrade] [Derp-Public-Key: <server key>] [Derp-Version: 2] [Upgrade: DERP]; ServerKey(server)`
	http200probe = `200 [Access-Control-Allow-Origin: *] [Content-Length: 0] ""`
	http204      = `204 [Cache-Control: no-cache, no-store, must-revalidate, no-transform, max-age=0]`
)

// httpCase sends the request head req (with a Host header added) to each
// server's HTTP handler and reports the response: status, headers but
// Date, body; for a 101 or no response at all, the first DERP frame.
func httpCase(name, req, want string) diffCase {
	return diffCase{name: name, want: want, script: func(t *testing.T, srv *diffTarget) string {
		nc, err := net.DialTimeout("tcp", srv.httpAddr, diffTimeout)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		nc.SetDeadline(time.Now().Add(diffTimeout))
		line, rest, _ := strings.Cut(req, "\r\n")
		if _, err := io.WriteString(nc, line+"\r\nHost: x\r\n"+rest+"\r\n"); err != nil {
			t.Fatal(err)
		}
		s := &rawSession{t: t, target: srv, nc: nc, br: bufio.NewReader(nc), names: map[relay.PublicKey]string{srv.pub: "server"}}
		serverKey := func() string {
			ft, p, err := s.readFrame()
			if err != nil {
				return err.Error()
			}
			if ft == relay.FrameServerKey && len(p) == 40 && string(p[:8]) == string(serverKeyMagic) {
				return "ServerKey(" + s.names[relay.PublicKey(p[8:])] + ")"
			}
			return s.describe(ft, p)
		}
		if b, err := s.br.Peek(1); err == nil && b[0] == byte(relay.FrameServerKey) {
			return "no HTTP response; " + serverKey()
		}
		method, _, _ := strings.Cut(line, " ")
		res, err := http.ReadResponse(s.br, &http.Request{Method: method})
		if err != nil {
			return "no response: " + err.Error()
		}
		var hs []string
		for k, vs := range res.Header {
			for _, v := range vs {
				if k == "Derp-Public-Key" && v == srv.pub.String() {
					v = "<server key>"
				}
				if k != "Date" {
					hs = append(hs, "["+k+": "+v+"]")
				}
			}
		}
		slices.Sort(hs)
		out := fmt.Sprint(res.StatusCode, " ", strings.Join(hs, " "))
		if res.StatusCode == http.StatusSwitchingProtocols && strings.EqualFold(res.Header.Get("Upgrade"), "websocket") {
			return out // then DERP inside WebSocket messages
		}
		if res.StatusCode == http.StatusSwitchingProtocols {
			return out + "; " + serverKey()
		}
		body, err := io.ReadAll(res.Body)
		if err != nil {
			return out + " body: " + err.Error()
		}
		if res.StatusCode == http.StatusNoContent {
			return out
		}
		return fmt.Sprintf("%s %q", out, body)
	}}
}

// pipelined returns a script that writes, without waiting for anything, an
// upgrade request (after a probe request, and with fast start, if
// probeFirst), a ClientInfo and a packet to itself, then reads the answers.
func pipelined(probeFirst bool) func(t *testing.T, srv *diffTarget) string {
	return func(t *testing.T, srv *diffTarget) string {
		nc, err := net.DialTimeout("tcp", srv.httpAddr, diffTimeout)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nc.Close() })
		priv := newPriv(t)
		s := &rawSession{t: t, target: srv, nc: nc, br: bufio.NewReader(nc), priv: priv, pub: priv.Public(),
			names: map[relay.PublicKey]string{priv.Public(): "self", srv.pub: "server"}}
		req := "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
		if probeFirst {
			req = "GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n" +
				"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n"
		}
		nc.SetDeadline(time.Now().Add(diffTimeout))
		if _, err := nc.Write(cat([]byte(req), sealedClientInfo(priv, srv.pub, `{"version":2}`), sendTo(s.pub, []byte("early")))); err != nil {
			t.Fatal(err)
		}
		res, err := http.ReadResponse(s.br, &http.Request{Method: "GET"})
		if err != nil {
			return "no response: " + err.Error()
		}
		io.Copy(io.Discard, res.Body)
		out := fmt.Sprint(res.StatusCode, "; ")
		ft, p, err := s.readFrame()
		if err != nil {
			return out + err.Error()
		}
		out += s.describe(ft, p)
		if ft == relay.FrameServerKey && len(p) == 40 && relay.PublicKey(p[8:]) == srv.pub {
			out = out[:len(out)-len(s.describe(ft, p))] + "ServerKey(server)"
		}
		return out + "; " + s.run(nil).String()
	}
}

// wsReq is a WebSocket upgrade request offering subprotocols.
func wsReq(subprotocols string, version int) string {
	return fmt.Sprintf("GET /derp HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: %d\r\nSec-WebSocket-Protocol: %s\r\n", version, subprotocols)
}

const wsUpgraded = `101 [Connection: Upgrade] [Sec-Websocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=] [Sec-Websocket-Protocol: derp] [Upgrade: websocket]`

// httpStatus is httpCase reduced to the response's status code.
func httpStatus(req string) func(t *testing.T, srv *diffTarget) string {
	return func(t *testing.T, srv *diffTarget) string {
		got := httpCase("", req, "").script(t, srv)
		status, _, _ := strings.Cut(got, " ")
		return status
	}
}

// closePeerScript has a mesh peer send ClosePeer for another session's key
// (or its own) and reports what each then sees; the closed session is read
// until its connection ends, since servers close it asynchronously.
func closePeerScript(own bool) func(t *testing.T, srv *diffTarget) string {
	return func(t *testing.T, srv *diffTarget) string {
		target := dialDiff(t, srv, "tcp", relay.PrivateKey{})
		target.login(`{"version":2}`)
		m := dialDiff(t, srv, "tcp", relay.PrivateKey{})
		m.login(`{"meshKey":"` + srv.meshKey + `"}`)
		if own {
			if _, err := m.nc.Write(rawFrame(relay.FrameClosePeer, m.pub[:])); err != nil {
				t.Fatal(err)
			}
			return "mesh: " + m.readToEnd()
		}
		return "mesh: " + m.run(rawFrame(relay.FrameClosePeer, target.pub[:])).String() + "; target: " + target.readToEnd()
	}
}

// readToEnd reads until the connection ends and reports what came.
func (s *rawSession) readToEnd() string {
	s.nc.SetReadDeadline(time.Now().Add(diffTimeout))
	var got []string
	for {
		ft, p, err := s.readFrame()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return fmt.Sprintf("%v and never closed", got)
			}
			break
		}
		if ft != relay.FrameKeepAlive {
			got = append(got, s.describe(ft, p))
		}
	}
	return diffResult{frames: got, closed: true}.String()
}

// watchFlagsScript logs in a prober with an app name over TCP, a client
// through the HTTP handler with an Ideal-Node header, and a mesh peer that
// then sends WatchConns.
func watchFlagsScript(t *testing.T, srv *diffTarget) string {
	prober := dialDiff(t, srv, "tcp", relay.PrivateKey{})
	prober.login(`{"version":2,"IsProber":true,"AppName":"probe"}`)
	nc, err := net.DialTimeout("tcp", srv.httpAddr, diffTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	notIdeal := &rawSession{t: t, target: srv, nc: nc, br: bufio.NewReader(nc), priv: newPriv(t), addrs: map[netip.AddrPort]string{}}
	notIdeal.pub = notIdeal.priv.Public()
	notIdeal.names = map[relay.PublicKey]string{notIdeal.pub: "self"}
	req := "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\nIdeal-Node: derp1\r\n\r\n"
	if _, err := io.WriteString(nc, req); err != nil {
		t.Fatal(err)
	}
	if ft, _, err := notIdeal.readFrame(); err != nil || ft != relay.FrameServerKey {
		t.Fatalf("%s: fast start: %v %v", srv.name, ft, err)
	}
	notIdeal.login(`{"version":2}`)
	w := dialDiff(t, srv, "tcp", relay.PrivateKey{})
	w.login(`{"meshKey":"` + srv.meshKey + `","version":2}`)
	w.names[prober.pub], w.names[notIdeal.pub] = "prober", "notIdeal"
	w.addrs[addrPortOf(t, prober.nc.LocalAddr())], w.addrs[addrPortOf(t, nc.LocalAddr())] = "its address", "its address"
	return w.runWatch()
}

// watchFlags is what watchFlagsScript gets from a server whose
// PeerPresent frames have n bytes without an app name, and carry it if
// appName.
func watchFlags(n int, appName bool) string {
	withName := n
	if appName {
		withName += len("probe")
	}
	return fmt.Sprintf("[PeerPresent(notIdeal at its address, flags 0x8, %d bytes), "+
		"PeerPresent(prober at its address, flags 0x4, %d bytes), "+
		"PeerPresent(self at its address, flags 0x2, %d bytes)]", n, withName, n) + andOpen
}
