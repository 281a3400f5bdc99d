package relay

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

func TestBackoffBounds(t *testing.T) {
	lo, hi := 100*time.Millisecond, 5*time.Second
	for failures := 1; failures <= 12; failures++ {
		want := lo
		for i := 1; i < failures && want < hi; i++ {
			want *= 2
		}
		want = min(want, hi)
		for range 200 {
			d := backoffStep(lo, hi, failures, false)
			if d < want/2 || d > want {
				t.Fatalf("failures=%d: %v outside [%v, %v]", failures, d, want/2, want)
			}
		}
	}
	for range 100 {
		if d := backoffStep(lo, hi, 10, true); d > lo {
			t.Fatalf("during a restart window backoff %v > %v", d, lo)
		}
	}
}

// rcHarness runs a ReconnectingClient against a test server with a Recv loop
// that forwards every message.
type rcHarness struct {
	rc       *ReconnectingClient
	msgs     chan Message
	mu       sync.Mutex
	connects []Handshake
}

func newRCHarness(t *testing.T, ts *TestServer, configure ...func(*ReconnectingClient)) *rcHarness {
	h := &rcHarness{msgs: make(chan Message, 64)}
	h.rc = &ReconnectingClient{
		URL:        ts.URL,
		PrivateKey: mustKey(t),
		Dialer:     &FastStart{TLSConfig: ts.TLSConfig},
		MinBackoff: 10 * time.Millisecond,
		MaxBackoff: 50 * time.Millisecond,
		OnConnect: func(hs Handshake) {
			h.mu.Lock()
			h.connects = append(h.connects, hs)
			h.mu.Unlock()
		},
	}
	for _, f := range configure {
		f(h.rc)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			m, err := h.rc.Recv(ctx)
			if err != nil {
				return
			}
			if p, ok := m.(*ReceivedPacket); ok {
				cp := *p
				cp.Data = append([]byte(nil), p.Data...)
				m = &cp
			}
			h.msgs <- m
		}
	}()
	t.Cleanup(func() { cancel(); h.rc.Close(); <-done })
	return h
}

// next waits for a message of type T.
func rcNext[T Message](t *testing.T, h *rcHarness) T {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case m := <-h.msgs:
			if v, ok := m.(T); ok {
				return v
			}
		case <-timeout:
			var zero T
			t.Fatalf("no %T in 10s", zero)
			return zero
		}
	}
}

func TestReconnectingClientAfterCut(t *testing.T) {
	ts := StartTestServer(t)
	h := newRCHarness(t, ts)
	ctx := context.Background()
	self := h.rc.PrivateKey.Public()
	if err := h.rc.NotePreferred(true); err != nil {
		t.Fatal(err)
	}
	if err := h.rc.Send(ctx, self, []byte("one")); err != nil {
		t.Fatal(err)
	}
	rcNext[ServerInfo](t, h)
	if p := rcNext[*ReceivedPacket](t, h); string(p.Data) != "one" {
		t.Fatalf("got %q", p.Data)
	}
	waitFor(t, func() bool { return ts.Server.Stats().CurrentHomeConnections == 1 })
	if _, err := h.rc.Ping(ctx); err != nil {
		t.Fatal(err)
	}

	// Cut the connection from the server side.
	ts.Server.closePeer(self)
	rcNext[ServerInfo](t, h) // the Recv loop reconnected by itself
	if g := h.rc.Generation(); g != 2 {
		t.Fatalf("generation %d, want 2", g)
	}
	if err := h.rc.Send(ctx, self, []byte("two")); err != nil {
		t.Fatal(err)
	}
	if p := rcNext[*ReceivedPacket](t, h); string(p.Data) != "two" {
		t.Fatalf("got %q", p.Data)
	}
	// NotePreferred was sent again on the new connection.
	waitFor(t, func() bool { return ts.Server.Stats().CurrentHomeConnections == 1 })
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.connects) != 2 || h.connects[0].Path != FastPath || h.connects[1].Path != FastPath {
		t.Fatalf("connects %+v", h.connects)
	}
	if h.rc.ServerPublicKey() != ts.Server.PublicKey() {
		t.Fatal("learned the wrong server key")
	}
}

func TestReconnectingClientHonoursRestart(t *testing.T) {
	ts := StartTestServer(t, WithRestartNotice(300*time.Millisecond, time.Second))
	h := newRCHarness(t, ts)
	ctx := context.Background()
	if err := h.rc.Send(ctx, h.rc.PrivateKey.Public(), []byte("x")); err != nil {
		t.Fatal(err)
	}
	rcNext[ServerInfo](t, h)
	ts.Server.Close()
	r := rcNext[ServerRestarting](t, h)
	received := time.Now()
	if r.ReconnectIn >= 300*time.Millisecond || r.TryFor != time.Second {
		t.Fatalf("restart notice %+v", r)
	}
	h.rc.mu.Lock()
	next, until := h.rc.nextDial, h.rc.restartUntil
	h.rc.mu.Unlock()
	// The next dial waits for the announced delay, and the restart window
	// (fast retries) lasts for the announced total.
	if noticed := next.Add(-r.ReconnectIn); noticed.After(received) || noticed.Before(received.Add(-time.Second)) {
		t.Errorf("next dial at %v, notice received %v with delay %v", next, received, r.ReconnectIn)
	}
	if got := until.Sub(next); got != r.TryFor {
		t.Errorf("restart window %v, want %v", got, r.TryFor)
	}
}

func TestReconnectingClientBacksOffWhenRefused(t *testing.T) {
	ts := StartTestServer(t, WithAdmission(func(context.Context, Admission) error {
		return errors.New("no")
	}))
	h := newRCHarness(t, ts, func(rc *ReconnectingClient) {
		rc.MinBackoff, rc.MaxBackoff = 20*time.Millisecond, 40*time.Millisecond
	})
	time.Sleep(500 * time.Millisecond)
	// Without backoff a refused client would reconnect thousands of times
	// in half a second; with a 20..40 ms backoff it can try at most ~50.
	if n := ts.Server.Stats().Errors["login:login_rejected"]; n < 2 || n > 60 {
		t.Fatalf("%d refused logins in 500ms", n)
	}
	h.rc.mu.Lock()
	failures := h.rc.failures
	h.rc.mu.Unlock()
	if failures < 2 {
		t.Fatalf("failures %d", failures)
	}
}

func TestReconnectingClientClosed(t *testing.T) {
	ts := StartTestServer(t)
	rc := &ReconnectingClient{URL: ts.URL, PrivateKey: mustKey(t), Dialer: &FastStart{TLSConfig: ts.TLSConfig}}
	ctx := context.Background()
	if err := rc.Send(ctx, rc.PrivateKey.Public(), nil); err != nil {
		t.Fatal(err)
	}
	rc.Close()
	if err := rc.Send(ctx, rc.PrivateKey.Public(), nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Send after Close: %v", err)
	}
	if _, err := rc.Recv(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("Recv after Close: %v", err)
	}
}

func TestStartTestServer(t *testing.T) {
	ts := StartTestServer(t)
	c, hs, err := (&FastStart{TLSConfig: ts.TLSConfig}).Dial(context.Background(), ts.URL, mustKey(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if hs.Path != FastPath || hs.ServerKey != ts.Server.PublicKey() {
		t.Fatalf("handshake %+v", hs)
	}
	ts.Close() // idempotent with the cleanup
}
