package relay

import (
	"net"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"
)

// pendingLogins counts the server goroutines waiting in a login for the
// client's next bytes.
func pendingLogins() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	c := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "[IO wait") && strings.Contains(g, "relay.(*Server).login(") {
			c++
		}
	}
	return c
}

// TestPendingLoginMemory opens many connections that stop part way into
// their login, as a flood of half-open logins would, and measures what the
// server holds for each while it waits for the rest (up to its login
// timeout): one goroutine, and a few KiB, however much the client
// announced or where it stopped. A client must send bytes to make the
// server keep them.
func TestPendingLoginMemory(t *testing.T) {
	n := 2000
	if testing.Short() {
		n = 500
	}
	// Heap of both ends of the connection (the server's of each, about
	// 3.5 KiB in all, and 16 KiB or more of buffers before they were
	// bounded), and the login goroutine's stack.
	const maxHeap = 6 << 10
	maxStack := 8 << 10
	if raceEnabled() {
		maxStack *= 2 // instrumented frames are larger
	}
	// A WebSocket login keeps net/http's 4 KiB read buffer, which its
	// framing reads through, and reads deeper down the stack.
	const wsHeap, wsStack = 6 << 10, 4 << 10
	upgrade := "GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n"
	fast := "GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n"
	ws := "GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: derp\r\n\r\n"
	cases := []struct {
		name  string
		first string // sent at once
		later []byte // sent once the server's first bytes arrived
		ws    bool   // see below
	}{
		{"101 path, one byte of the ClientInfo header", upgrade, []byte{byte(FrameClientInfo)}, false},
		{"101 path, ClientInfo header announcing 16 KiB", upgrade, frameHeader(FrameClientInfo, 16<<10), false},
		{"WebSocket, one byte of the ClientInfo header", ws, wsFrame(0x82, []byte{byte(FrameClientInfo)}, false), true},
		{"WebSocket, a message header announcing 16 KiB", ws, wsFrame(0x82, make([]byte, 16<<10), false)[:8], true},
		{"fast start, three bytes of the ClientInfo header", fast + string(frameHeader(FrameClientInfo, 16<<10)[:3]), nil, false},
		{"fast start, ClientInfo header announcing 16 KiB and 100 bytes", fast + string(frameHeader(FrameClientInfo, 16<<10)) + strings.Repeat("x", 100), nil, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := NewServer(mustKey(t), WithLoginTimeout(5*time.Minute))
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			hs := &http.Server{Handler: s, ReadHeaderTimeout: time.Minute}
			served := make(chan struct{})
			go func() { hs.Serve(ln); close(served) }()
			t.Cleanup(func() { s.Close(); hs.Close(); <-served })

			conns := make([]net.Conn, 0, n)
			t.Cleanup(func() {
				for _, c := range conns {
					c.Close()
				}
			})
			// What earlier cases left (sessions still ending, buffers in
			// pools) must not count against this one.
			for deadline := time.Now().Add(time.Minute); pendingLogins() > 0; time.Sleep(20 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("logins of an earlier case still waiting")
				}
			}
			runtime.GC()
			runtime.GC() // and what sync.Pool kept for one more cycle
			var m0, m1 runtime.MemStats
			runtime.ReadMemStats(&m0)
			g0 := runtime.NumGoroutine()
			for range n {
				nc, err := net.Dial("tcp", ln.Addr().String())
				if err != nil {
					t.Fatal(err)
				}
				conns = append(conns, nc)
				if _, err := nc.Write([]byte(tc.first)); err != nil {
					t.Fatal(err)
				}
			}
			if tc.later != nil {
				// The server's 101 and ServerKey frame end with the key:
				// once they are in, the login waits for ClientInfo.
				for _, nc := range conns {
					nc.SetReadDeadline(time.Now().Add(time.Minute))
					var buf [512]byte
					got := 0
					for !strings.Contains(string(buf[:got]), "\r\n\r\n") || got < strings.Index(string(buf[:got]), "\r\n\r\n")+4+frameHeaderLen+serverKeyLen {
						k, err := nc.Read(buf[got:])
						if err != nil {
							t.Fatal(err)
						}
						got += k
					}
					if _, err := nc.Write(tc.later); err != nil {
						t.Fatal(err)
					}
				}
			}
			deadline := time.Now().Add(2 * time.Minute)
			for pendingLogins() < n {
				if time.Now().After(deadline) {
					t.Fatalf("%d of %d logins waiting after 2 min", pendingLogins(), n)
				}
				time.Sleep(20 * time.Millisecond)
			}
			// Give the server time to read whatever it was sent: the
			// goroutines wait for more only once they read it all.
			time.Sleep(100 * time.Millisecond)
			runtime.GC()
			runtime.GC()
			runtime.ReadMemStats(&m1)
			g1 := runtime.NumGoroutine()
			heap := (int64(m1.HeapInuse) - int64(m0.HeapInuse)) / int64(n)
			stack := (int64(m1.StackInuse) - int64(m0.StackInuse)) / int64(n)
			t.Logf("%d pending logins: %d bytes of heap and %d of stack each, %.2f goroutines each",
				n, heap, stack, float64(g1-g0)/float64(n))
			wantHeap, wantStack := int64(maxHeap), int64(maxStack)
			if tc.ws {
				wantHeap, wantStack = wantHeap+wsHeap, wantStack+wsStack
			}
			if heap > wantHeap {
				t.Errorf("a pending login holds %d bytes of heap, want at most %d", heap, wantHeap)
			}
			if stack > wantStack {
				t.Errorf("a pending login holds %d bytes of stack, want at most %d", stack, wantStack)
			}
			if g1-g0 > n+n/20 {
				t.Errorf("%d goroutines for %d pending logins", g1-g0, n)
			}
			if got := s.Stats().CurrentConnections; got != 0 {
				t.Errorf("%d connections logged in", got)
			}
		})
	}
}
