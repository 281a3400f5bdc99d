package relay

// The server's packet path:
//
//	 client A's conn                                      client B's conn
//	┌──────────────┐   route: shard RLock,   ┌───────────────────────────┐
//	│ reader       │   map lookup, active    │ B.mu: outbox              │
//	│ goroutine    │──conn pointer──────────▶│   disco ring | other ring │
//	│ header, dst, │   copy once into a      │   pong, peer gone, mesh   │
//	│ payload      │   pooled packet         │   updates, health, ...    │
//	└──────────────┘                         └────────────┬──────────────┘
//	                                                      │ first item starts
//	                                                      ▼ a writer goroutine
//	                                         ┌───────────────────────────┐
//	                                         │ writer: take everything   │
//	                                         │ under B.mu, write it with │
//	                                         │ a pooled bufio.Writer,    │
//	                                         │ flush once per burst,     │
//	                                         │ exit when the outbox is   │
//	                                         │ empty                     │
//	                                         └───────────────────────────┘
//
// Locking: a routing shard's mu is never held while taking a conn's mu
// except in register/unregister, which take shard.mu then conn.mu; the
// writer takes conn.mu alone, and takes shard locks only after releasing it.
// Readers never block on a slow receiver: enqueue only appends to a bounded
// ring under the receiver's mutex and, when the ring is full, yields to the
// receiver's writer a few times, then drops the oldest packet. Lock order:
// s.mu, then a conn's mu, then the parker's mu.
//
// Idle costs: the writer goroutine and write buffer exist only while there
// is something to write, and the read buffer only while there are unread
// bytes. The reader goroutine exists only while the client sends: an idle
// session parks (see WithIdlePark, parkReader and server_linux.go), its
// socket watched by the parker's epoll set, and a new reader starts when
// bytes arrive.

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/subtle"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"expvar"
	"fmt"
	"io"
	"iter"
	"log/slog"
	"math"
	"math/bits"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Server is a DERP relay server. Create it with NewServer, hand it
// connections with Accept or serve it over HTTP with ServeHTTP, and Close it
// when done. All methods are safe for concurrent use.
type Server struct {
	priv     PrivateKey
	pub      PublicKey
	cfg      serverConfig
	log      *slog.Logger
	metaCert []byte

	shards [numShards]routeShard

	mu       sync.Mutex
	conns    map[*sconn]struct{}
	watchers map[*sconn]struct{}
	tableSeq uint64 // numbers the routing table's changes (changeLocked)
	// perIP counts sessions by perIPKey: an IPv4 address, or an IPv6 /64.
	perIP    map[netip.Addr]int
	closed   bool
	closing  chan struct{} // made by the first Close, closed when it is done
	sessions sync.WaitGroup

	replay  nonceGuard
	stats   serverCounters
	rate    atomic.Pointer[rateLimit] // nil: no limit
	debug   debugLog                  // SetDebugKeys
	peerLog struct {                  // logPeer's limit
		mu sync.Mutex
		logLimit
	}
	parkLog struct { // logParkFailure's limit
		mu sync.Mutex
		logLimit
	}
	mesh meshState
	park parker // idle sessions without a reader goroutine

	// The walk of a Stats call in progress over conns, if any, and the
	// number of the last walk (guarded by mu); statsMu, taken before mu,
	// lets one walk run at a time. Last, to move none of the above.
	statsWalk *statsWalk
	statsGen  uint64
	statsMu   sync.Mutex

	// Guarded by mu: the most conns and perIP have held since they were
	// last rebuilt (deleteShrink), and the walks over conns in progress
	// (walkConnsLocked), during which conns is not rebuilt.
	connsPeak, perIPPeak, connsWalks int
}

const numShards = 64

type routeShard struct {
	mu   sync.RWMutex
	m    map[PublicKey]*keyEntry
	seq  uint64 // Server.tableSeq of the shard's last change
	peak int    // most m has held since it was last rebuilt (deleteShrink)
}

// keyEntry is the set of local connections of one key.
type keyEntry struct {
	active atomic.Pointer[sconn] // receives packets for the key
	// Guarded by the shard's mu:
	conns      []*sconn // oldest first
	recipients recipientSet
}

func (s *Server) shard(k PublicKey) *routeShard { return &s.shards[k[0]%numShards] }

// ServerOption configures NewServer.
type ServerOption func(*serverConfig)

type serverConfig struct {
	logger           *slog.Logger
	meshKey          [MeshKeyLen]byte
	hasMeshKey       bool
	admit            func(ctx context.Context, a Admission) error
	rateBytesPerSec  int
	rateBurst        int
	loginTimeout     time.Duration
	writeTimeout     time.Duration
	meshWriteTimeout time.Duration
	// linkWriteTimeout bounds the mesh link's own frames: meshLinkWriteTimeout
	// unless a test lowers it.
	linkWriteTimeout time.Duration
	queueDepth       int
	keepAlive        time.Duration
	idleTimeout      time.Duration
	userTimeout      time.Duration
	idlePark         time.Duration
	maxConns         int
	maxConnsPerIP    int
	maxClientInfo    int
	restartDelay     time.Duration
	restartTryFor    time.Duration
	meshPeers        []string
	meshDialer       *FastStart

	// linkPingAfter and linkPongWait time the mesh link's liveness pings
	// (meshLink.probe): meshPingAfter and meshPongWait unless a test
	// lowers them.
	linkPingAfter, linkPongWait time.Duration

	// meshMaxWaiting bounds mesh.waiting (maxMeshWaiting unless a test
	// lowers it).
	meshMaxWaiting int
	// meshWaitGrace is how long a wait in mesh.waiting lasts without news
	// of its key (sweepWaits): meshWaitGrace unless a test changes it.
	meshWaitGrace time.Duration
	// closeGrace is how long Close gives logged-in sessions to read their
	// restart notice: closeGrace unless a test changes it.
	closeGrace time.Duration
}

// Admission describes a client asking to log in, for the admission hook.
type Admission struct {
	Key        PublicKey  // the key the client proved it owns
	Info       ClientInfo // what the client said at login
	RemoteAddr string     // as given to Accept; for HTTP, the request's RemoteAddr
}

// WithLogger sets the server's logger. The default discards everything.
// The server never logs packet contents or private keys. Lines that
// clients can cause at will (failed logins, refused connections, sessions
// ended by an error, duplicate keys, write timeouts, requests whose
// connection cannot be hijacked, unexpected Upgrade headers) are logged at
// Info at most 10 a second after a burst of 20, and at Debug beyond that;
// the next line at Info says how many were held back ("suppressed"), and
// Stats counts them all. Sessions that cannot be parked (see WithIdlePark;
// the process is out of file descriptors or epoll watches) are logged at
// Warn, bounded the same way in a budget of their own. A mesh peer's
// Health and ServerRestarting notices are logged at Info, bounded the same
// way in a budget per link (but the first ServerRestarting of each
// connection always at Info), and a Health the same as the one before at
// Debug; a Health's text longer than 256 bytes is cut there and ends in
// "…", and problemBytes then gives its length as the Client kept it (at
// most 64 KiB and a "…": see Health). Lines are logged with no lock of the
// server held, so the handler may call the Server's methods, except Close:
// sessions, mesh links and forwarders log, and Close waits for them.
func WithLogger(l *slog.Logger) ServerOption {
	return func(c *serverConfig) { c.logger = l }
}

// WithMeshKey sets the region's mesh key, 64 hex digits shared by the
// servers of a region. Clients that present it may watch connections, close
// peers and forward packets. NewServer panics on a malformed key, as it is a
// configuration error that must not silently disable meshing.
func WithMeshKey(k string) ServerOption {
	return func(c *serverConfig) {
		mk, ok, err := parseMeshKey(k)
		if err != nil {
			panic("relay: WithMeshKey: " + err.Error())
		}
		c.meshKey, c.hasMeshKey = mk, ok
	}
}

// WithAdmission sets a hook that decides whether a client may log in. It is
// called after the client proved it owns its key and before it is
// registered, except for mesh peers; a non-nil error refuses the login and
// is logged. ctx ends with the login deadline, or when Close cuts the
// login short (at once: a login in progress gets no restart notice).
// The hook may call the Server's methods except Close, which waits for
// logins in progress, the hook's own included: call it from a goroutine of
// its own.
func WithAdmission(f func(ctx context.Context, a Admission) error) ServerOption {
	return func(c *serverConfig) { c.admit = f }
}

// AdmissionURL returns an admission hook for WithAdmission that asks an
// HTTP service, as Tailscale's derper does with --verify-client-url: it POSTs
// {"NodePublic":"nodekey:<hex>","Source":"<client IP>"} to url and admits the
// client only on a 200 response whose JSON body (read up to 4 KiB) is
// {"Allow":true}. Each request is bounded by 5 s and by the login deadline.
// If the service cannot be reached, failOpen admits the client (derper's
// default) instead of refusing it. client nil means http.DefaultClient.
//
// At most 64 requests are in flight at once; further
// logins wait for a slot within their login deadline, so that a mass
// reconnect reaches the service as a bounded queue rather than a burst. A
// login whose deadline passes while it waits counts as the service being
// unreachable.
//
// It is (&AdmissionService{URL: url, FailOpen: failOpen, Client:
// client}).Admit; set AdmissionService.CacheFor to remember verdicts.
func AdmissionURL(url string, failOpen bool, client *http.Client) func(context.Context, Admission) error {
	return (&AdmissionService{URL: url, FailOpen: failOpen, Client: client}).Admit
}

// AdmissionService asks an HTTP service whether clients may log in, as
// AdmissionURL describes, or the local tailscaled, as AdmissionTailscaled
// describes; pass its Admit method to WithAdmission. Set the
// fields before the first Admit and do not change them afterwards.
type AdmissionService struct {
	URL      string       // where each login's question is POSTed
	FailOpen bool         // admit when the service cannot be reached
	Client   *http.Client // nil: http.DefaultClient; not used with Tailscaled

	// Tailscaled, if set, replaces URL: it is the Unix socket of a
	// tailscaled on this machine, which is asked, as AdmissionTailscaled
	// describes, whether each client is a node of its tailnet.
	Tailscaled string

	// CacheFor, if positive, remembers each verdict the service gave, to
	// admit or to refuse, for a key logging in from an IP address, for this
	// long: a client that reconnects, or a flood of logins with a refused
	// key, is answered without a request. Logins of one key from one
	// address while its request is in flight wait for that request. What
	// the service did not decide (it was unreachable, answered an error
	// status or garbage, or the login ran out of time) is not remembered.
	// At most 65536 verdicts are kept: when that many are current, a
	// quarter of them make room for new ones. Expired verdicts are
	// dropped as new ones are remembered, at most once every CacheFor. A key refused later
	// is still admitted until its verdict expires: keep CacheFor short
	// (a minute) where revocation must be quick.
	CacheFor time.Duration

	once  sync.Once
	slots chan struct{}
	local *http.Client // for Tailscaled

	mu       sync.Mutex
	verdicts map[admissionKey]admissionVerdict
	inflight map[admissionKey]*admissionCall
	// inflightPeak is the most inflight has held since it was last
	// rebuilt: a flood of logins has an entry for each key waiting for a
	// slot, and the map is rebuilt smaller after (shrinkMap).
	inflightPeak int
	// verdictsPeak is the same for verdicts; sweepAt is when
	// rememberLocked next drops the expired verdicts.
	verdictsPeak int
	sweepAt      time.Time
}

type admissionKey struct {
	key    PublicKey
	source string // the client's IP address
}

type admissionVerdict struct {
	allow bool
	until time.Time
}

// admissionCall is a request in flight; done is closed when decided says
// whether the service decided, and allow what.
type admissionCall struct {
	done           chan struct{}
	decided, allow bool
}

// errAdmissionDenied is the refusal of a client by the admission service.
var errAdmissionDenied = errors.New("admission service denied the client")

// errTailscaledDenied is the refusal of a client the local tailscaled does
// not know.
var errTailscaledDenied = errors.New("not a node of the local tailscaled's tailnet")

// AdmissionTailscaled returns an admission hook for WithAdmission that
// admits only the nodes of one tailnet, as Tailscale's derper does with
// --verify-clients: for each login it asks the tailscaled running on this
// machine, through the LocalAPI on its Unix socket, whether the client's
// key belongs to a node it knows (GET /localapi/v0/whois?addr=nodekey:<hex>).
// A node tailscaled does not know is refused. So is every client when
// tailscaled cannot be asked or gives no clear answer (the error says why:
// no socket, access denied, a tailscaled too old for the query, or a reply
// that is not about the key asked): an unreachable tailscaled fails closed.
//
// socket "" means /var/run/tailscale/tailscaled.sock, where tailscaled
// listens on Linux. The process needs read access to the LocalAPI: it runs
// as root or as tailscaled's operator user. Requests are bounded as with
// AdmissionURL. For a cache, or to fail open, use AdmissionService with its
// Tailscaled field set.
func AdmissionTailscaled(socket string) func(context.Context, Admission) error {
	if socket == "" {
		socket = defaultTailscaledSocket
	}
	return (&AdmissionService{Tailscaled: socket}).Admit
}

// defaultTailscaledSocket is where tailscaled's LocalAPI listens on Linux.
const defaultTailscaledSocket = "/var/run/tailscale/tailscaled.sock"

// localAPIHost is the Host header tailscaled's LocalAPI requires.
const localAPIHost = "local-tailscaled.sock"

// maxWhoIsReply bounds the LocalAPI reply read: a node with its
// capabilities and user profile, a few KiB in practice.
const maxWhoIsReply = 1 << 20

// localAPIGet sends a GET for path to tailscaled's LocalAPI and returns the
// reply's status and body (up to maxWhoIsReply bytes).
func (as *AdmissionService) localAPIGet(ctx context.Context, path string) (status int, body []byte, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+localAPIHost+path, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := as.local.Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("%w: tailscaled at %s: %w", errAdmissionUnreachable, as.Tailscaled, err)
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(io.LimitReader(resp.Body, maxWhoIsReply))
	if err != nil {
		return 0, nil, fmt.Errorf("tailscaled reply: %w", err)
	}
	return resp.StatusCode, body, nil
}

// askTailscaled asks tailscaled's LocalAPI whether it knows key.
func (as *AdmissionService) askTailscaled(ctx context.Context, key PublicKey) (allow, decided bool, err error) {
	nodeKey := "nodekey:" + key.String()
	status, body, err := as.localAPIGet(ctx, "/localapi/v0/whois?addr="+url.QueryEscape(nodeKey))
	if err != nil {
		return false, false, err
	}
	switch status {
	case http.StatusOK:
	case http.StatusNotFound:
		return false, true, nil
	case http.StatusBadRequest:
		if bytes.Contains(body, []byte("invalid 'addr' parameter")) {
			return false, false, errors.New("tailscaled is too old to look up node keys")
		}
		fallthrough
	default:
		return false, false, fmt.Errorf("tailscaled answered %d %s: %.200q", status, http.StatusText(status), bytes.TrimSpace(body))
	}
	var who struct {
		Node *struct{ Key string }
	}
	if err := json.Unmarshal(body, &who); err != nil {
		return false, false, fmt.Errorf("tailscaled reply: %w", err)
	}
	if who.Node == nil || who.Node.Key != nodeKey {
		return false, false, errors.New("tailscaled reply is not about the key asked")
	}
	return true, true, nil
}

// Check tests that the service can answer, for a health endpoint. With
// Tailscaled set it does what derper's consistency check does with
// --verify-clients: it asks tailscaled for this machine's own node key
// (GET /localapi/v0/status?peers=false) and then whether that node would be
// admitted, which fails if tailscaled is unreachable, not logged in, too
// old, or refuses the process access. With a URL it returns nil without a
// request: the admission protocol has no question without side effects.
func (as *AdmissionService) Check(ctx context.Context) error {
	if as.Tailscaled == "" {
		return nil
	}
	as.init()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	status, body, err := as.localAPIGet(ctx, "/localapi/v0/status?peers=false")
	if err != nil {
		return err
	}
	if status != http.StatusOK {
		return fmt.Errorf("tailscaled status: %d %s: %.200q", status, http.StatusText(status), bytes.TrimSpace(body))
	}
	var st struct {
		BackendState string
		Self         *struct{ PublicKey string }
	}
	if err := json.Unmarshal(body, &st); err != nil {
		return fmt.Errorf("tailscaled status: %w", err)
	}
	if st.Self == nil || st.Self.PublicKey == "" {
		return fmt.Errorf("tailscaled has no node key (state %q)", st.BackendState)
	}
	hex, ok := strings.CutPrefix(st.Self.PublicKey, "nodekey:")
	self, err := ParsePublicKey(hex)
	if err == nil && !ok {
		err = errors.New(`no "nodekey:" prefix`)
	}
	if err != nil {
		return fmt.Errorf("tailscaled status: own key: %w", err)
	}
	if self.IsZero() {
		return fmt.Errorf("tailscaled has no node key (state %q)", st.BackendState)
	}
	allow, _, err := as.askTailscaled(ctx, self)
	switch {
	case err != nil:
		return err
	case !allow:
		return errors.New("tailscaled does not know its own node key")
	}
	return nil
}

// dialTailscaled connects to the Tailscaled socket, whatever address the
// HTTP client asks for.
func (as *AdmissionService) dialTailscaled(ctx context.Context, _, _ string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "unix", as.Tailscaled)
}

// maxAdmissionVerdicts bounds the verdicts an AdmissionService remembers.
const maxAdmissionVerdicts = 1 << 16

// Admit asks the service (or its cache) whether a may log in; it is a hook
// for WithAdmission.
func (as *AdmissionService) Admit(ctx context.Context, a Admission) error {
	as.init()
	var source string // tailscaled's answer does not depend on it
	if ip := parseRemote(a.RemoteAddr).Addr(); ip.IsValid() && as.Tailscaled == "" {
		source = ip.String()
	}
	if as.CacheFor <= 0 {
		allow, decided, err := as.ask(ctx, a.Key, source)
		return as.verdict(allow, decided, err)
	}
	k := admissionKey{a.Key, source}
	for {
		as.mu.Lock()
		if v, ok := as.verdicts[k]; ok && time.Now().Before(v.until) {
			as.mu.Unlock()
			return as.verdict(v.allow, true, nil)
		}
		if call, ok := as.inflight[k]; ok {
			as.mu.Unlock()
			select {
			case <-call.done:
			case <-ctx.Done():
				return as.verdict(false, false, fmt.Errorf("%w: busy: %w", errAdmissionUnreachable, ctx.Err()))
			}
			if call.decided {
				return as.verdict(call.allow, true, nil)
			}
			continue // undecided: ask again, for this login
		}
		call := &admissionCall{done: make(chan struct{})}
		if as.inflight == nil {
			as.inflight = map[admissionKey]*admissionCall{}
		}
		as.inflight[k] = call
		as.mu.Unlock()

		allow, decided, err := as.ask(ctx, a.Key, source)
		as.mu.Lock()
		as.inflightPeak = max(as.inflightPeak, len(as.inflight)) // see deleteShrink
		delete(as.inflight, k)
		as.inflight = shrinkMap(as.inflight, &as.inflightPeak)
		call.decided, call.allow = decided, allow
		if decided {
			as.rememberLocked(k, allow)
		}
		as.mu.Unlock()
		close(call.done)
		return as.verdict(allow, decided, err)
	}
}

// init prepares as on first use.
func (as *AdmissionService) init() {
	as.once.Do(func() {
		as.slots = make(chan struct{}, maxAdmissionRequests)
		if as.Tailscaled != "" {
			as.local = &http.Client{Transport: &http.Transport{
				DialContext:         as.dialTailscaled,
				MaxIdleConnsPerHost: 8,
				IdleConnTimeout:     time.Minute,
			}}
		}
	})
}

// rememberLocked stores a verdict. When the cache is full it makes room by
// dropping the expired verdicts and, if that leaves it over three quarters
// full, others too: a flood of logins with new keys then costs one walk
// over the cache per quarter of it, not one per login, and does not keep
// new verdicts (a flapping client's) out until the flood's expire. At most
// once every CacheFor it drops the expired verdicts, and rebuilds the map
// smaller if most are gone (shrinkMap): a flood's verdicts, which would
// otherwise stay until the cache filled up again, cost one walk over the
// cache per CacheFor.
func (as *AdmissionService) rememberLocked(k admissionKey, allow bool) {
	now := time.Now()
	if as.verdicts == nil {
		as.verdicts = map[admissionKey]admissionVerdict{}
	}
	as.verdictsPeak = max(as.verdictsPeak, len(as.verdicts)) // see deleteShrink
	if !now.Before(as.sweepAt) {
		for k, v := range as.verdicts {
			if !now.Before(v.until) {
				delete(as.verdicts, k)
			}
		}
		as.verdicts = shrinkTable(as.verdicts, &as.verdictsPeak)
		as.sweepAt = now.Add(as.CacheFor)
	}
	if _, ok := as.verdicts[k]; !ok && len(as.verdicts) >= maxAdmissionVerdicts {
		for k, v := range as.verdicts {
			if !now.Before(v.until) {
				delete(as.verdicts, k)
			}
		}
		for k := range as.verdicts { // in no particular order
			if len(as.verdicts) <= maxAdmissionVerdicts*3/4 {
				break
			}
			delete(as.verdicts, k)
		}
	}
	as.verdicts[k] = admissionVerdict{allow, now.Add(as.CacheFor)}
}

// verdict turns the outcome of a request into the hook's answer.
func (as *AdmissionService) verdict(allow, decided bool, err error) error {
	switch {
	case decided && allow:
		return nil
	case decided && as.Tailscaled != "":
		return errTailscaledDenied
	case decided:
		return errAdmissionDenied
	case as.FailOpen && errors.Is(err, errAdmissionUnreachable):
		return nil
	}
	return err
}

// errAdmissionUnreachable marks failures to reach the service, which
// FailOpen forgives.
var errAdmissionUnreachable = errors.New("admission service unreachable")

// ask sends one request. decided reports whether the service gave a
// verdict; if not, err says why.
func (as *AdmissionService) ask(ctx context.Context, key PublicKey, source string) (allow, decided bool, err error) {
	select {
	case as.slots <- struct{}{}:
		defer func() { <-as.slots }()
	case <-ctx.Done():
		return false, false, fmt.Errorf("%w: busy: %w", errAdmissionUnreachable, ctx.Err())
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if as.Tailscaled != "" {
		return as.askTailscaled(ctx, key)
	}
	client := as.Client
	if client == nil {
		client = http.DefaultClient
	}
	body, _ := json.Marshal(struct {
		NodePublic string
		Source     string
	}{"nodekey:" + key.String(), source})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, as.URL, bytes.NewReader(body))
	if err != nil {
		return false, false, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return false, false, fmt.Errorf("%w: %w", errAdmissionUnreachable, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		// Quoted: the status line is the service's, and net/http keeps a
		// carriage return inside it.
		return false, false, fmt.Errorf("admission service answered %q", resp.Status)
	}
	var v struct{ Allow bool }
	if err := json.NewDecoder(io.LimitReader(resp.Body, 4096)).Decode(&v); err != nil {
		return false, false, fmt.Errorf("admission service reply: %w", err)
	}
	return v.Allow, true, nil
}

// maxAdmissionRequests bounds the requests one AdmissionURL hook has in
// flight.
const maxAdmissionRequests = 64

// WithRateLimit limits how fast each non-mesh client may send, in bytes per
// second of frames (the 5-byte header included, as clients count their
// SendPackets), with the given burst (raised to at least one maximal
// SendPacket frame, 65573 bytes). The limit is announced to clients in
// ServerInfo and enforced by reading more slowly, so TCP flow control slows
// the sender and the server drops nothing. Clients keep to the announced
// limit themselves: a packet their own bucket cannot pay for is refused
// by ours (ErrRateLimited) and dropped, silently, by Tailscale's (WireGuard
// sends it again; interop TestTailscaleNodesUnderLimits measures it), so
// the limit is lossless only for clients not told of it (see
// SetRateLimit). What clients do not count against it (Pings, Pongs,
// NotePreferred and, over WebSocket, the WebSocket framing) is paid for
// from a second token bucket of the same rate and burst, so
// that a client that keeps its packets within the limit is not paced for
// those, nor its liveness checks held up behind its packets, while a flood
// of them is paced all the same: a client may send the limit in packets
// (and any other frames) and the limit again in those. On Linux, over
// plain TCP, a wait of more than a second looks at the socket every
// second, so that a client that hangs up before sending the rest of the
// frame being paid for ends its session then, not after the wait. Zero
// bytesPerSec, the default, means no limit. Server.SetRateLimit changes it
// while the server runs.
func WithRateLimit(bytesPerSec, burst int) ServerOption {
	return func(c *serverConfig) { c.rateBytesPerSec, c.rateBurst = bytesPerSec, burst }
}

// WithLoginTimeout bounds the whole login: writing ServerKey (and before
// it a WebSocket upgrade's 101 response), reading ClientInfo and the
// admission hook. Default 10 s; zero means no limit
// (the admission hook's context then has no deadline of its own).
func WithLoginTimeout(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.loginTimeout = d }
}

// WithWriteTimeout bounds each burst of writes to a client; a client that
// does not read for that long is disconnected. Default 2 s; zero means no
// limit (dangerous on the open internet). Mesh peers get 30 s.
func WithWriteTimeout(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.writeTimeout = d }
}

// WithQueueDepth sets how many packets may wait for each client in each of
// its two queues (disco and other). When a queue is full the oldest packet is
// dropped. Default 32. Each queue also holds at most 512 KiB of packets.
func WithQueueDepth(n int) ServerOption {
	return func(c *serverConfig) { c.queueDepth = n }
}

// WithKeepAlive sets the interval of KeepAlive frames; each session adds a
// random jitter of up to 5 s. Default 60 s. Clients give up after 120 s of
// silence, so do not raise it past 110 s.
func WithKeepAlive(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.keepAlive = d }
}

// WithTCPUserTimeout bounds how long data the server sends to a client may
// stay unacknowledged before the kernel ends the connection (the socket
// option TCP_USER_TIMEOUT, Linux only). Without it a client that vanished
// (its machine off, its network gone, no RST) is retransmitted to for many
// minutes, whatever it declared; with it the session ends, as a write
// error, d after the first unacknowledged frame (at the latest one
// keepalive interval after the client vanished). It applies to sessions on
// TCP, under TLS and WebSocket too; other connections are left alone.
// Default 15 s, as Tailscale's derper sets; zero leaves the socket as it is.
func WithTCPUserTimeout(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.userTimeout = d }
}

// WithIdleTimeout makes the server check that clients which declared
// CanAckPings (Tailscale's clients do) are alive: each keepalive is sent as a
// Ping instead, and a session from which nothing at all, not even the Pong,
// was read for d (not counting the server's own waits for WithRateLimit)
// ends with the reason "idle_timeout". This finds vanished
// clients without relying on TCP timeouts. d should exceed the keepalive
// interval plus jitter. Default 150 s; zero turns the check off. Mesh peers
// and clients that cannot ack pings are exempt. For a parked session (see
// WithIdlePark) the keepalive timer enforces it, counting from when the
// session parked: it may end up to one park delay late.
func WithIdleTimeout(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.idleTimeout = d }
}

// defaultIdlePark is WithIdlePark's default; tests may shorten it.
var defaultIdlePark = 5 * time.Second

// WithIdlePark sets how long a session must read nothing before its reader
// goroutine is parked: the socket joins an epoll set of the server's own and
// the goroutine exits, to be started again when the client sends something.
// A session is also parked right after its login if the client has nothing
// more to say. An idle session then costs its heap state (about 3 KiB over
// plain TCP) and no goroutine stack (8 KiB). The price is a few microseconds
// each time a parked session wakes. Stats reports parked sessions as
// CurrentParked.
//
// Parking needs Linux and a session over *net.TCPConn, *net.UnixConn or a
// *tls.Conn over one of those, or DERP over WebSocket on any of these (any
// other wrapper might hold buffered bytes that the socket would not show). Sessions given to Accept park too, but
// Accept's caller keeps waiting on its own goroutine until the session ends;
// ServeHTTP's sessions hold no goroutine at all while parked. Default 5 s;
// zero turns parking off.
func WithIdlePark(d time.Duration) ServerOption {
	return func(c *serverConfig) { c.idlePark = d }
}

// WithMaxConnections limits the number of sessions (logged in or logging
// in) in total and per remote IP address; zero means no limit. Defaults:
// no total limit, no per-IP limit. The per-IP limit counts the connections
// of an IPv6 /64 together (one host, or one LAN, holds a whole /64, as a
// NAT's hosts share one IPv4 address), and an IPv4-mapped IPv6 address as
// its IPv4 address. It is keyed by the remote address as Accept or
// net/http gives it: a connection whose remote address is not an IP (a
// Unix socket's) counts only against the total, and behind a reverse proxy
// every client has the proxy's address, so set no per-IP limit there. A
// connection over a limit is closed before a byte is written, except one
// that comes through ServeHTTP: it is answered "503 Service Unavailable"
// with the limit that was reached, before its connection is taken from
// net/http.
func WithMaxConnections(total, perIP int) ServerOption {
	return func(c *serverConfig) { c.maxConns, c.maxConnsPerIP = total, perIP }
}

// WithRestartNotice sets what Close tells clients in its ServerRestarting
// frame: each client is asked to wait a random delay up to spread before
// reconnecting (so clients do not all come back at once), and to keep trying
// for tryFor. Defaults: 2 s and 5 s.
func WithRestartNotice(spread, tryFor time.Duration) ServerOption {
	return func(c *serverConfig) { c.restartDelay, c.restartTryFor = spread, tryFor }
}

// WithMeshPeers makes the server one of a region's servers. For each URL
// ("https://derp2.example.com/derp"; a bare "host[:port]" means
// "https://host[:port]/derp") it keeps a watcher connection, logged in with
// the server's own DERP key and the mesh key, learns which clients are
// connected there and forwards packets for them, one hop, through a bounded
// queue per peer that never blocks the sender. A link that has heard
// nothing from its peer for 5 s pings it, and reconnects if nothing arrives
// within 5 s more: a peer gone silent without closing (a path that drops
// everything) loses its routes within about 10 s. On Linux a Ping that
// waits behind the link's own forwards on a congested path is not taken as
// unanswered while the peer still acknowledges some of them within each
// 5 s (the kernel's TCP_INFO and send queue say so): a slow peer keeps its
// routes. Nor, on Linux, does a peer that has never answered one of the
// link's Pings lose its connection while its host acknowledges every byte
// sent to it: an implementation that ignores Pings, on a live path. So
// that a busy peer, which never goes 5 s without sending, is not taken for
// one, a peer is pinged every 5 s even while it sends until it has
// answered once. A URL that turns out to
// reach this server itself is ignored, so every server of a region may be
// given the same list. Requires WithMeshKey: NewServer panics without one, or on a
// URL that does not parse. Default: no peers.
func WithMeshPeers(urls ...string) ServerOption {
	return func(c *serverConfig) { c.meshPeers = append(c.meshPeers, urls...) }
}

// WithMeshDialer sets how mesh links are dialed: f's TLSConfig (for example
// a pool trusting the region's self-signed certificates), DialContext,
// Header and DisableFastStart apply; its ServerKey is ignored, as each peer
// has its own. f is copied. Default: the zero FastStart (system roots, a
// net.Dialer, fast start when the peer's TLS 1.3 chain has a meta cert).
func WithMeshDialer(f *FastStart) ServerOption {
	return func(c *serverConfig) { c.meshDialer = f }
}

// NewServer returns a server whose DERP key is priv.
func NewServer(priv PrivateKey, opts ...ServerOption) *Server {
	cfg := serverConfig{
		loginTimeout:     10 * time.Second,
		writeTimeout:     2 * time.Second,
		meshWriteTimeout: 30 * time.Second,
		linkWriteTimeout: meshLinkWriteTimeout,
		linkPingAfter:    meshPingAfter,
		linkPongWait:     meshPongWait,
		meshMaxWaiting:   maxMeshWaiting,
		meshWaitGrace:    meshWaitGrace,
		closeGrace:       closeGrace,
		queueDepth:       32,
		keepAlive:        60 * time.Second,
		idleTimeout:      150 * time.Second,
		userTimeout:      15 * time.Second,
		idlePark:         defaultIdlePark,
		maxClientInfo:    16 << 10,
		restartDelay:     2 * time.Second,
		restartTryFor:    5 * time.Second,
	}
	for _, o := range opts {
		if o != nil {
			o(&cfg)
		}
	}
	if cfg.queueDepth < 1 {
		cfg.queueDepth = 1
	}
	s := &Server{
		priv:     priv,
		pub:      priv.Public(),
		cfg:      cfg,
		log:      cfg.logger,
		conns:    map[*sconn]struct{}{},
		watchers: map[*sconn]struct{}{},
		perIP:    map[netip.Addr]int{},
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	for i := range s.shards {
		s.shards[i].m = map[PublicKey]*keyEntry{}
	}
	s.rate.Store(newRateLimit(cfg.rateBytesPerSec, cfg.rateBurst))
	s.replay.init()
	s.stats.init()
	mc, err := MintMetaCert(s.pub, ProtocolVersion)
	if err != nil {
		panic("relay: minting meta cert: " + err.Error()) // only fails if crypto/rand does
	}
	s.metaCert = mc
	s.initMesh()
	return s
}

// PublicKey returns the server's DERP public key.
func (s *Server) PublicKey() PublicKey { return s.pub }

// MetaCert returns the DER of the server's meta cert, to be presented as the
// last certificate of its TLS chain (see AppendMetaCert).
func (s *Server) MetaCert() []byte { return s.metaCert }

// HasMeshKey reports whether the server was given a mesh key.
func (s *Server) HasMeshKey() bool { return s.cfg.hasMeshKey }

// sconn is one client session on the server.
type sconn struct {
	s          *Server
	nc         net.Conn
	br         *connReader
	key        PublicKey
	remote     string
	remoteAddr netip.AddrPort
	info       ClientInfo
	isMesh     bool
	notIdeal   bool
	fastStart  bool
	connNum    int64
	start      time.Time
	entry      *keyEntry
	ctx        context.Context // the caller's; its end ends the session
	stopClose  func() bool     // stops the AfterFunc of ctx, if ctx can end

	dup  atomic.Bool // another connection has the same key
	left atomic.Bool // ended: recipient sets may drop it (forgetRecipient)
	home atomic.Bool // preferred, for Sessions

	pingIdle bool // liveness pings and an idle read deadline apply (set at login)
	parkable bool // the reader may be parked when idle (set by setupReads)
	vectored bool // nc is a plain socket: the writer uses writev, not a bufio.Writer

	// Reader-owned: destinations this client sent to (noteSentTo), and
	// those reached through mesh routes (noteSentToMesh).
	lastDst        PublicKey
	lastDstEntry   *keyEntry
	sentTo         map[PublicKey]*keyEntry
	sentToMesh     map[PublicKey]*meshRoute
	sentToPeak     int // most sentTo has held since it was last rebuilt (shrinkMap)
	sentToMeshPeak int
	// toldGone is set when c is told that a key left (enqueuePeerGone):
	// the reader then drops departed destinations from sentTo and
	// sentToMesh (pruneSentTo) before it adds the next one.
	toldGone atomic.Bool

	// waitFor holds the keys c waits for in mesh.waiting, guarded by
	// s.mesh.mu; waits is set while it holds some (until c ends), for
	// forgetRecipient and the writer (takeLocked).
	waitFor map[PublicKey]struct{}
	waits   atomic.Bool

	// Reader-owned state.
	preferred bool
	notHere   tokenBucket
	rateLimit *tokenBucket
	// rateExtra pays, under the same limit, for what clients do not
	// count against it (see paceRead); set with rateLimit.
	rateExtra *tokenBucket
	rateCfg   *rateLimit // the limit rateLimit follows
	// pacedAt is when the reader's last wait for the rate limit ended:
	// over WebSocket it may wait inside a read (paceFraming), which is
	// no silence of the client's (onStall).
	pacedAt   time.Time
	recvPkts  atomic.Int64
	recvBytes atomic.Int64

	// Writer-side counters.
	sentPkts  atomic.Int64
	sentBytes atomic.Int64
	dropped   atomic.Int64               // packets for this client dropped here
	batches   [batchBuckets]atomic.Int64 // packet batches written, by size (Stats.PacketsPerBatch)
	queueWait atomic.Int64               // ns, summed over batches (Stats.QueueWait)

	mu sync.Mutex // guards everything below
	// outbox
	disco, other pktRing
	pong         [8]byte
	ping         [8]byte // liveness ping to send
	hasPing      bool
	hasPong      bool
	wsPong       bool // a WebSocket pong is due (wsPongDue)
	keepAlive    bool
	peerGone     []peerGoneItem
	meshUpdates  []PeerPresent // Flags==0 means gone
	floodQueued  bool          // meshUpdates has a whole list, none of it taken yet,
	floodAt      int           // starting at this index
	// While addWatcher builds c's list (listing), broadcasts go to
	// listed instead of meshUpdates, each with its change's number.
	listing      bool
	listed       []seqUpdate
	health       *string
	restarting   *ServerRestarting
	serverInfo   []byte // the ServerInfo frame, until written
	closeAfter   bool   // close the conn after writing the outbox (server Close)
	writing      bool   // a writer goroutine is running
	parked       bool   // the writer is waiting on wake for more to write
	flushing     bool   // the writer is writing what it took (or blocked on the socket)
	wake         chan struct{}
	closed       bool // session over: enqueue drops
	registered   bool // in the routing table
	sentFrom     map[PublicKey]struct{}
	sentFromPeak int // most sentFrom has held since it was last rebuilt (shrinkMap)
	lastSrc      PublicKey
	// lastVia is the mesh peer's session that forwarded the last packet
	// from lastSrc, nil for a local sender's (see takeLocked).
	lastVia      *sconn
	watching     bool
	writers      sync.WaitGroup
	keepTimer    *time.Timer
	nextKeep     time.Time     // when the next keepalive is due
	readParkID   uint64        // nonzero while the reader is parked
	idleDeadline time.Time     // while parked: when idle_timeout ends the session
	endErr       error         // why the server ended the session, if it did
	done         chan struct{} // closed when the session has ended, if Accept waits
	ended        bool          // end was called
	quit         chan struct{} // closed by end; made by quitChan
	admitCancel  func()        // cancels the admission hook's context

	// Guarded by s.mu, not mu (and last, to move none of the above):
	regSeq   uint64 // the routing table's change that registered c (Server.tableSeq, for Sessions)
	statsGen uint64 // the last Stats walk that counted c's traffic (statsWalk.gen)
}

type peerGoneItem struct {
	key    PublicKey
	reason PeerGoneReason
}

// maxPendingControl bounds queued control frames (PeerGone notices) per
// client; beyond it they are dropped, as a client that does not read cannot
// use them anyway.
const maxPendingControl = 4096

// maxKeptPeerGone bounds the queue of PeerGone notices a session keeps once
// they are written (about 2 KiB): a burst of thousands must not stay with
// the session for the rest of its life.
const maxKeptPeerGone = 64

// Accept runs one DERP session over nc, which the server now owns: it logs
// the client in, relays its packets until the connection ends, ctx is done or
// the server is closed, and closes nc. brw must buffer nc; bytes already
// buffered in it are read first and bytes written but not flushed (such as
// an HTTP 101 response) leave with the ServerKey frame. remoteAddr ("ip:port",
// or an IP with no port, an IPv6 one in brackets or not) is used for
// per-IP limits, admission and PeerPresent.
//
// ctx must not be nil (use context.Background()): Accept closes nc and
// panics at once, on the caller's goroutine, rather than on one of the
// server's own where nobody could recover it.
func (s *Server) Accept(ctx context.Context, nc net.Conn, brw *bufio.ReadWriter, remoteAddr string) {
	if ctx == nil {
		nc.Close()
		panic("relay: Server.Accept: nil Context")
	}
	s.accept(ctx, nc, brw, remoteAddr, acceptOpts{})
}

type acceptOpts struct {
	notIdeal  bool
	fastStart bool
	detached  bool // on a goroutine of the server's own: nobody waits for the session
	admitted  bool // the connection slot is already taken (hijack did it)
	// upgrade holds an HTTP response, written straight to the connection
	// below nc, that the login sends before its first frame.
	upgrade *bufio.Writer
}

func (s *Server) accept(ctx context.Context, nc net.Conn, brw *bufio.ReadWriter, remoteAddr string, ao acceptOpts) {
	s.stats.accepts.Add(1)
	if ao.detached || !s.mayPark(nc) {
		s.runSession(ctx, nc, brw, remoteAddr, ao, nil)
		return
	}
	// Accept returns when the session ends, parked or not. The session
	// runs on a goroutine of its own, which exits while it is parked, and
	// the caller's goroutine only waits: on a stack that the login never
	// grew, so that it stays at the runtime's minimum.
	done := make(chan struct{})
	go s.runSession(ctx, nc, brw, remoteAddr, ao, done)
	<-done
}

// runSession runs a session; done, if not nil, is closed when it has ended.
func (s *Server) runSession(ctx context.Context, nc net.Conn, brw *bufio.ReadWriter, remoteAddr string, ao acceptOpts, done chan struct{}) {
	// The login's frames are gone from the stack by the time the session
	// idles in readLoop: the idle stack stays small enough for the runtime
	// to shrink it.
	c := s.startSession(ctx, nc, brw, remoteAddr, ao)
	if c == nil {
		if done != nil {
			close(done)
		}
		return
	}
	c.done = done
	if wc, ok := nc.(*wsConn); ok {
		// Set by the reader's goroutine, before it reads.
		wc.onPong = c.wsPongDue
		wc.pace = c.paceFraming
	}
	c.setupReads()
	c.serve()
}

// wsPongDue has the writer send the WebSocket pong that fell due.
func (c *sconn) wsPongDue() {
	c.mu.Lock()
	c.wsPong = true
	c.kickLocked()
	c.mu.Unlock()
}

// mayPark reports whether a session over nc could be parked.
func (s *Server) mayPark(nc net.Conn) bool {
	return parkSupported && s.cfg.idlePark > 0 && parkSocket(nc) != nil
}

// parkSocket returns the socket whose readability tells when a parked
// session over nc has something to read, or nil if nc cannot be parked:
// any other wrapper might hold buffered bytes that the socket would not
// show.
func parkSocket(nc net.Conn) syscall.Conn {
	switch c := nc.(type) {
	case *net.TCPConn:
		return c
	case *net.UnixConn:
		return c
	case *tls.Conn:
		// A read from crypto/tls times out only when it needs more bytes
		// from the socket: its decrypted data is used up and what it has
		// of the next record is incomplete. The socket's readability is
		// then exactly what a parked reader waits for.
		switch u := c.NetConn().(type) {
		case *net.TCPConn:
			return u
		case *net.UnixConn:
			return u
		}
	case *wsConn:
		// Likewise: a WebSocket read times out only when its buffer
		// holds less than the next frame header or payload byte it
		// needs, so those must come from the connection below.
		return parkSocket(c.Conn)
	}
	return nil
}

// startSession admits and logs in a client and registers it. It returns nil,
// with nc closed, if any step fails.
func (s *Server) startSession(ctx context.Context, nc net.Conn, brw *bufio.ReadWriter, remoteAddr string, ao acceptOpts) *sconn {
	if brw == nil {
		brw = bufio.NewReadWriter(bufio.NewReader(nc), bufio.NewWriter(nc))
	}
	ap := parseRemote(remoteAddr)
	// ServeHTTP takes the slot itself, before it hijacks the connection.
	if err := s.admitConnUnless(ao.admitted, ap.Addr()); err != nil {
		if errors.Is(err, ErrClosed) {
			s.stats.countRejected("server_closed")
			s.log.Debug("relay: refusing connection", "remote", remoteAddr, "err", err)
		} else {
			s.stats.countRejected("too_many_connections")
			s.logPeer("relay: refusing connection", "remote", remoteAddr, "err", err)
		}
		nc.Close()
		return nil
	}
	if s.cfg.userTimeout > 0 {
		if tc, ok := parkSocket(nc).(*net.TCPConn); ok {
			if err := setTCPUserTimeout(tc, s.cfg.userTimeout); err != nil {
				s.log.Debug("relay: TCP_USER_TIMEOUT", "remote", remoteAddr, "err", err)
			}
		}
	}
	c := &sconn{
		s:          s,
		nc:         nc,
		br:         newConnReader(nc, brw.Reader),
		remote:     remoteAddr,
		remoteAddr: ap,
		notIdeal:   ao.notIdeal,
		fastStart:  ao.fastStart,
		connNum:    s.stats.connNum.Add(1),
		ctx:        ctx,
		notHere:    tokenBucket{rate: 1, burst: 3, tokens: 3, last: time.Now()},
	}
	switch nc.(type) {
	case *net.TCPConn, *net.UnixConn:
		c.vectored = true
	}
	if ctx.Done() != nil {
		// No context of our own per session: an idle session is all
		// heap, and contexts with their AfterFunc cost 0.5 KiB each.
		c.stopClose = context.AfterFunc(ctx, c.closeConn)
	}
	s.mu.Lock()
	if s.closed {
		// Admitted before Close, but not in the snapshot Close took,
		// and perhaps starting after Close cut the logins it knew of:
		// nothing would end this login (with WithLoginTimeout(0),
		// ever), and register would refuse it anyway.
		s.mu.Unlock()
		s.stats.countRejected("server_closed")
		s.log.Debug("relay: refusing connection", "remote", remoteAddr, "err", ErrClosed)
		nc.Close()
		c.release()
		return nil
	}
	s.conns[c] = struct{}{} // so that Close can cut a login short
	s.mu.Unlock()
	err := s.login(ctx, c, ao.upgrade, brw.Writer)
	if err == nil && ctx.Done() == nil {
		// A context that cannot end (ServeHTTP's) was needed only for
		// the admission hook; dropping it frees net/http's request
		// contexts for the session's life.
		c.mu.Lock()
		c.ctx = context.Background()
		c.mu.Unlock()
	}
	switch {
	case err == nil:
	case ctx.Err() != nil || c.isEnded():
		// The caller's context or Close ended the login: not the
		// client's failure.
		s.log.Debug("relay: login cut short", "remote", remoteAddr, "err", err)
	default:
		s.stats.countLoginError(err)
		s.logPeer("relay: login failed", "remote", remoteAddr, "err", err)
	}
	if err != nil || !s.register(c) {
		nc.Close()
		s.mu.Lock()
		s.deleteConnLocked(c)
		s.mu.Unlock()
		c.release()
		return nil
	}
	return c
}

// serve runs a logged-in session until it ends, or until its reader is
// parked; the parker then calls it again on a new goroutine when the client
// sends something.
func (c *sconn) serve() {
	s := c.s
	err := c.readLoop()
	if err == errParked {
		return
	}
	c.mu.Lock()
	endErr := c.endErr
	c.mu.Unlock()
	if endErr != nil {
		err = endErr
	}
	quiet := endErr == nil && c.isEnded() // the caller or Close ended the session
	s.unregister(c)
	c.shutdown()
	s.stats.addSession(c) // what the writer's last batch added
	c.release()
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !quiet {
		s.stats.countSessionError(err)
		s.logPeer("relay: session ended", "remote", c.remote, "key", c.key.ShortString(), "err", err)
	}
	if c.done != nil {
		close(c.done)
	}
}

// release frees what startSession took: the AfterFunc and the connection
// slot.
func (c *sconn) release() {
	if c.stopClose != nil {
		c.stopClose()
	}
	// The reader is done: a session that ended with bytes still buffered
	// (a protocol error, a failed login) must give its buffer back too, or
	// the budget of big buffers would shrink for good.
	c.br.drop()
	c.s.releaseConn(c.remoteAddr.Addr())
}

// end marks the session as ended by the server or the caller: a reader
// waiting for the rate limit or an admission hook is woken, and the reader
// will not park again.
func (c *sconn) end() {
	c.mu.Lock()
	if !c.ended {
		c.ended = true
		if c.quit != nil {
			close(c.quit)
		}
		if c.admitCancel != nil {
			c.admitCancel()
		}
	}
	c.mu.Unlock()
}

// isEnded reports whether end was called or the caller's context is done.
func (c *sconn) isEnded() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.endedLocked()
}

func (c *sconn) endedLocked() bool { return c.ended || c.ctx.Err() != nil }

// quitChan returns a channel closed by end, made on first use.
func (c *sconn) quitChan() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.quit == nil {
		c.quit = make(chan struct{})
		if c.ended {
			close(c.quit)
		}
	}
	return c.quit
}

// parseRemote parses a remote address as admitConn and releaseConn key it:
// an IPv4-mapped IPv6 address counts as the IPv4 address. A bare IP, with
// no port, is taken with port 0: middleware that puts the client's address
// from X-Forwarded-For into http.Request.RemoteAddr (chi's RealIP,
// gorilla's ProxyHeaders) leaves it so, and an IPv6 one in brackets, as
// RFC 7239's Forwarded header writes it ("[2001:db8::1]") and
// ProxyHeaders passes it on.
func parseRemote(remoteAddr string) netip.AddrPort {
	ap, err := netip.ParseAddrPort(remoteAddr)
	if err != nil {
		if len(remoteAddr) > 2 && remoteAddr[0] == '[' && remoteAddr[len(remoteAddr)-1] == ']' {
			remoteAddr = remoteAddr[1 : len(remoteAddr)-1]
		}
		ip, _ := netip.ParseAddr(remoteAddr)
		ap = netip.AddrPortFrom(ip, 0)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// perIPKey returns what the per-IP limit counts ip under: an IPv4 address
// itself, an IPv6 address its /64. One IPv6 host holds a whole /64 (SLAAC
// privacy addresses, or any address it gives itself), which is what one
// IPv4 address is to a host or a NAT: counted per address, the limit would
// bind no one.
func perIPKey(ip netip.Addr) netip.Addr {
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return p.Addr()
	}
	return ip
}

// admitConnUnless is admitConn unless the slot was already taken.
func (s *Server) admitConnUnless(admitted bool, ip netip.Addr) error {
	if admitted {
		return nil
	}
	return s.admitConn(ip)
}

func (s *Server) admitConn(ip netip.Addr) error {
	ip = perIPKey(ip)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if s.cfg.maxConns > 0 && int(s.stats.sessions.Load()) >= s.cfg.maxConns {
		return fmt.Errorf("%w: server limit %d", ErrTooManyConnections, s.cfg.maxConns)
	}
	// A remote address that is not an IP (a Unix socket's, a pipe's)
	// counts only against the total: there is no client IP to share.
	if s.cfg.maxConnsPerIP > 0 && ip.IsValid() && s.perIP[ip] >= s.cfg.maxConnsPerIP {
		if ip.Is6() {
			return fmt.Errorf("%w: limit %d per IPv6 /64", ErrTooManyConnections, s.cfg.maxConnsPerIP)
		}
		return fmt.Errorf("%w: limit %d per IP", ErrTooManyConnections, s.cfg.maxConnsPerIP)
	}
	if ip.IsValid() {
		s.perIP[ip]++
	}
	s.stats.sessions.Add(1)
	s.sessions.Add(1)
	return nil
}

func (s *Server) releaseConn(ip netip.Addr) {
	ip = perIPKey(ip)
	s.mu.Lock()
	if ip.IsValid() {
		if s.perIP[ip]--; s.perIP[ip] <= 0 {
			s.perIP = deleteShrink(s.perIP, ip, &s.perIPPeak)
		}
	}
	s.stats.sessions.Add(-1)
	s.mu.Unlock()
	s.sessions.Done()
}

// login runs the server side of the handshake: ServerKey out, ClientInfo in,
// admission, ServerInfo out. upgrade, if not nil, holds an HTTP response
// that goes out first, on the connection below c.nc (WebSocket's 101).
func (s *Server) login(ctx context.Context, c *sconn, upgrade, bw *bufio.Writer) error {
	deadline := time.Now().Add(s.cfg.loginTimeout)
	if s.cfg.loginTimeout > 0 {
		c.nc.SetDeadline(deadline)
	}
	if upgrade != nil {
		if err := upgrade.Flush(); err != nil {
			return fmt.Errorf("send HTTP 101 response: %w", err)
		}
	}
	var kb [serverKeyLen]byte
	if err := writeFrame(bw, FrameServerKey, appendServerKey(kb[:0], s.pub)); err != nil {
		return fmt.Errorf("send server key: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("send server key: %w", err)
	}
	// A client that stops part way through its ClientInfo makes the
	// server hold no read buffer (see readFull) and no more of the
	// payload than it sent: the payload's buffer grows as it arrives.
	var h [frameHeaderLen]byte
	if _, err := c.br.readFull(h[:]); err != nil {
		return fmt.Errorf("receive client info: %w", err)
	}
	t, n := FrameType(h[0]), binary.BigEndian.Uint32(h[1:])
	if t != FrameClientInfo {
		return protoErr("unexpected_frame", t, "want ClientInfo first")
	}
	if n < minClientInfoLen || int64(n) > int64(s.cfg.maxClientInfo) {
		return protoErr("bad_client_info_length", t, fmt.Sprintf("%d bytes, want %d..%d", n, minClientInfoLen, s.cfg.maxClientInfo))
	}
	payload := make([]byte, min(int(n), clientInfoChunk))
	for got := 0; ; {
		k, err := c.br.readFull(payload[got:])
		if got += k; err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF // the client hung up inside the frame
			}
			return fmt.Errorf("receive client info: %w", err)
		}
		if got == int(n) {
			break
		}
		more := min(int(n)-got, got) // doubles: a few reads at most
		payload = slices.Grow(payload, more)[:got+more]
	}
	c.key = PublicKey(payload[:KeyLen])
	if err := checkPeerKey(c.key); err != nil {
		return &ProtocolError{Reason: "bad_client_key", Frame: t, Err: err}
	}
	shared, err := sharedKey(s.priv, c.key)
	if err != nil {
		return &ProtocolError{Reason: "bad_client_key", Frame: t, Err: err}
	}
	sealed := payload[KeyLen:]
	msg, ok := openBox(nil, shared, sealed)
	if !ok {
		return protoErr("bad_client_info_box", t, "box does not open with the claimed key "+c.key.ShortString())
	}
	var info clientInfoJSON
	if err := json.Unmarshal(msg, &info); err != nil {
		return &ProtocolError{Reason: "bad_client_info_json", Frame: t, Err: err}
	}
	if !ValidAppName(info.AppName) {
		return protoErr("bad_app_name", t, fmt.Sprintf("AppName %.40q is not up to %d bytes of printable ASCII", info.AppName, MaxAppNameLen))
	}
	if !s.replay.check([nonceLen]byte(sealed[:nonceLen]), time.Now()) {
		return &ProtocolError{Reason: "replayed_client_info", Frame: t, Err: ErrReplayedLogin}
	}
	c.info = ClientInfo{Version: info.Version, CanAckPings: info.CanAckPings, IsProber: info.IsProber, AppName: info.AppName}
	c.isMesh = s.cfg.hasMeshKey && // a zero (absent) client key never matches
		subtle.ConstantTimeCompare(info.MeshKey[:], s.cfg.meshKey[:]) == 1
	c.pingIdle = s.cfg.idleTimeout > 0 && info.CanAckPings && !c.isMesh
	if !c.isMesh && s.cfg.admit != nil {
		actx, cancel := context.WithCancel(ctx)
		if s.cfg.loginTimeout > 0 {
			actx, cancel = context.WithDeadline(ctx, deadline)
		}
		c.mu.Lock()
		c.admitCancel = cancel // so that Close can cut the hook short
		if c.ended {
			cancel()
		}
		c.mu.Unlock()
		err := s.cfg.admit(actx, Admission{Key: c.key, Info: c.info, RemoteAddr: c.remote})
		c.mu.Lock()
		c.admitCancel = nil
		c.mu.Unlock()
		cancel()
		if err != nil {
			return fmt.Errorf("%w: %s: %w", ErrLoginRejected, c.key.ShortString(), err)
		}
	}
	c.nc.SetDeadline(time.Time{})

	// ServerInfo is written by the writer goroutine as the first item of
	// the outbox, after the client is registered: a client that has seen
	// ServerInfo is reachable, and nothing can overtake it.
	si := serverInfoJSON{Version: ProtocolVersion}
	if rl := s.rate.Load(); !c.isMesh && rl != nil {
		si.TokenBucketBytesPerSecond = rl.bytesPerSec
		si.TokenBucketBytesBurst = rl.burst
		c.applyRate(rl)
	}
	js, _ := json.Marshal(si)
	c.serverInfo = appendFrame(nil, FrameServerInfo, sealBox(make([]byte, 0, nonceLen+boxOverhead+len(js)), shared, js))
	c.start = time.Now()
	return nil
}

// clientInfoChunk is the most of a ClientInfo payload the login reads
// before any of it has arrived: more than a real one needs.
const clientInfoChunk = 1 << 10

func (c *sconn) writeTimeout() time.Duration {
	if c.isMesh {
		return c.s.cfg.meshWriteTimeout
	}
	return c.s.cfg.writeTimeout
}

// register adds c to the routing table and announces it to watchers.
func (s *Server) register(c *sconn) bool {
	// s.mu is held from the routing table's change to the PeerPresent
	// broadcast, as in unregister, and the change is numbered for
	// addWatcher: a watcher then learns of each login exactly once (from
	// its list or from the broadcast), and updates for one key reach it in
	// the order the table changed (a key's PeerGone never follows the
	// PeerPresent of a newer connection).
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return false
	}
	sh := s.shard(c.key)
	sh.mu.Lock()
	e := sh.m[c.key]
	if e == nil {
		e = &keyEntry{}
		sh.m[c.key] = e
	}
	c.entry = e
	e.conns = append(e.conns, c)
	e.active.Store(c)
	s.changeLocked(sh)
	c.regSeq = s.tableSeq
	var dups []*sconn // to tell of the duplicates
	ndup := len(e.conns)
	if ndup > 1 {
		if ndup <= maxDupHealthFanout {
			dups = append(dups, e.conns...)
		} else {
			dups = append(dups, c) // see maxDupHealthFanout
		}
		if ndup == 2 {
			s.stats.dupKeys.Add(1)
			s.stats.dupConns.Add(2)
			e.conns[0].dup.Store(true)
		} else {
			s.stats.dupConns.Add(1)
		}
		s.stats.dupTotal.Add(1)
		c.dup.Store(true) // the others are marked already
	}
	sh.mu.Unlock()
	s.broadcastLocked(c.presence())
	// The gauges change under s.mu, with the table: ConsistencyCheck
	// compares them.
	s.stats.current.Add(1)
	if c.notIdeal {
		s.stats.notIdeal.Add(1)
	}
	// Registered before anything can start the writer (a duplicate's
	// Health notice below does): the writer's first item is ServerInfo,
	// and a client that has it must be listed by Sessions and told by
	// Close that the server is restarting. Both take s.mu before they
	// look (Close to snapshot, Sessions to walk), so it is set under
	// s.mu with the table: a Close right after this release would skip
	// the session otherwise.
	c.mu.Lock()
	c.registered = true
	c.mu.Unlock()
	s.mu.Unlock()
	if h := testHookRegistering.Load(); h != nil {
		(*h)(c)
	}
	s.meshClaimWaiting(c.key, e)
	if c.fastStart {
		s.stats.fastStarts.Add(1)
	} else {
		s.stats.upgrades.Add(1)
	}
	if len(dups) > 0 {
		msg := dupHealth(ndup, c.key)
		for _, d := range dups {
			d.setHealth(msg)
		}
		s.logPeer("relay: duplicate key", "key", c.key.ShortString(), "conns", ndup)
	}
	if s.debug.has(c.key) {
		s.log.Info("relay: debug key: connected", "key", c.key.ShortString(), "remote", c.remote, "conn", c.connNum,
			"fastStart", c.fastStart, "mesh", c.isMesh, "sessions", ndup)
	}
	c.startKeepAlive()
	c.mu.Lock()
	c.kickLocked() // ServerInfo
	c.mu.Unlock()
	s.log.Debug("relay: client connected", "remote", c.remote, "key", c.key.ShortString(), "mesh", c.isMesh, "fastStart", c.fastStart)
	return true
}

// testHookRegistering, if set, is called by register once c is in the
// routing table and s.mu is released. It is nil outside tests.
var testHookRegistering atomic.Pointer[func(c *sconn)]

// maxDupHealthFanout is the most sessions of one key that are each told,
// as one joins or leaves, how many there are. Beyond it only a newcomer is
// told (the others keep the count they had) until the set shrinks back to
// it: telling all of them made each login and logout of n sessions with one
// key cost n Health frames, a flood of n logins n²/2.
const maxDupHealthFanout = 8

// dupHealth is the Health problem of each of n connections sharing key k.
func dupHealth(n int, k PublicKey) string {
	return fmt.Sprintf("another connection (%d in all) is using this node key %s on this relay; only the one that sent last receives packets", n, k.ShortString())
}

// unregister removes c from the routing table. If it was the key's last
// connection, every client that received packets from it is told PeerGone.
func (s *Server) unregister(c *sconn) {
	c.mu.Lock()
	c.registered = false
	c.mu.Unlock()
	s.mu.Lock()
	s.deleteConnLocked(c)
	if _, ok := s.watchers[c]; ok {
		delete(s.watchers, c)
		s.stats.watchers.Add(-1)
	}
	// s.mu is held until the broadcast: see register.
	sh := s.shard(c.key)
	sh.mu.Lock()
	s.changeLocked(sh)
	e := c.entry
	if i := slices.Index(e.conns, c); i >= 0 {
		// slices.Delete clears the vacated slot: a pointer left beyond
		// the length would keep the ended session, and whatever it
		// holds, for as long as the entry lives.
		e.conns = slices.Delete(e.conns, i, i+1)
	}
	var alone *sconn
	var stillDup []*sconn
	var gone map[*sconn]struct{}
	last := len(e.conns) == 0 // read under sh.mu: a duplicate may be leaving too
	wasActive := e.active.Load() == c
	switch len(e.conns) {
	case 0:
		sh.m = deleteShrink(sh.m, c.key, &sh.peak)
		// The entry leaves the table with its set, which nothing adds to
		// any more: sessions that sent here keep the entry (sentTo,
		// lastDstEntry) but must not keep the recipients alive with it.
		gone = e.recipients.m
		e.recipients = recipientSet{}
		e.active.Store(nil)
	case 1:
		alone = e.conns[0]
		alone.dup.Store(false)
		e.active.Store(alone)
		s.stats.dupKeys.Add(-1)
		s.stats.dupConns.Add(-2)
	default:
		if wasActive {
			e.active.Store(e.conns[len(e.conns)-1])
		}
		if len(e.conns) <= maxDupHealthFanout {
			stillDup = append(stillDup, e.conns...)
		}
		s.stats.dupConns.Add(-1)
	}
	sh.mu.Unlock()
	if last {
		s.broadcastLocked(PeerPresent{Key: c.key}) // Flags 0: gone
	}
	// A duplicate leaving, even the active one, is not announced: the key
	// is still here. Announcing the session that remains would make this
	// server the newest route to the key at every mesh peer, taking the
	// route from a server the client has moved to since (a roaming
	// client's old connections linger until they time out).
	s.stats.current.Add(-1)
	if c.notIdeal {
		s.stats.notIdeal.Add(-1)
	}
	recvd, sent := c.recvPkts.Load(), c.sentPkts.Load() // addSession zeroes them
	// Under s.mu, with c gone from s.conns: Stats sees c's counters in
	// exactly one place (a walk in progress that has not counted c yet
	// will not reach it, and adds them).
	t := s.stats.addSession(c)
	if w := s.statsWalk; w != nil && c.statsGen != w.gen {
		w.missed.add(&t)
	}
	s.mu.Unlock()
	if last && c.isMesh {
		s.meshPeerLeft(c.key)
	}
	if c.preferred {
		s.stats.home.Add(-1)
	}
	if s.debug.has(c.key) {
		c.mu.Lock()
		why := c.endErr
		c.mu.Unlock()
		s.log.Info("relay: debug key: disconnected", "key", c.key.ShortString(), "remote", c.remote, "conn", c.connNum,
			"err", why, "received", recvd, "sent", sent, "dropped", c.dropped.Load())
	}
	if alone != nil {
		alone.setHealth("")
	}
	if len(stillDup) > 0 {
		msg := dupHealth(len(stillDup), c.key)
		for _, d := range stillDup {
			d.setHealth(msg)
		}
	}
	if last {
		// c is among them if it sent packets to its own key; it is
		// ending, and telling it that it is gone would only add a
		// bogus last frame before its close.
		delete(gone, c)
		if h := testHookLastLeft.Load(); h != nil {
			(*h)(c.key, func() { s.tellLeft(c.key, gone) })
		} else {
			s.tellLeft(c.key, gone)
		}
	}
}

// tellLeft tells the recipients of k, whose last connection here has just
// left (and watchers were told), that k is gone, unless k is still reached
// through a mesh peer: then its route takes them over.
func (s *Server) tellLeft(k PublicKey, recipients map[*sconn]struct{}) {
	if !s.meshAdopt(k, recipients) {
		for r := range recipients {
			r.enqueuePeerGone(k, PeerGoneDisconnected)
		}
	}
}

// testHookLastLeft, if set, is called by unregister when a key's last
// connection has left the table and watchers have been told, with the
// step that tells the key's recipients: a test logs the key in again
// before running it. It is nil outside tests.
var testHookLastLeft atomic.Pointer[func(k PublicKey, tell func())]

// lookup returns the connection that receives packets for k, or nil.
func (s *Server) lookup(k PublicKey) *sconn {
	_, c := s.lookupEntry(k)
	return c
}

// lookupEntry returns k's routing entry and its active connection.
func (s *Server) lookupEntry(k PublicKey) (*keyEntry, *sconn) {
	sh := s.shard(k)
	sh.mu.RLock()
	e := sh.m[k]
	sh.mu.RUnlock()
	if e == nil {
		return nil, nil
	}
	return e, e.active.Load()
}

// maxSentTo bounds the destinations a session remembers having sent to.
// Those that left are forgotten before the next is added (pruneSentTo).
const maxSentTo = 4096

// noteSentTo registers c to be told PeerGone when dst's last connection
// leaves. Tailscale tells only clients that received from the peer; a client
// that only sent to it would keep sending into the void (and learn nothing
// unless its packets are disco). Reader-owned state makes the common case,
// the same destination again, one comparison.
//
// e may have left the table since c looked it up, its recipients told
// already: noteSentToLeft then registers c with what replaced it, or tells
// c that dst is gone.
func (c *sconn) noteSentTo(dst PublicKey, e *keyEntry) {
	if e == c.lastDstEntry && dst == c.lastDst {
		return
	}
	c.lastDst, c.lastDstEntry = dst, e
	if c.sentTo[dst] == e {
		return
	}
	if c.toldGone.Load() {
		c.pruneSentTo()
	}
	if c.sentTo == nil || len(c.sentTo) >= maxSentTo {
		// Start again rather than grow. The entries c forgets keep it as
		// a recipient (re-registering is harmless); once c has ended,
		// recipientSet.add sweeps it out of them.
		c.sentTo = map[PublicKey]*keyEntry{}
	}
	if h := testHookNoteSentTo.Load(); h != nil {
		(*h)(dst)
	}
	sh := c.s.shard(dst)
	sh.mu.Lock()
	if sh.m[dst] == e {
		e.recipients.add(c)
		c.sentTo[dst] = e
		c.sentToPeak = max(c.sentToPeak, len(c.sentTo))
		sh.mu.Unlock()
		return
	}
	sh.mu.Unlock()
	c.noteSentToLeft(dst)
}

// testHookNoteSentTo, if set, is called by noteSentTo between the routing
// table's lookup and the registration, where a test ends the destination's
// session. It is nil outside tests.
var testHookNoteSentTo atomic.Pointer[func(dst PublicKey)]

// noteSentToLeft registers c as noteSentTo does when dst's entry left the
// routing table after c looked it up (its recipients were told already):
// with the entry of dst's new connection if it has one, else with its
// mesh route, else c is told now that dst is gone. It takes mesh.mu, as
// meshAdopt hands a departed entry's recipients to the route, so that c
// is not missed between the two.
func (c *sconn) noteSentToLeft(dst PublicKey) {
	delete(c.sentTo, dst)
	c.lastDst, c.lastDstEntry = PublicKey{}, nil
	m := &c.s.mesh
	gone := false
	m.mu.Lock()
	sh := c.s.shard(dst)
	sh.mu.Lock()
	if cur := sh.m[dst]; cur != nil {
		cur.recipients.add(c)
		c.sentTo[dst] = cur
		c.sentToPeak = max(c.sentToPeak, len(c.sentTo))
		c.lastDst, c.lastDstEntry = dst, cur
	} else if r := m.routes[dst]; r != nil {
		r.recipients.add(c)
		if c.sentToMesh == nil || len(c.sentToMesh) >= maxSentTo {
			c.sentToMesh = map[PublicKey]*meshRoute{} // see noteSentTo
		}
		c.sentToMesh[dst] = r
		c.sentToMeshPeak = max(c.sentToMeshPeak, len(c.sentToMesh))
	} else {
		gone = true
	}
	sh.mu.Unlock()
	m.mu.Unlock()
	if gone {
		c.enqueuePeerGone(dst, PeerGoneDisconnected)
	}
}

// pruneSentTo drops from sentTo and sentToMesh the destinations that left
// (their entry or route is no longer the table's), and the memory they
// held. The reader calls it only when it is about to add a destination
// and c was told PeerGone since it last ran: nothing on the packet path.
// A departed key's entry has no active connection; a route is checked
// under mesh.mu.
func (c *sconn) pruneSentTo() {
	c.toldGone.Store(false) // before the scan: a departure after it sets it again
	for k, e := range c.sentTo {
		if e.active.Load() == nil {
			delete(c.sentTo, k)
		}
	}
	c.sentTo = shrinkMap(c.sentTo, &c.sentToPeak)
	if c.lastDstEntry != nil && c.lastDstEntry.active.Load() == nil {
		c.lastDst, c.lastDstEntry = PublicKey{}, nil
	}
	if len(c.sentToMesh) == 0 {
		return
	}
	m := &c.s.mesh
	m.mu.RLock()
	for k, r := range c.sentToMesh {
		if m.routes[k] != r {
			delete(c.sentToMesh, k)
		}
	}
	m.mu.RUnlock()
	c.sentToMesh = shrinkMap(c.sentToMesh, &c.sentToMeshPeak)
}

// startKeepAlive arms the session's keepalive timer. It runs no goroutine
// while waiting.
func (c *sconn) startKeepAlive() {
	d := c.s.cfg.keepAlive
	if d <= 0 {
		return
	}
	jitter := rand.N(min(5*time.Second, d/12) + 1) // 60 s + [0, 5 s] by default
	period := d + min(jitter, math.MaxInt64-d)     // saturates: a huge d must not wrap negative
	c.mu.Lock()
	c.nextKeep = time.Now().Add(period)
	c.keepTimer = time.AfterFunc(period, func() { c.keepAliveTick(period) })
	c.mu.Unlock()
}

// keepAliveTick queues a KeepAlive (or liveness Ping) when one is due, and
// ends a parked session whose idle timeout has passed: with no reader
// goroutine, no read deadline can.
func (c *sconn) keepAliveTick(period time.Duration) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	now := time.Now()
	parkedIdle := c.readParkID != 0 && c.pingIdle
	if parkedIdle && !now.Before(c.idleDeadline) {
		c.endErr = c.idleError()
		c.mu.Unlock()
		c.closeConn()
		return
	}
	if !now.Before(c.nextKeep) {
		if c.pingIdle {
			// A Ping does what a KeepAlive does and also proves the
			// client is alive when its Pong comes back.
			binary.LittleEndian.PutUint64(c.ping[:], rand.Uint64())
			c.hasPing = true
		} else {
			c.keepAlive = true
		}
		c.kickLocked()
		c.nextKeep = now.Add(period)
	}
	next := c.nextKeep.Sub(now)
	if parkedIdle {
		next = min(next, c.idleDeadline.Sub(now))
	}
	c.keepTimer.Reset(next)
	c.mu.Unlock()
}

func (c *sconn) idleError() error {
	return &ProtocolError{Reason: "idle_timeout", Err: os.ErrDeadlineExceeded,
		Detail: fmt.Sprintf("nothing, not even a Pong, read for %v from a client that said it answers pings", c.s.cfg.idleTimeout)}
}

// errParked is how readLoop says that its goroutine should exit because the
// session was parked.
var errParked = errors.New("relay: reader parked")

// errIdleStall tells readLoop that the session is idle between frames and
// may be parked.
var errIdleStall = errors.New("relay: idle between frames")

// errNotParkable is the parker's answer for a connection it cannot watch.
var errNotParkable = errors.New("relay: connection cannot be parked")

// setupReads decides, once the session is logged in, how its reads time
// out.
//
// A parkable session has a read deadline of the park delay that is not
// moved by traffic, so that the read path costs nothing: when it passes
// with the reader between frames, the session parks (a busy one wakes again
// at once, a few microseconds every park delay); inside a frame it is
// simply set again. A session that cannot park but answers pings notes when
// each read begins instead, for a deadline of the idle timeout.
func (c *sconn) setupReads() {
	cfg := &c.s.cfg
	// c.br.nc, not c.nc: it is a wrapper when the caller's buffered
	// reader held more than c.br could take, and neither parking nor raw
	// reads may skip those bytes.
	c.parkable = c.s.mayPark(c.br.nc) &&
		!(c.pingIdle && cfg.keepAlive <= 0) // the keepalive timer enforces idle_timeout while parked
	c.br.onStall = c.onStall
	if raw := rawReader(c.br.nc); raw != nil {
		c.br.raw = raw
		c.br.rawFn = c.br.rawRead
	}
	switch {
	case c.parkable:
		c.br.timeout = cfg.idlePark
		if c.pingIdle {
			c.br.timeout = min(cfg.idlePark, cfg.idleTimeout)
		}
		// Park as soon as the client has nothing more to say after its
		// login, instead of after the park delay: a storm of logins
		// (every client of a restarted server) then never holds a
		// goroutine per session.
		c.br.arm(time.Now(), 0)
	case c.pingIdle:
		c.br.timeout = cfg.idleTimeout
		c.br.track = true
	}
}

// onStall decides what a read that timed out means; since is when the read
// began (tracked sessions only; a wait for the rate limit inside the read
// moves it to the wait's end), and boundary says no byte of the next
// frame has arrived. It returns nil to keep waiting, errIdleStall to have
// readLoop park the reader, or the error that ends the session.
func (c *sconn) onStall(since time.Time, boundary bool) error {
	now := time.Now()
	cfg := &c.s.cfg
	if c.br.track {
		if c.pacedAt.After(since) {
			// The read waited for the rate limit (over WebSocket,
			// inside the read): the client's silence, if any, began
			// when the wait ended.
			since = c.pacedAt
		}
		idle := now.Sub(since)
		if idle >= cfg.idleTimeout {
			return c.idleError()
		}
		c.br.arm(now, min(c.br.timeout, cfg.idleTimeout-idle))
		return nil
	}
	if boundary {
		// readLoop parks the reader once nothing of this goroutine's
		// stack refers to the reader's state any more.
		return errIdleStall
	}
	// Inside a frame: a slow client, or one that stopped mid-frame. The
	// deadline is not moved by traffic, so the first one to pass may
	// come just after a byte: only the whole periods after it are
	// silence.
	if c.pingIdle && time.Duration(c.br.stalls-1)*c.br.timeout >= cfg.idleTimeout {
		return c.idleError()
	}
	c.br.arm(now, c.br.timeout)
	return nil
}

// parkReader hands the idle session's socket to the server's parker; the
// reader goroutine then exits and must not touch the session's reader state
// any more. If the session cannot be parked it goes on as one that cannot.
func (c *sconn) parkReader() bool {
	var parkErr error
	defer func() { // after c.mu is unlocked: no log handler runs under it
		if parkErr != nil {
			c.s.logParkFailure("remote", c.remote, "err", parkErr)
		}
	}()
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	if c.closed || c.endedLocked() {
		c.br.arm(now, c.br.timeout) // the reader sees the end soon
		return false
	}
	id, err := c.s.park.add(c)
	if err != nil {
		parkErr = err
		c.parkable = false
		if c.pingIdle {
			c.br.timeout, c.br.track = c.s.cfg.idleTimeout, true
			c.br.armedAt = time.Time{}
		} else {
			c.br.timeout = 0
			c.nc.SetReadDeadline(time.Time{})
		}
		return false
	}
	c.readParkID = id
	c.br.drop() // empty: the reader is between frames
	if ws, ok := c.br.nc.(*wsConn); ok {
		ws.releaseReadBuffer()
	}
	c.br.resumed = true // the deadline has passed: the next reader sets it again
	if c.pingIdle {
		// The client has been quiet for up to a park delay already;
		// counting from now errs by at most that on the late side.
		c.idleDeadline = now.Add(c.s.cfg.idleTimeout)
		if c.keepTimer != nil && c.idleDeadline.Before(c.nextKeep) {
			c.keepTimer.Reset(time.Until(c.idleDeadline))
		}
	}
	return true
}

// resumed is the parker's call when the parked socket id became readable.
func (c *sconn) resumed(id uint64) {
	c.mu.Lock()
	if c.readParkID == id {
		c.readParkID = 0
	}
	c.mu.Unlock()
	go c.serve()
}

// unpark resumes a parked reader so that it sees the session end. Callers
// call end first (or the caller's context is done), so the reader does not
// park again.
func (c *sconn) unpark() {
	c.mu.Lock()
	id := c.readParkID
	c.readParkID = 0
	c.mu.Unlock()
	if id != 0 && c.s.park.remove(c, id) {
		go c.serve()
	}
}

// shutdown ends the session's writer side: queued packets are counted as
// dropped and the connection is closed.
func (c *sconn) shutdown() {
	c.mu.Lock()
	c.closed = true
	if c.parked {
		c.parked = false
		select {
		case c.wake <- struct{}{}:
		default:
		}
	}
	if c.keepTimer != nil {
		c.keepTimer.Stop()
	}
	c.mu.Unlock()
	c.end()
	c.nc.Close()
	c.writers.Wait()
	c.s.forgetRecipient(c) // reader and writer are done: no more registrations
	c.mu.Lock()
	c.dropAllLocked(dropGone)
	c.mu.Unlock()
}

// forgetRecipient removes the ended session c from the recipients of every
// key it sent to or received from, which would otherwise keep it (and its
// maps) until those keys leave: a client reconnecting in a loop to send to
// one long-lived peer would grow that peer's entry without bound.
func (s *Server) forgetRecipient(c *sconn) {
	c.left.Store(true)
	for dst, e := range c.sentTo {
		sh := s.shard(dst)
		sh.mu.Lock()
		if sh.m[dst] == e { // a removed entry's set belongs to its unregister
			e.recipients.remove(c)
		}
		sh.mu.Unlock()
	}
	// c may stay in sets it was forgotten from (see noteSentTo) until they
	// are swept: it should hold no more than itself meanwhile.
	c.sentTo, c.lastDst, c.lastDstEntry = nil, PublicKey{}, nil
	c.mu.Lock()
	from := make([]PublicKey, 0, len(c.sentFrom))
	for k := range c.sentFrom {
		from = append(from, k)
	}
	c.mu.Unlock()
	if len(from) == 0 && len(c.sentToMesh) == 0 && !c.waits.Load() {
		return
	}
	// A popular client (a subnet router, an exit node) may have heard
	// from tens of thousands of peers: mesh.mu, which every packet for a
	// key not connected here needs, is released every meshLockBatch keys.
	// Each key is handled under one hold, as meshAdopt and
	// meshUnrouteLocked move a key's recipients between its entry and its
	// route under mesh.mu.
	held := 0
	s.mesh.mu.Lock()
	// Taken under mesh.mu, as takeWaitingLocked changes it; from now on
	// it is c's alone.
	waitFor := c.waitFor
	c.waitFor = nil
	next := func() {
		if held++; held > meshLockBatch {
			s.mesh.mu.Unlock()
			testMeshBatchDone(held - 1)
			held = 1
			s.mesh.mu.Lock()
		}
	}
	for k, r := range c.sentToMesh {
		next()
		if s.mesh.routes[k] == r { // a removed route's set belongs to whoever removed it
			r.recipients.remove(c)
		}
	}
	for k := range waitFor {
		next()
		if w := s.mesh.waiting[k]; w != nil {
			if _, ok := w.sessions[c]; ok {
				delete(w.sessions, c)
				s.mesh.waits--
				s.noteWaits(k, waitEnded, 1)
			}
			if len(w.sessions) == 0 {
				s.mesh.deleteWaitingLocked(k)
			}
		}
	}
	for _, k := range from {
		next()
		if r := s.mesh.routes[k]; r != nil {
			r.recipients.remove(c)
		}
		sh := s.shard(k)
		sh.mu.Lock()
		if e := sh.m[k]; e != nil {
			e.recipients.remove(c)
		}
		sh.mu.Unlock()
	}
	s.mesh.mu.Unlock()
	testMeshBatchDone(held)
}

// recipientSet is the sessions to tell when a key leaves. Sessions that
// ended remove themselves (forgetRecipient) from the sets they know of; add
// sweeps out any others, so a set holds at most about twice its live
// members, and its map is rebuilt smaller once most have gone (shrinkMap).
type recipientSet struct {
	m       map[*sconn]struct{}
	sweepAt int // size at which add next sweeps
	peak    int // most m has held since it was last rebuilt
}

// minSweep is the size below which a recipientSet is not swept.
const minSweep = 64

func (rs *recipientSet) add(c *sconn) {
	if rs.m == nil {
		rs.m = map[*sconn]struct{}{}
	}
	if len(rs.m) >= max(rs.sweepAt, minSweep) {
		for r := range rs.m {
			if r.left.Load() {
				delete(rs.m, r)
			}
		}
		rs.m = shrinkMap(rs.m, &rs.peak)
		if rs.m == nil {
			rs.m = map[*sconn]struct{}{}
		}
		rs.sweepAt = 2 * len(rs.m)
	}
	rs.m[c] = struct{}{}
	rs.peak = max(rs.peak, len(rs.m))
}

// remove removes c, which has ended.
func (rs *recipientSet) remove(c *sconn) {
	delete(rs.m, c)
	rs.m = shrinkMap(rs.m, &rs.peak)
}

// merge adds the members of o.
func (rs *recipientSet) merge(o map[*sconn]struct{}) {
	for r := range o {
		rs.add(r)
	}
}

// readLoop reads and dispatches frames until the connection ends.
func (c *sconn) readLoop() error {
	var sinceYield uint32
	if c.br.resumed {
		// A parked session woke up: its deadline has passed.
		c.br.resumed = false
		c.br.arm(time.Now(), c.br.timeout)
	}
	for {
		// A reader whose client always has more to send never blocks,
		// and the Go scheduler would let it run for a whole 10 ms time
		// slice, starving the writers that drain the queues it fills: on
		// a busy server nearly everything read would be dropped. Yielding
		// every readYieldBytes keeps reading and writing in proportion.
		if sinceYield >= readYieldBytes {
			sinceYield = 0
			runtime.Gosched()
		}
		c.br.boundary = true // a timeout here may park the reader
		t, n, err := readFrameHeader(c.br)
		c.br.boundary = false
		if err == errIdleStall {
			if c.parkReader() {
				return errParked
			}
			continue
		}
		sinceYield += frameHeaderLen + min(n, maxForwardFrame)
		if err != nil {
			if err == io.ErrUnexpectedEOF { // a partial header
				err = truncatedFrame(t)
			}
			return err
		}
		if !c.isMesh {
			if rl := c.s.rate.Load(); rl != c.rateCfg {
				c.applyRate(rl)
			}
			if c.rateLimit != nil {
				if err := c.paceRead(t, n); err != nil {
					if err == io.ErrUnexpectedEOF {
						err = truncatedFrame(t)
					}
					return err
				}
			}
		}
		if c.dup.Load() {
			c.noteDupActivity()
		}
		switch t {
		case FrameSendPacket:
			err = c.handleSendPacket(n)
		case FrameForwardPacket:
			err = c.handleForwardPacket(n)
		case FrameNotePreferred:
			err = c.handleNotePreferred(n)
		case FramePing:
			err = c.handlePing(n)
		case FrameWatchConns:
			err = c.handleWatchConns(n)
		case FrameClosePeer:
			err = c.handleClosePeer(n)
		case FramePong:
			c.s.stats.gotPong.Add(1)
			if n > maxServerPingLen {
				err = protoErr("bad_pong_length", t, fmt.Sprintf("%d bytes", n))
			} else {
				_, err = c.br.Discard(int(n))
			}
		default:
			err = c.skipFrame(t, n)
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			// bufio reports the end of the stream inside a payload as a
			// plain io.EOF, which would end the session silently.
			err = truncatedFrame(t)
		}
		if err != nil {
			return err
		}
	}
}

// truncatedFrame is the error of a stream that ended inside a frame; only
// EOF between frames ends a session quietly.
func truncatedFrame(t FrameType) error {
	return &ProtocolError{Reason: "truncated_frame", Frame: t, Detail: "connection ended inside a frame", Err: io.ErrUnexpectedEOF}
}

// readYieldBytes is how much a session's reader handles before it lets
// other goroutines (the writers) run; see readLoop.
const readYieldBytes = 64 << 10

// maxUnknownFrame bounds frames the server reads and discards (unknown
// types, a second ClientInfo, KeepAlive; a Pong has the limit of a Ping).
// Tailscale's server read up to 4 GiB of such frames before v1.104 and
// 64 KiB + 32 since; no legitimate client sends more than a few bytes, and
// the room left is for frame types yet to come.
const maxUnknownFrame = 1 << 20

func (c *sconn) skipFrame(t FrameType, n uint32) error {
	if n > maxUnknownFrame {
		return protoErr("frame_too_large", t, fmt.Sprintf("%d bytes, limit %d for frames the server ignores", n, maxUnknownFrame))
	}
	c.s.stats.unknownFrames.Add(1)
	// The first chunk was paid for before the frame (paceRead); under a
	// rate limit each next one is paid for once the one before has come.
	for left := int(n); ; {
		k := min(left, paceChunk)
		if _, err := c.br.Discard(k); err != nil {
			return err
		}
		if left -= k; left == 0 {
			return nil
		}
		if c.rateLimit != nil {
			if err := c.pace(min(left, paceChunk), false, left); err != nil {
				return err
			}
		}
	}
}

// paceRead waits until the client's token bucket can pay for a frame of
// type t with n bytes of payload: waiting just stops reading, so TCP flow
// control slows the client. Every byte the server will read is paid for,
// the 5-byte header too, as the client's own bucket counts it (Tailscale
// charges the payload alone, so a flood of empty frames passes unpaced,
// and caps the cost at one maximal SendPacket, which lets 1 MiB frames that
// the server reads and discards through at 16 times the limit). A frame
// longer than its type allows (maxFrameLen) is refused unread, so it costs
// its header only: a lying length buys no wait before it is refused. Of a
// frame longer than paceChunk (one the server skips), the rest is paid for
// as skipFrame reads it.
//
// Clients count their SendPackets alone against the limit ServerInfo
// announces. What they send besides (Pings, Pongs, NotePreferred) and,
// over WebSocket, the framing (paceFraming) is paid for from a second
// bucket of the same rate and burst (rateExtra): a client that keeps its
// packets within the limit never waits because of those frames, nor do its
// liveness checks wait behind its packets, while a flood of those frames
// is paced like any other.
//
// A wait ends early when Server.SetRateLimit changes the limit: the debt is
// then paid at the new rate, or forgiven if the limit is gone.
func (c *sconn) paceRead(t FrameType, n uint32) error {
	cost := frameHeaderLen
	if n <= maxFrameLen(t) {
		// Only the frames skipFrame reads are longer than a chunk: it
		// pays for the rest as it reads it.
		cost += int(min(n, paceChunk))
	}
	extra := t == FramePing || t == FramePong || t == FrameNotePreferred
	need := 0
	if n <= maxFrameLen(t) {
		need = int(n)
	}
	return c.pace(cost, extra, need)
}

// paceChunk is the most of a frame's payload paid for before its bytes
// are read: one maximal SendPacket. A longer frame (one the server skips)
// is paid for a chunk at a time as skipFrame reads it, so that a client
// that sends the header of a 1 MiB frame and hangs up does not keep its
// session for the wait the whole frame would buy.
const paceChunk = maxSendFrame

// maxFrameLen is the longest payload of a frame of type t that the reader
// reads from a client not of the mesh (the only ones paced): a longer one
// ends the session unread (each handler checks it). ForwardPacket,
// WatchConns and ClosePeer end it whatever their length, unread.
func maxFrameLen(t FrameType) uint32 {
	switch t {
	case FrameSendPacket:
		return maxSendFrame
	case FramePing, FramePong:
		return maxServerPingLen
	case FrameNotePreferred:
		return 1
	case FrameForwardPacket, FrameWatchConns, FrameClosePeer:
		return 0
	}
	return maxUnknownFrame
}

// paceFraming makes a WebSocket client pay for n bytes of framing under
// the rate limit, from the bucket of what clients do not count (see
// paceRead, wsConn.pace). The reader calls it in the middle of a read.
func (c *sconn) paceFraming(n int) error {
	if c.isMesh {
		return nil
	}
	if rl := c.s.rate.Load(); rl != c.rateCfg {
		c.applyRate(rl)
	}
	if c.rateLimit == nil {
		return nil
	}
	return c.pace(n, true, 0)
}

// pace waits until the token bucket (rateExtra if extra, else rateLimit)
// can pay cost bytes (see paceRead). need is how many more bytes the frame
// being read needs (zero if it will not be read): over a plain TCP socket
// on Linux, a wait longer than paceProbe looks at the socket every
// paceProbe, and ends with io.ErrUnexpectedEOF once the client has hung up
// (its FIN or a reset arrived) without sending what the frame needs, which
// readLoop reports as a truncated frame (the read after the wait would end
// the same way after a FIN, and with the reset's error after a reset).
// Other sockets (a Unix socket's) are not looked at.
func (c *sconn) pace(cost int, extra bool, need int) error {
	bucket := func() *tokenBucket {
		if extra {
			return c.rateExtra
		}
		return c.rateLimit
	}
	d := bucket().reserve(cost, time.Now())
	if d <= 0 {
		return nil
	}
	c.s.stats.rateWaits.Add(1)
	defer func() { c.pacedAt = time.Now() }()
	var sc syscall.Conn
	if need > c.br.Buffered() && c.br.raw != nil {
		if tc, ok := c.br.nc.(*net.TCPConn); ok {
			sc = tc
		}
	}
	step := func(d time.Duration) time.Duration {
		if sc != nil {
			return min(d, paceProbe)
		}
		return d
	}
	until := time.Now().Add(d)
	t := time.NewTimer(step(d))
	defer t.Stop()
	for {
		select {
		case <-t.C:
			if d = time.Until(until); d <= 0 {
				return nil
			}
			if sc != nil && peerSentLess(sc, need-c.br.Buffered()) {
				return io.ErrUnexpectedEOF
			}
			t.Reset(step(d))
		case <-c.rateCfg.changed:
			c.applyRate(c.s.rate.Load())
			if c.rateLimit == nil {
				return nil
			}
			now := time.Now()
			if d = bucket().reserve(0, now); d <= 0 {
				return nil
			}
			until = now.Add(d)
			t.Reset(step(d))
		case <-c.quitChan():
			return net.ErrClosed
		case <-c.ctx.Done():
			return c.ctx.Err()
		}
	}
}

// paceProbe is how often a long wait for the rate limit looks whether the
// client hung up in the middle of its frame (see pace).
const paceProbe = time.Second

// rateLimit is a per-client receive limit set by WithRateLimit or
// SetRateLimit. It is immutable; changed is closed when it is replaced.
type rateLimit struct {
	bytesPerSec, burst int
	changed            chan struct{}
}

// newRateLimit returns nil (no limit) for bytesPerSec <= 0, and raises burst
// to one maximal SendPacket frame, header included (minRateBurst): a
// smaller one could never pay for it.
func newRateLimit(bytesPerSec, burst int) *rateLimit {
	if bytesPerSec <= 0 {
		return nil
	}
	return &rateLimit{bytesPerSec: bytesPerSec, burst: max(burst, minRateBurst), changed: make(chan struct{})}
}

// minRateBurst is the least burst of a rate limit, which ServerInfo
// announces: the cost of one maximal SendPacket frame, as the server and
// clients (ours and Tailscale's, which never sends a packet that costs more
// than the burst) count it.
const minRateBurst = frameHeaderLen + maxSendFrame

// SetRateLimit changes the limit of WithRateLimit while the server runs:
// bytes per second of frames (header included) that each non-mesh client
// may send, with the given burst (and as much again of Pings, Pongs,
// NotePreferred and WebSocket framing); zero bytesPerSec removes the limit.
// Sessions follow it from their next frame (a read waiting for tokens is
// woken to pay its debt at the new rate); ServerInfo announces it to
// clients that log in afterwards, since the protocol has no way to tell
// those already connected.
func (s *Server) SetRateLimit(bytesPerSec, burst int) {
	old := s.rate.Swap(newRateLimit(bytesPerSec, burst))
	if old != nil {
		close(old.changed)
	}
}

// applyRate makes the session's token buckets follow rl, keeping what the
// client saved (up to the new burst) or owes.
func (c *sconn) applyRate(rl *rateLimit) {
	c.rateCfg = rl
	switch {
	case rl == nil:
		c.rateLimit, c.rateExtra = nil, nil
	case c.rateLimit == nil:
		now := time.Now()
		c.rateLimit = &tokenBucket{rate: float64(rl.bytesPerSec), burst: float64(rl.burst),
			tokens: float64(rl.burst), last: now}
		e := *c.rateLimit
		c.rateExtra = &e
	default:
		now := time.Now()
		for _, b := range [2]*tokenBucket{c.rateLimit, c.rateExtra} {
			b.refill(now)
			b.rate, b.burst = float64(rl.bytesPerSec), float64(rl.burst)
			b.tokens = min(b.tokens, b.burst)
		}
	}
}

// noteDupActivity makes c the active connection of its key: with duplicate
// connections, the one that sent last receives.
func (c *sconn) noteDupActivity() {
	if c.entry.active.Load() != c {
		sh := c.s.shard(c.key)
		sh.mu.Lock()
		if c.dup.Load() {
			c.entry.active.Store(c)
		}
		sh.mu.Unlock()
	}
}

func (c *sconn) handleSendPacket(n uint32) error {
	if n < KeyLen {
		return protoErr("short_send_packet", FrameSendPacket, fmt.Sprintf("%d bytes", n))
	}
	if n > maxSendFrame {
		return protoErr("packet_too_large", FrameSendPacket, fmt.Sprintf("%d-byte packet, limit %d", n-KeyLen, MaxPacketSize))
	}
	kb, err := c.br.Peek(KeyLen)
	if err != nil {
		return err
	}
	dst := PublicKey(kb)
	c.br.Discard(KeyLen)
	return c.s.routePacket(c, c.key, dst, int(n-KeyLen), false)
}

func (c *sconn) handleForwardPacket(n uint32) error {
	if !c.isMesh {
		return &ProtocolError{Reason: "forward_not_mesh", Frame: FrameForwardPacket, Err: ErrNotMesh}
	}
	if n < 2*KeyLen {
		return protoErr("short_forward_packet", FrameForwardPacket, fmt.Sprintf("%d bytes", n))
	}
	if n > maxForwardFrame {
		return protoErr("packet_too_large", FrameForwardPacket, fmt.Sprintf("%d-byte packet, limit %d", n-2*KeyLen, MaxPacketSize))
	}
	kb, err := c.br.Peek(2 * KeyLen)
	if err != nil {
		return err
	}
	src, dst := PublicKey(kb[:KeyLen]), PublicKey(kb[KeyLen:])
	c.br.Discard(2 * KeyLen)
	return c.s.routePacket(c, src, dst, int(n-2*KeyLen), true)
}

// routePacket reads an n-byte packet from c and delivers it to dst: to its
// local connection, else (for packets not already forwarded) through a mesh
// peer, else it is dropped and, if it is disco, the sender is told NotHere.
func (s *Server) routePacket(c *sconn, src, dst PublicKey, n int, forwarded bool) error {
	var e *keyEntry
	var dc *sconn
	if !forwarded && dst == c.lastDst && c.lastDstEntry != nil {
		// The same destination as the last packet: its entry is still
		// the routing table's while it has an active connection (an
		// entry leaves the table and loses its connection together).
		e = c.lastDstEntry
		dc = e.active.Load()
	}
	if dc == nil {
		e, dc = s.lookupEntry(dst)
	}
	if dc != nil {
		if !forwarded {
			c.noteSentTo(dst, e)
		}
		p := getPacket(n)
		if _, err := io.ReadFull(c.br, p.buf[:n]); err != nil {
			putPacket(p)
			return err
		}
		p.n = n
		p.src = src
		if forwarded {
			p.via = c // its waits' peer, if src has no route (meshNoteRecipient)
		} else {
			p.srcConn = c
		}
		disco := looksLikeDisco(p.buf[:n])
		if forwarded {
			s.stats.forwardedIn.Add(1)
		} else {
			c.recvPkts.Add(1)
			c.recvBytes.Add(int64(n))
		}
		dc.enqueue(p, disco)
		return nil
	}
	var head [minDiscoLen]byte
	m := copy(head[:], peekUpTo(c.br, min(n, minDiscoLen)))
	disco := looksLikeDisco(head[:m]) && n >= minDiscoLen
	if !forwarded {
		if r := s.meshForward(src, dst, c.br, n); r != nil {
			c.noteSentToMesh(dst, r)
			c.recvPkts.Add(1)
			c.recvBytes.Add(int64(n))
			return nil
		}
	}
	if _, err := c.br.Discard(n); err != nil {
		return err
	}
	reason := dropUnknownDest
	if forwarded {
		s.stats.forwardedIn.Add(1) // received, as the drop counted below
		reason = dropUnknownDestOnFwd
	} else {
		c.recvPkts.Add(1)
		c.recvBytes.Add(int64(n))
	}
	s.stats.drop(reason, disco, n)
	s.debugDrop(reason, src, dst, disco, n)
	if disco && c.notHere.allow(1, time.Now()) {
		s.tellNotHere(c, dst)
	}
	return nil
}

// tellNotHere queues PeerGone(dst, NotHere) to c. A mesh peer watching
// this server drops its route to dst when told, so for a mesh session dst
// is looked up again under s.mu, where logins are announced: if dst logged
// in since routePacket looked, its PeerPresent may already be queued, and a
// NotHere after it would leave the peer with no route to a connected key.
func (s *Server) tellNotHere(c *sconn, dst PublicKey) {
	if !c.isMesh {
		c.enqueuePeerGone(dst, PeerGoneNotHere)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lookup(dst) == nil {
		c.enqueuePeerGone(dst, PeerGoneNotHere)
	}
}

func peekUpTo(br *connReader, n int) []byte {
	b, _ := br.Peek(min(n, br.Size()))
	return b
}

func (c *sconn) handleNotePreferred(n uint32) error {
	if n != 1 {
		return protoErr("bad_note_preferred_length", FrameNotePreferred, fmt.Sprintf("%d bytes, want 1", n))
	}
	b, err := c.br.ReadByte()
	if err != nil {
		return err
	}
	v := b != 0
	if v == c.preferred {
		return nil
	}
	c.preferred = v
	c.home.Store(v)
	if v {
		c.s.stats.home.Add(1)
	} else {
		c.s.stats.home.Add(-1)
	}
	if time.Since(c.start) > 5*time.Second {
		if v {
			c.s.stats.homeMovesIn.Add(1)
		} else {
			c.s.stats.homeMovesOut.Add(1)
		}
	}
	return nil
}

func (c *sconn) handlePing(n uint32) error {
	if n < minPingLen || n > maxServerPingLen {
		return protoErr("bad_ping_length", FramePing, fmt.Sprintf("%d bytes, want 8..%d", n, maxServerPingLen))
	}
	b, err := c.br.Peek(8)
	if err != nil {
		return err
	}
	data := [8]byte(b)
	if _, err := c.br.Discard(int(n)); err != nil {
		return err
	}
	c.s.stats.gotPing.Add(1)
	c.mu.Lock()
	if !c.hasPong && !c.closed {
		c.pong, c.hasPong = data, true
		c.kickLocked()
	}
	c.mu.Unlock()
	return nil
}

func (c *sconn) handleWatchConns(n uint32) error {
	if !c.isMesh {
		return &ProtocolError{Reason: "watch_not_mesh", Frame: FrameWatchConns, Err: ErrNotMesh}
	}
	if n != 0 {
		return protoErr("bad_watch_conns_length", FrameWatchConns, fmt.Sprintf("%d bytes, want 0", n))
	}
	if c.key == c.s.pub {
		return nil // a server watching itself: nothing to learn
	}
	c.s.addWatcher(c)
	return nil
}

func (c *sconn) handleClosePeer(n uint32) error {
	if !c.isMesh {
		return &ProtocolError{Reason: "close_peer_not_mesh", Frame: FrameClosePeer, Err: ErrNotMesh}
	}
	if n != KeyLen {
		return protoErr("bad_close_peer_length", FrameClosePeer, fmt.Sprintf("%d bytes, want %d", n, KeyLen))
	}
	b, err := c.br.Peek(KeyLen)
	if err != nil {
		return err
	}
	k := PublicKey(b)
	c.br.Discard(KeyLen)
	closed := c.s.closePeer(k)
	c.s.log.Info("relay: closed peer on mesh request", "key", k.ShortString(), "conns", closed, "by", c.key.ShortString())
	return nil
}

// ClosePeer ends every session of key k on this server, as a mesh peer's
// ClosePeer frame does, and reports how many there were. The client may
// reconnect: it is an operator's tool to move clients elsewhere (or to
// restart a stuck session), not a ban; refuse keys with WithAdmission.
func (s *Server) ClosePeer(k PublicKey) int {
	n := s.closePeer(k)
	s.log.Info("relay: closed peer", "key", k.ShortString(), "conns", n)
	return n
}

// SessionInfo describes one client session, for debugging and operator
// pages: see Server.Sessions.
type SessionInfo struct {
	Key        PublicKey      // the client's key
	Info       ClientInfo     // what the client said at login
	RemoteAddr netip.AddrPort // zero if the caller of Accept gave none
	Connected  time.Time      // when the login completed
	Mesh       bool           // a mesh peer (logged in with the mesh key)
	Home       bool           // the client said this server is its home
	Duplicate  bool           // another session has the same key
	Active     bool           // this session receives the key's packets
	NotIdeal   bool           // the upgrade request had Ideal-Node
	FastStart  bool           // logged in without waiting for the 101
	WebSocket  bool           // DERP over WebSocket
	Parked     bool           // idle, with no reader goroutine (WithIdlePark)
	// Packets and bytes (without framing) received from and sent to the
	// client so far; two snapshots give its traffic in between.
	PacketsReceived, BytesReceived int64
	PacketsSent, BytesSent         int64
	// PacketsDropped counts packets for the client that were dropped
	// here: pushed out of its full queue, or lost to a failed write or
	// the session's end (Stats.PacketsDropped has them by reason).
	PacketsDropped int64
	// Senders counts the distinct peers whose packets reached the client
	// and that have not disconnected since, as far as this server knows.
	// (Exact, where Tailscale's debug page estimates it, but for one case
	// in a mesh: a key forwarded by a mesh peer before its route reached
	// this server stays counted until it is known to leave, so one that
	// left before its route arrived stays counted until the server gives
	// the wait up, 30 s or more later (see the README's mesh section);
	// beyond the server's bound on such waits, 16384, such a key is not
	// counted until its next packet. The client is also told PeerGone
	// about peers it only sent to; those are not counted.)
	Senders int
	// RTT is the kernel's smoothed round-trip time of the session's TCP
	// connection (Linux), or zero where unknown.
	RTT time.Duration
}

// Sessions returns the server's logged-in sessions in the order they
// connected. It takes a snapshot of which sessions exist, then describes each
// as the loop reaches it (skipping those that ended meanwhile); the loop body
// may call the Server's methods. The snapshot is taken a few hundred
// sessions at a time, so that logins and logouts do not wait for all of
// them; it lists the sessions logged in when the call began, and none that
// logged in after. On Linux each session costs one system call (for RTT).
func (s *Server) Sessions() iter.Seq[SessionInfo] {
	return func(yield func(SessionInfo) bool) {
		s.mu.Lock()
		n, seq := len(s.conns), s.tableSeq
		s.mu.Unlock()
		conns := make([]*sconn, 0, n) // not under s.mu: n may be 100k
		s.mu.Lock()
		last := s.walkConnsLocked(func(c *sconn) {
			// A session that logged in after the first hold of s.mu
			// has a later number.
			if c.entry != nil && c.regSeq <= seq {
				conns = append(conns, c)
			}
		})
		s.mu.Unlock()
		testConnsBatchDone(last)
		slices.SortFunc(conns, func(a, b *sconn) int { return cmp.Compare(a.connNum, b.connNum) })
		for _, c := range conns {
			c.mu.Lock()
			// unregister clears registered under c.mu before it moves
			// the counters into the totals: read them here too.
			parked, gone, senders := c.readParkID != 0, c.closed || !c.registered, len(c.sentFrom)
			recvP, recvB := c.recvPkts.Load(), c.recvBytes.Load()
			sentP, sentB := c.sentPkts.Load(), c.sentBytes.Load()
			c.mu.Unlock()
			if gone {
				continue
			}
			_, ws := c.nc.(*wsConn)
			si := SessionInfo{
				Key:             c.key,
				Info:            c.info,
				RemoteAddr:      c.remoteAddr,
				Connected:       c.start,
				Mesh:            c.isMesh,
				Home:            c.home.Load(),
				Duplicate:       c.dup.Load(),
				Active:          c.entry.active.Load() == c,
				NotIdeal:        c.notIdeal,
				FastStart:       c.fastStart,
				WebSocket:       ws,
				Parked:          parked,
				PacketsReceived: recvP,
				BytesReceived:   recvB,
				PacketsSent:     sentP,
				BytesSent:       sentB,
				PacketsDropped:  c.dropped.Load(),
				Senders:         senders,
				RTT:             socketRTT(parkSocket(c.nc)),
			}
			if !yield(si) {
				return
			}
		}
	}
}

// ConsistencyCheck verifies the server's internal bookkeeping, for health
// checks and tests: that the routing table and the session list agree, that
// every key's receiving session is one of its sessions, and that the gauges
// of Stats match what they count. It returns nil or an error listing the
// problems found (the first 20) on one line, separated by "; ". It holds
// the server's lock while it runs, so logins and logouts wait; it costs a
// walk over all sessions.
func (s *Server) ConsistencyCheck() error {
	var errs []error
	bad := func(format string, args ...any) {
		if len(errs) < 20 {
			errs = append(errs, fmt.Errorf(format, args...))
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	registered := map[*sconn]bool{}
	var notIdeal int64
	for c := range s.conns {
		if c.entry != nil {
			registered[c] = false
			if c.notIdeal {
				notIdeal++
			}
		}
	}
	var dupKeys, dupConns int64
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.RLock()
		for k, e := range sh.m {
			if s.shard(k) != sh {
				bad("key %s is in routing shard %d, want %d", k.ShortString(), i, k[0]%numShards)
			}
			if len(e.conns) == 0 {
				bad("key %s has a routing entry but no session", k.ShortString())
				continue
			}
			if len(e.conns) > 1 {
				dupKeys++
				dupConns += int64(len(e.conns))
			}
			active := e.active.Load()
			if !slices.Contains(e.conns, active) {
				bad("key %s: the session receiving its packets is not one of its %d sessions", k.ShortString(), len(e.conns))
			}
			for _, c := range e.conns {
				seen, ok := registered[c]
				switch {
				case !ok:
					bad("key %s: a routed session (conn %d) is not in the session list", k.ShortString(), c.connNum)
				case seen:
					bad("key %s: session (conn %d) routed twice", k.ShortString(), c.connNum)
				}
				registered[c] = true
				if c.key != k || c.entry != e {
					bad("conn %d: routed under key %s, but it is %s's", c.connNum, k.ShortString(), c.key.ShortString())
				}
				if c.dup.Load() != (len(e.conns) > 1) {
					bad("conn %d: duplicate flag %v with %d sessions for its key", c.connNum, c.dup.Load(), len(e.conns))
				}
			}
		}
		sh.mu.RUnlock()
	}
	for c, seen := range registered {
		if !seen {
			bad("conn %d (key %s) is logged in but not routed", c.connNum, c.key.ShortString())
		}
	}
	gauge := func(name string, got, want int64) {
		if got != want {
			bad("gauge %s is %d, but %d counted", name, got, want)
		}
	}
	gauge("current_connections", s.stats.current.Load(), int64(len(registered)))
	gauge("current_not_ideal_connections", s.stats.notIdeal.Load(), notIdeal)
	gauge("current_dup_keys", s.stats.dupKeys.Load(), dupKeys)
	gauge("current_dup_connections", s.stats.dupConns.Load(), dupConns)
	gauge("watchers", s.stats.watchers.Load(), int64(len(s.watchers)))
	if h := s.stats.home.Load(); h < 0 || h > int64(len(registered)) {
		bad("gauge current_home_connections is %d with %d sessions", h, len(registered))
	}
	if p := s.stats.parked.Load(); p < 0 || p > int64(len(registered)) {
		bad("gauge current_parked is %d with %d sessions", p, len(registered))
	}
	var perIP int
	for ip, n := range s.perIP {
		if n <= 0 {
			bad("per-IP count of %v is %d", ip, n)
		}
		perIP += n
	}
	gauge("sessions (admitted connections)", s.stats.sessions.Load(), int64(perIP))
	if perIP < len(registered) {
		bad("%d connections admitted, but %d sessions logged in", perIP, len(registered))
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("relay: inconsistent state: %w", joinErrors(errs...))
}

// closePeer closes every local connection of k and returns how many.
func (s *Server) closePeer(k PublicKey) int {
	sh := s.shard(k)
	sh.mu.RLock()
	var conns []*sconn
	if e := sh.m[k]; e != nil {
		conns = append(conns, e.conns...)
	}
	sh.mu.RUnlock()
	for _, c := range conns {
		c.closeConn()
	}
	return len(conns)
}

// addWatcher subscribes c to connection changes, starting with a
// PeerPresent for every key connected here.
//
// The list is built without s.mu, for which logins and logouts wait (a walk
// over 10k keys takes 2 ms): c is subscribed first, and the updates
// broadcast while the shards are walked are set aside, each with the
// number of its change. A shard's walk reflects every change of the shard
// up to its seq and none after, so the updates set aside that the walk
// already reflects are dropped and the others follow the list: c learns
// of each login once, and of no logout before its login, as if the list
// had been taken at once.
func (s *Server) addWatcher(c *sconn) {
	s.mu.Lock()
	if _, ok := s.watchers[c]; !ok {
		s.watchers[c] = struct{}{}
		s.stats.watchers.Add(1)
	}
	// A list still queued, with the updates after it, is already the
	// whole state: a watcher asking again and again without reading
	// queues no more than one list at a time, and costs no walk over
	// every key per ask.
	c.mu.Lock()
	c.watching = true
	queued := c.closed || c.floodQueued
	if !queued {
		c.listing = true
	}
	c.mu.Unlock()
	n := s.stats.current.Load() // sessions: at least as many as keys
	s.mu.Unlock()
	if queued {
		return
	}
	present := make([]PeerPresent, 0, n)
	var seen [numShards]uint64
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.RLock()
		seen[i] = sh.seq
		for _, e := range sh.m {
			if a := e.active.Load(); a != nil {
				present = append(present, a.presence())
			}
		}
		sh.mu.RUnlock()
	}
	// Under s.mu: every change the walk saw has been broadcast (register
	// and unregister hold s.mu from the change to the broadcast).
	s.mu.Lock()
	c.mu.Lock()
	listed := c.listed
	c.listing, c.listed = false, nil
	if !c.closed {
		c.floodAt = len(c.meshUpdates)
		if len(c.meshUpdates) == 0 {
			c.meshUpdates = present // no copy under the locks
		} else {
			c.meshUpdates = append(c.meshUpdates, present...)
		}
		for _, u := range listed {
			if u.seq > seen[u.Key[0]%numShards] {
				c.meshUpdates = append(c.meshUpdates, u.PeerPresent)
			}
		}
		c.floodQueued = true
		c.kickLocked()
	}
	c.mu.Unlock()
	s.mu.Unlock()
}

// seqUpdate is a broadcast set aside while a watcher's list is built, with
// the number of the change it announces.
type seqUpdate struct {
	PeerPresent
	seq uint64
}

// changeLocked numbers a change of the routing table in sh; s.mu and sh.mu
// must be held.
func (s *Server) changeLocked(sh *routeShard) {
	s.tableSeq++
	sh.seq = s.tableSeq
}

func (c *sconn) presence() PeerPresent {
	var f PeerPresentFlags
	if c.isMesh {
		f |= PeerIsMeshPeer
	}
	if c.info.IsProber {
		f |= PeerIsProber
	}
	if c.notIdeal {
		f |= PeerIsNotIdeal
	}
	if f == 0 {
		f = PeerIsRegular
	}
	return PeerPresent{Key: c.key, Addr: c.remoteAddr, Flags: f, AppName: c.info.AppName}
}

// broadcastLocked queues u to every watcher; s.mu must be held.
func (s *Server) broadcastLocked(u PeerPresent) {
	for w := range s.watchers {
		w.mu.Lock()
		switch {
		case w.closed:
		case w.listing:
			w.listed = append(w.listed, seqUpdate{u, s.tableSeq}) // see addWatcher
		default:
			w.meshUpdates = append(w.meshUpdates, u)
			w.kickLocked()
		}
		w.mu.Unlock()
	}
}

// setHealth queues a Health frame; "" clears an earlier problem.
func (c *sconn) setHealth(msg string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.health = &msg
	c.kickLocked()
}

// enqueuePeerGone queues PeerGone(k, r) to c. A recipient's notice that k
// left (Disconnected) is not written to a watcher (a mesh peer's watch
// session, which is a recipient when a client sent packets to that
// server's own key): the watch updates already tell it when k leaves this
// server, in order with k's logins, and a mesh peer takes any PeerGone
// for "not at this server". Written after k logged in here again, the
// notice made the peer forget its route to k.
func (c *sconn) enqueuePeerGone(k PublicKey, r PeerGoneReason) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	if r == PeerGoneDisconnected {
		// Even when the notice itself does not fit: a later return of k
		// must register again, and c's reader may forget k (pruneSentTo).
		c.toldGone.Store(true)
		delete(c.sentFrom, k)
		c.sentFrom = shrinkMap(c.sentFrom, &c.sentFromPeak)
		if c.lastSrc == k {
			c.lastSrc = PublicKey{}
		}
		if c.watching {
			return
		}
	}
	if len(c.peerGone) >= maxPendingControl {
		return
	}
	c.peerGone = append(c.peerGone, peerGoneItem{k, r})
	c.kickLocked()
}

// enqueue queues a packet for c, dropping the oldest queued packet of the
// same class if the queue is full. It never blocks on c's writer.
func (c *sconn) enqueue(p *packet, disco bool) {
	c.mu.Lock()
	if c.refuseClosedLocked(p, disco) {
		return
	}
	q := &c.other
	if disco {
		q = &c.disco
	}
	if q.buf == nil {
		q.buf = make([]*packet, c.s.cfg.queueDepth)
	}
	// Let the writer run before dropping: the queue may be full only
	// because the writer has not had a CPU since it was woken, and a
	// sender whose bursts outrun one queue would then lose most of them
	// to the scheduler. (One yield is not always enough: the scheduler
	// sometimes runs the yielding goroutine again first.) If the client
	// is slow instead (its writer is blocked writing), one yield slows
	// the sender's reader, and TCP the sender, rather than the server
	// reading packets only to drop them.
	for tries := 0; q.n == len(q.buf) && c.writing && tries < 4 && !(c.flushing && tries > 0); tries++ {
		c.kickLocked()
		c.mu.Unlock()
		runtime.Gosched()
		c.mu.Lock()
		if c.refuseClosedLocked(p, disco) {
			return
		}
	}
	if old := q.push(p); old != nil {
		c.drop(dropQueueHead, disco, old)
		putPacket(old)
	} else if q.n == 1 {
		q.since = monoNanos()
	}
	// The packet count alone would let one stalled receiver pin 32
	// maximal packets per queue; the byte cap bounds that too, oldest
	// first, always keeping the newest packet.
	for q.bytes > maxQueueBytes && q.n > 1 {
		old := q.pop()
		c.drop(dropQueueHead, disco, old)
		putPacket(old)
	}
	c.kickLocked()
	c.mu.Unlock()
}

// refuseClosedLocked drops p and unlocks c.mu if the session is over.
func (c *sconn) refuseClosedLocked(p *packet, disco bool) bool {
	if !c.closed {
		return false
	}
	c.mu.Unlock()
	c.drop(dropGone, disco, p)
	putPacket(p)
	return true
}

// maxQueueBytes caps the packet bytes waiting in each of a client's two
// queues: 32 packets of 16 KiB fit, so ordinary traffic only meets the
// packet count, while a stalled receiver of 64 KiB packets holds at most
// 512 KiB per queue instead of 2 MiB.
const maxQueueBytes = 512 << 10

// kickLocked wakes the writer goroutine, or starts it if it is not running.
func (c *sconn) kickLocked() {
	if c.writing {
		if c.parked {
			c.parked = false
			select {
			case c.wake <- struct{}{}:
			default:
			}
		}
		return
	}
	if c.closed {
		return
	}
	if c.wake == nil {
		c.wake = make(chan struct{}, 1)
	}
	c.writing = true
	c.writers.Add(1)
	go c.writeLoop()
}

// writerLinger is how long a writer with nothing to write waits for more
// before exiting: long enough that a busy receiver keeps one writer (no
// goroutine started per burst), short enough that idle clients hold none.
const writerLinger = 500 * time.Millisecond

// writerState is what a running writer borrows from a pool.
type writerState struct {
	bw      *bufio.Writer // only for conns without writev; nil until needed
	pkts    []*packet
	discos  int   // the first discos entries of pkts are disco
	wait    int64 // ns the oldest of pkts waited
	control []byte
	// ctlTail is where a Restarting frame starts in control, which is
	// written after the packets; len(control) when there is none.
	ctlTail  int
	wsPong   bool // a WebSocket pong is due (wsConn.onPong)
	last     bool // control ends with the Restarting notice: the last batch
	newSrcs  []*sconn
	fwdSrcs  []meshSrc // new sources of forwarded packets (mesh recipients)
	lateSrcs []meshSrc // new local sources that left before their packets were written

	// The vectored path: frame headers, control frames and small payloads
	// are copied into scratch; vec lists the pieces of scratch and the
	// large payloads, in order, for one writev.
	scratch []byte
	vec     [][]byte
	send    net.Buffers // consumed by WriteTo; a field so it is not allocated per batch
}

var writerPool = sync.Pool{New: func() any { return new(writerState) }}

// writerBufSize is the buffer of writers that cannot use writev (TLS): big
// enough that a batch makes few records and system calls.
const writerBufSize = 32 << 10

func (c *sconn) writeLoop() {
	defer c.writers.Done()
	ws := writerPool.Get().(*writerState)
	if !c.vectored {
		// Only these writers need a bufio.Writer: a busy plain-socket
		// writer holds just its scratch.
		if ws.bw == nil {
			ws.bw = bufio.NewWriterSize(c.nc, writerBufSize)
		} else {
			ws.bw.Reset(c.nc)
		}
	}
	linger := time.NewTimer(writerLinger)
	defer func() {
		linger.Stop()
		if ws.bw != nil {
			ws.bw.Reset(nil)
		}
		if cap(ws.scratch) > maxPooledScratch {
			ws.scratch = nil
		}
		if cap(ws.control) > maxPooledScratch {
			ws.control = nil // a burst of notices, a mesh peer's flood
		}
		ws.pkts = ws.pkts[:0]
		ws.newSrcs = ws.newSrcs[:0]
		ws.fwdSrcs = ws.fwdSrcs[:0]
		ws.lateSrcs = ws.lateSrcs[:0]
		writerPool.Put(ws)
	}()
	for {
		c.mu.Lock()
		c.flushing = false
		closeAfter := c.closeAfter
		if !c.takeLocked(ws) {
			if closeAfter || c.closed || !c.park(linger) {
				c.writing = false
				c.wake = nil // an idle session holds no channel either
				if closeAfter {
					c.closed = true // nothing may follow the Restarting notice
				}
				c.mu.Unlock()
				if closeAfter {
					c.closeWrite()
				}
				return
			}
			c.mu.Unlock()
			continue
		}
		c.flushing = true
		c.mu.Unlock()
		c.registerRecipients(ws)
		err := c.writeBatch(ws)
		if err == nil && !c.vectored && c.writeTimeout() > 0 {
			// Under TLS the reader writes too: crypto/tls answers a
			// KeyUpdate from inside Read, and under this batch's
			// deadline, passed by then, that answer would fail and
			// break the connection for good.
			c.nc.SetWriteDeadline(time.Time{})
		}
		for i, p := range ws.pkts {
			putPacket(p)
			ws.pkts[i] = nil
		}
		ws.pkts = ws.pkts[:0]
		if err != nil || ws.last {
			if err != nil {
				c.writeFailed(err)
			}
			c.mu.Lock()
			c.flushing = false
			c.writing = false
			c.wake = nil
			c.mu.Unlock()
			if err == nil {
				c.closeWrite() // after the Restarting notice
			}
			return
		}
	}
}

// park waits, with c.mu held on entry and exit, until kickLocked wakes the
// writer or the linger timer fires. It reports whether there may be more to
// write.
func (c *sconn) park(linger *time.Timer) bool {
	c.parked = true
	linger.Reset(writerLinger)
	c.mu.Unlock()
	select {
	case <-c.wake:
		c.mu.Lock()
		return true
	case <-linger.C:
		c.mu.Lock()
		if c.parked {
			c.parked = false
			return false
		}
		return true // woken at the same time; the token in wake is harmless
	}
}

// takeLocked moves everything queued into ws: control frames are encoded
// into ws.control, packets are moved (disco first). It reports whether
// there was anything.
func (c *sconn) takeLocked(ws *writerState) bool {
	ws.control = append(ws.control[:0], c.serverInfo...)
	c.serverInfo = nil
	for _, g := range c.peerGone {
		ws.control = appendPeerGoneFrame(ws.control, g.key, g.reason)
	}
	if cap(c.peerGone) > maxKeptPeerGone {
		c.peerGone = nil // after a burst: the session may now idle for long
	} else {
		c.peerGone = c.peerGone[:0]
	}
	// A watcher's whole list (tens of thousands of keys on a big server)
	// is taken maxUpdatesPerBatch at a time: it is encoded under c.mu, for
	// which every login's and logout's broadcast waits, under s.mu.
	take := min(len(c.meshUpdates), maxUpdatesPerBatch)
	for _, u := range c.meshUpdates[:take] {
		if u.Flags == 0 {
			ws.control = appendPeerGoneFrame(ws.control, u.Key, PeerGoneDisconnected)
		} else {
			ws.control = appendPeerPresentFrame(ws.control, u)
		}
	}
	if c.floodQueued {
		if c.floodAt < take {
			c.floodQueued = false // started: no longer the whole state
		} else {
			c.floodAt -= take
		}
	}
	switch {
	case take < len(c.meshUpdates):
		clear(c.meshUpdates[:take]) // the app names
		c.meshUpdates = c.meshUpdates[take:]
	case cap(c.meshUpdates) > 1024:
		c.meshUpdates = nil
	default:
		c.meshUpdates = c.meshUpdates[:0]
	}
	if c.hasPong {
		ws.control = appendFrame(ws.control, FramePong, c.pong[:])
		c.hasPong = false
		c.s.stats.sentPong.Add(1)
	}
	if c.health != nil {
		ws.control = appendFrame(ws.control, FrameHealth, []byte(*c.health))
		c.health = nil
	}
	if c.keepAlive {
		ws.control = appendFrame(ws.control, FrameKeepAlive, nil)
		c.keepAlive = false
	}
	if c.hasPing {
		ws.control = appendFrame(ws.control, FramePing, c.ping[:])
		c.hasPing = false
		c.s.stats.sentPing.Add(1)
	}
	ws.wait = 0
	if c.disco.n > 0 || c.other.n > 0 {
		now := monoNanos()
		for _, q := range [...]*pktRing{&c.disco, &c.other} {
			if q.n > 0 {
				ws.wait = max(ws.wait, now-q.since)
			}
		}
	}
	for p := c.disco.pop(); p != nil; p = c.disco.pop() {
		ws.pkts = append(ws.pkts, p)
	}
	ws.discos = len(ws.pkts)
	for p := c.other.pop(); p != nil; p = c.other.pop() {
		ws.pkts = append(ws.pkts, p)
	}
	for _, p := range ws.pkts {
		if (p.srcConn != nil || !p.src.IsZero()) && (p.src != c.lastSrc || p.via != c.lastVia) {
			c.lastSrc, c.lastVia = p.src, p.via
			if _, ok := c.sentFrom[p.src]; !ok {
				if c.sentFrom == nil {
					c.sentFrom = map[PublicKey]struct{}{}
				}
				c.sentFrom[p.src] = struct{}{}
				c.sentFromPeak = max(c.sentFromPeak, len(c.sentFrom))
				if p.srcConn != nil {
					ws.newSrcs = append(ws.newSrcs, p.srcConn)
				} else {
					// Forwarded in by a mesh peer.
					ws.fwdSrcs = append(ws.fwdSrcs, meshSrc{key: p.src, via: p.via})
				}
			} else if p.via != nil && c.waits.Load() {
				// A known source, forwarded after a packet from
				// another key or through another peer (it may have
				// moved there), while c waits for some key's route:
				// if c waits for this one, the wait learns that the
				// key is still in the region, and through which
				// peer (sweepWaits).
				ws.fwdSrcs = append(ws.fwdSrcs, meshSrc{key: p.src, via: p.via})
			}
		}
	}
	ws.ctlTail = len(ws.control)
	ws.wsPong, c.wsPong = c.wsPong, false
	// The Restarting notice goes out at once, even before the rest of a
	// watcher's list: the connection ends after it, and with it every
	// route the peer learned through it.
	ws.last = c.restarting != nil
	if ws.last {
		ws.control = appendFrame(ws.control, FrameRestarting, appendRestarting(nil, c.restarting.ReconnectIn, c.restarting.TryFor))
		c.restarting = nil
		// Nothing may follow the notice: what is queued from now on is
		// refused, and counted as dropped.
		c.closed = true
	}
	return len(ws.control) > 0 || len(ws.pkts) > 0 || ws.wsPong
}

// maxUpdatesPerBatch bounds the PeerPresent and PeerGone updates a
// watcher's writer takes at once (about 60 KiB of frames).
const maxUpdatesPerBatch = 1024

// registerRecipients records that c received packets from new sources, so
// that c is told PeerGone when they leave.
func (c *sconn) registerRecipients(ws *writerState) {
	for _, src := range ws.newSrcs {
		sh := c.s.shard(src.key)
		sh.mu.Lock()
		e := sh.m[src.key]
		if e != nil {
			e.recipients.add(c)
		}
		sh.mu.Unlock()
		if e == nil {
			// The source left while its packet waited here: a mesh
			// peer may have it now, else c is told it is gone.
			ws.lateSrcs = append(ws.lateSrcs, meshSrc{key: src.key})
		}
	}
	clear(ws.newSrcs)
	ws.newSrcs = ws.newSrcs[:0]
	if len(ws.lateSrcs) > 0 {
		c.s.meshNoteRecipient(c, ws.lateSrcs, true)
		ws.lateSrcs = ws.lateSrcs[:0]
	}
	if len(ws.fwdSrcs) > 0 {
		c.s.meshNoteRecipient(c, ws.fwdSrcs, false)
		clear(ws.fwdSrcs) // the sessions
		ws.fwdSrcs = ws.fwdSrcs[:0]
	}
}

func appendFrame(b []byte, t FrameType, payload []byte) []byte {
	b = append(b, byte(t))
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

// appendPeerGoneFrame appends a whole PeerGone frame: no payload buffer of
// its own, as a burst of thousands is encoded under the session's mu.
func appendPeerGoneFrame(b []byte, k PublicKey, r PeerGoneReason) []byte {
	b = append(b, byte(FramePeerGone))
	b = binary.BigEndian.AppendUint32(b, KeyLen+1)
	return appendPeerGone(b, k, r)
}

// appendPeerPresentFrame appends a whole PeerPresent frame, as
// appendPeerGoneFrame does.
func appendPeerPresentFrame(b []byte, m PeerPresent) []byte {
	b = append(b, byte(FramePeerPresent), 0, 0, 0, 0)
	start := len(b)
	b = appendPeerPresent(b, m)
	binary.BigEndian.PutUint32(b[start-4:start], uint32(len(b)-start))
	return b
}

func (c *sconn) writeBatch(ws *writerState) error {
	if wt := c.writeTimeout(); wt > 0 {
		c.nc.SetWriteDeadline(time.Now().Add(wt))
	}
	if ws.wsPong && len(ws.control) == 0 && len(ws.pkts) == 0 {
		// Only a WebSocket pong: unlockWrite sends it. Any other
		// write would have sent it too. A failed pong fails the next
		// write, as it leaves the connection broken.
		if wc, ok := c.nc.(*wsConn); ok {
			wc.wmu.Lock()
			wc.unlockWrite()
		}
		return nil
	}
	// Control frames other than Restarting first: they are small and
	// time-sensitive (Pong). Restarting was appended last to control, but
	// packets queued before Close should still go out before it, so split
	// where takeLocked put it (the bytes themselves cannot tell: a key
	// inside a PeerGone may hold any value).
	ctl, tail := ws.control[:ws.ctlTail], ws.control[ws.ctlTail:]
	var bytes int64
	for _, p := range ws.pkts {
		bytes += int64(p.n)
	}
	var err error
	if c.vectored {
		err = c.writeVec(ws, ctl, tail)
	} else {
		err = c.writeBuffered(ws, ctl, tail)
	}
	if err != nil {
		// The connection is broken: whatever of the batch reached the
		// socket may never reach the client, so count the batch lost.
		for i, p := range ws.pkts {
			c.drop(dropWriteError, i < ws.discos, p)
		}
		return err
	}
	if n := len(ws.pkts); n > 0 {
		c.sentPkts.Add(int64(n))
		c.sentBytes.Add(bytes)
		c.batches[batchBucket(n)].Add(1)
		c.queueWait.Add(ws.wait)
	}
	return nil
}

// batchBuckets is the number of buckets of Stats.PacketsPerBatch.
const batchBuckets = 8

// batchBucket is the bucket of Stats.PacketsPerBatch for a batch of n ≥ 1
// packets: 1, 2–3, 4–7, …, 128 or more.
func batchBucket(n int) int {
	return min(bits.Len(uint(n))-1, batchBuckets-1)
}

// monoNanos is a monotonic clock in nanoseconds.
func monoNanos() int64 { return int64(time.Since(monoBase)) }

var monoBase = time.Now()

// writeBuffered writes a batch through ws.bw: for TLS and other conns
// without writev, where each Write may cost a record of its own.
func (c *sconn) writeBuffered(ws *writerState, ctl, tail []byte) error {
	bw := ws.bw
	if _, err := bw.Write(ctl); err != nil {
		return err
	}
	for _, p := range ws.pkts {
		var src *PublicKey
		if !p.src.IsZero() {
			src = &p.src
		}
		if err := writePacketFrame(bw, FrameRecvPacket, src, p.buf[:p.n]); err != nil {
			return err
		}
	}
	if _, err := bw.Write(tail); err != nil {
		return err
	}
	return bw.Flush()
}

// vecCopyMax is the largest payload writeVec copies next to its frame
// header; larger payloads are written from their packet buffers, so that a
// batch of big packets costs one system call and no copy.
const vecCopyMax = 512

// maxPooledScratch bounds the scratch and control buffers a pooled
// writerState keeps.
const maxPooledScratch = 64 << 10

// writeVec writes a batch with one writev (more only if the socket's buffer
// fills).
func (c *sconn) writeVec(ws *writerState, ctl, tail []byte) error {
	// Sized so that the appends below never reallocate: pieces already in
	// vec would stay valid, but each batch would allocate.
	need := len(ctl) + len(tail)
	for _, p := range ws.pkts {
		need += frameHeaderLen + KeyLen
		if p.n <= vecCopyMax {
			need += p.n
		}
	}
	if cap(ws.scratch) < need {
		ws.scratch = make([]byte, 0, need)
	}
	s := append(ws.scratch[:0], ctl...)
	v := ws.vec[:0]
	mark := 0 // scratch before mark is already in v
	for _, p := range ws.pkts {
		n := p.n
		hasSrc := !p.src.IsZero()
		if hasSrc {
			n += KeyLen
		}
		s = append(s, byte(FrameRecvPacket))
		s = binary.BigEndian.AppendUint32(s, uint32(n))
		if hasSrc {
			s = append(s, p.src[:]...)
		}
		if p.n <= vecCopyMax {
			s = append(s, p.buf[:p.n]...)
			continue
		}
		v = append(v, s[mark:len(s):len(s)], p.buf[:p.n:p.n])
		mark = len(s)
	}
	s = append(s, tail...)
	if mark < len(s) {
		v = append(v, s[mark:len(s):len(s)])
	}
	ws.vec = v
	ws.send = v
	_, err := ws.send.WriteTo(c.nc)
	clear(v) // WriteTo clears only what it wrote
	ws.send = nil
	return err
}

// closeWrite half-closes nc after the Restarting notice. A full Close while
// the client's frames sit unread in the socket makes the kernel send a TCP
// RST, which discards the notice still in the send buffer; with a half
// close the client reads the notice, then EOF, and the session ends when it
// closes its side (or when Server.Close cuts what is left).
func (c *sconn) closeWrite() {
	if cw, ok := c.nc.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
		return
	}
	// No half close (WebSocket): close politely, with a WebSocket close
	// frame and a TLS close_notify, each under a deadline of its own. This
	// runs on the writer's goroutine, right after a write that succeeded.
	c.end()
	c.unpark()
	c.nc.Close()
}

// writeFailed ends the session after a write error.
func (c *sconn) writeFailed(err error) {
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		c.s.stats.writeTimeouts.Add(1)
		c.s.logPeer("relay: write timeout, dropping client", "remote", c.remote, "key", c.key.ShortString())
	}
	c.closeConn() // the socket itself: no close_notify into a socket that just failed
}

// closeSocket closes the connection under nc's TLS and WebSocket layers.
func closeSocket(nc net.Conn) error {
	switch c := nc.(type) {
	case *tls.Conn:
		return closeSocket(c.NetConn())
	case *wsConn:
		return closeSocket(c.Conn)
	default:
		return nc.Close()
	}
}

// closeConn ends the session from the server side. Cancelling the session's
// context also wakes a reader that is waiting for the rate limit, which
// closing the connection alone would not. It closes the socket itself, with
// no TLS close_notify or WebSocket close frame first: those wait (5 s and
// 1 s) for room in a socket that a stalled client may have filled, and
// closeConn is called by ClosePeer, from a mesh peer's reader and by
// Close with the server's lock held. The client reads EOF either way.
func (c *sconn) closeConn() {
	c.end()
	c.unpark() // a parked socket must leave the epoll set before it closes
	closeSocket(c.nc)
}

// drop counts a packet for c that will not reach it.
func (c *sconn) drop(r dropReason, disco bool, p *packet) {
	c.dropped.Add(1)
	c.s.stats.drop(r, disco, p.n)
	c.s.debugDrop(r, p.src, c.key, disco, p.n)
}

func (c *sconn) dropAllLocked(r dropReason) {
	for _, q := range []*pktRing{&c.disco, &c.other} {
		disco := q == &c.disco
		for p := q.pop(); p != nil; p = q.pop() {
			c.drop(r, disco, p)
			putPacket(p)
		}
		q.buf = nil
	}
	c.peerGone, c.meshUpdates, c.sentFrom, c.sentFromPeak = nil, nil, nil, 0
}

// minShrink is the size below which shrinkMap leaves a map as it is.
const minShrink = 64

// shrinkMap returns m, or a copy of it sized for what it holds now if that
// is under a quarter of *peak, the most it has held; *peak then becomes its
// size. A Go map keeps the space of its largest size: a session that once
// had thousands of senders, or a key thousands of recipients, would hold
// it (hundreds of KiB) for good after they left. Callers update *peak as
// they add and call shrinkMap after they delete; each copy is paid for by
// the deletions since the last, and nothing on the packet path adds or
// deletes.
func shrinkMap[K comparable, V any](m map[K]V, peak *int) map[K]V {
	if *peak < minShrink || 4*len(m) >= *peak {
		return m
	}
	*peak = len(m)
	if len(m) == 0 {
		return nil
	}
	n := make(map[K]V, len(m))
	for k, v := range m {
		n[k] = v
	}
	return n
}

// deleteShrink deletes k from m, a server-wide table (one that must stay
// non-nil), and returns m, or a smaller copy of it as shrinkMap decides.
// It brings *peak up to date first: a table grows only between deletions,
// so the most it has held since its last copy is what it held just before
// one of them, and the paths that add to it (logins) need not track it.
// The copy is made under the table's lock, at most once for each fall to
// a quarter of the peak: after 100k sessions, 25k entries of the session
// list, 1.3-4.9 ms on a loaded 2-core machine, once.
func deleteShrink[K comparable, V any](m map[K]V, k K, peak *int) map[K]V {
	*peak = max(*peak, len(m))
	delete(m, k)
	return shrinkTable(m, peak)
}

// shrinkTable is shrinkMap for a server-wide table: it returns an empty map
// rather than nil.
func shrinkTable[K comparable, V any](m map[K]V, peak *int) map[K]V {
	if m = shrinkMap(m, peak); m == nil {
		m = map[K]V{}
	}
	return m
}

// closeGrace is how long Close waits for logged-in sessions to end after
// telling them the server is restarting, before it cuts them.
const closeGrace = 2 * time.Second

// Close tells every logged-in client that the server is restarting, with
// a random reconnect delay each so they do not all return at once, gives
// them 2 s to read it and go, then ends every session that is left and
// waits for them. Logins in progress (the client has not been sent
// ServerInfo) get no notice: Close ends them at once, without waiting the
// 2 s for them. Accept calls after Close close their
// connection at once, and ServeHTTP answers upgrades with 503. The
// forwarders of AddPacketForwarder stop: Close waits for their
// ForwardPacket calls in progress, and none starts after, so a forwarder
// must not call Close itself (it would wait for itself): it may start a
// goroutine that does. The same holds for the admission hook
// (WithAdmission) and the log handler (WithLogger). A Close called while
// another runs waits for it to be done, so that what holds after one
// Close holds after every Close.
//
// Close is the only thing that ends sessions that came through ServeHTTP:
// net/http forgets a connection once it is hijacked, so http.Server's
// Shutdown and Close do not end them (nor does the request's context).
// To end them together, register Close with the http.Server:
//
//	hs.RegisterOnShutdown(func() { srv.Close() })
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		closing := s.closing
		s.mu.Unlock()
		<-closing
		return nil
	}
	s.closed = true
	s.closing = make(chan struct{})
	defer close(s.closing)
	conns := make([]*sconn, 0, len(s.conns))
	var logins []*sconn
	for c := range s.conns {
		// register sets c.entry under s.mu once it has seen s.closed
		// false; a login without one now will never register, nor be
		// sent ServerInfo, so it gets no notice and nothing is gained
		// by waiting the grace for it.
		if c.entry == nil {
			logins = append(logins, c)
		} else {
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()
	for _, c := range logins {
		c.closeConn()
	}
	s.closeMesh()
	for _, c := range conns {
		c.mu.Lock()
		if !c.closed && c.registered {
			var delay time.Duration
			if s.cfg.restartDelay > 0 {
				delay = rand.N(s.cfg.restartDelay)
			}
			c.restarting = &ServerRestarting{ReconnectIn: delay, TryFor: s.cfg.restartTryFor}
			c.closeAfter = true
			c.kickLocked()
		}
		c.mu.Unlock()
	}
	// Give writers a moment to deliver the notice (each half-closes its
	// connection after writing it; the session ends when the client
	// closes), then cut
	// whatever is left. No session can start after s.closed is set, so
	// waiting on s.sessions is safe here.
	done := make(chan struct{})
	go func() {
		s.sessions.Wait()
		close(done)
	}()
	t := time.NewTimer(s.cfg.closeGrace)
	defer t.Stop()
	select {
	case <-done:
		return nil
	case <-t.C:
	}
	s.mu.Lock()
	for c := range s.conns {
		c.closeConn()
	}
	s.mu.Unlock()
	<-done
	return nil
}

// IsClientConnected reports whether a client with key k is logged in here.
func (s *Server) IsClientConnected(k PublicKey) bool { return s.lookup(k) != nil }

// pktRing is a fixed-size FIFO of packets.
type pktRing struct {
	buf   []*packet
	head  int
	n     int
	bytes int   // sum of the queued packets' lengths
	since int64 // monoNanos when the ring last became non-empty
}

// push appends p; if the ring is full it first removes and returns the
// oldest packet.
func (r *pktRing) push(p *packet) (old *packet) {
	if r.n == len(r.buf) {
		old = r.pop()
	}
	r.buf[(r.head+r.n)%len(r.buf)] = p
	r.n++
	r.bytes += p.n
	return old
}

func (r *pktRing) pop() *packet {
	if r.n == 0 {
		return nil
	}
	p := r.buf[r.head]
	r.buf[r.head] = nil
	r.head = (r.head + 1) % len(r.buf)
	r.n--
	r.bytes -= p.n
	return p
}

// packet is a relayed packet, owned by one queue at a time.
type packet struct {
	src     PublicKey
	srcConn *sconn // the local sender, or nil for forwarded packets
	via     *sconn // for forwarded packets, the mesh peer's session that forwarded it
	n       int
	buf     []byte
	class   int8
}

// Packets come from pools by size class so that a small packet does not pin
// 64 KiB and nothing is allocated per packet in the steady state.
var packetClasses = [...]int{256, 2048, 16 << 10, MaxPacketSize}

var packetPools [len(packetClasses)]sync.Pool

func getPacket(n int) *packet {
	for i, size := range packetClasses {
		if n <= size {
			if p, _ := packetPools[i].Get().(*packet); p != nil {
				return p
			}
			return &packet{buf: make([]byte, size), class: int8(i)}
		}
	}
	panic("relay: packet larger than MaxPacketSize")
}

func putPacket(p *packet) {
	p.srcConn, p.via = nil, nil
	p.n = 0
	packetPools[p.class].Put(p)
}

// nonceGuard remembers the nonces of recent ClientInfo boxes so that a
// captured login cannot be replayed. It keeps two generations of at most
// maxNonces each, rotated every half hour, so a nonce is remembered for
// between 30 and 60 minutes and memory stays bounded. Under a flood of more
// than maxNonces logins per half hour the window shrinks accordingly.
type nonceGuard struct {
	mu        sync.Mutex
	cur, prev map[[16]byte]struct{}
	rotated   time.Time
}

const (
	maxNonces     = 1 << 18
	nonceInterval = 30 * time.Minute
)

func (g *nonceGuard) init() {
	g.cur = map[[16]byte]struct{}{}
	g.rotated = time.Now()
}

// check records nonce and reports whether it was new.
func (g *nonceGuard) check(nonce [nonceLen]byte, now time.Time) bool {
	k := [16]byte(nonce[:16])
	g.mu.Lock()
	defer g.mu.Unlock()
	if now.Sub(g.rotated) > nonceInterval || len(g.cur) >= maxNonces {
		g.prev, g.cur, g.rotated = g.cur, make(map[[16]byte]struct{}, len(g.cur)/2), now
	}
	if _, ok := g.cur[k]; ok {
		return false
	}
	if _, ok := g.prev[k]; ok {
		return false
	}
	g.cur[k] = struct{}{}
	return true
}

// ServeHTTP serves DERP over HTTP: an upgrade request on any path other than
// the probe paths starts a session; "Derp-Fast-Start: 1" makes the server
// skip the 101 response. /derp/probe and /derp/latency-check answer latency
// probes and /generate_204 captive-portal checks, if they are routed here.
// An upgrade to WebSocket that offers the subprotocol "derp" (browsers'
// only way in) carries the session in binary messages; to refuse those,
// answer requests with "Upgrade: websocket" before they reach the Server.
// After the upgrade ServeHTTP returns at once and the session continues on
// its own goroutine, so net/http's per-connection buffers are not kept for
// the session's lifetime; Close waits for every session, and after it
// upgrade requests are answered 503 (Tailscale's server would upgrade them
// and run the session). An upgrade over a WithMaxConnections limit is
// answered 503 naming the limit, and one whose connection cannot be
// hijacked (behind http.TimeoutHandler, or a ResponseWriter wrapper
// without Unwrap) 500 saying so; neither takes a connection slot. An
// upgrade request with a body is answered 400: the session's stream starts
// where the request ends, and Tailscale's server would read the body as
// the client's first frames. Each of these refusals, and any other answer
// to a request with "Derp-Fast-Start" (a 426 without an upgrade, a probe's
// 200, /generate_204's 204), closes the connection ("Connection: close"): a fast-start client's
// DERP frames follow its request, and must not be read as the next one.
// http.Server's Shutdown and Close do not end such sessions (see Close).
//
// Set ReadHeaderTimeout on the http.Server (the examples use 10 s): the
// handler, and with it the server's login deadline, only starts once the
// request headers are complete, so without it a client that never finishes
// them (slowloris) holds its connection forever.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.ProtoMajor == 1 && r.Header.Get(FastStartHeader) != "" {
		// A fast-start client's DERP frames follow its request: any
		// answer but the upgrade (which takes the connection over)
		// closes the connection, so that net/http does not read them
		// as the next request. (Over HTTP/2, "Connection: close" would
		// end every stream of the connection, and nothing follows a
		// stream's headers but its own frames.)
		w.Header().Set("Connection", "close")
	}
	switch r.URL.Path {
	case "/derp/probe", "/derp/latency-check":
		ServeProbe(w, r)
		return
	case "/generate_204":
		ServeNoContent(w, r)
		return
	}
	up := r.Header.Get("Upgrade")
	if !strings.EqualFold(up, "derp") && !strings.EqualFold(up, "websocket") {
		if up != "" {
			// The client's own string, up to net/http's 1 MiB of
			// headers: its start is enough to tell what it is.
			s.logPeer("relay: unexpected Upgrade header", "upgrade", clip(up, maxLoggedHeader), "remote", r.RemoteAddr)
		}
		s.stats.countRejected("no_upgrade")
		http.Error(w, "DERP requires connection upgrade", http.StatusUpgradeRequired)
		return
	}
	if r.ProtoMajor != 1 {
		s.stats.countRejected("not_http1")
		http.Error(w, "DERP requires HTTP/1.1 (the server negotiated "+r.Proto+"; disable HTTP/2 for this listener, see relay.AppendMetaCert)", http.StatusHTTPVersionNotSupported)
		return
	}
	if r.ContentLength != 0 {
		// The body (Content-Length, or chunked: -1) would be left in
		// the connection's buffer, and the login would read it as the
		// client's first frames. The DERP frames that follow the
		// request would be parsed as the next request: close.
		s.stats.countRejected("upgrade_body")
		w.Header().Set("Connection", "close")
		http.Error(w, "relay: a DERP upgrade request must not have a body (Content-Length or Transfer-Encoding): it would be read as DERP frames", http.StatusBadRequest)
		return
	}
	if isWebSocketDERP(r) {
		s.serveWebSocket(w, r)
		return
	}
	fastStart := r.Header.Get(FastStartHeader) == "1"
	nc, brw, ok := s.hijack(w, r)
	if !ok {
		return
	}
	if !fastStart {
		fmt.Fprintf(brw.Writer, "HTTP/1.1 101 Switching Protocols\r\n"+
			"Upgrade: DERP\r\n"+
			"Connection: Upgrade\r\n"+
			"Derp-Version: %d\r\n"+
			"Derp-Public-Key: %s\r\n\r\n", ProtocolVersion, s.pub)
	}
	// The session runs on its own goroutine and ServeHTTP returns, so
	// that net/http's per-connection state (its buffers, the request) is
	// freed instead of living as long as the session. The request's
	// context is not canceled when a hijacked connection closes; the
	// session ends on its own.
	ctx := context.WithoutCancel(r.Context())
	ao := acceptOpts{notIdeal: r.Header.Get(IdealNodeHeader) != "", fastStart: fastStart, detached: true, admitted: true}
	remote := r.RemoteAddr
	go s.accept(ctx, nc, brw, remote, ao)
}

// maxLoggedHeader bounds the bytes of a client's header value in a log line.
const maxLoggedHeader = 64

// clip returns s cut to at most n bytes, marked with "…" if cut.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "…"
}

// hijack takes a connection slot for r's client (see WithMaxConnections)
// and the connection from net/http. If the server is closed or a
// connection limit is reached it answers 503 instead, which a client can
// act on, rather than a 101 and a hang-up; if the connection cannot be
// taken, 500. It reports false after such an answer. On success the slot
// belongs to the caller, which passes it on to accept (acceptOpts.admitted)
// at once: anything the caller has to write goes in brw's buffer, which the
// login sends (under its deadline, and where Close can cut it).
func (s *Server) hijack(w http.ResponseWriter, r *http.Request) (nc net.Conn, brw *bufio.ReadWriter, ok bool) {
	ip := parseRemote(r.RemoteAddr).Addr()
	if err := s.admitConn(ip); err != nil {
		// After a fast-start request the client's DERP frames follow
		// the headers: no further request will come on this connection.
		w.Header().Set("Connection", "close")
		if errors.Is(err, ErrClosed) {
			s.stats.countRejected("server_closed")
			http.Error(w, "relay: server is shutting down", http.StatusServiceUnavailable)
			return nil, nil, false
		}
		s.stats.countRejected("too_many_connections")
		s.logPeer("relay: refusing connection", "remote", r.RemoteAddr, "err", err)
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return nil, nil, false
	}
	nc, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		s.releaseConn(ip)
		s.stats.countRejected("hijack_failed")
		// Every request fails this way on a server deployed behind such
		// a wrapper, so the line is rate-limited like the others that
		// clients can cause at will.
		s.logPeer("relay: hijack failed", "remote", r.RemoteAddr, "err", err)
		// Like the 503s: the client's frames may follow the request.
		w.Header().Set("Connection", "close")
		http.Error(w, "relay: cannot take over the connection for DERP: the http.ResponseWriter does not support Hijack "+
			"(a wrapper such as http.TimeoutHandler's without Hijack or Unwrap?): "+err.Error(), http.StatusInternalServerError)
		return nil, nil, false
	}
	return nc, brw, true
}

// ServeProbe answers DERP latency probes (/derp/probe, /derp/latency-check):
// 200 with an empty body for GET and HEAD, 405 otherwise.
func ServeProbe(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		w.Header().Set("Access-Control-Allow-Origin", "*")
	default:
		http.Error(w, "bogus probe method", http.StatusMethodNotAllowed)
	}
}

// ServeNoContent answers captive-portal checks (/generate_204) with 204 and,
// for a well-formed X-Tailscale-Challenge header, the matching
// X-Tailscale-Response.
func ServeNoContent(w http.ResponseWriter, r *http.Request) {
	if c := r.Header.Get("X-Tailscale-Challenge"); c != "" && validChallenge(c) {
		w.Header().Set("X-Tailscale-Response", "response "+c)
	}
	w.Header().Set("Cache-Control", "no-cache, no-store, must-revalidate, no-transform, max-age=0")
	w.WriteHeader(http.StatusNoContent)
}

func validChallenge(c string) bool {
	if len(c) > 64 {
		return false
	}
	for i := 0; i < len(c); i++ {
		b := c[i]
		if !('a' <= b && b <= 'z' || 'A' <= b && b <= 'Z' || '0' <= b && b <= '9' || b == '.' || b == '-' || b == '_' || b == ':') {
			return false
		}
	}
	return true
}

// dropReason says why a packet was dropped; the names are those of
// Tailscale's metrics.
type dropReason int

const (
	dropUnknownDest dropReason = iota
	dropUnknownDestOnFwd
	dropGone
	dropQueueHead
	dropQueueTail
	dropWriteError
	dropDupClient
	dropMeshQueue    // a mesh link's queue was full: its oldest packet
	dropMeshLinkDown // the mesh peer holding the destination was not connected
	numDropReasons
)

var dropReasonNames = [numDropReasons]string{
	"unknown_dest", "unknown_dest_on_fwd", "gone_disconnected", "queue_head", "queue_tail", "write_error", "dup_client",
	"mesh_queue", "mesh_link_down",
}

type serverCounters struct {
	accepts, connNum, sessions, current, home, notIdeal atomic.Int64
	dupKeys, dupConns, dupTotal, watchers, parked       atomic.Int64
	parks                                               atomic.Int64
	fastStarts, upgrades                                atomic.Int64
	webSockets                                          atomic.Int64
	gotPing, sentPong, unknownFrames, rateWaits         atomic.Int64
	sentPing, gotPong                                   atomic.Int64
	homeMovesIn, homeMovesOut, writeTimeouts            atomic.Int64
	forwardedIn, forwardedOut                           atomic.Int64
	waitsGivenUp, waitsForgotten                        atomic.Int64
	dropPkts, dropBytes                                 [numDropReasons][2]atomic.Int64

	mu       sync.Mutex
	closed   sessionTraffic   // of ended sessions; live ones keep their own
	errors   map[string]int64 // login/session failures by reason
	rejected map[string]int64
}

// sessionTraffic is what a session's traffic counters hold: each session
// counts its own, and Stats adds them up.
type sessionTraffic struct {
	recvPkts, recvBytes int64
	sentPkts, sentBytes int64
	batches             [batchBuckets]int64
	queueWait           int64 // ns
}

func (t *sessionTraffic) add(u *sessionTraffic) {
	t.recvPkts += u.recvPkts
	t.recvBytes += u.recvBytes
	t.sentPkts += u.sentPkts
	t.sentBytes += u.sentBytes
	for i := range t.batches {
		t.batches[i] += u.batches[i]
	}
	t.queueWait += u.queueWait
}

// addTraffic adds c's traffic counters to t.
func (t *sessionTraffic) addTraffic(c *sconn) {
	t.recvPkts += c.recvPkts.Load()
	t.recvBytes += c.recvBytes.Load()
	t.sentPkts += c.sentPkts.Load()
	t.sentBytes += c.sentBytes.Load()
	for i := range t.batches {
		t.batches[i] += c.batches[i].Load()
	}
	t.queueWait += c.queueWait.Load()
}

func (sc *serverCounters) init() {
	sc.errors = map[string]int64{}
	sc.rejected = map[string]int64{}
}

func (sc *serverCounters) drop(r dropReason, disco bool, n int) {
	k := 0
	if disco {
		k = 1
	}
	sc.dropPkts[r][k].Add(1)
	sc.dropBytes[r][k].Add(int64(n))
}

// addSession moves the counters of c, which has left s.conns, into the
// totals, and returns what it moved. It is called twice: when c is
// unregistered, and again once its writer has finished, for what a last
// batch added meanwhile.
func (sc *serverCounters) addSession(c *sconn) sessionTraffic {
	var t sessionTraffic
	sc.mu.Lock()
	defer sc.mu.Unlock()
	t.recvPkts = c.recvPkts.Swap(0)
	t.recvBytes = c.recvBytes.Swap(0)
	t.sentPkts = c.sentPkts.Swap(0)
	t.sentBytes = c.sentBytes.Swap(0)
	for i := range t.batches {
		t.batches[i] = c.batches[i].Swap(0)
	}
	t.queueWait = c.queueWait.Swap(0)
	sc.closed.add(&t)
	return t
}

func errorReason(err error, fallback string) string {
	if r := ProtocolErrorReason(err); r != "" {
		return r
	}
	switch {
	case errors.Is(err, ErrLoginRejected):
		return "login_rejected"
	case errors.Is(err, ErrReplayedLogin):
		return "replayed_client_info"
	case errors.Is(err, ErrClosed):
		return "server_closed"
	}
	// errors.As, not a type assertion: login errors are wrapped
	// ("receive client info: ...").
	if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
		return fallback + "_timeout"
	}
	return fallback
}

func (sc *serverCounters) countLoginError(err error) {
	sc.mu.Lock()
	sc.errors["login:"+errorReason(err, "io_error")]++
	sc.mu.Unlock()
}

func (sc *serverCounters) countSessionError(err error) {
	sc.mu.Lock()
	sc.errors["session:"+errorReason(err, "io_error")]++
	sc.mu.Unlock()
}

func (sc *serverCounters) countRejected(reason string) {
	sc.mu.Lock()
	sc.rejected[reason]++
	sc.mu.Unlock()
}

// Stats is a snapshot of a server's counters. Counters only grow; gauges
// ("Current…") go up and down.
type Stats struct {
	Accepts                   int64 // sessions handed to Accept or ServeHTTP
	CurrentConnections        int64 // logged-in sessions
	CurrentHomeConnections    int64 // sessions that said this server is their home
	CurrentNotIdealConns      int64 // sessions whose upgrade request had Ideal-Node
	CurrentDupKeys            int64 // keys with more than one session
	CurrentDupConns           int64 // sessions sharing a key with another
	TotalDupLogins            int64 // logins of a key that was already connected
	Watchers                  int64 // mesh peers watching connections
	CurrentParked             int64 // idle sessions with no reader goroutine (WithIdlePark)
	Parks                     int64 // times a session's reader was parked
	FastStartLogins           int64 // sessions that skipped the 101 (Derp-Fast-Start: 1)
	WebSocketAccepts          int64 // WebSocket handshakes completed (DERP over WebSocket)
	UpgradeLogins             int64 // sessions through a 101 or Accept
	PacketsReceived           int64 // packets received from local clients
	BytesReceived             int64 // their bytes, without framing
	PacketsSent               int64 // packets written to clients
	BytesSent                 int64 // their bytes, without framing
	PacketsForwardedIn        int64 // packets received from mesh peers, delivered or dropped
	PacketsForwardedOut       int64 // packets forwarded to mesh peers
	PingsReceived, PongsSent  int64 // pings from clients, and the pongs that answered them
	PingsSent, PongsReceived  int64 // liveness pings to clients that can ack them
	HomeMovesIn, HomeMovesOut int64 // NotePreferred changes after the first 5 s
	WriteTimeouts             int64 // sessions ended by the write deadline
	UnknownFrames             int64 // frames read and ignored
	RateLimitWaits            int64 // waits for the rate limit: before a frame, before each later chunk of a frame the server skips, and for WebSocket framing
	// MeshWaiting counts the (session, key) pairs in which a session
	// was forwarded packets by a mesh peer from a key with no route here
	// yet, and waits for the key's route or login, to be told when the
	// key leaves (see WithMeshPeers). MeshWaitsGivenUp counts the pairs
	// ended because the key was found gone from the peer, the session
	// told PeerGone; MeshWaitsForgotten those ended with no news to be had
	// (the peer is one this server has no link to: not in WithMeshPeers,
	// not reached yet, or replaced at its link's URL by four more since)
	// or never started (over 16384 waits), the session forgetting the key
	// until its next packet.
	// Pairs taken over by a route or a login, and those of a session
	// that ends while it waits, are in neither.
	MeshWaiting, MeshWaitsGivenUp, MeshWaitsForgotten int64
	// PacketsPerBatch counts the batches of packets written to clients
	// (one writev, or one flush under TLS, each) by the packets they held:
	// 1, 2–3, 4–7, 8–15, 16–31, 32–63, 64–127, 128 or more. Bigger
	// batches mean the writers are behind and each system call carries
	// more.
	PacketsPerBatch [batchBuckets]int64
	// QueueWait sums, over those batches, how long each batch's oldest
	// packet had waited in its queue (from when the queue last became
	// non-empty); divided by the number of batches, it is the mean queue
	// delay.
	QueueWait time.Duration
	// PacketsDropped and BytesDropped count drops by reason ("unknown_dest",
	// "unknown_dest_on_fwd", "gone_disconnected", "queue_head", "queue_tail",
	// "write_error", "dup_client", "mesh_queue", "mesh_link_down") and kind
	// ("disco", "other"), as "reason/kind". Every combination is present,
	// zero or not. "queue_tail" and "dup_client" are Tailscale's names for
	// drops this server never makes (a full queue loses its oldest packet,
	// counted as "queue_head", and a key with several sessions is routed
	// to the one that sent last); they stay, at zero, so dashboards built
	// on those names find them.
	PacketsDropped map[string]int64
	BytesDropped   map[string]int64
	// Errors counts failed logins ("login:<reason>") and sessions ended by
	// a protocol violation or I/O error ("session:<reason>").
	Errors map[string]int64
	// Rejected counts connections and requests refused before login by
	// reason: "too_many_connections" (WithMaxConnections), "server_closed"
	// (after Close), "hijack_failed" (ServeHTTP could not take the
	// connection), and requests ServeHTTP answers with an HTTP error:
	// "no_upgrade" (no Upgrade: DERP or websocket), "not_http1" (HTTP/2
	// or later), "upgrade_body" (an upgrade request with a body),
	// "websocket_version" and "websocket_handshake". A reason appears
	// once it has been counted.
	Rejected map[string]int64
}

// statsWalk is a Stats call's walk over s.conns, which releases s.mu
// between batches of sessions.
type statsWalk struct {
	gen    uint64         // sconn.statsGen of the sessions it counted
	missed sessionTraffic // of sessions that ended before it reached them
}

// connsBatch is how many sessions a walk over s.conns (Stats, Sessions)
// handles per hold of s.mu, for which every login and logout waits: tens of
// microseconds.
const connsBatch = 256

// walkConnsLocked calls f for every session in s.conns, with s.mu held, as
// the caller holds it; it releases s.mu after every connsBatch sessions, so
// that logins and logouts wait for a batch rather than the whole walk, and
// returns how many sessions the last batch (still under s.mu) had. As with
// a range over a map that changes, a session that leaves s.conns before
// the walk reaches it is not visited, one that joins may be or not, and
// every other is visited once.
func (s *Server) walkConnsLocked(f func(c *sconn)) (last int) {
	// A walk that goes on over a map that was replaced would visit the
	// sessions that left since and miss those that came (see
	// deleteConnLocked).
	s.connsWalks++
	defer func() {
		if s.connsWalks--; s.connsWalks == 0 {
			s.conns = shrinkTable(s.conns, &s.connsPeak)
		}
	}()
	held := 0
	for c := range s.conns {
		f(c)
		// Let go after a session, not before: the range takes the next
		// one from the map only once the lock is held again, so one
		// that ended meanwhile is not visited.
		if held++; held == connsBatch {
			s.mu.Unlock()
			testConnsBatchDone(held)
			held = 0
			// Let a login or logout that waits have the lock now:
			// the woken waiter would otherwise find it taken again.
			runtime.Gosched()
			s.mu.Lock()
		}
	}
	return held
}

// deleteConnLocked removes c from s.conns, which is rebuilt smaller once
// most of its sessions have gone (deleteShrink), unless a walk over it is
// in progress: the last walk to end does it then. s.mu must be held.
func (s *Server) deleteConnLocked(c *sconn) {
	if s.connsWalks > 0 {
		s.connsPeak = max(s.connsPeak, len(s.conns))
		delete(s.conns, c)
		return
	}
	s.conns = deleteShrink(s.conns, c, &s.connsPeak)
}

// testHookConnsBatch, if set, is called with s.mu released after each batch
// of sessions a walk over s.conns (Stats, Sessions) visited under one hold
// of s.mu, with the batch's size. It is nil outside tests.
var testHookConnsBatch atomic.Pointer[func(sessions int)]

func testConnsBatchDone(sessions int) {
	if h := testHookConnsBatch.Load(); h != nil {
		(*h)(sessions)
	}
}

// Stats returns a snapshot of the server's counters. The traffic counters
// (packets and bytes each way, PacketsPerBatch, QueueWait) add up those of
// every session, live or ended: a walk over all sessions that takes the
// server's lock for a few hundred sessions at a time, so that logins and
// logouts wait for one batch at most, not the whole walk. Each session is
// counted once, even if it ends during the walk, so no counter is ever
// lower than in an earlier snapshot. Concurrent calls wait for each other.
func (s *Server) Stats() Stats {
	sc := &s.stats
	st := Stats{
		Accepts:                sc.accepts.Load(),
		CurrentConnections:     sc.current.Load(),
		CurrentHomeConnections: sc.home.Load(),
		CurrentNotIdealConns:   sc.notIdeal.Load(),
		CurrentDupKeys:         sc.dupKeys.Load(),
		CurrentDupConns:        sc.dupConns.Load(),
		TotalDupLogins:         sc.dupTotal.Load(),
		Watchers:               sc.watchers.Load(),
		CurrentParked:          sc.parked.Load(),
		Parks:                  sc.parks.Load(),
		FastStartLogins:        sc.fastStarts.Load(),
		WebSocketAccepts:       sc.webSockets.Load(),
		UpgradeLogins:          sc.upgrades.Load(),
		PacketsForwardedIn:     sc.forwardedIn.Load(),
		PacketsForwardedOut:    sc.forwardedOut.Load(),
		PingsReceived:          sc.gotPing.Load(),
		PongsSent:              sc.sentPong.Load(),
		PingsSent:              sc.sentPing.Load(),
		PongsReceived:          sc.gotPong.Load(),
		HomeMovesIn:            sc.homeMovesIn.Load(),
		HomeMovesOut:           sc.homeMovesOut.Load(),
		WriteTimeouts:          sc.writeTimeouts.Load(),
		UnknownFrames:          sc.unknownFrames.Load(),
		RateLimitWaits:         sc.rateWaits.Load(),
		MeshWaitsGivenUp:       sc.waitsGivenUp.Load(),
		MeshWaitsForgotten:     sc.waitsForgotten.Load(),
		PacketsDropped:         map[string]int64{},
		BytesDropped:           map[string]int64{},
		Errors:                 map[string]int64{},
		Rejected:               map[string]int64{},
	}
	for r := range numDropReasons {
		for k, kind := range []string{"other", "disco"} {
			name := dropReasonNames[r] + "/" + kind
			st.PacketsDropped[name] = sc.dropPkts[r][k].Load()
			st.BytesDropped[name] = sc.dropBytes[r][k].Load()
		}
	}
	s.mesh.mu.RLock()
	st.MeshWaiting = int64(s.mesh.waits)
	s.mesh.mu.RUnlock()
	sc.mu.Lock()
	for k, v := range sc.errors {
		st.Errors[k] = v
	}
	for k, v := range sc.rejected {
		st.Rejected[k] = v
	}
	sc.mu.Unlock()

	// The totals of ended sessions are read with the walk registered, in
	// one hold of s.mu: a session that ends (unregister) before then is in
	// them; one that ends after is counted by the walk when it reaches it,
	// or, if it ends before, added to w.missed by unregister.
	s.statsMu.Lock()
	defer s.statsMu.Unlock()
	s.mu.Lock()
	s.statsGen++
	w := &statsWalk{gen: s.statsGen}
	s.statsWalk = w
	sc.mu.Lock()
	t := sc.closed
	sc.mu.Unlock()
	last := s.walkConnsLocked(func(c *sconn) {
		c.statsGen = w.gen
		t.addTraffic(c)
	})
	s.statsWalk = nil
	t.add(&w.missed)
	s.mu.Unlock()
	testConnsBatchDone(last)
	st.PacketsReceived, st.BytesReceived = t.recvPkts, t.recvBytes
	st.PacketsSent, st.BytesSent = t.sentPkts, t.sentBytes
	st.PacketsPerBatch, st.QueueWait = t.batches, time.Duration(t.queueWait)
	return st
}

// ExpVar returns an expvar.Var whose String is the JSON of Stats, for
// publishing with expvar.Publish.
func (s *Server) ExpVar() expvar.Var {
	return expvar.Func(func() any { return s.Stats() })
}

// WritePrometheus writes the server's counters in the Prometheus text
// exposition format, with names like Tailscale's exporter produces
// ("derp_current_connections", "derp_packets_dropped{reason,kind}"), so a
// /metrics handler needs no client library:
//
//	mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) { srv.WritePrometheus(w) })
//
// On Linux it also writes derp_client_rtt_seconds, a histogram of the
// kernel's smoothed RTT of every TCP session, sampled as it writes: one
// system call per session, about 1 µs each.
func (s *Server) WritePrometheus(w io.Writer) error {
	st := s.Stats()
	bw := bufio.NewWriter(w)
	metric := func(name, kind, help string, v int64) {
		fmt.Fprintf(bw, "# HELP derp_%s %s\n# TYPE derp_%s %s\nderp_%s %d\n", name, help, name, kind, name, v)
	}
	metric("accepts", "counter", "Sessions handed to the server.", st.Accepts)
	metric("current_connections", "gauge", "Logged-in sessions.", st.CurrentConnections)
	metric("current_home_connections", "gauge", "Sessions that declared this server home.", st.CurrentHomeConnections)
	metric("current_notideal_connections", "gauge", "Sessions whose request had Ideal-Node.", st.CurrentNotIdealConns)
	metric("current_dup_client_keys", "gauge", "Keys with more than one session.", st.CurrentDupKeys)
	metric("current_dup_client_conns", "gauge", "Sessions sharing their key.", st.CurrentDupConns)
	metric("total_dup_client_conns", "counter", "Logins of an already connected key.", st.TotalDupLogins)
	metric("watchers", "gauge", "Mesh peers watching connections.", st.Watchers)
	metric("current_parked_connections", "gauge", "Idle sessions with no reader goroutine.", st.CurrentParked)
	metric("parks", "counter", "Times a session's reader was parked.", st.Parks)
	metric("fast_start_logins", "counter", "Sessions that skipped the 101 response.", st.FastStartLogins)
	metric("upgrade_logins", "counter", "Sessions through a 101 response or Accept.", st.UpgradeLogins)
	metric("websocket_accepts", "counter", "WebSocket handshakes completed.", st.WebSocketAccepts)
	metric("packets_received", "counter", "Packets received from local clients.", st.PacketsReceived)
	metric("bytes_received", "counter", "Bytes of packets received from local clients.", st.BytesReceived)
	metric("packets_sent", "counter", "Packets written to clients.", st.PacketsSent)
	metric("bytes_sent", "counter", "Bytes of packets written to clients.", st.BytesSent)
	metric("packets_forwarded_in", "counter", "Packets received from mesh peers.", st.PacketsForwardedIn)
	metric("packets_forwarded_out", "counter", "Packets forwarded to mesh peers.", st.PacketsForwardedOut)
	metric("got_ping", "counter", "Pings received.", st.PingsReceived)
	metric("sent_pong", "counter", "Pongs sent.", st.PongsSent)
	metric("sent_ping", "counter", "Liveness pings sent to clients.", st.PingsSent)
	metric("got_pong", "counter", "Pongs received for liveness pings.", st.PongsReceived)
	metric("home_moves_in", "counter", "Clients that made this server home after their first 5 s.", st.HomeMovesIn)
	metric("home_moves_out", "counter", "Clients that stopped calling this server home after their first 5 s.", st.HomeMovesOut)
	metric("sclient_write_timeouts", "counter", "Sessions ended by the write deadline.", st.WriteTimeouts)
	metric("unknown_frames", "counter", "Frames read and ignored.", st.UnknownFrames)
	metric("rate_limit_waits", "counter", "Waits of reads for the rate limit (a frame, each later chunk of a skipped frame, WebSocket framing).", st.RateLimitWaits)
	metric("mesh_waiting", "gauge", "Pairs of a session and a key forwarded to it whose route the session waits for.", st.MeshWaiting)
	metric("mesh_waits_given_up", "counter", "Waits for a forwarded key ended by finding it gone (PeerGone sent).", st.MeshWaitsGivenUp)
	metric("mesh_waits_forgotten", "counter", "Waits for a forwarded key ended or skipped with no news to be had.", st.MeshWaitsForgotten)
	fmt.Fprintf(bw, "# HELP derp_queue_wait_seconds Summed over packet batches written to clients: how long each batch's oldest packet waited.\n# TYPE derp_queue_wait_seconds counter\nderp_queue_wait_seconds %g\n", st.QueueWait.Seconds())
	fmt.Fprintf(bw, "# HELP derp_packets_per_batch Packets per write to a client.\n# TYPE derp_packets_per_batch histogram\n")
	var batches int64
	for i, n := range st.PacketsPerBatch {
		batches += n
		le := "+Inf"
		if i < batchBuckets-1 {
			le = strconv.Itoa(2<<i - 1)
		}
		fmt.Fprintf(bw, "derp_packets_per_batch_bucket{le=%q} %d\n", le, batches)
	}
	fmt.Fprintf(bw, "derp_packets_per_batch_sum %d\nderp_packets_per_batch_count %d\n", st.PacketsSent, batches)
	labelled := func(name, help string, m map[string]int64, labels func(k string) string) {
		fmt.Fprintf(bw, "# HELP derp_%s %s\n# TYPE derp_%s counter\n", name, help, name)
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			fmt.Fprintf(bw, "derp_%s{%s} %d\n", name, labels(k), m[k])
		}
	}
	split := func(a, b string) func(string) string {
		return func(k string) string {
			x, y, _ := strings.Cut(k, "/")
			if b == "" {
				return fmt.Sprintf("%s=%q", a, k)
			}
			if i := strings.IndexByte(k, ':'); i >= 0 && a == "phase" {
				x, y = k[:i], k[i+1:]
			}
			return fmt.Sprintf("%s=%q,%s=%q", a, x, b, y)
		}
	}
	labelled("packets_dropped", "Packets dropped, by reason and kind.", st.PacketsDropped, split("reason", "kind"))
	labelled("bytes_dropped", "Bytes of packets dropped, by reason and kind.", st.BytesDropped, split("reason", "kind"))
	labelled("errors", "Failed logins and sessions ended by an error, by phase and reason.", st.Errors, split("phase", "reason"))
	labelled("rejected", "Connections refused before login, by reason.", st.Rejected, split("reason", ""))
	s.writeRTTHistogram(bw)
	return bw.Flush()
}

// rttBuckets are the upper bounds of derp_client_rtt_seconds.
var rttBuckets = [...]time.Duration{
	time.Millisecond, 5 * time.Millisecond, 10 * time.Millisecond, 25 * time.Millisecond,
	50 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond,
	time.Second, 2500 * time.Millisecond,
}

// writeRTTHistogram writes the histogram of the sessions' TCP RTTs, if the
// platform reports any.
func (s *Server) writeRTTHistogram(bw *bufio.Writer) {
	var counts [len(rttBuckets)]int64
	var n int64
	var sum time.Duration
	for si := range s.Sessions() {
		if si.RTT <= 0 {
			continue
		}
		n++
		sum += si.RTT
		for i, b := range rttBuckets {
			if si.RTT <= b {
				counts[i]++
			}
		}
	}
	if n == 0 {
		return
	}
	const name = "derp_client_rtt_seconds"
	fmt.Fprintf(bw, "# HELP %s Smoothed TCP round-trip time of client sessions, from the kernel.\n# TYPE %s histogram\n", name, name)
	for i, b := range rttBuckets {
		fmt.Fprintf(bw, "%s_bucket{le=\"%g\"} %d\n", name, b.Seconds(), counts[i])
	}
	fmt.Fprintf(bw, "%s_bucket{le=\"+Inf\"} %d\n%s_sum %g\n%s_count %d\n", name, n, name, sum.Seconds(), name, n)
}

// The mesh: the servers of a region share a mesh key, and each one watches
// every other one and forwards packets for the keys connected there.
//
//	peer B's clients come and go
//	  │ PeerPresent / PeerGone, over our watch connection to B (logged in
//	  ▼ with this server's own DERP key and the mesh key)
//	link B, run goroutine: dial (FastStart), WatchConns, Recv loop; on any
//	  │ error forget B's keys, back off with jitter, dial again
//	  ▼ meshAdd / meshRemove
//	routes: key → links that announced it (the newest is used)
//	        + local clients that received packets forwarded from it
//	  ▲ meshLookup (RLock)
//	client A's reader: routePacket finds no local conn → meshForward copies
//	  │ the packet once onto link B's ring (oldest dropped when full)
//	  ▼
//	link B, writer goroutine (one per connection): ForwardPacket(src, dst,
//	  pkt) on the same connection to B, 5 s write timeout each
//
// A forwarded packet is delivered only locally by the receiving server
// (routePacket never forwards a forwarded packet), so a packet crosses at
// most one mesh hop and stale or inconsistent routes cannot make it loop.
//
// Locking: mesh.mu may be held while taking a routing shard's mu, never the
// other way round; it is never held while taking a conn's mu or a link's
// mu. A link's mu guards only its current client and its ring.

// Mesh link parameters.
const (
	// meshQueueDepth is how many packets may wait for each mesh peer. A
	// link carries the traffic of many clients, so it is deeper than a
	// client's queue; when full, the oldest packet is dropped.
	meshQueueDepth  = 256
	meshDialTimeout = 10 * time.Second
	// meshLinkWriteTimeout bounds each of a link's own frames (WatchConns,
	// Pings, Pongs) as ForwardPacket's bound does its forwards: a peer that
	// stops reading ends the connection instead of wedging the link.
	meshLinkWriteTimeout = 5 * time.Second
	meshMinBackoff       = 100 * time.Millisecond
	meshMaxBackoff       = 5 * time.Second

	// A link that has received nothing from its peer for meshPingAfter
	// pings it, and if nothing at all (the Pong or anything else) arrives
	// in meshPongWait more, the peer counts as gone (meshLink.probe): a
	// peer paused, or a path that drops everything without a FIN or RST,
	// is noticed about 10 s after its last frame instead of at the
	// Client's 120 s receive timeout. Every peer answers Pings,
	// Tailscale's servers included; one that never has is kept while its
	// host acknowledges our bytes (Linux; see probe).
	meshPingAfter = 5 * time.Second
	meshPongWait  = 5 * time.Second
)

// errMeshSelf ends a link whose URL reaches this very server.
var errMeshSelf = errors.New("relay: mesh peer is this server")

// meshState is the server's view of the other servers of its region.
type meshState struct {
	links  []*meshLink
	dialer FastStart
	keyHex string // the mesh key, as MeshKey wants it
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // the links' run goroutines

	mu     sync.RWMutex
	routes map[PublicKey]*meshRoute      // keys announced by at least one peer
	custom map[PacketForwarder]*meshLink // AddPacketForwarder's, by forwarder
	closed bool                          // closeMesh ran: no more custom links
	// routesPeak is the most routes has held since it was last rebuilt
	// (deleteShrink).
	routesPeak int
	// waiting holds, for each key with neither a route nor a connection
	// here, the sessions that were written packets forwarded from it
	// (meshNoteRecipient): its PeerPresent may still be on its way, or
	// the link to its server may be down while that server's link here
	// is up. They join the key's route when one is added, or its entry
	// when it logs in here, to be told when it leaves, and are dropped
	// when they end (forgetRecipient). Each one lists its keys in waitFor.
	// waits counts the (key, session) pairs, at most cfg.meshMaxWaiting.
	// A key that never gets a route (it left its server before its
	// PeerPresent reached us, or while our link to that server was down)
	// is given up by sweepWaits, which the timer sweep runs every half
	// cfg.meshWaitGrace while there are waits (sweepOn).
	waiting map[PublicKey]*meshWait
	waits   int
	sweep   *time.Timer
	sweepOn bool // sweep is due to run
	// waitingPeak is the most keys waiting has held since it was last
	// rebuilt (deleteWaitingLocked).
	waitingPeak int
	// fwdLoops are the custom links whose forwardLoop has not returned,
	// stopped ones included: Close waits for them.
	fwdLoops map[*meshLink]struct{}
	// fwdTurns are the turns of the forwarders that have a forwardLoop
	// running: a forwarder removed during a call and added again has two.
	fwdTurns map[PacketForwarder]*fwdTurn
}

// fwdTurn lets one forwardLoop of a forwarder call it at a time.
type fwdTurn struct {
	ch    chan struct{} // one slot, held around ForwardPacket calls
	loops int           // the forwarder's forwardLoops still running
}

// meshWait is the sessions waiting for a key's route or login (mesh.waiting).
type meshWait struct {
	sessions map[*sconn]struct{}
	// since is when the last session joined (monoNanos), or a waiting
	// one was written a packet from the key after one from another key
	// or through another peer (the key may have moved: see takeLocked):
	// that packet had just been forwarded, so the key was at the
	// forwarding peer's server then.
	since int64
	// via is the server key of the mesh peer that forwarded that packet
	// (its session's key), or zero: the link that watches it (or watched
	// it before it was replaced at the link's URL: meshLink.replaced)
	// tells sweepWaits whether the key is still there.
	via PublicKey
}

// meshSrc is a new source of the packets written to a session, for
// meshNoteRecipient: a key, and for forwarded packets the mesh peer's
// session that forwarded them.
type meshSrc struct {
	key PublicKey
	via *sconn
}

// meshRoute says where a key announced by mesh peers can be reached.
type meshRoute struct {
	// links that announced the key, oldest first. Packets go to the last
	// one: a client that moved to another server is found where it went,
	// even before the server it left says it is gone.
	links []*meshLink
	// recipients are the local clients that were written packets forwarded
	// from the key or sent packets to it (noteSentToMesh); they are told
	// PeerGone when it leaves the region, as keyEntry.recipients are for
	// local keys.
	recipients recipientSet
}

// meshLink is this server's connection to one mesh peer: it watches the
// peer's connections and carries packets forwarded to the peer.
type meshLink struct {
	s    *Server
	url  string
	wake chan struct{} // one-slot doorbell: the ring is not empty

	mu     sync.Mutex
	client *Client // the current connection; nil while down
	ring   fwdRing
	// peer is the server key of the peer, from the link's last
	// connection (zero before the first); upAt is when the current
	// connection's watch began (monoNanos), zero while down, and downAt
	// when the last one ended. The peer announces its clients from upAt
	// on. peerLeftAt is when the peer's last session here (its own link
	// to us) ended, zero if none has. For sweepWaits.
	peer       PublicKey
	upAt       int64
	downAt     int64
	peerLeftAt int64
	// replaced are the servers the link's connections reached before the
	// last changes of peer (the server at l.url was replaced, or
	// restarted with a new key), oldest first, at most
	// maxReplacedPeers. For sweepWaits: keys forwarded by them are still
	// waited for.
	replaced []replacedPeer

	// keys this peer announced, and the most it has held since it was
	// last rebuilt (deleteShrink); guarded by s.mesh.mu.
	keys     map[PublicKey]struct{}
	keysPeak int

	// ponged is set once the peer answered a Ping of ours, on any of the
	// link's connections: from then on a Ping it leaves unanswered ends
	// the connection even if the peer's host acknowledges it (probe).
	ponged atomic.Bool

	// noticeLog budgets the lines about the peer's Health and
	// ServerRestarting notices (logNotice); only run uses it.
	noticeLog logLimit

	// For AddPacketForwarder's links (no peer URL, no client): packets go
	// to fwd; stop ends forwardLoop; stopped (guarded by mu) refuses more.
	fwd     PacketForwarder
	stop    chan struct{}
	stopped bool
	done    chan struct{} // closed when forwardLoop returns
	turn    *fwdTurn      // shared with the forwarder's other links
}

// replacedPeer is a server that a mesh link's connections no longer reach:
// key is its server key, downAt when the link's last connection to it
// ended and leftAt when its last session here did, as meshLink.downAt and
// peerLeftAt.
type replacedPeer struct {
	key            PublicKey
	downAt, leftAt int64
}

// maxReplacedPeers bounds meshLink.replaced: a peer restarting with a new
// key in a loop must not grow it.
const maxReplacedPeers = 4

func newMeshLink(s *Server, peerURL string) *meshLink {
	return &meshLink{
		s:    s,
		url:  peerURL,
		wake: make(chan struct{}, 1),
		ring: fwdRing{buf: make([]fwdItem, meshQueueDepth)},
		keys: map[PublicKey]struct{}{},
	}
}

type fwdItem struct {
	dst PublicKey
	p   *packet // p.src is the original source
}

// fwdRing is a fixed-size FIFO of packets waiting for a mesh peer.
type fwdRing struct {
	buf     []fwdItem
	head, n int
}

// push appends it; if the ring is full it first removes and returns the
// oldest item.
func (r *fwdRing) push(it fwdItem) (old fwdItem) {
	if r.n == len(r.buf) {
		old = r.buf[r.head]
		r.buf[r.head] = fwdItem{}
		r.head = (r.head + 1) % len(r.buf)
		r.n--
	}
	r.buf[(r.head+r.n)%len(r.buf)] = it
	r.n++
	return old
}

// popAll moves every item, oldest first, to dst.
func (r *fwdRing) popAll(dst []fwdItem) []fwdItem {
	for ; r.n > 0; r.n-- {
		dst = append(dst, r.buf[r.head])
		r.buf[r.head] = fwdItem{}
		r.head = (r.head + 1) % len(r.buf)
	}
	return dst
}

func (s *Server) initMesh() {
	m := &s.mesh
	m.routes = map[PublicKey]*meshRoute{}
	if len(s.cfg.meshPeers) == 0 {
		return
	}
	if !s.cfg.hasMeshKey {
		panic("relay: WithMeshPeers requires WithMeshKey")
	}
	if s.cfg.meshDialer != nil {
		m.dialer = *s.cfg.meshDialer
	}
	m.dialer.ServerKey = PublicKey{} // each peer has its own
	m.keyHex = fmt.Sprintf("%x", s.cfg.meshKey[:])
	seen := map[string]bool{}
	for _, raw := range s.cfg.meshPeers {
		u, err := meshPeerURL(raw)
		if err != nil {
			panic("relay: WithMeshPeers: " + err.Error())
		}
		if seen[u] {
			continue // two links with one key would be duplicates at the peer
		}
		seen[u] = true
		m.links = append(m.links, newMeshLink(s, u))
	}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	for _, l := range m.links {
		m.wg.Add(1)
		go l.run()
	}
}

// meshPeerURL normalizes a WithMeshPeers entry.
func meshPeerURL(raw string) (string, error) {
	raw = strings.TrimSpace(raw)
	if !strings.Contains(raw, "://") {
		raw = "https://" + raw + "/derp"
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "", err
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", fmt.Errorf("%q: want an http or https URL with a host", raw)
	}
	return u.String(), nil
}

// closeMesh stops every link and waits for their goroutines. Keys learned
// from peers are forgotten without telling anyone: the server is closing,
// and they have not left the region.
func (s *Server) closeMesh() {
	m := &s.mesh
	m.mu.Lock()
	m.closed = true
	if m.sweep != nil {
		m.sweep.Stop() // a sweep running still gives up what it found
	}
	var custom []*meshLink
	for f, l := range m.custom {
		custom = append(custom, l)
		delete(m.custom, f)
	}
	loops := make([]*meshLink, 0, len(m.fwdLoops))
	for l := range m.fwdLoops {
		loops = append(loops, l)
	}
	m.mu.Unlock()
	for _, l := range custom {
		l.stopForwarding()
	}
	// Wait for the forwarders' calls in progress.
	for _, l := range loops {
		<-l.done
	}
	if m.cancel == nil {
		return
	}
	m.cancel()
	for _, l := range m.links {
		l.mu.Lock()
		c := l.client
		l.mu.Unlock()
		if c != nil {
			c.Close() // ends its Recv and its writer
		}
	}
	m.wg.Wait()
}

// run keeps the link connected until the server closes: each failure is
// followed by an exponential backoff with jitter, reset once a connection
// has been accepted as a watcher.
func (l *meshLink) run() {
	defer l.s.mesh.wg.Done()
	ctx := l.s.mesh.ctx
	backoff := meshMinBackoff
	for {
		start := time.Now()
		watched, restartIn, err := l.session(ctx)
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, errMeshSelf) {
			l.s.log.Info("relay: mesh peer is this server; ignoring it", "peer", l.url)
			return
		}
		if watched && time.Since(start) >= meshMaxBackoff {
			// Only a link that lasted starts over: a peer that takes
			// the watch and drops it at once, every time, would
			// otherwise be redialled (and logged) every 100 ms.
			backoff = meshMinBackoff
		}
		d := backoff/2 + rand.N(backoff/2+1)
		d = max(d, min(restartIn, meshMaxBackoff)) // the peer said when to come back
		l.s.log.Info("relay: mesh link down", "peer", l.url, "err", err, "retryIn", d)
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(2*backoff, meshMaxBackoff)
	}
}

// session makes one connection to the peer, watches it until it fails and
// then forgets what it learned. watched reports whether the peer accepted
// the watch (it announced at least one connection: its flood includes our
// own); restartIn is the delay the peer asked for in a ServerRestarting.
func (l *meshLink) session(ctx context.Context) (watched bool, restartIn time.Duration, err error) {
	s := l.s
	dctx, cancel := context.WithTimeout(ctx, meshDialTimeout)
	c, hs, err := s.mesh.dialer.Dial(dctx, l.url, s.priv, MeshKey(s.mesh.keyHex))
	cancel()
	if err != nil {
		return false, 0, err
	}
	if c.ServerPublicKey() == s.pub {
		c.Close()
		return false, 0, errMeshSelf
	}
	if err := c.writeFrameWithin(l.s.cfg.linkWriteTimeout, FrameWatchConns, nil); err != nil {
		c.Close()
		return false, 0, err
	}
	l.mu.Lock()
	if ctx.Err() != nil { // closeMesh ran and could not see c
		l.mu.Unlock()
		c.Close()
		return false, 0, ctx.Err()
	}
	l.client = c
	l.noteUpLocked(c.ServerPublicKey(), monoNanos())
	l.mu.Unlock()
	s.log.Info("relay: mesh link up", "peer", l.url, "serverKey", c.ServerPublicKey().ShortString(), "path", hs.Path)

	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		l.writeLoop(c, stop)
	}()
	lv := &linkLiveness{answered: make(chan struct{}, 1)}
	lv.heard.Store(monoNanos())
	var probeErr error
	probed := make(chan struct{})
	go func() {
		defer close(probed)
		probeErr = l.probe(c, stop, lv)
	}()
	watched, restartIn, err = l.watch(c, lv)
	close(stop) // first: probe takes a write failing from here on for the end
	c.Close()
	<-done
	<-probed
	if probeErr != nil && errors.Is(err, ErrClosed) {
		err = probeErr // probe closed c: say why
	}

	l.mu.Lock()
	l.client, l.upAt, l.downAt = nil, 0, monoNanos()
	stale := l.ring.popAll(nil)
	l.mu.Unlock()
	for _, it := range stale {
		s.stats.drop(dropMeshLinkDown, looksLikeDisco(it.p.buf[:it.p.n]), it.p.n)
		putPacket(it.p)
	}
	s.meshForgetLink(l, ctx.Err() == nil)
	return watched, restartIn, err
}

// noteUpLocked records that l's connection to the server with key peer
// began its watch at at (monoNanos); l.mu must be held. A new key moves the
// old one's times to replaced, for sweepWaits.
func (l *meshLink) noteUpLocked(peer PublicKey, at int64) {
	if !l.peer.IsZero() && peer != l.peer {
		// peer is replaced no more (the link went back to it); a
		// session of it that left before now does not matter, as the
		// link's connection to it ends after now.
		l.replaced = slices.DeleteFunc(l.replaced, func(r replacedPeer) bool { return r.key == peer })
		if len(l.replaced) == maxReplacedPeers {
			l.replaced = slices.Delete(l.replaced, 0, 1)
		}
		l.replaced = append(l.replaced, replacedPeer{l.peer, l.downAt, l.peerLeftAt})
		l.peerLeftAt = 0
	}
	l.peer, l.upAt = peer, at
}

// watch applies the peer's PeerPresent and PeerGone messages to the routes
// until the connection fails, noting in lv when each frame arrived, for
// probe.
func (l *meshLink) watch(c *Client, lv *linkLiveness) (watched bool, restartIn time.Duration, err error) {
	var notices recipientNotices
	var lastProblem string // the last Health's, as logged
	restartSaid := false   // a ServerRestarting was logged at Info
	for {
		m, err := c.Recv()
		if err != nil {
			return watched, restartIn, err
		}
		lv.heard.Store(monoNanos())
		if lv.waiting.Load() {
			select {
			case lv.answered <- struct{}{}:
			default:
			}
		}
		switch m := m.(type) {
		case Pong:
			l.ponged.Store(true)
		case PeerPresent:
			watched = true
			l.s.meshAdd(m.Key, l)
		case *ReceivedPacket:
			// From a client of the peer to this server's own key:
			// the peer may count this connection among its
			// recipients.
			notices.sentUs(m.Source)
		case PeerGone:
			// Disconnected, or NotHere in answer to a packet we forwarded
			// on a stale route: either way the key is not there, unless
			// this is the notice to the key's recipients.
			if m.Reason == PeerGoneDisconnected && notices.isNotice(m.Peer, l.s.meshAnnounced(m.Peer, l)) {
				continue
			}
			l.s.meshRemove(m.Peer, l, true)
		case Ping:
			// Bounded: a peer that pings and stops reading must not
			// hold the watch (and, behind the Client's write lock,
			// the forwards) forever. A failed write ends the link.
			if err := c.writeFrameWithin(l.s.cfg.linkWriteTimeout, FramePong, m[:]); err != nil {
				return watched, restartIn, err
			}
		case ServerRestarting:
			restartIn = m.ReconnectIn
			// The first of a connection goes to Info whatever the
			// budget: it is why the link is about to go down, and
			// connections come no faster than the "mesh link down"
			// lines, which are not budgeted either.
			l.logNoticeAlways(!restartSaid, "relay: mesh peer restarting", "reconnectIn", m.ReconnectIn)
			restartSaid = true
		case Health:
			// A problem the same as the last one (cut alike) is
			// the peer repeating itself: to Debug.
			problem := clip(m.Problem, maxLoggedHealth)
			if problem != "" {
				args := []any{"problem", problem}
				if problem != m.Problem { // cut (clip's "…" may make it longer)
					args = append(args, "problemBytes", len(m.Problem))
				}
				l.logNotice(problem != lastProblem, "relay: mesh peer health", args...)
			}
			lastProblem = problem
		}
	}
}

// maxLoggedHealth bounds the bytes of a mesh peer's Health problem in a
// log line; the link's Client keeps up to maxHealthLen of it.
const maxLoggedHealth = 256

// logNotice logs a line about a notice from the link's peer (Health,
// ServerRestarting), at Info if news and the link's budget allow (as
// logPeer's, in a budget per link), else at Debug: a peer can send them as
// fast as the link reads. Only the link's run goroutine calls it.
func (l *meshLink) logNotice(news bool, msg string, args ...any) {
	args = append([]any{"peer", l.url}, args...)
	if !news {
		l.s.log.Debug(msg, args...)
		return
	}
	ok, held := l.noticeLog.allow(time.Now())
	if !ok {
		l.s.log.Debug(msg, args...)
		return
	}
	if held > 0 {
		args = append(args, "suppressed", held)
	}
	l.s.log.Info(msg, args...)
}

// logNoticeAlways is logNotice(true, ...), except that if always is set
// the line goes to Info even when the budget is spent (it still uses a
// token, if there is one, and leaves the count of lines held back to the
// next line the budget lets through).
func (l *meshLink) logNoticeAlways(always bool, msg string, args ...any) {
	if !always {
		l.logNotice(true, msg, args...)
		return
	}
	args = append([]any{"peer", l.url}, args...)
	ok, held := l.noticeLog.allow(time.Now())
	if !ok {
		l.noticeLog.suppressed-- // it is not held back after all
	}
	if held > 0 {
		args = append(args, "suppressed", held)
	}
	l.s.log.Info(msg, args...)
}

// recipientNotices tells, on one connection of a mesh link, the PeerGone
// that a Tailscale derper sends to the recipients of a key (the sessions
// it wrote packets from the key to) from the PeerGone of its watch. A
// client of the peer that sends a packet to this server's own key
// reaches the link's session there, which then becomes one of its
// recipients: when the key leaves, the session is told twice, both
// times Disconnected, once per connection (the derper remembers the
// senders it registered). The notice may come after the key's next
// PeerPresent (v1.102 writes it from a goroutine of its own), and taken
// for the key leaving again it would drop a route to a connected key
// until its next login. A peer of this package sends no such notice
// (see enqueuePeerGone), so the PeerGone taken for it is then that of the key
// leaving a second time: its route stays until a disco packet forwarded
// to it draws a NotHere, or its next login and departure.
type recipientNotices struct {
	// m holds the senders (at most maxRecipientNotices) and where each
	// is: noticeOwed, noticeLeft or noticeDone.
	m map[PublicKey]uint8
}

const (
	noticeOwed = iota + 1 // a packet from the key arrived; it has not left since
	noticeLeft            // it left once since: one PeerGone more is due
	noticeDone            // the notice came: its PeerGones are the watch's

	maxRecipientNotices = 1024 // beyond it, PeerGones of new senders are the watch's
)

// sentUs notes a packet from k to this server's key.
func (n *recipientNotices) sentUs(k PublicKey) {
	if _, ok := n.m[k]; ok || len(n.m) >= maxRecipientNotices {
		return
	}
	if n.m == nil {
		n.m = map[PublicKey]uint8{}
	}
	n.m[k] = noticeOwed
}

// isNotice reports whether a PeerGone(k, Disconnected) is the notice to
// k's recipients, given whether the link announces k (meshAnnounced): of
// the PeerGones (Disconnected) since k's first packet on the connection,
// the first if k is not announced, else the second. The first one while
// k is announced removes it, whichever of the two it is: k left. If k is
// announced again when the second comes, it came back before the notice,
// and stays.
func (n *recipientNotices) isNotice(k PublicKey, announced bool) bool {
	switch n.m[k] {
	case noticeOwed:
		if announced {
			n.m[k] = noticeLeft
			return false
		}
		n.m[k] = noticeDone
		return true
	case noticeLeft:
		n.m[k] = noticeDone
		return true // announced: k came back before the notice
	}
	return false
}

// linkLiveness is what a mesh link's watch tells its probe.
type linkLiveness struct {
	heard    atomic.Int64  // monoNanos of the last frame received
	waiting  atomic.Bool   // a Ping is unanswered: ring answered
	answered chan struct{} // one slot: a frame arrived while waiting
}

// probe pings the peer over c whenever it has sent nothing (lv.heard, set
// by watch) for linkPingAfter, and closes c if nothing at all arrives
// within linkPongWait after the Ping, or if the Ping cannot be written
// within linkWriteTimeout. On Linux, a wait is extended while the socket
// still holds forwards of ours that the peer acknowledged some of within
// linkPongWait: the Ping may be queued behind them on a slow path. A peer that went silent without closing the
// connection would otherwise keep the routes it announced, and lose what
// is forwarded to it, until the Client's 120 s receive timeout. Also on
// Linux, an unanswered Ping ends nothing while the peer has never answered
// one of the link's (l.ponged) and its host acknowledged every byte of c:
// a peer that ignores Pings, on a live path. Until the peer has answered
// one, it is pinged every linkPingAfter even while it sends, so that a busy
// peer is not taken for one that ignores Pings. It returns why it closed
// c, or nil once stop is closed.
func (l *meshLink) probe(c *Client, stop <-chan struct{}, lv *linkLiveness) error {
	cfg := &l.s.cfg
	t := time.NewTimer(cfg.linkPingAfter)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return nil
		case <-t.C:
		}
		// Until the peer has answered a Ping it is pinged even while it
		// sends: a busy peer, never silent for linkPingAfter, would
		// otherwise never answer one, and be taken for a peer that
		// ignores them (below) once it hangs.
		if quiet := time.Duration(monoNanos() - lv.heard.Load()); quiet < cfg.linkPingAfter && l.ponged.Load() {
			t.Reset(cfg.linkPingAfter - quiet)
			continue
		}
		lv.waiting.Store(true)
		select {
		case <-lv.answered: // rung for an earlier Ping
		default:
		}
		sent := monoNanos()
		if err := c.writeFrameWithin(cfg.linkWriteTimeout, FramePing, []byte("meshlink")); err != nil {
			select {
			case <-stop: // the link is ending anyway
				return nil
			default:
			}
			c.Close()
			return fmt.Errorf("relay: mesh peer silent for %v, and a ping to it failed: %w",
				time.Duration(monoNanos()-lv.heard.Load()).Round(time.Millisecond), err)
		}
		t.Reset(cfg.linkPongWait)
		behind := false // the last look found the Ping behind forwards
		for lv.heard.Load() < sent {
			select {
			case <-stop:
				return nil
			case <-lv.answered:
				continue
			case <-t.C:
			}
			if last := lv.heard.Load(); last < sent {
				if socketDraining(parkSocket(c.nc), cfg.linkPongWait) {
					// The Ping is still behind forwards of ours that
					// the peer takes, slowly (a congested path): it
					// is alive. The Client's receive timeout bounds
					// how long this can go on.
					behind = true
					t.Reset(cfg.linkPongWait)
					continue
				}
				if behind {
					// The queue drained within the last wait: the
					// Ping's answer gets a whole wait of its own.
					behind = false
					t.Reset(cfg.linkPongWait)
					continue
				}
				if !l.ponged.Load() && socketAcked(parkSocket(c.nc)) {
					// The peer has never answered a Ping of this
					// link's, and its host took every byte of ours,
					// this Ping included: a server that does not
					// answer Pings, on a path that is alive. Only a
					// path that stops taking our bytes ends its
					// connection.
					break
				}
				c.Close()
				return fmt.Errorf("relay: mesh peer silent: nothing received for %v, no answer to a ping in %v",
					time.Duration(monoNanos()-last).Round(time.Millisecond), time.Duration(monoNanos()-sent).Round(time.Millisecond))
			}
		}
		lv.waiting.Store(false)
		t.Reset(cfg.linkPingAfter) // from the answer, about
	}
}

// writeLoop forwards queued packets over c until stop is closed or a write
// fails; a failed write closes c, which ends the watch and reconnects.
func (l *meshLink) writeLoop(c *Client, stop <-chan struct{}) {
	l.serveQueue(stop, func(batch []fwdItem) bool {
		// One flush for the whole burst, not one per packet.
		err := c.forwardBatch(len(batch), func(i int) (src, dst *PublicKey, pkt []byte) {
			return &batch[i].p.src, &batch[i].dst, batch[i].p.buf[:batch[i].p.n]
		})
		for _, it := range batch {
			if err != nil {
				// Whether any of the burst arrived is unknown: count it
				// all as failed.
				l.s.stats.drop(dropWriteError, looksLikeDisco(it.p.buf[:it.p.n]), it.p.n)
			}
			putPacket(it.p)
		}
		if err != nil {
			if !errors.Is(err, ErrClosed) {
				l.s.log.Info("relay: mesh forward failed", "peer", l.url, "err", err)
			}
			c.Close()
			return false
		}
		l.s.stats.forwardedOut.Add(int64(len(batch)))
		return true
	})
}

// serveQueue waits for packets in l's ring until stop is closed, and hands
// each burst, oldest first, to send, which owns its packets; it returns
// when stop is closed or send reports false.
func (l *meshLink) serveQueue(stop <-chan struct{}, send func(batch []fwdItem) bool) {
	var batch []fwdItem
	for {
		select {
		case <-stop:
			return
		case <-l.wake:
		}
		for {
			l.mu.Lock()
			batch = l.ring.popAll(batch[:0])
			l.mu.Unlock()
			if len(batch) == 0 {
				break
			}
			ok := send(batch)
			clear(batch)
			if !ok {
				return
			}
		}
	}
}

// enqueue queues p for dst on the link without blocking. It reports false if
// the link is down; otherwise old is the item dropped to make room, if any.
func (l *meshLink) enqueue(dst PublicKey, p *packet) (old fwdItem, ok bool) {
	l.mu.Lock()
	if (l.client == nil && l.fwd == nil) || l.stopped {
		l.mu.Unlock()
		return fwdItem{}, false
	}
	old = l.ring.push(fwdItem{dst: dst, p: p})
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
	return old, true
}

// meshForward reads an n-byte packet from br and forwards it to dst through
// a mesh peer, returning dst's route, or nil if it has none. It never blocks
// on the peer: the packet is queued, and dropped (counted) if the link is
// down.
func (s *Server) meshForward(src, dst PublicKey, br *connReader, n int) *meshRoute {
	r, l := s.meshRoute(dst)
	if l == nil {
		return nil
	}
	p := getPacket(n)
	if _, err := io.ReadFull(br, p.buf[:n]); err != nil {
		// The stream is broken; the caller's discard meets the same error
		// and ends the session.
		putPacket(p)
		return nil
	}
	p.n, p.src = n, src
	old, ok := l.enqueue(dst, p)
	if !ok {
		s.stats.drop(dropMeshLinkDown, looksLikeDisco(p.buf[:n]), n)
		putPacket(p)
	} else if old.p != nil {
		s.stats.drop(dropMeshQueue, looksLikeDisco(old.p.buf[:old.p.n]), old.p.n)
		putPacket(old.p)
	}
	return r
}

// noteSentToMesh registers c to be told PeerGone when dst, reached through
// the mesh route r, leaves the region, as noteSentTo does for local keys.
// c remembers the route it registered with: a map lookup per packet.
//
// r may have left while the packet was forwarded, its recipients told
// already: c is then registered with the route that replaced it, or with
// dst's local connection if dst moved here, or else told now that dst is
// gone.
func (c *sconn) noteSentToMesh(dst PublicKey, r *meshRoute) {
	if c.sentToMesh[dst] == r {
		return
	}
	if c.toldGone.Load() {
		c.pruneSentTo()
	}
	if c.sentToMesh == nil || len(c.sentToMesh) >= maxSentTo {
		c.sentToMesh = map[PublicKey]*meshRoute{} // see noteSentTo
	}
	m := &c.s.mesh
	gone := false
	m.mu.Lock()
	if cur := m.routes[dst]; cur != nil {
		cur.recipients.add(c)
		c.sentToMesh[dst] = cur
		c.sentToMeshPeak = max(c.sentToMeshPeak, len(c.sentToMesh))
	} else {
		delete(c.sentToMesh, dst)
		// Under m.mu as meshUnrouteLocked hands a route's recipients to
		// a local connection, so c is not missed between the two.
		sh := c.s.shard(dst)
		sh.mu.Lock()
		if e := sh.m[dst]; e != nil {
			e.recipients.add(c) // its departure tells c (see meshNoteRecipient)
		} else {
			gone = true
		}
		sh.mu.Unlock()
	}
	m.mu.Unlock()
	if gone {
		c.enqueuePeerGone(dst, PeerGoneDisconnected)
	}
}

// meshLookup returns the link through which packets for k go, or nil.
func (s *Server) meshLookup(k PublicKey) *meshLink {
	_, l := s.meshRoute(k)
	return l
}

// meshRoute returns k's mesh route and the link packets for k go through,
// or nils.
func (s *Server) meshRoute(k PublicKey) (*meshRoute, *meshLink) {
	s.mesh.mu.RLock()
	defer s.mesh.mu.RUnlock()
	if r := s.mesh.routes[k]; r != nil {
		return r, r.links[len(r.links)-1]
	}
	return nil, nil
}

// MeshPeerFor reports the URL of the mesh peer (as normalized from
// WithMeshPeers) through which packets for k are forwarded when k has no
// connection here: the peer that announced k most recently. For a route
// added with AddPacketForwarder it is "forwarder " and the forwarder's
// String, or its type and address.
func (s *Server) MeshPeerFor(k PublicKey) (peerURL string, ok bool) {
	if l := s.meshLookup(k); l != nil {
		return l.name(), true
	}
	return "", false
}

// name is the link's peer URL or, for AddPacketForwarder's, "forwarder "
// and the forwarder's String if it has one. It is called with no lock held:
// String is the embedder's code and may call the Server.
func (l *meshLink) name() string {
	if st, ok := l.fwd.(fmt.Stringer); ok {
		return "forwarder " + st.String()
	}
	return l.url
}

// PacketForwarder carries packets to clients connected to another server,
// for Server.AddPacketForwarder. A *Client logged in to that server with its
// mesh key is one. ForwardPacket must not keep pkt after it returns. It may
// call the Server's methods except Close, which waits for the forwarders'
// calls to return: a forwarder that wants the server closed calls Close from
// a goroutine of its own.
type PacketForwarder interface {
	ForwardPacket(src, dst PublicKey, pkt []byte) error
}

// AddPacketForwarder makes packets for dst go through f while dst has no
// session here: the route an embedder's own mesh found for dst (its own
// watch connections, its own service discovery), as WithMeshPeers does for
// the keys its peers announce. Among f, other forwarders and mesh peers, the
// route added last wins. Packets wait for f in a queue of its own (256
// packets, the oldest dropped when full, counted as "mesh_queue"), which one
// goroutine per forwarder serves, so a slow f delays no client's reader; a
// packet f returns an error for is counted as "write_error". Packets that
// arrived forwarded are not forwarded again (one hop). f identifies the
// forwarder (one queue and goroutine per f, shared by its keys), so it must
// be comparable: a pointer, typically. f is never called from two
// goroutines at once, even when it is removed during a call and added
// again. Adding after Close does nothing.
func (s *Server) AddPacketForwarder(dst PublicKey, f PacketForwarder) {
	if f == nil {
		return
	}
	m := &s.mesh
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return
	}
	l := m.custom[f]
	if l == nil {
		l = newMeshLink(s, fmt.Sprintf("forwarder %T %p", f, f)) // String: see name
		l.fwd, l.stop, l.done = f, make(chan struct{}), make(chan struct{})
		if m.custom == nil {
			m.custom = map[PacketForwarder]*meshLink{}
			m.fwdLoops = map[*meshLink]struct{}{}
			m.fwdTurns = map[PacketForwarder]*fwdTurn{}
		}
		m.custom[f] = l
		m.fwdLoops[l] = struct{}{}
		// A link of f stopped by RemovePacketForwarder may still be
		// inside ForwardPacket: the new one waits for its turn.
		l.turn = m.fwdTurns[f]
		if l.turn == nil {
			l.turn = &fwdTurn{ch: make(chan struct{}, 1)}
			m.fwdTurns[f] = l.turn
		}
		l.turn.loops++
		go l.forwardLoop()
	}
	s.meshAddLocked(dst, l)
}

// RemovePacketForwarder undoes AddPacketForwarder(dst, f). If f was dst's
// last route and dst has no session here, the clients that received packets
// from dst or sent packets to it are told it is gone. A forwarder with no key left stops, and the
// packets still queued for it are dropped (counted as "mesh_link_down").
func (s *Server) RemovePacketForwarder(dst PublicKey, f PacketForwarder) {
	m := &s.mesh
	m.mu.Lock()
	l := m.custom[f]
	if l == nil {
		m.mu.Unlock()
		return
	}
	gone := s.meshUnrouteLocked(dst, l)
	last := len(l.keys) == 0
	if last {
		delete(m.custom, f)
	}
	m.mu.Unlock()
	if last {
		l.stopForwarding()
	}
	for r := range gone {
		r.enqueuePeerGone(dst, PeerGoneDisconnected)
	}
}

// stopForwarding ends a custom link: its queue is dropped and forwardLoop
// returns.
func (l *meshLink) stopForwarding() {
	l.mu.Lock()
	l.stopped = true
	stale := l.ring.popAll(nil)
	l.mu.Unlock()
	close(l.stop)
	for _, it := range stale {
		l.s.stats.drop(dropMeshLinkDown, looksLikeDisco(it.p.buf[:it.p.n]), it.p.n)
		putPacket(it.p)
	}
}

// forwardLoop hands a custom link's queued packets to its forwarder until
// the link stops.
func (l *meshLink) forwardLoop() {
	defer func() {
		m := &l.s.mesh
		m.mu.Lock()
		delete(m.fwdLoops, l)
		if l.turn.loops--; l.turn.loops == 0 {
			delete(m.fwdTurns, l.fwd)
		}
		m.mu.Unlock()
		close(l.done)
	}()
	l.serveQueue(l.stop, func(batch []fwdItem) bool {
		drop := func(rest []fwdItem) bool {
			for _, it := range rest {
				l.s.stats.drop(dropMeshLinkDown, looksLikeDisco(it.p.buf[:it.p.n]), it.p.n)
				putPacket(it.p)
			}
			return false
		}
		select {
		case l.turn.ch <- struct{}{}:
		case <-l.stop:
			return drop(batch)
		}
		defer func() { <-l.turn.ch }()
		for i, it := range batch {
			select {
			case <-l.stop:
				// Stopped during the batch (the forwarder may have
				// closed the server): no more calls.
				return drop(batch[i:])
			default:
			}
			if err := l.fwd.ForwardPacket(it.p.src, it.dst, it.p.buf[:it.p.n]); err != nil {
				l.s.stats.drop(dropWriteError, looksLikeDisco(it.p.buf[:it.p.n]), it.p.n)
				if l.s.log.Enabled(context.Background(), slog.LevelDebug) { // name may cost a String call
					l.s.log.Debug("relay: forwarder failed", "forwarder", l.name(), "dst", it.dst.ShortString(), "err", err)
				}
			} else {
				l.s.stats.forwardedOut.Add(1)
			}
			putPacket(it.p)
		}
		return true
	})
}

// meshAdd records that l's peer announced k. Announcing again (a new login
// there) makes l the newest route to k.
func (s *Server) meshAdd(k PublicKey, l *meshLink) {
	s.mesh.mu.Lock()
	defer s.mesh.mu.Unlock()
	s.meshAddLocked(k, l)
}

func (s *Server) meshAddLocked(k PublicKey, l *meshLink) {
	if k == s.pub {
		return // our own watch connection at that peer
	}
	m := &s.mesh
	r := m.routes[k]
	if r == nil {
		r = &meshRoute{}
		m.routes[k] = r
		r.recipients.merge(s.takeWaitingLocked(k, waitRouted))
	}
	r.links = append(removeLink(r.links, l), l)
	l.keys[k] = struct{}{}
}

// meshRemove records that k left l's peer. If that was k's last route and
// k has no connection here, local clients that received packets from k are
// told it is gone (if notify), though a peer whose link is down may still
// have it, as when that link broke (meshForgetLink): its next packet to
// one of them through that peer makes it wait (meshNoteRecipient).
func (s *Server) meshRemove(k PublicKey, l *meshLink, notify bool) {
	s.mesh.mu.Lock()
	gone := s.meshUnrouteLocked(k, l)
	s.mesh.mu.Unlock()
	if notify {
		for r := range gone {
			r.enqueuePeerGone(k, PeerGoneDisconnected)
		}
	}
}

// meshAnnounced reports whether l's peer announces k.
func (s *Server) meshAnnounced(k PublicKey, l *meshLink) bool {
	s.mesh.mu.RLock()
	defer s.mesh.mu.RUnlock()
	_, ok := l.keys[k]
	return ok
}

// meshForgetLink removes every route through l: its connection broke (the
// meaning of Tailscale's PeerGone "mesh connection broke") or the server is
// closing (notify false).
//
// A peer may have announced tens of thousands of keys, and every packet
// for a key not connected here looks its route up under mesh.mu: the
// routes are removed meshLockBatch at a time, mesh.mu released in
// between, so that forwarding, and whatever else needs mesh.mu, waits for
// one batch, not for all of them. Nothing else uses l.keys meanwhile: l's watch,
// the only one that adds to it, has returned.
func (s *Server) meshForgetLink(l *meshLink, notify bool) {
	type notice struct {
		key        PublicKey
		recipients map[*sconn]struct{}
	}
	var notices []notice
	s.mesh.mu.Lock()
	keys := l.keys
	l.keys, l.keysPeak = map[PublicKey]struct{}{}, 0
	n, held := len(keys), 0
	for k := range keys {
		if held == meshLockBatch {
			s.mesh.mu.Unlock()
			testMeshBatchDone(held)
			held = 0
			s.mesh.mu.Lock()
		}
		held++
		if gone := s.meshUnrouteLocked(k, l); len(gone) > 0 {
			notices = append(notices, notice{k, gone})
		}
	}
	s.mesh.mu.Unlock()
	testMeshBatchDone(held)
	if n > 0 {
		s.log.Debug("relay: mesh link lost; forgot its keys", "peer", l.url, "keys", n)
	}
	if notify {
		for _, nt := range notices {
			for r := range nt.recipients {
				r.enqueuePeerGone(nt.key, PeerGoneDisconnected)
			}
		}
	}
}

// meshLockBatch is how many keys a loop over many keys (meshForgetLink,
// forgetRecipient) handles per hold of mesh.mu: tens of microseconds.
const meshLockBatch = 256

// testHookMeshBatch, if set, is called with mesh.mu released after each
// batch of keys meshForgetLink and forgetRecipient handled under one hold
// of it, with the batch's size. It is nil outside tests.
var testHookMeshBatch atomic.Pointer[func(keys int)]

func testMeshBatchDone(keys int) {
	if h := testHookMeshBatch.Load(); h != nil {
		(*h)(keys)
	}
}

// meshUnrouteLocked removes l from k's route. When that was the last one it
// returns the recipients to tell that k left the region, or hands them to
// k's local connections if it has some.
func (s *Server) meshUnrouteLocked(k PublicKey, l *meshLink) map[*sconn]struct{} {
	l.keys = deleteShrink(l.keys, k, &l.keysPeak)
	r := s.mesh.routes[k]
	if r == nil {
		return nil
	}
	r.links = removeLink(r.links, l)
	if len(r.links) > 0 {
		return nil
	}
	s.mesh.routes = deleteShrink(s.mesh.routes, k, &s.mesh.routesPeak)
	sh := s.shard(k)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if e := sh.m[k]; e != nil {
		// Still connected here: its local departure will tell them.
		e.recipients.merge(r.recipients.m)
		return nil
	}
	return r.recipients.m
}

// meshAdopt is called when k's last local connection ended. It reports
// whether k is still reachable through a mesh peer; if so, recipients (the
// local clients that received packets from k) are told when k leaves the
// region instead of now.
func (s *Server) meshAdopt(k PublicKey, recipients map[*sconn]struct{}) bool {
	s.mesh.mu.RLock()
	_, ok := s.mesh.routes[k]
	s.mesh.mu.RUnlock()
	if !ok {
		return false // the common case: no write lock on every departure
	}
	s.mesh.mu.Lock()
	defer s.mesh.mu.Unlock()
	r := s.mesh.routes[k]
	if r == nil {
		return false
	}
	r.recipients.merge(recipients)
	return true
}

// meshNoteRecipient records that c was written packets from the keys srcs,
// forwarded by mesh peers or (local) from local clients that have left
// since, so that c is told when they leave the region. A key with no route
// and no local connection is gone if it was local, and c is told so now;
// a forwarded one's PeerPresent may still be on its way over the watch
// connection (or our link to its server be down), so c waits for its route
// or its login here in mesh.waiting, until sweepWaits gives the key up;
// beyond maxMeshWaiting waits, c forgets k instead, and k's next packet
// tries again.
func (s *Server) meshNoteRecipient(c *sconn, srcs []meshSrc, local bool) {
	var unknown, forget []PublicKey
	m := &s.mesh
	now := monoNanos()
	m.mu.Lock()
	for _, src := range srcs {
		k := src.key
		if r := m.routes[k]; r != nil {
			r.recipients.add(c)
			continue
		}
		sh := s.shard(k)
		sh.mu.Lock()
		e := sh.m[k]
		if e != nil {
			e.recipients.add(c)
		}
		sh.mu.Unlock()
		switch {
		case e != nil:
		case local:
			unknown = append(unknown, k)
		default:
			if w := m.waiting[k]; w != nil {
				if _, ok := w.sessions[c]; ok {
					// Waiting already: k's packets still come,
					// through src.via now.
					w.since = now
					if src.via != nil {
						w.via = src.via.key
					}
					break
				}
			}
			if m.waits >= s.cfg.meshMaxWaiting {
				// Too many waits: c forgets k, and k's next
				// packet tries again.
				forget = append(forget, k)
				break
			}
			if m.waiting == nil {
				m.waiting = map[PublicKey]*meshWait{}
			}
			w := m.waiting[k]
			if w == nil {
				w = &meshWait{sessions: map[*sconn]struct{}{}}
				m.waiting[k] = w
			}
			w.sessions[c] = struct{}{}
			w.since, w.via = now, PublicKey{}
			if src.via != nil {
				w.via = src.via.key
			}
			m.waits++
			s.noteWaits(k, waitCreated, 1)
			if c.waitFor == nil {
				c.waitFor = map[PublicKey]struct{}{}
			}
			c.waitFor[k] = struct{}{}
			c.waits.Store(true)
			s.startSweepLocked()
		}
	}
	m.mu.Unlock()
	for _, k := range unknown {
		c.enqueuePeerGone(k, PeerGoneDisconnected) // forgets k too
	}
	// Counted by what c forgot: a key noted twice in one batch (see
	// takeLocked) is one pair.
	s.stats.waitsForgotten.Add(int64(c.forgetSources(forget)))
}

// forgetSources makes c forget that it was written packets from keys, as
// if it never had been: the next packet from one registers c again. It
// returns how many of keys c remembered.
func (c *sconn) forgetSources(keys []PublicKey) int {
	if len(keys) == 0 {
		return 0
	}
	n := 0
	c.mu.Lock()
	for _, k := range keys {
		if _, ok := c.sentFrom[k]; ok {
			delete(c.sentFrom, k)
			n++
		}
		if c.lastSrc == k {
			c.lastSrc = PublicKey{}
		}
	}
	c.sentFrom = shrinkMap(c.sentFrom, &c.sentFromPeak)
	c.mu.Unlock()
	return n
}

// maxMeshWaiting bounds the waits for a forwarded key's route
// (mesh.waiting), a few hundred bytes each: some 5 MB however many fresh
// keys send once and leave. Beyond it a session forgets such a key, and
// the key's next packet tries again.
const maxMeshWaiting = 1 << 14

// meshWaitGrace is how long sessions wait for the route or login of a key
// forwarded to them (mesh.waiting) with no news of it, before sweepWaits
// gives the key up: long enough for a link's whole list of its peer's
// clients, or a login's PeerPresent, to arrive, many times over (a link
// whose peer sends nothing for 10 s is dropped, and then its waits last
// while the peer's own link here does, and a grace after).
const meshWaitGrace = 30 * time.Second

// takeWaitingLocked removes and returns the sessions waiting for k's route
// or login (mesh.waiting), for the reason ev; mesh.mu must be held.
func (s *Server) takeWaitingLocked(k PublicKey, ev waitEvent) map[*sconn]struct{} {
	m := &s.mesh
	w := m.waiting[k]
	if w == nil {
		return nil
	}
	s.noteWaits(k, ev, len(w.sessions))
	m.deleteWaitingLocked(k)
	m.waits -= len(w.sessions)
	for c := range w.sessions {
		delete(c.waitFor, k)
		if len(c.waitFor) == 0 {
			c.waits.Store(false) // no more re-noting in takeLocked
		}
	}
	return w.sessions
}

// deleteWaitingLocked removes k from waiting, which is rebuilt smaller once
// most of its keys have gone, as the server-wide tables are (deleteShrink),
// and dropped when empty; mesh.mu must be held.
func (m *meshState) deleteWaitingLocked(k PublicKey) {
	m.waitingPeak = max(m.waitingPeak, len(m.waiting))
	delete(m.waiting, k)
	m.waiting = shrinkMap(m.waiting, &m.waitingPeak)
	if len(m.waiting) == 0 {
		m.waiting, m.waitingPeak = nil, 0 // after a burst
	}
}

// meshClaimWaiting hands the sessions waiting for k (mesh.waiting) to e,
// the entry of k, which has just logged in here: they are told when k
// leaves. If k has left again already, they go to its newer entry, or are
// told now that it left (unless a mesh route takes them over).
func (s *Server) meshClaimWaiting(k PublicKey, e *keyEntry) {
	m := &s.mesh
	m.mu.RLock()
	_, ok := m.waiting[k]
	m.mu.RUnlock()
	if !ok {
		// The common case, even while sessions wait for other keys:
		// no write lock on every login.
		return
	}
	var left map[*sconn]struct{}
	m.mu.Lock()
	if _, ok := m.waiting[k]; ok {
		sh := s.shard(k)
		sh.mu.Lock()
		switch cur := sh.m[k]; {
		case cur == e:
			e.recipients.merge(s.takeWaitingLocked(k, waitLoggedIn))
		case cur != nil:
			// k left and logged in again: they join its new entry
			// (whose own claim may come after this one).
			cur.recipients.merge(s.takeWaitingLocked(k, waitLoggedIn))
		default:
			// k left again already: they are told so below, as
			// its recipients were, unless a mesh route took it.
			left = s.takeWaitingLocked(k, waitLoggedIn)
		}
		sh.mu.Unlock()
	}
	m.mu.Unlock()
	if left != nil {
		s.tellLeft(k, left)
	}
}

// startSweepLocked has sweepWaits run in half the grace, unless it is due
// already; mesh.mu must be held.
func (s *Server) startSweepLocked() {
	m := &s.mesh
	if m.sweepOn || m.closed {
		return
	}
	m.sweepOn = true
	d := max(s.cfg.meshWaitGrace/2, time.Millisecond)
	if m.sweep == nil {
		m.sweep = time.AfterFunc(d, func() { s.sweepWaits(monoNanos()) })
	} else {
		m.sweep.Reset(d)
	}
}

// sweepWaits gives up, at now (monoNanos), the keys waited for in
// mesh.waiting of which there was no news (meshWait.since) for
// cfg.meshWaitGrace, if the
// mesh peer that forwarded the last of their packets cannot announce them
// any more:
//
//   - A peer this server has a link to (WithMeshPeers) had announced each
//     of its clients by then, or the key's login, if the link has been up
//     for the grace too: the key has left it (before its PeerPresent
//     arrived, or while the link was down, so that its list did not
//     have the key). The waiting sessions are told PeerGone, as when a
//     route leaves. A PeerPresent later than the grace (a list longer
//     than the path carries in a grace, a watch lagging that far) is
//     taken for a key that left: nothing on the link marks where its
//     list ends, and a Pong is none (takeLocked writes it after one
//     batch of updates, not the whole list). The key's route then
//     gets its recipients back from its next packet to each of them
//     (TestMeshWaitLatePresentHeals). While the link is down nothing
//     is known, and they wait on, unless it has been down for the
//     grace and the peer has had no connection here for the grace
//     either (its link here is gone too, not just being redialled):
//     the peer is cut off, and they are told PeerGone, as they would
//     have been when the link broke had the key been routed through
//     it.
//   - A peer that was replaced at its link's URL (the link's connections
//     now reach a server with another key: meshLink.replaced, the last
//     maxReplacedPeers of them) is taken for one whose link is down,
//     since its last connection to it ended, unless another link
//     reaches it now (the servers traded URLs).
//   - Of any other peer (a server not in WithMeshPeers, not reached yet,
//     or replaced longer ago) this server never hears: the waiting sessions forget the key,
//     as beyond maxMeshWaiting, and its next packet tries again.
//
// Keys that logged in here meanwhile get their waiting sessions, as
// meshClaimWaiting does. It runs every half grace while there are waits
// (startSweepLocked), and takes mesh.mu for meshLockBatch keys at a time.
func (s *Server) sweepWaits(now int64) {
	m := &s.mesh
	grace := int64(s.cfg.meshWaitGrace)
	type linkState struct {
		peer                     PublicKey
		upAt, downAt, peerLeftAt int64
	}
	links := make([]linkState, 0, 2*len(m.links))
	var old []linkState
	for _, l := range m.links {
		l.mu.Lock()
		if !l.peer.IsZero() {
			links = append(links, linkState{l.peer, l.upAt, l.downAt, l.peerLeftAt})
		}
		for _, r := range l.replaced {
			// A server replaced at the link's URL: down since the
			// link's last connection to it ended.
			old = append(old, linkState{r.key, 0, r.downAt, r.leftAt})
		}
		l.mu.Unlock()
	}
	// After every link's current peer, which it is when another link
	// reaches it now (the servers traded URLs): the first match counts.
	links = append(links, old...)
	type notice struct {
		key      PublicKey
		sessions map[*sconn]struct{}
		gone     bool // tell them PeerGone; else they forget the key
	}
	var notices []notice
	held := 0
	m.mu.Lock()
	m.sweepOn = false
	for k, w := range m.waiting {
		if held++; held > meshLockBatch {
			m.mu.Unlock()
			held = 1
			m.mu.Lock()
		}
		if m.waiting[k] != w {
			// Taken while mesh.mu was released, or waiting was
			// rebuilt smaller (deleteWaitingLocked) and this range
			// goes on over the old map: w may be stale.
			continue
		}
		if now-w.since < grace {
			continue
		}
		gone, known := false, false
		for _, ls := range links {
			if ls.peer == w.via {
				known = true
				if ls.upAt != 0 {
					gone = now-ls.upAt >= grace
				} else {
					gone = now-ls.downAt >= grace && now-ls.peerLeftAt >= grace &&
						s.lookup(w.via) == nil
				}
				break
			}
		}
		if known && !gone {
			s.noteWaits(k, waitHeld, len(w.sessions))
			continue // its list may be on its way, or its link is down
		}
		if r := m.routes[k]; r != nil { // never (meshAddLocked takes the waits)
			r.recipients.merge(s.takeWaitingLocked(k, waitRouted))
			continue
		}
		sh := s.shard(k)
		sh.mu.Lock()
		e := sh.m[k]
		if e != nil {
			// Logged in, and its meshClaimWaiting is still to come.
			e.recipients.merge(s.takeWaitingLocked(k, waitLoggedIn))
		}
		sh.mu.Unlock()
		if e == nil {
			ev := waitForgotten
			if gone {
				ev = waitGivenUp
			}
			notices = append(notices, notice{k, s.takeWaitingLocked(k, ev), gone})
		}
	}
	if len(m.waiting) > 0 {
		s.startSweepLocked()
	}
	m.mu.Unlock()
	for _, n := range notices {
		for c := range n.sessions {
			if n.gone {
				c.enqueuePeerGone(n.key, PeerGoneDisconnected)
			} else {
				c.forgetSources([]PublicKey{n.key})
			}
		}
	}
	if h := testHookSweepWaits.Load(); h != nil {
		(*h)()
	}
}

// meshPeerLeft notes that the last session here of k, the key of a mesh
// peer that forwards to us, ended: sweepWaits takes the peer for cut off
// only once it has had no session here for the grace, not while it
// redials its link.
func (s *Server) meshPeerLeft(k PublicKey) {
	now := monoNanos()
	for _, l := range s.mesh.links {
		l.mu.Lock()
		if k == l.peer {
			l.peerLeftAt = now
		}
		for i := range l.replaced {
			if l.replaced[i].key == k {
				l.replaced[i].leftAt = now
			}
		}
		l.mu.Unlock()
	}
}

// testHookSweepWaits, if set, is called after each sweepWaits. It is nil
// outside tests.
var testHookSweepWaits atomic.Pointer[func()]

// waitEvent is what happened to waits of mesh.waiting, for testHookWaits.
type waitEvent int

const (
	waitCreated   waitEvent = iota // a session began to wait (meshNoteRecipient)
	waitHeld                       // sweepWaits kept an overdue wait: its peer's list may still come
	waitRouted                     // the key got a route (meshAddLocked)
	waitLoggedIn                   // the key logged in here (meshClaimWaiting, sweepWaits)
	waitGivenUp                    // sweepWaits told the sessions PeerGone
	waitForgotten                  // sweepWaits had the sessions forget the key
	waitEnded                      // the waiting session ended (forgetRecipient)
)

// testHookWaits, if set, is called with mesh.mu held whenever ev happens
// to the waits of n sessions for k. It must not call s. It is nil outside
// tests.
var testHookWaits atomic.Pointer[func(s *Server, k PublicKey, ev waitEvent, n int)]

// noteWaits records that ev happened to the waits of n sessions for k: in
// Stats, and to testHookWaits.
func (s *Server) noteWaits(k PublicKey, ev waitEvent, n int) {
	switch ev { // Stats.MeshWaitsGivenUp and MeshWaitsForgotten
	case waitGivenUp:
		s.stats.waitsGivenUp.Add(int64(n))
	case waitForgotten:
		s.stats.waitsForgotten.Add(int64(n))
	}
	if h := testHookWaits.Load(); h != nil {
		(*h)(s, k, ev, n)
	}
}

// removeLink removes l from links, keeping the order.
func removeLink(links []*meshLink, l *meshLink) []*meshLink {
	for i, x := range links {
		if x == l {
			copy(links[i:], links[i+1:])
			links[len(links)-1] = nil
			return links[:len(links)-1]
		}
	}
	return links
}

// connReader buffers a session's reads like a bufio.Reader, but holds its
// buffer only while the client is sending faster than the server reads: once
// the bytes are consumed and the last read found the socket drained, the
// buffer goes back to a pool, and the next read waits with a small inline
// array. An idle session therefore holds no read buffer, and a busy one
// reads up to 64 KiB (many packets) per system call (16 KiB while many
// readers hold buffers at once; see getReadBuf). Slices returned by Peek
// are valid only until the next call that consumes bytes.
//
// With a timeout set, reads from the connection have a read deadline (see
// sconn.setupReads), and a read that times out asks onStall what to do.
type connReader struct {
	nc    net.Conn
	buf   []byte // from getReadBuf; nil while empty
	r, w  int
	small [128]byte // where a read waits while buf is nil
	hot   bool      // the last read filled the space it had: more is likely queued

	timeout  time.Duration // zero: no read deadline
	track    bool          // note when each read begins, refresh the deadline
	armedAt  time.Time     // when the deadline was last set
	stalls   int           // deadlines passed since the last byte read
	boundary bool          // the caller is reading a frame header
	resumed  bool          // set the deadline before the next read
	onStall  func(since time.Time, boundary bool) error

	// With raw set (plain sockets on Linux), fill reads through the
	// runtime's poller with a callback that takes a pooled buffer only
	// when the socket has bytes: every read is a large one, and a reader
	// waiting for data holds no buffer.
	raw    syscall.RawConn
	rawFn  func(fd uintptr) bool // rawRead, bound once
	rawN   int
	rawErr error
	// stashed is how many unread bytes (the start of a frame, at most
	// len(small)) a reader keeps in small instead of buf while it waits
	// for the connection; only inside fill.
	stashed int
}

// arm sets the read deadline to now+d.
func (cr *connReader) arm(now time.Time, d time.Duration) {
	cr.nc.SetReadDeadline(now.Add(d))
	cr.armedAt = now
}

// read reads from the connection.
func (cr *connReader) read(p []byte) (int, error) {
	if cr.timeout <= 0 {
		return cr.nc.Read(p)
	}
	since := cr.beginRead()
	for {
		n, err := cr.nc.Read(p)
		if n > 0 || err == nil {
			cr.stalls = 0
			return n, err
		}
		if err := cr.stalled(err, since); err != nil {
			return 0, err
		}
	}
}

// beginRead returns when a read begins, for tracked readers (the zero time
// for others), and refreshes their deadline at most four times a period.
func (cr *connReader) beginRead() (since time.Time) {
	if cr.track {
		since = time.Now()
		if since.Sub(cr.armedAt) > cr.timeout/4 {
			cr.arm(since, cr.timeout)
		}
	}
	return since
}

// stalled returns err unless it is a read timeout, for which it returns
// onStall's verdict: nil to read again.
func (cr *connReader) stalled(err error, since time.Time) error {
	if ne, ok := err.(net.Error); !ok || !ne.Timeout() || cr.timeout <= 0 {
		return err
	}
	cr.stalls++
	return cr.onStall(since, cr.boundary && cr.r == cr.w && cr.stashed == 0)
}

// Read buffers are big while few readers hold one, so that a busy session
// reads many frames per system call, and small beyond maxBigReadBufs, so
// that a flood from many connections at once cannot make every one of them
// hold 64 KiB: at most 16 MiB of big buffers, then 16 KiB per reader.
const (
	bigReadBufSize = 64 << 10
	readBufSize    = 16 << 10 // the least a reader's buffer holds
	maxBigReadBufs = 256
)

var (
	bigReadBufPool = sync.Pool{New: func() any { return new([bigReadBufSize]byte) }}
	readBufPool    = sync.Pool{New: func() any { return new([readBufSize]byte) }}
	bigReadBufs    atomic.Int32 // big buffers taken and not given back
)

// getReadBuf returns a big read buffer if fewer than maxBigReadBufs are in
// use, else a small one.
func getReadBuf() []byte {
	if bigReadBufs.Add(1) <= maxBigReadBufs {
		return bigReadBufPool.Get().(*[bigReadBufSize]byte)[:]
	}
	bigReadBufs.Add(-1)
	return readBufPool.Get().(*[readBufSize]byte)[:]
}

// putReadBuf gives back a buffer from getReadBuf.
func putReadBuf(b []byte) {
	if len(b) == bigReadBufSize {
		bigReadBufPool.Put((*[bigReadBufSize]byte)(b))
		bigReadBufs.Add(-1)
		return
	}
	readBufPool.Put((*[readBufSize]byte)(b))
}

// directReadSize is the payload size from which Read skips the buffer even
// when more is queued: copying it would cost more than the system call
// saved.
const directReadSize = 8 << 10

// newConnReader returns a reader of nc that first returns what br (the
// caller's buffered reader, which must not be used afterwards) has buffered.
func newConnReader(nc net.Conn, br *bufio.Reader) *connReader {
	cr := &connReader{nc: nc}
	if br != nil && br.Buffered() > 0 {
		b, _ := br.Peek(br.Buffered())
		// A caller's reader holding more than our buffer: keep reading
		// through it. Rare enough not to optimise.
		cr.buf = getReadBuf()
		cr.w = copy(cr.buf, b)
		br.Discard(cr.w)
		if br.Buffered() > 0 {
			cr.nc = readerConn{Conn: nc, r: io.MultiReader(br, nc)}
		}
	}
	return cr
}

// readFull reads exactly len(p) bytes into p: the buffered ones, then
// straight from the connection, with the buffer given back first. It is for
// the login, before setupReads, whose reads have no deadline of their own
// to give the buffer back by (see fill): a client that stops inside its
// ClientInfo must not hold a read buffer. Like io.ReadFull it returns
// io.EOF only if it read nothing.
func (cr *connReader) readFull(p []byte) (int, error) {
	n := copy(p, cr.buf[cr.r:cr.w])
	cr.r += n
	if n == len(p) {
		cr.release()
		return n, nil
	}
	cr.drop()
	k, err := io.ReadFull(cr.nc, p[n:])
	if err == io.EOF && n > 0 {
		err = io.ErrUnexpectedEOF
	}
	return n + k, err
}

// readerConn reads from r instead of the connection.
type readerConn struct {
	net.Conn
	r io.Reader
}

func (c readerConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// Buffered returns the number of unread bytes held.
func (cr *connReader) Buffered() int { return cr.w - cr.r }

// Size returns the most Peek can return.
func (cr *connReader) Size() int { return readBufSize }

// release gives the buffer back when everything in it was consumed and the
// socket looked drained; while more is likely queued the buffer is kept for
// the next read (raw readers give it back when they find the socket empty).
func (cr *connReader) release() {
	if cr.r == cr.w && cr.buf != nil {
		if cr.hot || cr.raw != nil {
			cr.r, cr.w = 0, 0
			return
		}
		cr.drop()
	}
}

// drop gives the buffer back, with whatever it still holds: between frames
// it is empty; at the end of a session the rest is unwanted.
func (cr *connReader) drop() {
	if cr.buf != nil {
		putReadBuf(cr.buf)
		cr.buf, cr.r, cr.w = nil, 0, 0
	}
	cr.hot = false
}

// fill reads at least one more byte. A read that waits a whole deadline
// with no more than the start of a frame buffered gives the buffer back
// and goes on waiting with those bytes in small: a client that stops inside
// a frame header holds no buffer (raw readers do this as soon as the socket
// is drained; here only a deadline says so, and waiting for it costs
// nothing per read).
func (cr *connReader) fill() error {
	if cr.raw != nil {
		return cr.fillRaw()
	}
	if cr.buf == nil && cr.hot {
		cr.buf = getReadBuf()
	}
	if cr.r == cr.w {
		cr.r, cr.w = 0, 0
	} else if cr.r > 0 && cr.w == len(cr.buf) {
		cr.w = copy(cr.buf, cr.buf[cr.r:cr.w])
		cr.r = 0
	}
	since := cr.beginRead()
	for {
		var n int
		var err error
		if cr.buf == nil {
			if n, err = cr.nc.Read(cr.small[cr.stashed:]); n > 0 {
				cr.hot = n == len(cr.small)-cr.stashed
				cr.buf = getReadBuf()
				cr.r, cr.w = 0, copy(cr.buf, cr.small[:cr.stashed+n])
				cr.stashed = 0
			}
		} else {
			n, err = cr.nc.Read(cr.buf[cr.w:])
			cr.hot = n == len(cr.buf)-cr.w
			cr.w += n
		}
		if n > 0 {
			cr.stalls = 0
			return nil
		}
		if err == nil {
			err = io.ErrNoProgress
		} else {
			err = cr.stalled(err, since)
		}
		if err != nil {
			cr.unstash()
			return err
		}
		if cr.buf != nil && cr.w-cr.r < len(cr.small) {
			cr.stashed = copy(cr.small[:], cr.buf[cr.r:cr.w])
			cr.drop()
		}
	}
}

// fillRaw is fill for raw readers: one read of whatever the socket has, up
// to the buffer's free space, with read deadlines handled as in read.
func (cr *connReader) fillRaw() error {
	since := cr.beginRead()
	for {
		cr.rawN, cr.rawErr = 0, nil
		err := cr.raw.Read(cr.rawFn)
		if cr.rawN > 0 {
			cr.w += cr.rawN
			cr.stalls = 0
			return nil
		}
		if err == nil {
			err = cr.rawErr
		}
		if err == nil {
			return io.EOF
		}
		if err := cr.stalled(err, since); err != nil {
			cr.unstash()
			return err
		}
	}
}

// unstash moves the stashed bytes back into a buffer.
func (cr *connReader) unstash() {
	if cr.stashed > 0 {
		cr.buf = getReadBuf()
		cr.r, cr.w = 0, copy(cr.buf, cr.small[:cr.stashed])
		cr.stashed = 0
	}
}

// rawRead is the raw reader's callback: it reads from fd into the buffer,
// taking one from the pool if needed, and reports false (wait for the
// socket) when the socket has nothing, with the buffer given back if it held
// no more than small does (stashed there meanwhile).
func (cr *connReader) rawRead(fd uintptr) bool {
	switch {
	case cr.buf == nil:
		cr.buf = getReadBuf()
		cr.r, cr.w = 0, copy(cr.buf, cr.small[:cr.stashed])
		cr.stashed = 0
	case cr.r == cr.w:
		cr.r, cr.w = 0, 0
	case cr.w == len(cr.buf):
		cr.w = copy(cr.buf, cr.buf[cr.r:cr.w])
		cr.r = 0
	}
	n, err := sysRead(fd, cr.buf[cr.w:])
	if err == errWouldBlock {
		if cr.w-cr.r <= len(cr.small) {
			// Waiting with at most the start of a frame: a client that
			// stops inside a frame header must not hold a buffer.
			cr.stashed = copy(cr.small[:], cr.buf[cr.r:cr.w])
			cr.drop()
		}
		return false
	}
	if n <= 0 && cr.r == cr.w {
		cr.drop() // the end of the stream, or an error
	}
	cr.rawN, cr.rawErr = max(n, 0), err
	return true
}

// Peek returns the next n bytes without consuming them.
func (cr *connReader) Peek(n int) ([]byte, error) {
	if n <= 0 {
		return nil, nil
	}
	if n > readBufSize {
		return nil, bufio.ErrBufferFull
	}
	for cr.w-cr.r < n {
		if cr.buf != nil && len(cr.buf)-cr.r < n {
			cr.w = copy(cr.buf, cr.buf[cr.r:cr.w])
			cr.r = 0
		}
		if err := cr.fill(); err != nil {
			if cr.buf == nil {
				return nil, err
			}
			return cr.buf[cr.r:cr.w], err
		}
	}
	return cr.buf[cr.r : cr.r+n], nil
}

// Discard skips the next n bytes.
func (cr *connReader) Discard(n int) (int, error) {
	done := 0
	for done < n {
		if cr.w == cr.r {
			cr.release()
			if err := cr.fill(); err != nil {
				return done, err
			}
		}
		k := min(n-done, cr.w-cr.r)
		cr.r += k
		done += k
	}
	cr.release()
	return done, nil
}

// Read reads into p: buffered bytes first, otherwise straight from the
// connection for large payloads (not copied twice), or through the buffer
// (many frames per system call).
func (cr *connReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if cr.w == cr.r {
		cr.release()
		if len(p) >= directReadSize || (cr.raw == nil && cr.buf == nil && len(p) >= len(cr.small)) {
			// The buffer is empty and this read bypasses it: it must not
			// be held while the read waits, for a client that stops
			// inside a large payload.
			cr.drop()
			n, err := cr.read(p)
			cr.hot = n == len(p)
			return n, err
		}
		if err := cr.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, cr.buf[cr.r:cr.w])
	cr.r += n
	cr.release()
	return n, nil
}

// ReadByte reads one byte.
func (cr *connReader) ReadByte() (byte, error) {
	if cr.w == cr.r {
		cr.release()
		if err := cr.fill(); err != nil {
			return 0, err
		}
	}
	b := cr.buf[cr.r]
	cr.r++
	cr.release()
	return b, nil
}

// SetDebugKeys makes the server log, at Info level, what happens to the
// sessions of the given keys and to the packets they send or should
// receive: each login and logout, and each dropped packet with its reason
// (drops on the way to a mesh peer or a PacketForwarder are only counted).
// It is for chasing one client's trouble on a busy server without logging
// every client. Drops are logged at most 10 a second (bursts of 20), and
// the next drop line written says how many were left out; logins and
// logouts always are. No keys turns it off.
// It costs nothing per relayed packet; only drops, logins and logouts look
// the keys up.
func (s *Server) SetDebugKeys(keys ...PublicKey) {
	if len(keys) == 0 {
		s.debug.keys.Store(nil)
		return
	}
	m := make(map[PublicKey]struct{}, len(keys))
	for _, k := range keys {
		m[k] = struct{}{}
	}
	s.debug.keys.Store(&m)
}

// logPeer logs at Info a line that a client, or anyone who can connect,
// can cause at will: a failed login, a refused connection, a session
// ended by an error. At most logLineBurst (20) such lines go out at once and
// logLineRate (10) a second after that, so that a flood of bad connections
// cannot flood the log; those over the limit go to Debug, and the next
// line let through at Info counts them ("suppressed"). Stats counts every
// one.
func (s *Server) logPeer(msg string, args ...any) {
	s.peerLog.mu.Lock()
	ok, held := s.peerLog.allow(time.Now())
	s.peerLog.mu.Unlock()
	if !ok {
		s.log.Debug(msg, args...)
		return
	}
	if held > 0 {
		args = append(args, "suppressed", held)
	}
	s.log.Info(msg, args...)
}

// logParkFailure logs at Warn that a session could not be parked (the
// process is out of file descriptors or epoll watches: the operator's to
// fix). Every session that goes idle then fails alike, once, and anyone
// who can connect can make sessions: the lines are bounded as logPeer's
// are (in a budget of their own, so that a flood of bad logins cannot
// hide them), the rest going to Debug.
func (s *Server) logParkFailure(args ...any) {
	const msg = "relay: cannot park idle session"
	s.parkLog.mu.Lock()
	ok, held := s.parkLog.allow(time.Now())
	s.parkLog.mu.Unlock()
	if !ok {
		s.log.Debug(msg, args...)
		return
	}
	if held > 0 {
		args = append(args, "suppressed", held)
	}
	s.log.Warn(msg, args...)
}

// logLimit lets a kind of log line through at most 10 times a second after
// a burst of 20, and counts the lines it holds back. Its owner's lock
// guards it.
type logLimit struct {
	bucket     tokenBucket
	suppressed int
}

// allow reports whether a line may go out now and, if so, how many were
// held back since the last one that did (the line says so).
func (l *logLimit) allow(now time.Time) (ok bool, held int) {
	if l.bucket.rate == 0 {
		l.bucket = tokenBucket{rate: logLineRate, burst: logLineBurst, tokens: logLineBurst, last: now}
	}
	if !l.bucket.allow(1, now) {
		l.suppressed++
		return false, 0
	}
	held, l.suppressed = l.suppressed, 0
	return true, held
}

const (
	logLineRate  = 10 // lines a second
	logLineBurst = 20
)

// debugLog is the rate-limited log of SetDebugKeys.
type debugLog struct {
	keys    atomic.Pointer[map[PublicKey]struct{}]
	mu      sync.Mutex
	limit   logLimit
	pending []debugLine // lines for the writer goroutine
	writing bool        // a writer goroutine is running
}

// debugLine is a log line waiting for debugLog's writer.
type debugLine struct {
	msg  string
	args []any
}

// has reports whether k is a debug key.
func (d *debugLog) has(k PublicKey) bool {
	m := d.keys.Load()
	if m == nil {
		return false
	}
	_, ok := (*m)[k]
	return ok
}

// log writes a drop line unless the rate limit says otherwise.
func (d *debugLog) log(l *slog.Logger, msg string, args ...any) {
	d.mu.Lock()
	ok, held := d.limit.allow(time.Now())
	if !ok {
		d.mu.Unlock()
		return
	}
	if held > 0 {
		args = append(args, "suppressed", held)
	}
	// A goroutine of its own writes the line: callers may hold a
	// session's lock, and a handler may be slow or call the server.
	if len(d.pending) >= maxDebugPending {
		d.limit.suppressed++ // the handler is stuck
	} else {
		d.pending = append(d.pending, debugLine{msg, args})
	}
	if !d.writing {
		d.writing = true
		go d.write(l)
	}
	d.mu.Unlock()
}

// maxDebugPending bounds the lines waiting for a slow log handler.
const maxDebugPending = 100

// write logs the pending lines until there are none.
func (d *debugLog) write(l *slog.Logger) {
	for {
		d.mu.Lock()
		lines := d.pending
		d.pending = nil
		if len(lines) == 0 {
			d.writing = false
			d.mu.Unlock()
			return
		}
		d.mu.Unlock()
		for _, x := range lines {
			l.Info(x.msg, x.args...)
		}
	}
}

// debugDrop logs a dropped packet if its sender or addressee is a debug
// key.
func (s *Server) debugDrop(r dropReason, src, dst PublicKey, disco bool, n int) {
	if !s.debug.has(src) && !s.debug.has(dst) {
		return
	}
	s.debug.log(s.log, "relay: debug key: packet dropped", "reason", dropReasonNames[r], "src", src.ShortString(),
		"dst", dst.ShortString(), "disco", disco, "bytes", n)
}
