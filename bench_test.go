package relay

import (
	"fmt"
	"net"
	"net/http/httptest"
	"os"
	"runtime"
	"runtime/pprof"
	"testing"
	"time"
)

// BenchmarkSendRecv relays packets from one client to another through a
// server over loopback TCP, closed loop with at most 32 packets in flight
// (so nothing is dropped). allocs/op counts the whole process: sending
// client, server and receiving client.
func BenchmarkSendRecv(b *testing.B) {
	for _, size := range []int{10, 100, 1000, 10000} {
		b.Run(fmt.Sprint(size), func(b *testing.B) { benchSendRecv(b, size) })
	}
}

// BenchmarkSendRecvWebSocket is BenchmarkSendRecv with both clients over
// WebSocket through ServeHTTP (plain HTTP).
func BenchmarkSendRecvWebSocket(b *testing.B) {
	for _, size := range []int{100, 1000, 10000} {
		b.Run(fmt.Sprint(size), func(b *testing.B) {
			s := newTestServer(b)
			srv := serveDERP(b, s, derpServeOpts{plain: true})
			fs := &FastStart{WebSocket: true}
			from, _ := dialFast(b, fs, srv.URL)
			to, _ := dialFast(b, fs, srv.URL)
			benchRelay(b, s, from, to, size)
		})
	}
}

func benchSendRecv(b *testing.B, size int) {
	s := NewServer(mustKey(b))
	addr := tcpServer(b, s)
	from, to := tcpClient(b, addr), tcpClient(b, addr)
	benchRelay(b, s, from, to, size)
}

// benchRelay sends b.N packets of size bytes from one client to the other
// through s, with at most 32 in flight.
func benchRelay(b *testing.B, s *Server, from, to *Client, size int) {
	pkt := make([]byte, size)
	const window = 32
	credits := make(chan struct{}, window)
	for range window {
		credits <- struct{}{}
	}
	done := make(chan error, 1)
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	go func() {
		for got := 0; got < b.N; {
			m, err := to.Recv()
			if err != nil {
				done <- err
				return
			}
			if _, ok := m.(*ReceivedPacket); ok {
				got++
				credits <- struct{}{}
			}
		}
		done <- nil
	}()
	dst := to.PublicKey()
	for range b.N {
		<-credits
		if err := from.Send(dst, pkt); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "pkts/s")
	st := s.Stats()
	for k, v := range st.PacketsDropped {
		if v != 0 {
			b.Fatalf("dropped %d packets (%s) in a lossless benchmark", v, k)
		}
	}
}

// BenchmarkIdleClients measures what an idle logged-in client costs the
// server: heap and stack bytes, and goroutines, per client. The clients are
// bare sockets that wrote a ClientInfo and read nothing, so nearly all the
// memory measured is the server's. "accept" serves them with Accept (whose
// caller's goroutine waits for each session), "http" with ServeHTTP behind
// a net/http server; on Linux their sessions park.
func BenchmarkIdleClients(b *testing.B) {
	for _, via := range []string{"accept", "http", "websocket"} {
		b.Run(via, func(b *testing.B) { benchIdleClients(b, via) })
	}
}

func benchIdleClients(b *testing.B, via string) {
	const n = 2000
	for range b.N {
		b.StopTimer()
		s := NewServer(mustKey(b))
		var addr, request string
		var ts *httptest.Server
		switch via {
		case "http":
			ts = httptest.NewServer(s)
			addr = ts.Listener.Addr().String()
			request = "GET /derp HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n"
		case "websocket":
			ts = httptest.NewServer(s)
			addr = ts.Listener.Addr().String()
			request = "GET /derp HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" +
				"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: derp\r\n\r\n"
		default:
			addr = tcpServer(b, s)
		}
		runtime.GC()
		var before runtime.MemStats
		runtime.ReadMemStats(&before)
		g0 := runtime.NumGoroutine()
		conns := make([]net.Conn, 0, n)
		for range n {
			nc, err := net.Dial("tcp", addr)
			if err != nil {
				b.Fatal(err)
			}
			conns = append(conns, nc)
			login := rawLogin(b, s.PublicKey())
			if via == "websocket" {
				login = wsFrame(0x82, login, false)
			}
			if _, err := nc.Write(append([]byte(request), login...)); err != nil {
				b.Fatal(err)
			}
		}
		deadline := time.Now().Add(30 * time.Second)
		for s.Stats().CurrentConnections < n {
			if time.Now().After(deadline) {
				b.Fatalf("only %d of %d logged in", s.Stats().CurrentConnections, n)
			}
			time.Sleep(10 * time.Millisecond)
		}
		time.Sleep(2 * writerLinger) // writers that sent ServerKey/ServerInfo exit
		// Pooled buffers survive one GC in sync.Pool's victim cache, and
		// each GC halves goroutine stacks that use less than a quarter
		// of their size (the login grew them): measure the steady state
		// a long-lived idle client reaches.
		for range 4 {
			runtime.GC()
		}
		var after runtime.MemStats
		runtime.ReadMemStats(&after)
		g1 := runtime.NumGoroutine()
		mem := float64(after.HeapInuse+after.StackInuse) - float64(before.HeapInuse+before.StackInuse)
		b.ReportMetric(mem/n/1024, "KiB/client")
		b.ReportMetric(float64(g1-g0)/n, "goroutines/client")
		b.ReportMetric((float64(after.StackInuse)-float64(before.StackInuse))/n/1024, "stackKiB/client")
		b.ReportMetric(float64(s.Stats().CurrentParked)/n, "parked/client")
		if f := os.Getenv("RELAY_IDLE_HEAP_PROFILE"); f != "" {
			out, _ := os.Create(f + "." + via)
			pprof.WriteHeapProfile(out)
			out.Close()
		}
		for _, nc := range conns {
			nc.Close()
		}
		s.Close()
		if ts != nil {
			ts.Close()
		}
	}
}

// rawLogin returns a ClientInfo frame for a fresh key, sealed to serverKey.
func rawLogin(tb testing.TB, serverKey PublicKey) []byte {
	priv := mustKey(tb)
	pub := priv.Public()
	shared, err := sharedKey(priv, serverKey)
	if err != nil {
		tb.Fatal(err)
	}
	payload := sealBox(append([]byte{}, pub[:]...), shared, []byte(`{"version":2}`))
	return appendFrame(nil, FrameClientInfo, payload)
}

// TestRelayPathNoAlloc guards what BenchmarkSendRecv shows: relaying a
// packet allocates nothing, in the server or the clients, over TCP and over
// WebSocket. (An occasional allocation of the runtime or a timer rounds
// away over the thousands of packets.)
func TestRelayPathNoAlloc(t *testing.T) {
	if raceEnabled() {
		t.Skip("the race detector's sync.Pool drops items")
	}
	for _, ws := range []bool{false, true} {
		r := testing.Benchmark(func(b *testing.B) {
			s := NewServer(mustKey(b))
			if ws {
				srv := serveDERP(b, s, derpServeOpts{plain: true})
				fs := &FastStart{WebSocket: true}
				from, _ := dialFast(b, fs, srv.URL)
				to, _ := dialFast(b, fs, srv.URL)
				benchRelay(b, s, from, to, 1000)
				return
			}
			addr := tcpServer(b, s)
			benchRelay(b, s, tcpClient(b, addr), tcpClient(b, addr), 1000)
		})
		if r.N < 1000 || r.AllocsPerOp() != 0 {
			t.Errorf("WebSocket %v: %d allocations over %d packets (%d per packet)", ws, r.MemAllocs, r.N, r.AllocsPerOp())
		}
	}
}

// BenchmarkWatcherListTake encodes a watcher's list of 10k connected keys
// and a burst of 4096 PeerGone notices, as its writer takes them (under
// the watcher's mu): per op, everything one watcher is sent.
func BenchmarkWatcherListTake(b *testing.B) {
	s := NewServer(mustKey(b), WithMeshKey(testMeshKey))
	defer s.Close()
	for i := range 10000 {
		addFakeSession(s, &sconn{s: s, key: fakeKey(i), info: ClientInfo{AppName: "tailscaled"}})
	}
	w := &sconn{s: s, writing: true} // no writer goroutine: the benchmark takes
	ws := new(writerState)
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		s.addWatcher(w)
		w.mu.Lock()
		for i := range maxPendingControl {
			w.peerGone = append(w.peerGone, peerGoneItem{PublicKey{byte(i), byte(i >> 8)}, PeerGoneDisconnected})
		}
		w.mu.Unlock()
		b.StartTimer()
		for {
			w.mu.Lock()
			more := w.takeLocked(ws)
			w.mu.Unlock()
			if !more {
				break
			}
		}
	}
}
