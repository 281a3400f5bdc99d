package relay

import (
	"fmt"
	"testing"
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

func benchSendRecv(b *testing.B, size int) {
	s := NewServer(mustKey(b))
	addr := tcpServer(b, s)
	from, to := tcpClient(b, addr), tcpClient(b, addr)
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
