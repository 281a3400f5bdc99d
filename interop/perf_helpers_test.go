package interop

// The side-by-side harness (perf_test.go): a cheap raw DERP load client, the
// server subprocess (ours or Tailscale's, pinned to one CPU) and its control
// protocol, and CPU/memory readings from /proc.

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/crypto/nacl/box"
	"golang.org/x/sys/unix"
	"tailscale.com/derp/derpserver"
	"tailscale.com/net/wsconn"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/fastderp/relay"
)

// ---------------------------------------------------------------------------
// Raw DERP load client: no relay.Client, no derp.Client, just frames.

const (
	frameHdrLen = 5
	keyLen      = 32
	// loadBatch is how many bytes of frames a sender writes per syscall.
	loadBatch = 64 << 10
	// loadReadBuf is how many bytes a receiver reads per syscall at most.
	loadReadBuf = 256 << 10
)

var serverKeyMagic = []byte("DERP🔑") // 8 bytes

// rawConn is a logged-in DERP connection driven by hand.
type rawConn struct {
	nc   net.Conn // *net.TCPConn, *tls.Conn for https, a wsconn for websocket
	pub  relay.PublicKey
	rest []byte // bytes read past the ServerInfo frame during login
}

// upgradeRequest is the HTTP upgrade both servers accept; with fast start
// neither answers with a 101, so the DERP frames follow at once and the
// ClientInfo frame can leave in the same segment as the request.
const upgradeRequest = "GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n"

// clientInfoFrame returns a ClientInfo frame for priv, sealed to serverPub
// with NaCl box, as a Tailscale client writes it.
func clientInfoFrame(priv relay.PrivateKey, serverPub relay.PublicKey) []byte {
	pub := priv.Public()
	var nonce [24]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		panic(err)
	}
	msg := []byte(`{"version":2}`)
	payloadLen := keyLen + len(nonce) + len(msg) + box.Overhead
	f := make([]byte, frameHdrLen, frameHdrLen+payloadLen)
	f[0] = byte(relay.FrameClientInfo)
	binary.BigEndian.PutUint32(f[1:], uint32(payloadLen))
	f = append(f, pub[:]...)
	f = append(f, nonce[:]...)
	f = box.Seal(f, msg, &nonce, (*[32]byte)(&serverPub), (*[32]byte)(&priv))
	return f
}

// dialRaw connects to a perf server, logs in with a fresh key and waits for
// the ServerInfo frame (both servers send it after registering the client,
// so packets sent to it from then on are routed). No goroutine and no buffer
// outlive the call.
func dialRaw(addr, transport string, serverPub relay.PublicKey) (*rawConn, error) {
	priv, err := relay.GeneratePrivateKey()
	if err != nil {
		return nil, err
	}
	if transport == "websocket" {
		// As Tailscale's js/wasm client connects: coder/websocket with
		// the derp subprotocol, binary messages through wsconn.
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		wc, _, err := websocket.Dial(ctx, "http://"+addr+"/derp", &websocket.DialOptions{
			Subprotocols: []string{"derp"},
			HTTPClient:   &http.Client{Transport: &http.Transport{DisableKeepAlives: true}},
		})
		if err != nil {
			return nil, err
		}
		return rawLogin(wsconn.NetConn(context.Background(), wc, websocket.MessageBinary, addr), priv, "", serverPub)
	}
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	if cc := os.Getenv("PERF_CC"); cc != "" {
		if err := setCongestion(c, cc); err != nil {
			c.Close()
			return nil, err
		}
	}
	if n := perfSockBuf(); n > 0 {
		// Fixed buffers (no autotuning) on every client socket.
		tc := c.(*net.TCPConn)
		if err := errors.Join(tc.SetReadBuffer(n), tc.SetWriteBuffer(n)); err != nil {
			c.Close()
			return nil, err
		}
	}
	if n := perfSendBuf(); n > 0 && perfSockBuf() == 0 {
		// A fixed send buffer of the kernel's initial size: a sender
		// that outruns the server keeps its backlog in its own process
		// and transmits it itself when woken, as a sender on another
		// machine would, instead of leaving megabytes queued on its
		// socket for the server's window updates to transmit on the
		// server's CPU.
		if err := c.(*net.TCPConn).SetWriteBuffer(n); err != nil {
			c.Close()
			return nil, err
		}
	}
	var nc net.Conn = c
	if transport == "https" {
		tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true, ServerName: "127.0.0.1"})
		tc.SetDeadline(time.Now().Add(15 * time.Second))
		if err := tc.Handshake(); err != nil {
			c.Close()
			return nil, err
		}
		nc = tc
	}
	request := ""
	if transport == "http" || transport == "https" {
		request = upgradeRequest
	}
	return rawLogin(nc, priv, request, serverPub)
}

// rawLogin writes request (if any) and a ClientInfo over nc, and reads up
// to the ServerInfo.
func rawLogin(nc net.Conn, priv relay.PrivateKey, request string, serverPub relay.PublicKey) (*rawConn, error) {
	rc := &rawConn{nc: nc, pub: priv.Public()}
	out := append([]byte(request), clientInfoFrame(priv, serverPub)...)
	nc.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := nc.Write(out); err != nil {
		nc.Close()
		return nil, err
	}
	buf := make([]byte, 0, 1024)
	for {
		// Parse what we have.
		for len(buf) >= frameHdrLen {
			t := relay.FrameType(buf[0])
			n := int(binary.BigEndian.Uint32(buf[1:]))
			if n > 64<<10 {
				nc.Close()
				return nil, fmt.Errorf("login: %v frame of %d bytes", t, n)
			}
			if len(buf) < frameHdrLen+n {
				break
			}
			p := buf[frameHdrLen : frameHdrLen+n]
			switch t {
			case relay.FrameServerKey:
				if n < 8+keyLen || string(p[:8]) != string(serverKeyMagic) || relay.PublicKey(p[8:8+keyLen]) != serverPub {
					nc.Close()
					return nil, fmt.Errorf("login: bad ServerKey frame %x", p)
				}
			case relay.FrameServerInfo:
				rc.rest = append([]byte(nil), buf[frameHdrLen+n:]...)
				nc.SetDeadline(time.Time{})
				return rc, nil
			}
			buf = append(buf[:0], buf[frameHdrLen+n:]...)
		}
		if len(buf) == cap(buf) {
			buf = append(buf, make([]byte, len(buf))...)[:len(buf)]
		}
		m, err := nc.Read(buf[len(buf):cap(buf)])
		if err != nil {
			nc.Close()
			if len(buf) > 0 && strings.HasPrefix(string(buf), "HTTP/") {
				return nil, fmt.Errorf("login: server answered %q: %v", firstLine(buf), err)
			}
			return nil, fmt.Errorf("login: %w", err)
		}
		buf = buf[:len(buf)+m]
		if strings.HasPrefix(string(buf), "HTTP/") {
			// Fast start was not honoured: skip the response head.
			i := strings.Index(string(buf), "\r\n\r\n")
			if i < 0 {
				continue
			}
			if !strings.HasPrefix(string(buf), "HTTP/1.1 101") {
				nc.Close()
				return nil, fmt.Errorf("login: server answered %q", firstLine(buf))
			}
			buf = append(buf[:0], buf[i+4:]...)
		}
	}
}

// perfSockBuf is PERF_SOCKBUF: if set, the SO_RCVBUF and SO_SNDBUF of
// every socket of a run, clients' and server's (the kernel doubles it, and
// turns autotuning off), to see what the amount of data waiting on loopback
// costs.
func perfSockBuf() int {
	n, _ := strconv.Atoi(os.Getenv("PERF_SOCKBUF"))
	return n
}

// perfSendBuf is PERF_SENDBUF: the SO_SNDBUF of every load-client socket
// (default 16384, the kernel's initial size, which it doubles and no longer
// autotunes; 0 leaves the buffers to autotuning, up to 4 MB each here).
// PERF_SOCKBUF, when set, overrides it.
func perfSendBuf() int {
	v, ok := os.LookupEnv("PERF_SENDBUF")
	if !ok {
		return 16384
	}
	n, _ := strconv.Atoi(v)
	return n
}

// setCongestion sets c's TCP congestion control algorithm (TCP_CONGESTION).
func setCongestion(c net.Conn, name string) error {
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION, name)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("TCP_CONGESTION %q: %w", name, serr)
	}
	return nil
}

func firstLine(b []byte) string {
	s, _, _ := strings.Cut(string(b), "\r\n")
	return s
}

// loadPair is one sender and one receiver connection. The sender writes
// SendPacket frames for the receiver in batches of up to loadBatch bytes; the
// receiver reads up to loadReadBuf bytes per syscall and checks every
// packet: source key, length, and a sequence number at both ends of the
// payload (the tail holds its complement), so a truncated, corrupted,
// duplicated or reordered packet is caught and every gap in the sequence is
// a packet the server dropped.
type loadPair struct {
	snd, rcv *rawConn
	size     int
	window   int // packets in flight at most; 0: open loop, never wait

	sent      atomic.Int64 // packets written to the socket
	delivered atomic.Int64 // packets received intact
	lost      atomic.Int64 // sequence numbers skipped: dropped by the server
	acked     atomic.Int64 // delivered + lost, for the closed-loop window
	bad       atomic.Int64 // corrupted, reordered, duplicated, misaddressed
	wake      chan struct{}

	errMu sync.Mutex
	err   error
}

func (p *loadPair) setErr(err error) {
	p.errMu.Lock()
	if p.err == nil {
		p.err = err
	}
	p.errMu.Unlock()
}

// loadRun is one slice's clients.
type loadRun struct {
	pairs  []*loadPair
	stop   atomic.Bool
	stopCh chan struct{}
	wg     sync.WaitGroup
}

// startLoad logs in n pairs against srv and starts them.
func startLoad(srv *perfServer, n, size, window int) (*loadRun, error) {
	if size < 16 {
		return nil, fmt.Errorf("packet size %d < 16", size)
	}
	lr := &loadRun{stopCh: make(chan struct{})}
	for range n {
		snd, err := dialRaw(srv.addr, srv.transport, srv.pub)
		if err != nil {
			lr.close()
			return nil, err
		}
		rcv, err := dialRaw(srv.addr, srv.transport, srv.pub)
		if err != nil {
			snd.nc.Close()
			lr.close()
			return nil, err
		}
		lr.pairs = append(lr.pairs, &loadPair{snd: snd, rcv: rcv, size: size, window: window, wake: make(chan struct{}, 1)})
	}
	for _, p := range lr.pairs {
		lr.wg.Add(3)
		go func() { defer lr.wg.Done(); p.receive(lr) }()
		go func() { defer lr.wg.Done(); p.drain(lr) }()
		go func() { defer lr.wg.Done(); p.send(lr) }()
	}
	return lr, nil
}

// close stops the senders, closes every connection and waits for the
// goroutines.
func (lr *loadRun) close() {
	if lr.stop.Swap(true) {
		return
	}
	close(lr.stopCh)
	for _, p := range lr.pairs {
		p.snd.nc.Close()
		p.rcv.nc.Close()
	}
	lr.wg.Wait()
}

// loadCounts is a snapshot of a run's counters.
type loadCounts struct {
	sent, delivered, lost, bad int64
}

func (lr *loadRun) counts() loadCounts {
	var c loadCounts
	for _, p := range lr.pairs {
		c.sent += p.sent.Load()
		c.delivered += p.delivered.Load()
		c.lost += p.lost.Load()
		c.bad += p.bad.Load()
	}
	return c
}

func (lr *loadRun) firstErr() error {
	for _, p := range lr.pairs {
		p.errMu.Lock()
		err := p.err
		p.errMu.Unlock()
		if err != nil {
			return err
		}
	}
	return nil
}

func (p *loadPair) send(lr *loadRun) {
	frameLen := frameHdrLen + keyLen + p.size
	tmpl := make([]byte, frameLen)
	tmpl[0] = byte(relay.FrameSendPacket)
	binary.BigEndian.PutUint32(tmpl[1:], uint32(keyLen+p.size))
	copy(tmpl[frameHdrLen:], p.rcv.pub[:])
	for i := frameHdrLen + keyLen; i < frameLen; i++ {
		tmpl[i] = byte(i * 7)
	}
	perBatch := max(1, loadBatch/frameLen)
	buf := make([]byte, 0, perBatch*frameLen)
	var seq uint64
	for !lr.stop.Load() {
		n := perBatch
		if p.window > 0 {
			for {
				avail := p.window - int(int64(seq)-p.acked.Load())
				if avail > 0 {
					n = min(n, avail)
					break
				}
				select {
				case <-p.wake:
				case <-lr.stopCh:
					return
				}
			}
		}
		buf = buf[:0]
		for range n {
			off := len(buf)
			buf = append(buf, tmpl...)
			pl := buf[off+frameHdrLen+keyLen:]
			binary.LittleEndian.PutUint64(pl, seq)
			binary.LittleEndian.PutUint64(pl[len(pl)-8:], ^seq)
			seq++
		}
		if _, err := p.snd.nc.Write(buf); err != nil {
			if !lr.stop.Load() {
				p.setErr(fmt.Errorf("send: %w", err))
			}
			return
		}
		p.sent.Add(int64(n))
	}
}

// drain reads and discards whatever the server sends the sender connection
// (KeepAlives, pings).
func (p *loadPair) drain(lr *loadRun) {
	var buf [4096]byte
	for {
		if _, err := p.snd.nc.Read(buf[:]); err != nil {
			if !lr.stop.Load() {
				p.setErr(fmt.Errorf("sender conn read: %w", err))
			}
			return
		}
	}
}

func (p *loadPair) receive(lr *loadRun) {
	buf := make([]byte, loadReadBuf)
	end := copy(buf, p.rcv.rest)
	start := 0
	var expect uint64
	src := p.snd.pub
	for {
		var delivered, lost, bad int64
		for end-start >= frameHdrLen {
			t := relay.FrameType(buf[start])
			n := int(binary.BigEndian.Uint32(buf[start+1:]))
			if n > len(buf)-frameHdrLen {
				p.setErr(fmt.Errorf("receive: %v frame of %d bytes", t, n))
				return
			}
			if end-start < frameHdrLen+n {
				break
			}
			if t == relay.FrameRecvPacket {
				f := buf[start+frameHdrLen : start+frameHdrLen+n]
				pl := f[min(keyLen, len(f)):]
				if len(f) < keyLen || relay.PublicKey(f[:keyLen]) != src || len(pl) != p.size {
					bad++
				} else if seq := binary.LittleEndian.Uint64(pl); binary.LittleEndian.Uint64(pl[len(pl)-8:]) != ^seq || seq < expect {
					bad++
				} else {
					lost += int64(seq - expect)
					expect = seq + 1
					delivered++
				}
			}
			start += frameHdrLen + n
		}
		if delivered+lost+bad > 0 {
			p.delivered.Add(delivered)
			p.lost.Add(lost)
			p.bad.Add(bad)
			p.acked.Add(delivered + lost)
			select {
			case p.wake <- struct{}{}:
			default:
			}
		}
		if start == end {
			start, end = 0, 0
		} else if len(buf)-end < 64<<10 {
			end = copy(buf, buf[start:end])
			start = 0
		}
		m, err := p.rcv.nc.Read(buf[end:])
		if err != nil {
			if !lr.stop.Load() {
				p.setErr(fmt.Errorf("receive: %w", err))
			}
			return
		}
		end += m
	}
}

// ---------------------------------------------------------------------------
// The server subprocess.

// perfServer is a server (ours or Tailscale's) running in a child process
// (the test binary re-executed to run TestPerfServerProcess), pinned to one
// CPU when taskset exists.
type perfServer struct {
	name      string // "ours" or "tailscale"
	transport string // "http" or "tcp"
	addr      string
	pub       relay.PublicKey
	pid       int
	procs     int // the child's GOMAXPROCS
	pinned    bool

	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
	mu    sync.Mutex
}

// startPerfServer starts a server subprocess. cpu < 0: not pinned.
func startPerfServer(name, transport string, cpu int, extraEnv ...string) (*perfServer, error) {
	args := []string{"-test.run=^TestPerfServerProcess$", "-test.count=1"}
	var cmd *exec.Cmd
	pinned := false
	if tp, err := exec.LookPath("taskset"); err == nil && cpu >= 0 && runtime.NumCPU() > cpu {
		cmd = exec.Command(tp, append([]string{"-c", strconv.Itoa(cpu), os.Args[0]}, args...)...)
		pinned = true
	} else {
		cmd = exec.Command(os.Args[0], args...)
	}
	cmd.Env = append(os.Environ(), "PERF_SERVER="+name, "PERF_TRANSPORT="+transport)
	cmd.Env = append(cmd.Env, extraEnv...)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	ps := &perfServer{name: name, transport: transport, cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout), pinned: pinned}
	line, err := ps.readLine("READY ", 30*time.Second)
	if err != nil {
		ps.close()
		return nil, fmt.Errorf("%s server: %w", name, err)
	}
	// READY <addr> <pubhex> <pid> <gomaxprocs>
	f := strings.Fields(line)
	if len(f) != 5 {
		ps.close()
		return nil, fmt.Errorf("%s server: bad READY line %q", name, line)
	}
	ps.addr = f[1]
	kb, err := hex.DecodeString(f[2])
	if err != nil || len(kb) != keyLen {
		ps.close()
		return nil, fmt.Errorf("%s server: bad key in %q", name, line)
	}
	ps.pub = relay.PublicKey(kb)
	ps.pid, _ = strconv.Atoi(f[3])
	ps.procs, _ = strconv.Atoi(f[4])
	return ps, nil
}

// readLine returns the next stdout line of the child that starts with
// prefix, skipping others.
func (ps *perfServer) readLine(prefix string, timeout time.Duration) (string, error) {
	type res struct {
		s   string
		err error
	}
	ch := make(chan res, 1)
	go func() {
		for {
			s, err := ps.out.ReadString('\n')
			if err != nil {
				ch <- res{err: fmt.Errorf("child stdout: %w", err)}
				return
			}
			if strings.HasPrefix(s, prefix) {
				ch <- res{s: strings.TrimSpace(s)}
				return
			}
		}
	}()
	select {
	case r := <-ch:
		return r.s, r.err
	case <-time.After(timeout):
		ps.cmd.Process.Kill()
		return "", errors.New("timed out waiting for " + strings.TrimSpace(prefix))
	}
}

// perfStats is what the child reports on "stats" and "gc".
type perfStats struct {
	Goroutines int    `json:"goroutines"`
	HeapInuse  uint64 `json:"heapInuse"`
	StackInuse uint64 `json:"stackInuse"`
	HeapAlloc  uint64 `json:"heapAlloc"`
	Sys        uint64 `json:"sys"`
	NumGC      uint32 `json:"numGC"`
	RSSKiB     int64  `json:"-"` // VmRSS from /proc/<pid>/status, read by the parent
}

// stats asks the child for its runtime stats; with gc it first collects
// garbage (several times, so pooled buffers and shrinkable stacks are gone)
// and returns freed memory to the OS.
func (ps *perfServer) stats(gc bool) (perfStats, error) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	cmd := "stats\n"
	if gc {
		cmd = "gc\n"
	}
	var st perfStats
	if _, err := io.WriteString(ps.stdin, cmd); err != nil {
		return st, err
	}
	line, err := ps.readLine("STATS ", 60*time.Second)
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "STATS ")), &st); err != nil {
		return st, err
	}
	st.RSSKiB, err = procRSSKiB(ps.pid)
	return st, err
}

// heapProfile makes the child write a heap profile (after a GC) to path.
func (ps *perfServer) heapProfile(path string) error {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if _, err := io.WriteString(ps.stdin, "heapprofile "+path+"\n"); err != nil {
		return err
	}
	line, err := ps.readLine("HEAPPROFILE ", 60*time.Second)
	if err != nil {
		return err
	}
	if res := strings.TrimPrefix(line, "HEAPPROFILE "); res != "<nil>" {
		return errors.New(res)
	}
	return nil
}

// cpuTicks returns the child's utime+stime in clock ticks.
func (ps *perfServer) cpuTicks() (int64, error) { return procCPUTicks(ps.pid) }

// waitIdle waits (at most max) until the child used no CPU tick over 100 ms:
// the previous slice's connections are torn down.
func (ps *perfServer) waitIdle(max time.Duration) {
	deadline := time.Now().Add(max)
	prev, _ := ps.cpuTicks()
	for time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		cur, err := ps.cpuTicks()
		if err != nil || float64(cur-prev)/clkTck < 0.005 {
			return
		}
		prev = cur
	}
}

func (ps *perfServer) close() {
	if ps.stdin != nil {
		io.WriteString(ps.stdin, "quit\n")
		ps.stdin.Close()
	}
	done := make(chan struct{})
	go func() { ps.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		ps.cmd.Process.Kill()
		<-done
	}
}

// clkTck is USER_HZ, the unit of /proc/<pid>/stat's utime and stime: 100 on
// every Linux architecture Go supports.
const clkTck = 100.0

// procCPUTicks returns utime+stime of pid from /proc/<pid>/stat.
func procCPUTicks(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which is in parentheses and may hold
	// spaces: state is field 3, utime 14, stime 15.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, errors.New("bad /proc stat")
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, errors.New("short /proc stat")
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, errors.New("bad /proc stat times")
	}
	return ut + st, nil
}

// procSchedWait returns how long the threads of pid now alive have waited,
// runnable, for a CPU (the second field of /proc/<pid>/task/*/schedstat):
// time other processes took from it.
func procSchedWait(pid int) time.Duration {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	var total int64
	for _, e := range ents {
		b, err := os.ReadFile(dir + "/" + e.Name() + "/schedstat")
		if err != nil {
			continue
		}
		if f := strings.Fields(string(b)); len(f) >= 2 {
			n, _ := strconv.ParseInt(f[1], 10, 64)
			total += n
		}
	}
	return time.Duration(total)
}

// procRSSKiB returns VmRSS of pid from /proc/<pid>/status.
func procRSSKiB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, errors.New("no VmRSS")
}

// selfCPU returns this process's user+system CPU time.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// raiseNoFile raises RLIMIT_NOFILE's soft limit to want, or to the hard
// limit if that is lower, and returns the soft limit now in force.
func raiseNoFile(want uint64) uint64 {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0
	}
	if rl.Cur < want {
		rl.Cur = min(want, rl.Max)
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl)
		syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl)
	}
	return rl.Cur
}

// pinProcess restricts every thread of this process (and so every thread
// it creates later, which inherits the creator's mask) to cpu, and returns a
// function restoring the previous mask. ok is false if that failed.
func pinProcess(cpu int) (restore func(), ok bool) {
	var old unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil || runtime.NumCPU() <= cpu {
		return func() {}, false
	}
	var set unix.CPUSet
	set.Set(cpu)
	setAll := func(s *unix.CPUSet) bool {
		ok := true
		// Twice: a thread started during the first pass by an unpinned one.
		for range 2 {
			ents, err := os.ReadDir("/proc/self/task")
			if err != nil {
				return false
			}
			for _, e := range ents {
				tid, err := strconv.Atoi(e.Name())
				if err != nil {
					continue
				}
				if err := unix.SchedSetaffinity(tid, s); err != nil && !errors.Is(err, unix.ESRCH) {
					ok = false
				}
			}
		}
		return ok
	}
	if !setAll(&set) {
		setAll(&old)
		return func() {}, false
	}
	return func() { setAll(&old) }, true
}

// ---------------------------------------------------------------------------
// The child side.

// servedRelay is a server (ours or Tailscale's) listening on 127.0.0.1.
type servedRelay struct {
	addr  string
	pub   relay.PublicKey
	close func()     // stops listening and ends every session
	stats func() any // ours only: the server's counters
}

// serveRelay serves which ("ours", "ours-nopark" or "tailscale") on 127.0.0.1 over
// transport: "http" (plain HTTP with the upgrade, as a server's handler)
// or "tcp" (Accept on bare TCP connections).
func serveRelay(which, transport string) (*servedRelay, error) {
	var (
		pub         [32]byte
		accept      func(ctx context.Context, nc net.Conn, brw *bufio.ReadWriter, remote string)
		h           http.Handler
		closeServer func()
		tsServer    *derpserver.Server
		ourStats    func() any
	)
	switch which {
	case "ours", "ours-nopark":
		priv, err := relay.GeneratePrivateKey()
		if err != nil {
			return nil, err
		}
		var opts []relay.ServerOption
		if which == "ours-nopark" { // to measure what parking costs
			opts = append(opts, relay.WithIdlePark(0))
		}
		s := relay.NewServer(priv, opts...)
		pub = s.PublicKey()
		accept, h, closeServer = s.Accept, s, func() { s.Close() }
		ourStats = func() any { return s.Stats() }
	case "tailscale":
		priv := key.NewNode()
		s := derpserver.New(priv, logger.Discard)
		tsServer = s
		pub = priv.Public().Raw32()
		accept = func(ctx context.Context, nc net.Conn, brw *bufio.ReadWriter, remote string) {
			s.Accept(ctx, nc, brw, remote)
		}
		h, closeServer = derpserver.Handler(s), func() { s.Close() }
	default:
		return nil, fmt.Errorf("server %q: want ours or tailscale", which)
	}
	switch transport {
	case "http", "https", "tcp":
	case "websocket":
		if which == "tailscale" {
			h = derpserver.AddWebSocketSupport(tsServer, h)
		}
	default:
		closeServer()
		return nil, fmt.Errorf("transport %q: want http, https, websocket or tcp", transport)
	}
	var lc net.ListenConfig
	cc, sockBuf := os.Getenv("PERF_CC"), perfSockBuf()
	if cc != "" || sockBuf > 0 {
		// Accepted sockets inherit the listener's algorithm and buffer
		// sizes (set before listen, so that the window scale fits).
		lc.Control = func(_, _ string, raw syscall.RawConn) error {
			var serr error
			if err := raw.Control(func(fd uintptr) {
				if cc != "" {
					serr = unix.SetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION, cc)
				}
				if sockBuf > 0 {
					serr = errors.Join(serr,
						unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, sockBuf),
						unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, sockBuf))
				}
			}); err != nil {
				return err
			}
			return serr
		}
	}
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		closeServer()
		return nil, err
	}
	if transport == "https" {
		// The same self-signed certificate for both servers, TLS 1.3,
		// HTTP/1.1; no meta cert (it changes nothing once logged in).
		cert, err := perfCert()
		if err != nil {
			closeServer()
			return nil, err
		}
		ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}})
	}
	var wg sync.WaitGroup
	sr := &servedRelay{addr: ln.Addr().String(), pub: pub, stats: ourStats}
	if transport != "tcp" {
		hs := &http.Server{Handler: h}
		wg.Go(func() { hs.Serve(ln) })
		sr.close = func() {
			hs.Close() // not the hijacked connections: the server ends those
			closeServer()
			wg.Wait()
		}
		return sr, nil
	}
	wg.Go(func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				accept(context.Background(), nc, bufio.NewReadWriter(bufio.NewReader(nc), bufio.NewWriter(nc)), nc.RemoteAddr().String())
			})
		}
	})
	sr.close = func() {
		ln.Close()
		closeServer()
		wg.Wait()
	}
	return sr, nil
}

// perfServerMain runs in the child process: it serves which ("ours" or
// "tailscale") with serveRelay, prints
// "READY <addr> <key hex> <pid> <GOMAXPROCS>" and answers "stats" and "gc"
// lines on stdin with "STATS <json>", and "heapprofile <path>" with
// "HEAPPROFILE <error or nil>", until "quit" or EOF.
func perfServerMain(which, transport string) error {
	raiseNoFile(1 << 20)
	if transport == "" {
		transport = "http"
	}
	sr, err := serveRelay(which, transport)
	if err != nil {
		return err
	}
	if path := os.Getenv("PERF_CPUPROFILE"); path != "" {
		f, err := os.Create(path + "." + which)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	if path := os.Getenv("PERF_RELAYSTATS"); path != "" && sr.stats != nil {
		// A diagnostic: our server's counters (batch sizes, queue
		// delay, drops) over the whole run.
		defer func() {
			b, _ := json.MarshalIndent(sr.stats(), "", " ")
			os.WriteFile(path+"."+which, b, 0o644)
		}()
	}
	fmt.Printf("READY %s %x %d %d\n", sr.addr, sr.pub[:], os.Getpid(), runtime.GOMAXPROCS(0))
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		if path, ok := strings.CutPrefix(sc.Text(), "heapprofile "); ok {
			runtime.GC()
			f, err := os.Create(path)
			if err == nil {
				err = pprof.WriteHeapProfile(f)
				f.Close()
			}
			fmt.Printf("HEAPPROFILE %v\n", err)
			continue
		}
		switch sc.Text() {
		case "gc":
			for range 4 {
				runtime.GC()
			}
			debug.FreeOSMemory()
			fallthrough
		case "stats":
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			b, _ := json.Marshal(perfStats{
				Goroutines: runtime.NumGoroutine(),
				HeapInuse:  ms.HeapInuse,
				StackInuse: ms.StackInuse,
				HeapAlloc:  ms.HeapAlloc,
				Sys:        ms.Sys,
				NumGC:      ms.NumGC,
			})
			fmt.Printf("STATS %s\n", b)
		case "quit":
			return nil
		}
	}
	return nil
}

// perfCert makes a self-signed certificate for 127.0.0.1.
func perfCert() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
