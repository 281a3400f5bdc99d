package relay

// Logging under attack: what anyone who can connect can make the server
// log at the default level (Info and above).

import (
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// infoRecords returns h's records at Info and above.
func (h *recHandler) infoRecords() []slog.Record {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []slog.Record
	for _, r := range h.recs {
		if r.Level >= slog.LevelInfo {
			out = append(out, r)
		}
	}
	return out
}

// An Upgrade header is the client's to choose, up to net/http's 1 MiB of
// headers: the line that reports an unexpected one must not carry it whole.
func TestUnexpectedUpgradeLogBounded(t *testing.T) {
	h := &recHandler{}
	s := newTestServer(t, WithLogger(slog.New(h)))
	r := httptest.NewRequest("GET", "/derp", nil)
	r.Header.Set("Upgrade", strings.Repeat("x", 1<<20-100))
	w := httptest.NewRecorder()
	s.ServeHTTP(w, r)
	if w.Code != http.StatusUpgradeRequired {
		t.Fatalf("status %d", w.Code)
	}
	recs := h.infoRecords()
	if len(recs) != 1 {
		t.Fatalf("%d lines, want 1", len(recs))
	}
	size := len(recs[0].Message)
	recs[0].Attrs(func(a slog.Attr) bool {
		size += len(a.Key) + len(a.Value.String())
		return true
	})
	if size > 512 {
		t.Errorf("%q: a line of %d bytes for one request", recs[0].Message, size)
	}
}
