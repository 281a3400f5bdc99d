package relay

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
)

// TestFrameGolden writes every frame the server or client sends, compares
// the bytes with the wire format of PROTOCOL.md, then reads them back.
func TestFrameGolden(t *testing.T) {
	var k PublicKey
	for i := range k {
		k[i] = byte(i)
	}
	k2 := k
	k2[0] = 0xff
	khex := hex.EncodeToString(k[:])
	k2hex := hex.EncodeToString(k2[:])
	unhex := func(s string) []byte {
		b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	ap := netip.MustParseAddrPort("192.0.2.1:41641")
	tests := []struct {
		name  string
		write func(bw *bufio.Writer) error
		want  string // hex of the whole frame
		parse func(p []byte) (any, error)
		msg   any
	}{
		{"ServerKey", func(bw *bufio.Writer) error { return writeFrame(bw, FrameServerKey, appendServerKey(nil, k)) },
			"01 00000028 44455250f09f9491" + khex,
			func(p []byte) (any, error) { return parseServerKey(p) }, k},
		{"SendPacket", func(bw *bufio.Writer) error { return writePacketFrame(bw, FrameSendPacket, &k, []byte("hi")) },
			"04 00000022" + khex + "6869", nil, nil},
		{"RecvPacket", func(bw *bufio.Writer) error { return writePacketFrame(bw, FrameRecvPacket, &k, []byte("hi")) },
			"05 00000022" + khex + "6869",
			func(p []byte) (any, error) {
				var m ReceivedPacket
				err := parseRecvPacket(&m, p)
				return m, err
			}, ReceivedPacket{Source: k, Data: []byte("hi")}},
		{"RecvPacket v1 (no source)", func(bw *bufio.Writer) error { return writePacketFrame(bw, FrameRecvPacket, nil, []byte("hi")) },
			"05 00000002 6869", nil, nil},
		{"KeepAlive", func(bw *bufio.Writer) error { return writeFrame(bw, FrameKeepAlive) },
			"06 00000000", nil, nil},
		{"NotePreferred", func(bw *bufio.Writer) error { return writeFrame(bw, FrameNotePreferred, []byte{1}) },
			"07 00000001 01", nil, nil},
		{"PeerGone", func(bw *bufio.Writer) error {
			return writeFrame(bw, FramePeerGone, appendPeerGone(nil, k, PeerGoneNotHere))
		}, "08 00000021" + khex + "01",
			func(p []byte) (any, error) { return parsePeerGone(p) }, PeerGone{Peer: k, Reason: PeerGoneNotHere}},
		{"PeerPresent", func(bw *bufio.Writer) error {
			return writeFrame(bw, FramePeerPresent, appendPeerPresent(nil, PeerPresent{Key: k, Addr: ap, Flags: PeerIsMeshPeer | PeerIsNotIdeal}))
		}, "09 00000034" + khex + "00000000000000000000ffffc0000201 a2a9 0a 00",
			func(p []byte) (any, error) { return parsePeerPresent(p) }, PeerPresent{Key: k, Addr: ap, Flags: PeerIsMeshPeer | PeerIsNotIdeal}},
		{"PeerPresent with app name", func(bw *bufio.Writer) error {
			return writeFrame(bw, FramePeerPresent, appendPeerPresent(nil, PeerPresent{Key: k, Addr: ap, Flags: PeerIsRegular, AppName: "tailscaled"}))
		}, "09 0000003e" + khex + "00000000000000000000ffffc0000201 a2a9 01 0a 7461696c7363616c6564",
			func(p []byte) (any, error) { return parsePeerPresent(p) }, PeerPresent{Key: k, Addr: ap, Flags: PeerIsRegular, AppName: "tailscaled"}},
		{"ForwardPacket", func(bw *bufio.Writer) error { return writeFrame(bw, FrameForwardPacket, k[:], k2[:], []byte("x")) },
			"0a 00000041" + khex + k2hex + "78", nil, nil},
		{"WatchConns", func(bw *bufio.Writer) error { return writeFrame(bw, FrameWatchConns) },
			"10 00000000", nil, nil},
		{"ClosePeer", func(bw *bufio.Writer) error { return writeFrame(bw, FrameClosePeer, k[:]) },
			"11 00000020" + khex, nil, nil},
		{"Ping", func(bw *bufio.Writer) error { return writeFrame(bw, FramePing, []byte("01234567")) },
			"12 00000008 3031323334353637",
			func(p []byte) (any, error) { return parsePing8(p) }, [8]byte([]byte("01234567"))},
		{"Pong", func(bw *bufio.Writer) error { return writeFrame(bw, FramePong, []byte("01234567")) },
			"13 00000008 3031323334353637", nil, nil},
		{"Health", func(bw *bufio.Writer) error { return writeFrame(bw, FrameHealth, []byte("bad")) },
			"14 00000003 626164", nil, nil},
		{"Restarting", func(bw *bufio.Writer) error {
			return writeFrame(bw, FrameRestarting, appendRestarting(nil, 1500*time.Millisecond, 10*time.Second))
		}, "15 00000008 000005dc 00002710",
			func(p []byte) (any, error) { return parseRestarting(p) }, ServerRestarting{ReconnectIn: 1500 * time.Millisecond, TryFor: 10 * time.Second}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			bw := bufio.NewWriter(&buf)
			if err := tt.write(bw); err != nil {
				t.Fatal(err)
			}
			bw.Flush()
			want := unhex(tt.want)
			if !bytes.Equal(buf.Bytes(), want) {
				t.Fatalf("wrote\n%x\nwant\n%x", buf.Bytes(), want)
			}
			ft, n, err := readFrameHeader(bufio.NewReader(bytes.NewReader(buf.Bytes())))
			if err != nil || ft != FrameType(want[0]) || int(n) != len(want)-frameHeaderLen {
				t.Fatalf("header: %v %d %v", ft, n, err)
			}
			if tt.parse == nil {
				return
			}
			got, err := tt.parse(want[frameHeaderLen:])
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.msg) {
				t.Fatalf("parsed %+v, want %+v", got, tt.msg)
			}
		})
	}
}

// TestParseOldAndFutureForms checks the lengths older servers sent and that
// trailing bytes a future server may add are ignored.
func TestParseOldAndFutureForms(t *testing.T) {
	var k PublicKey
	k[0] = 9
	if g, err := parsePeerGone(k[:]); err != nil || g.Reason != PeerGoneDisconnected || g.Peer != k {
		t.Errorf("32-byte PeerGone: %+v %v", g, err)
	}
	if g, err := parsePeerGone(append(appendPeerGone(nil, k, 1), 7, 7)); err != nil || g.Reason != 1 {
		t.Errorf("long PeerGone: %+v %v", g, err)
	}
	if p, err := parsePeerPresent(k[:]); err != nil || p.Key != k || p.Addr.IsValid() || p.Flags != 0 {
		t.Errorf("32-byte PeerPresent: %+v %v", p, err)
	}
	ap := netip.MustParseAddrPort("[2001:db8::1]:7")
	full := appendPeerPresent(nil, PeerPresent{Key: k, Addr: ap, Flags: PeerIsProber, AppName: "app"})
	if p, err := parsePeerPresent(full[:50]); err != nil || p.Addr != ap || p.Flags != 0 {
		t.Errorf("50-byte PeerPresent: %+v %v", p, err)
	}
	if p, err := parsePeerPresent(full[:51]); err != nil || p.Addr != ap || p.Flags != PeerIsProber || p.AppName != "" {
		t.Errorf("51-byte PeerPresent (before Tailscale v1.104): %+v %v", p, err)
	}
	if p, err := parsePeerPresent(append(full, 1, 2, 3)); err != nil || p.Addr != ap || p.Flags != PeerIsProber || p.AppName != "app" {
		t.Errorf("long PeerPresent: %+v %v", p, err)
	}
	// An app name cut short or not printable ASCII is dropped; the rest
	// of the message stands.
	for _, bad := range [][]byte{full[:len(full)-1], append(full[:51:51], 3, 'a', 0, 'b'), append(full[:51:51], 40)} {
		if p, err := parsePeerPresent(bad); err != nil || p.Flags != PeerIsProber || p.AppName != "" {
			t.Errorf("PeerPresent %x: %+v %v", bad[51:], p, err)
		}
	}
	// An invalid name is never sent.
	if got := appendPeerPresent(nil, PeerPresent{Key: k, AppName: "bad\nname"}); len(got) != 52 || got[51] != 0 {
		t.Errorf("PeerPresent with an invalid name: %x", got[51:])
	}
	for _, short := range [][]byte{nil, k[:31]} {
		if _, err := parsePeerGone(short); err != errSkip {
			t.Errorf("short PeerGone: %v", err)
		}
		if _, err := parsePeerPresent(short); err != errSkip {
			t.Errorf("short PeerPresent: %v", err)
		}
	}
	if _, err := parsePing8(make([]byte, 7)); err != errSkip {
		t.Errorf("7-byte ping: %v", err)
	}
	if _, err := parseRestarting(make([]byte, 7)); err != errSkip {
		t.Errorf("7-byte restarting: %v", err)
	}
	if k2, err := parseServerKey(append(appendServerKey(nil, k), "future"...)); err != nil || k2 != k {
		t.Errorf("long ServerKey: %v %v", k2, err)
	}
}

func TestFrameTypeString(t *testing.T) {
	for ft, want := range map[FrameType]string{FrameServerKey: "ServerKey", FrameWatchConns: "WatchConns", FrameRestarting: "Restarting", 0x0b: "Unknown(0xb)", 0xff: "Unknown(0xff)"} {
		if got := ft.String(); got != want {
			t.Errorf("%d: %q want %q", ft, got, want)
		}
	}
}

func TestHeaderNoAlloc(t *testing.T) {
	var buf bytes.Buffer
	bw := bufio.NewWriter(&buf)
	br := bufio.NewReader(bytes.NewReader(make([]byte, 1<<20)))
	allocs := testing.AllocsPerRun(1000, func() {
		writeFrameHeader(bw, FrameSendPacket, 1234)
		readFrameHeader(br)
	})
	if allocs != 0 {
		t.Fatalf("%v allocs per header write+read", allocs)
	}
}
