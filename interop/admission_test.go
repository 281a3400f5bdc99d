package interop

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fastderp/relay"
	"tailscale.com/derp"
	"tailscale.com/types/key"
)

// admissionRequest is what an admission service saw of one question.
type admissionRequest struct {
	Method, Path, Query, Host string
	Body                      string
}

// admissionRecorder answers admission questions, LocalAPI whois or
// --verify-client-url POSTs, for one known key and records them.
type admissionRecorder struct {
	known string // "nodekey:<hex>"

	mu   sync.Mutex
	reqs []admissionRequest
}

func (a *admissionRecorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	a.mu.Lock()
	a.reqs = append(a.reqs, admissionRequest{r.Method, r.URL.Path, r.URL.RawQuery, r.Host, string(body)})
	a.mu.Unlock()
	if r.Method == http.MethodPost { // the admission URL
		var q struct{ NodePublic string }
		json.Unmarshal(body, &q)
		fmt.Fprintf(w, `{"Allow":%v}`, q.NodePublic == a.known)
		return
	}
	// tailscaled's LocalAPI: it refuses requests for other hosts. The
	// machine's own node is the known one.
	if r.Host == "local-tailscaled.sock" && r.URL.Path == "/localapi/v0/status" {
		fmt.Fprintf(w, `{"BackendState":"Running","Self":{"ID":"n1","PublicKey":%q}}`, a.known)
		return
	}
	if r.Host != "local-tailscaled.sock" || r.URL.Path != "/localapi/v0/whois" {
		http.Error(w, "invalid localapi request", http.StatusForbidden)
		return
	}
	if addr := r.FormValue("addr"); addr != a.known {
		http.Error(w, "no match for IP:port", http.StatusNotFound)
		return
	}
	fmt.Fprintf(w, `{"Node":{"ID":1,"Key":%q,"Name":"known.example.ts.net."},"UserProfile":{"ID":1}}`, a.known)
}

// take returns the requests recorded since the last call.
func (a *admissionRecorder) take() []admissionRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	r := a.reqs
	a.reqs = nil
	return r
}

// tsRefused checks that a Tailscale client with key priv is refused by the
// server at addr: its connection ends before any ServerInfo.
func tsRefused(t *testing.T, name, addr string, priv key.NodePrivate) {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, recvTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(recvTimeout))
	c, err := derp.NewClient(priv, nc, bufio.NewReadWriter(bufio.NewReader(nc), bufio.NewWriter(nc)), t.Logf)
	if err != nil {
		t.Fatalf("%s: derp.NewClient: %v", name, err)
	}
	m, err := c.Recv()
	if err == nil {
		t.Fatalf("%s: refused client received %s", name, describe(m))
	}
	if strings.Contains(err.Error(), "timeout") {
		t.Fatalf("%s: the server neither admitted nor refused the client: %v", name, err)
	}
}

// TestAdmissionInterop runs Tailscale's server and ours with the same
// admission service, tailscaled's LocalAPI (derper --verify-clients) and an
// admission URL (--verify-client-url): both servers admit the known node,
// refuse a stranger, and ask the service exactly the same questions.
func TestAdmissionInterop(t *testing.T) {
	checkNoLeaks(t)
	known, stranger := key.NewNode(), key.NewNode()
	rec := &admissionRecorder{known: known.Public().String()}

	sock := filepath.Join(t.TempDir(), "tailscaled.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Skipf("unix socket: %v", err)
	}
	local := &http.Server{Handler: rec}
	go local.Serve(ln)
	defer local.Close()
	svc := httptest.NewServer(rec)
	defer svc.Close()

	for _, mode := range []string{"tailscaled", "url"} {
		t.Run(mode, func(t *testing.T) {
			ts := newTSServer(t)
			var admit func(ctx context.Context, a relay.Admission) error
			if mode == "tailscaled" {
				ts.SetVerifyClient(true)
				ts.SetTailscaledSocketPath(sock)
				admit = relay.AdmissionTailscaled(sock)
			} else {
				ts.SetVerifyClientURL(svc.URL)
				admit = relay.AdmissionURL(svc.URL, false, nil)
			}
			ours := newOurServer(t, relay.WithAdmission(admit))
			addrs := map[string]string{
				"tailscale": tsAcceptLoop(t, ts),
				"ours":      acceptLoop(t, ours.Accept, ours.Close),
			}
			asked := map[string][]admissionRequest{}
			for _, name := range []string{"tailscale", "ours"} {
				rec.take()
				p := dialTSKey(t, name+" known", addrs[name], known)
				p.close()
				tsRefused(t, name+" stranger", addrs[name], stranger)
				asked[name] = rec.take()
			}
			for name, q := range asked {
				if len(q) != 2 {
					t.Fatalf("%s server asked %d questions for 2 logins: %+v", name, len(q), q)
				}
			}
			for i := range asked["ours"] {
				tq, oq := asked["tailscale"][i], asked["ours"][i]
				if mode == "url" {
					// The same JSON object; the order of its fields may differ.
					var tv, ov map[string]any
					json.Unmarshal([]byte(tq.Body), &tv)
					json.Unmarshal([]byte(oq.Body), &ov)
					tq.Body, oq.Body = fmt.Sprint(tv), fmt.Sprint(ov)
					tq.Host, oq.Host = "", "" // the same URL; ports are equal anyway
				}
				if tq != oq {
					t.Errorf("question %d differs:\n tailscale: %+v\n ours:      %+v", i, tq, oq)
				}
			}
			if mode != "tailscaled" {
				return
			}
			// The health check: Tailscale's ConsistencyCheck and our
			// AdmissionService.Check ask tailscaled the same questions.
			rec.take()
			if err := ts.ConsistencyCheck(); err != nil && strings.Contains(err.Error(), "verifyClient") {
				t.Errorf("Tailscale's check: %v", err)
			}
			tsAsked := rec.take()
			if err := (&relay.AdmissionService{Tailscaled: sock}).Check(context.Background()); err != nil {
				t.Errorf("our Check: %v", err)
			}
			ourAsked := rec.take()
			if len(tsAsked) != 2 || fmt.Sprint(tsAsked) != fmt.Sprint(ourAsked) {
				t.Errorf("health check questions differ:\n tailscale: %+v\n ours:      %+v", tsAsked, ourAsked)
			}
		})
	}
}
