package interop

// Side-by-side performance of our server and Tailscale's (issue 7).
//
// Both servers run in child processes (this test binary re-executed to run
// TestPerfServerProcess) pinned to CPU 0 with taskset; the load, one common
// raw DERP client with batched writes (perf_helpers_test.go), runs in this
// process pinned to CPU 1. Slices alternate between the two servers (ABBA),
// so that the machine's drift hits both alike, and results are medians.
//
//	cd interop && go test -run XXX -bench 'SideBySide|IdleMemory' -benchtime 1x -timeout 30m .
//
// Knobs (environment): PERF_REPS (5), PERF_SLICE (1.5s), PERF_WARMUP
// (500ms), PERF_PAIRS (16), PERF_WINDOW (32), PERF_SIZES (100,1200,10000),
// PERF_MODES (closed,deep,open), PERF_DEEP_WINDOW (1024), PERF_CC (the TCP
// congestion control of every socket of the run, client's and servers';
// empty: the system's), PERF_SENDBUF (16384: the SO_SNDBUF of every load
// client socket, fixed; 0: autotuned, see perfSendBuf), PERF_RPS (a diagnostic: "server" or "client" steers
// loopback's receive work to that CPU with RPS for the run, as a NIC whose
// interrupts land there would; "rfs" gives each socket's receive work to the
// CPU of its user, as two hosts on a network; restored after; needs root;
// empty: where the kernel does it, on the sending CPU), PERF_TRANSPORT (http, https or tcp; http), PERF_SERVERS
// (tailscale,ours), PERF_IDLE_CLIENTS (5000), PERF_IDLE_TRANSPORTS
// (http,https,websocket,tcp), PERF_OUT (append the markdown tables to this file),
// PERF_CPUPROFILE (each server child writes a CPU profile of its whole life
// to $PERF_CPUPROFILE.ours / .tailscale), PERF_HEAPPROFILE (the idle
// benchmark's children write a heap profile with all clients connected to
// $PERF_HEAPPROFILE.<transport>.<server>), PERF_RELAYSTATS (our server child
// writes its Stats, with the batch sizes and queue delay, as JSON to
// $PERF_RELAYSTATS.ours when it exits).
//
// Neither benchmark runs without -bench, and TestPerfServerProcess returns
// at once unless PERF_SERVER is set, so plain `go test` only runs
// TestPerfLoadClient, a quick in-process check of the load client.

import (
	"bytes"
	"cmp"
	"fmt"
	"math"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestPerfServerProcess is the server child of the benchmarks below; it does
// nothing unless PERF_SERVER is set.
func TestPerfServerProcess(t *testing.T) {
	which := os.Getenv("PERF_SERVER")
	if which == "" {
		return
	}
	if err := perfServerMain(which, os.Getenv("PERF_TRANSPORT")); err != nil {
		fmt.Fprintln(os.Stderr, "perf server:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// TestPerfLoadClient checks the benchmarks' raw load client against both
// servers, in process: every packet of a short closed-loop run arrives
// intact and in order, and an open-loop run delivers only intact, ordered
// packets (gaps are drops, which it may have).
func TestPerfLoadClient(t *testing.T) {
	checkNoLeaks(t)
	for _, which := range []string{"ours", "tailscale"} {
		for _, transport := range []string{"http", "tcp"} {
			t.Run(which+"/"+transport, func(t *testing.T) {
				sr, err := serveRelay(which, transport)
				if err != nil {
					t.Fatal(err)
				}
				defer sr.close()
				ps := &perfServer{name: which, transport: transport, addr: sr.addr, pub: sr.pub}
				for _, cfg := range []sbsConfig{{size: 100}, {size: 10000}, {size: 1200, open: true}} {
					window := 32
					if cfg.open {
						window = 0
					}
					lr, err := startLoad(ps, 2, cfg.size, window)
					if err != nil {
						t.Fatal(err)
					}
					deadline := time.Now().Add(5 * time.Second)
					for lr.counts().delivered < 200 && time.Now().Before(deadline) {
						time.Sleep(10 * time.Millisecond)
					}
					lr.close()
					c := lr.counts()
					if err := lr.firstErr(); err != nil {
						t.Errorf("%d B %s loop: %v", cfg.size, cfg.mode(), err)
					}
					if c.delivered < 200 || c.bad != 0 || (!cfg.open && c.lost != 0) {
						t.Errorf("%d B %s loop: %+v, want ≥ 200 delivered, none bad, none lost in closed loop", cfg.size, cfg.mode(), c)
					}
				}
			})
		}
	}
}

func envStr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func envInt(tb testing.TB, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		tb.Fatalf("%s=%q: %v", name, v, err)
	}
	return n
}

func envDur(tb testing.TB, name string, def time.Duration) time.Duration {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		tb.Fatalf("%s=%q: %v", name, v, err)
	}
	return d
}

func envList(name, def string) []string {
	return strings.Split(envStr(name, def), ",")
}

// perfOut appends s to $PERF_OUT if set.
func perfOut(s string) {
	if path := os.Getenv("PERF_OUT"); path != "" {
		if f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
			f.WriteString(s)
			f.Close()
		}
	}
}

// serverTitle is how the tables name a server.
func serverTitle(name string) string {
	if name == "tailscale" {
		return "Tailscale"
	}
	return name
}

// ---------------------------------------------------------------------------
// Throughput.

type sbsConfig struct {
	size int
	open bool
	deep int // closed loop with this window instead of PERF_WINDOW, if > 0
}

func (c sbsConfig) mode() string {
	switch {
	case c.open:
		return "open"
	case c.deep > 0:
		return "deep"
	}
	return "closed"
}

// sliceResult is one measured slice against one server.
type sliceResult struct {
	pps       float64 // packets delivered per second
	mbps      float64 // payload MB (1e6 bytes) delivered per second
	sentPps   float64 // packets the senders wrote per second
	dropPct   float64 // lost / (delivered + lost): every gap in a sequence
	cpuPerPkt float64 // server CPU µs per delivered packet
	serverCPU float64 // server CPU, % of one CPU
	clientCPU float64 // load client (this process) CPU, % of one CPU
	// Time the threads of the server and of the client spent runnable but
	// waiting for a CPU, % of the slice: CPU time others took from them.
	serverWait, clientWait float64
}

// runSlice logs in the load pairs, lets them run for warmup, then measures
// for dur.
func runSlice(srv *perfServer, cfg sbsConfig, pairs, window int, warmup, dur time.Duration) (sliceResult, error) {
	var r sliceResult
	srv.waitIdle(3 * time.Second)
	if cfg.open {
		window = 0
	} else if cfg.deep > 0 {
		window = cfg.deep
	}
	lr, err := startLoad(srv, pairs, cfg.size, window)
	if err != nil {
		return r, err
	}
	defer lr.close()
	time.Sleep(warmup)
	sw0, cw0 := procSchedWait(srv.pid), procSchedWait(os.Getpid())
	c0, t0 := lr.counts(), time.Now()
	cpu0, err0 := srv.cpuTicks()
	self0 := selfCPU()
	time.Sleep(dur)
	c1, t1 := lr.counts(), time.Now()
	cpu1, err1 := srv.cpuTicks()
	self1 := selfCPU()
	sw1, cw1 := procSchedWait(srv.pid), procSchedWait(os.Getpid())
	lr.close()
	if err := cmp.Or(err0, err1); err != nil {
		return r, fmt.Errorf("server CPU time: %w", err)
	}
	if err := lr.firstErr(); err != nil {
		return r, err
	}
	if c1.bad > 0 {
		return r, fmt.Errorf("%d packets arrived corrupted, reordered, duplicated or misaddressed", c1.bad)
	}
	secs := t1.Sub(t0).Seconds()
	delivered, lost := float64(c1.delivered-c0.delivered), float64(c1.lost-c0.lost)
	serverCPU := float64(cpu1-cpu0) / clkTck
	r.pps = delivered / secs
	r.mbps = delivered * float64(cfg.size) / secs / 1e6
	r.sentPps = float64(c1.sent-c0.sent) / secs
	if delivered+lost > 0 {
		r.dropPct = 100 * lost / (delivered + lost)
	}
	r.cpuPerPkt = math.Inf(1)
	if delivered > 0 {
		r.cpuPerPkt = serverCPU * 1e6 / delivered
	}
	r.serverCPU = 100 * serverCPU / secs
	r.clientCPU = 100 * (self1 - self0).Seconds() / secs
	r.serverWait = 100 * (sw1 - sw0).Seconds() / secs
	r.clientWait = 100 * (cw1 - cw0).Seconds() / secs
	return r, nil
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func field(rs []sliceResult, f func(sliceResult) float64) []float64 {
	out := make([]float64, len(rs))
	for i, r := range rs {
		out[i] = f(r)
	}
	return out
}

// fmtRate prints a packet rate compactly: 345.6k, 1.23M.
func fmtRate(x float64) string {
	switch {
	case math.IsNaN(x) || math.IsInf(x, 0):
		return "—"
	case x >= 1e6:
		return fmt.Sprintf("%.2fM", x/1e6)
	case x >= 1e4:
		return fmt.Sprintf("%.0fk", x/1e3)
	case x >= 1e3:
		return fmt.Sprintf("%.1fk", x/1e3)
	}
	return fmt.Sprintf("%.0f", x)
}

func fmtNum(x float64) string {
	switch {
	case math.IsNaN(x) || math.IsInf(x, 0):
		return "—"
	case x >= 100:
		return fmt.Sprintf("%.0f", x)
	case x >= 10:
		return fmt.Sprintf("%.1f", x)
	}
	return fmt.Sprintf("%.2f", x)
}

// BenchmarkSideBySide relays packets through our server and Tailscale's,
// each in its own process pinned to CPU 0, with the same raw clients pinned
// to CPU 1: 16 sender/receiver pairs, closed loop (at most 32 packets in
// flight per sender: lossless for both servers), "deep" closed loop (at most
// 1024 in flight: more than TCP's receive window holds, so the senders are
// held back by TCP flow control, as in open loop, yet never outrun the
// server) and open loop (senders never wait), packets of 100, 1200 and
// 10000 bytes, in alternating slices.
// Sub-benchmarks report each server's medians and the ratios ours/Tailscale
// (medians of the ratios of adjacent slices).
func BenchmarkSideBySide(b *testing.B) {
	reps := envInt(b, "PERF_REPS", 5)
	sliceDur := envDur(b, "PERF_SLICE", 1500*time.Millisecond)
	warmup := envDur(b, "PERF_WARMUP", 500*time.Millisecond)
	npairs := envInt(b, "PERF_PAIRS", 16)
	window := envInt(b, "PERF_WINDOW", 32)
	deepWindow := envInt(b, "PERF_DEEP_WINDOW", 1024)
	transport := envStr("PERF_TRANSPORT", "http")
	names := envList("PERF_SERVERS", "tailscale,ours")
	var configs []sbsConfig
	for _, s := range envList("PERF_SIZES", "100,1200,10000") {
		size, err := strconv.Atoi(s)
		if err != nil {
			b.Fatalf("PERF_SIZES: %v", err)
		}
		for _, m := range envList("PERF_MODES", "closed,deep,open") {
			switch m {
			case "closed", "open":
				configs = append(configs, sbsConfig{size: size, open: m == "open"})
			case "deep":
				configs = append(configs, sbsConfig{size: size, deep: deepWindow})
			default:
				b.Fatalf("PERF_MODES: %q", m)
			}
		}
	}
	raiseNoFile(20000)

	servers := make([]*perfServer, len(names))
	for i, name := range names {
		srv, err := startPerfServer(name, transport, 0)
		if err != nil {
			b.Fatal(err)
		}
		defer srv.close()
		servers[i] = srv
	}
	restore, pinned := pinProcess(1)
	defer restore()
	if pinned {
		defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	}
	rps := setLoopbackRPS(b, os.Getenv("PERF_RPS"))
	perfLog(b, fmt.Sprintf("servers pinned to CPU 0: %v (GOMAXPROCS %d); load client pinned to CPU 1: %v; %d CPUs; transport %s; %d pairs, window %d, %v slices after %v warmup, %d repetitions; loopback receive work (RPS): %s\n",
		servers[0].pinned, servers[0].procs, pinned, runtime.NumCPU(), transport, npairs, window, sliceDur, warmup, reps, rps))

	type rkey struct {
		cfg    sbsConfig
		server string
	}
	results := map[rkey][]sliceResult{}
	var log strings.Builder
	for rep := range reps {
		for ci, cfg := range configs {
			order := slices.Clone(servers)
			if (rep+ci)%2 == 1 {
				slices.Reverse(order)
			}
			for _, srv := range order {
				r, err := runSlice(srv, cfg, npairs, window, warmup, sliceDur)
				if err != nil {
					b.Fatalf("rep %d, %d B %s loop, %s: %v", rep+1, cfg.size, cfg.mode(), srv.name, err)
				}
				k := rkey{cfg, srv.name}
				results[k] = append(results[k], r)
				fmt.Fprintf(&log, "rep %d %5d B %-6s %-9s %8s pkts/s (sent %8s/s) %7.1f MB/s  drop %5.1f%%  server %6s µs/pkt  server CPU %3.0f%% (waited %3.0f%%)  client CPU %3.0f%% (waited %3.0f%%)\n",
					rep+1, cfg.size, cfg.mode(), srv.name, fmtRate(r.pps), fmtRate(r.sentPps), r.mbps, r.dropPct, fmtNum(r.cpuPerPkt), r.serverCPU, r.serverWait, r.clientCPU, r.clientWait)
			}
		}
	}
	perfLog(b, "slices:\n"+log.String())

	// Medians and paired ratios.
	var tbl strings.Builder
	fmt.Fprintf(&tbl, "\nSide by side, %s on 127.0.0.1, %d pairs, medians of %d interleaved %v slices (server pinned to CPU 0: %v, client to CPU 1: %v):\n\n",
		transport, npairs, reps, sliceDur, servers[0].pinned, pinned)
	hdr := "| size | mode |"
	sep := "| --- | --- |"
	for _, col := range []string{"pkts/s", "MB/s", "drop %", "server CPU µs/pkt"} {
		for _, n := range names {
			hdr += " " + serverTitle(n) + " " + col + " |"
			sep += " ---: |"
		}
		if col == "pkts/s" || col == "server CPU µs/pkt" {
			if len(names) == 2 {
				hdr += " " + serverTitle(names[1]) + "/" + serverTitle(names[0]) + " |"
				sep += " ---: |"
			}
		}
	}
	fmt.Fprintf(&tbl, "%s\n%s\n", hdr, sep)
	var rng strings.Builder
	fmt.Fprintf(&rng, "\nRanges over the repetitions: min–max pkts/s; medians of server and load-client CPU use, and of the time their threads waited, runnable, for a CPU other processes held (%% of one CPU):\n\n| size | mode | server | pkts/s min–max | server CPU | server waited | client CPU | client waited |\n| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |\n")
	ratio := func(cfg sbsConfig, f func(sliceResult) float64) float64 {
		a, c := results[rkey{cfg, names[0]}], results[rkey{cfg, names[1]}]
		var rs []float64
		for i := range min(len(a), len(c)) {
			rs = append(rs, f(c[i])/f(a[i]))
		}
		return median(rs)
	}
	for _, cfg := range configs {
		row := fmt.Sprintf("| %d B | %s |", cfg.size, cfg.mode())
		cols := []func(sliceResult) float64{
			func(r sliceResult) float64 { return r.pps },
			func(r sliceResult) float64 { return r.mbps },
			func(r sliceResult) float64 { return r.dropPct },
			func(r sliceResult) float64 { return r.cpuPerPkt },
		}
		for ci, f := range cols {
			for _, n := range names {
				v := median(field(results[rkey{cfg, n}], f))
				switch ci {
				case 0:
					row += " " + fmtRate(v) + " |"
				case 2:
					row += fmt.Sprintf(" %.1f |", v)
				default:
					row += " " + fmtNum(v) + " |"
				}
			}
			if len(names) == 2 && (ci == 0 || ci == 3) {
				row += fmt.Sprintf(" %.2f× |", ratio(cfg, f))
			}
		}
		fmt.Fprintln(&tbl, row)
		for _, n := range names {
			rs := results[rkey{cfg, n}]
			pps := field(rs, func(r sliceResult) float64 { return r.pps })
			fmt.Fprintf(&rng, "| %d B | %s | %s | %s–%s | %.0f%% | %.0f%% | %.0f%% | %.0f%% |\n", cfg.size, cfg.mode(), serverTitle(n),
				fmtRate(slices.Min(pps)), fmtRate(slices.Max(pps)),
				median(field(rs, func(r sliceResult) float64 { return r.serverCPU })),
				median(field(rs, func(r sliceResult) float64 { return r.serverWait })),
				median(field(rs, func(r sliceResult) float64 { return r.clientCPU })),
				median(field(rs, func(r sliceResult) float64 { return r.clientWait })))
		}
	}
	perfLog(b, tbl.String()+rng.String())
	perfOut(tbl.String() + rng.String())

	var sizes []int
	for _, cfg := range configs {
		if !slices.Contains(sizes, cfg.size) {
			sizes = append(sizes, cfg.size)
		}
	}
	for _, size := range sizes {
		b.Run(fmt.Sprintf("size=%d", size), func(b *testing.B) {
			for _, cfg := range configs {
				if cfg.size != size {
					continue
				}
				b.Run("mode="+cfg.mode(), func(b *testing.B) {
					for _, n := range names {
						rs := results[rkey{cfg, n}]
						b.Run("server="+n, func(b *testing.B) {
							b.ReportMetric(0, "ns/op")
							b.ReportMetric(median(field(rs, func(r sliceResult) float64 { return r.pps })), "pkts/s")
							b.ReportMetric(median(field(rs, func(r sliceResult) float64 { return r.mbps })), "MB/s")
							b.ReportMetric(median(field(rs, func(r sliceResult) float64 { return r.dropPct })), "drop%")
							b.ReportMetric(median(field(rs, func(r sliceResult) float64 { return r.cpuPerPkt })), "server-CPU-µs/pkt")
							b.ReportMetric(median(field(rs, func(r sliceResult) float64 { return r.serverCPU })), "server-CPU%")
							b.ReportMetric(median(field(rs, func(r sliceResult) float64 { return r.clientCPU })), "client-CPU%")
						})
					}
					if len(names) == 2 {
						b.Run("ratio="+names[1]+"/"+names[0], func(b *testing.B) {
							b.ReportMetric(0, "ns/op")
							b.ReportMetric(ratio(cfg, func(r sliceResult) float64 { return r.pps }), "x-pkts/s")
							b.ReportMetric(ratio(cfg, func(r sliceResult) float64 { return r.cpuPerPkt }), "x-CPU/pkt")
						})
					}
				})
			}
		})
	}
}

// perfLog logs s with b.Logf and, as the log of a benchmark that has
// sub-benchmarks is shown only with -v, also prints it otherwise.
func perfLog(b *testing.B, s string) {
	b.Helper()
	b.Logf("%s", s)
	if !testing.Verbose() {
		fmt.Print(s)
	}
}

// ---------------------------------------------------------------------------
// Idle memory.

type idleResult struct {
	n                   int
	kibPerClient        float64 // (HeapInuse+StackInuse) growth / n
	stackKiBPerClient   float64
	rssKiBPerClient     float64
	goroutinesPerClient float64
	loginsPerSec        float64
}

// measureIdle starts a fresh server child, logs in n raw clients that then
// do nothing (this process keeps only their sockets: no goroutine, no
// buffer), and reads the child's memory and goroutines before and after,
// each time after collecting garbage.
func measureIdle(name, transport string, n int) (idleResult, error) {
	r := idleResult{n: n}
	srv, err := startPerfServer(name, transport, 0)
	if err != nil {
		return r, err
	}
	defer srv.close()
	// Warm up: a few logins, so state created on first use is in the baseline.
	for range 4 {
		rc, err := dialRaw(srv.addr, transport, srv.pub)
		if err != nil {
			return r, err
		}
		rc.nc.Close()
	}
	time.Sleep(time.Second)
	before, err := srv.stats(true)
	if err != nil {
		return r, err
	}
	conns := make([]*rawConn, n)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		ferr error
	)
	start := time.Now()
	const workers = 8
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += workers {
				rc, err := dialRaw(srv.addr, transport, srv.pub)
				if err != nil {
					mu.Lock()
					ferr = fmt.Errorf("client %d: %w", i, err)
					mu.Unlock()
					return
				}
				rc.rest = nil
				conns[i] = rc
			}
		}()
	}
	wg.Wait()
	r.loginsPerSec = float64(n) / time.Since(start).Seconds()
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.nc.Close()
			}
		}
	}()
	if ferr != nil {
		return r, ferr
	}
	// Let writers that sent ServerKey/ServerInfo finish and linger out,
	// and our idle sessions park (after 5 s by default).
	time.Sleep(7 * time.Second)
	after, err := srv.stats(true)
	if err != nil {
		return r, err
	}
	if path := os.Getenv("PERF_HEAPPROFILE"); path != "" {
		if err := srv.heapProfile(fmt.Sprintf("%s.%s.%s", path, transport, name)); err != nil {
			return r, err
		}
	}
	fn := float64(n)
	r.kibPerClient = (float64(after.HeapInuse+after.StackInuse) - float64(before.HeapInuse+before.StackInuse)) / fn / 1024
	r.stackKiBPerClient = (float64(after.StackInuse) - float64(before.StackInuse)) / fn / 1024
	r.rssKiBPerClient = float64(after.RSSKiB-before.RSSKiB) / fn
	r.goroutinesPerClient = float64(after.Goroutines-before.Goroutines) / fn
	return r, nil
}

// BenchmarkIdleMemory logs in 5,000 idle clients to each server, each in
// its own fresh child process, and reports the server's memory (heap +
// stack from runtime.MemStats after GC, and VmRSS) and goroutines per client.
func BenchmarkIdleMemory(b *testing.B) {
	n := envInt(b, "PERF_IDLE_CLIENTS", 5000)
	names := envList("PERF_SERVERS", "tailscale,ours")
	if lim := raiseNoFile(20000); lim < uint64(n)+1000 {
		b.Skipf("RLIMIT_NOFILE is %d, need %d", lim, n+1000)
	}
	type rkey struct{ transport, server string }
	results := map[rkey]idleResult{}
	transports := envList("PERF_IDLE_TRANSPORTS", "http,https,websocket,tcp")
	for _, tr := range transports {
		b.Run("transport="+tr, func(b *testing.B) {
			for _, name := range names {
				b.Run("server="+name, func(b *testing.B) {
					k := rkey{tr, name}
					r, ok := results[k]
					if !ok {
						var err error
						r, err = measureIdle(name, tr, n)
						if err != nil {
							b.Fatal(err)
						}
						results[k] = r
					}
					b.ReportMetric(0, "ns/op")
					b.ReportMetric(r.kibPerClient, "KiB/client")
					b.ReportMetric(r.stackKiBPerClient, "stackKiB/client")
					b.ReportMetric(r.rssKiBPerClient, "RSS-KiB/client")
					b.ReportMetric(r.goroutinesPerClient, "goroutines/client")
				})
			}
		})
	}
	if len(results) == 0 {
		return
	}
	var tbl strings.Builder
	fmt.Fprintf(&tbl, "\nIdle clients: %d raw logged-in clients that do nothing, server in a fresh process; heap+stack from runtime.MemStats after GC, VmRSS from /proc:\n\n", n)
	fmt.Fprintf(&tbl, "| transport | server | KiB/client (heap+stack) | of which stack | RSS KiB/client | goroutines/client | logins/s |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |\n")
	for _, tr := range transports {
		for _, name := range names {
			r, ok := results[rkey{tr, name}]
			if !ok {
				continue
			}
			fmt.Fprintf(&tbl, "| %s | %s | %.2f | %.2f | %.2f | %.2f | %.0f |\n", tr, serverTitle(name), r.kibPerClient, r.stackKiBPerClient, r.rssKiBPerClient, r.goroutinesPerClient, r.loginsPerSec)
		}
	}
	perfLog(b, tbl.String())
	perfOut(tbl.String())
}

// The files that steer loopback's receive processing: the CPUs RPS may use,
// and the flow tables RFS needs to follow each socket's reader.
const (
	loopbackRPS      = "/sys/class/net/lo/queues/rx-0/rps_cpus"
	loopbackFlowCnt  = "/sys/class/net/lo/queues/rx-0/rps_flow_cnt"
	rpsSockFlowTable = "/proc/sys/net/core/rps_sock_flow_entries"
)

// setLoopbackRPS places loopback's receive processing for the rest of the
// benchmark, and restores the old settings when it ends:
//
//   - "" leaves the kernel's default: the sending CPU does it, so a sender's
//     CPU also does the receiver's TCP work;
//   - "server" or "client" steers all of it to the server's CPU (0) or the
//     load client's (1) with RPS, as a NIC whose interrupts land there would;
//   - "rfs" steers each packet to the CPU of the process that last used its
//     socket (RFS), so each side does its own receive work, and a sender
//     whose window reopens transmits from its own CPU: the placement of two
//     hosts on a network.
//
// It returns a description for the log.
func setLoopbackRPS(b *testing.B, where string) string {
	settings := map[string]string{}
	var desc string
	switch where {
	case "":
		return "default (on the sending CPU)"
	case "server":
		settings[loopbackRPS], desc = "1", "the server's CPU 0"
	case "client":
		settings[loopbackRPS], desc = "2", "the client's CPU 1"
	case "rfs":
		settings[loopbackRPS] = "3"
		settings[loopbackFlowCnt] = "32768"
		settings[rpsSockFlowTable] = "32768"
		desc = "the CPU of each socket's user (RFS)"
	default:
		b.Fatalf("PERF_RPS=%q: want server, client or rfs", where)
	}
	// The global table first, the queue's mask last, so RPS never runs
	// half set up; restore in the opposite order.
	for _, path := range []string{rpsSockFlowTable, loopbackFlowCnt, loopbackRPS} {
		v, ok := settings[path]
		if !ok {
			continue
		}
		old, err := os.ReadFile(path)
		if err != nil {
			b.Fatalf("PERF_RPS: %v", err)
		}
		if err := os.WriteFile(path, []byte(v), 0); err != nil {
			b.Fatalf("PERF_RPS: %v (needs root)", err)
		}
		b.Cleanup(func() {
			if err := os.WriteFile(path, bytes.TrimSpace(old), 0); err != nil {
				b.Errorf("restore %s to %q: %v", path, bytes.TrimSpace(old), err)
			}
		})
	}
	return desc
}
