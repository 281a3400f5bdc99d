package interop

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	neturl "net/url"
	"strings"
	"sync"
	"testing"

	"github.com/coder/websocket"
	"tailscale.com/derp"
	"tailscale.com/derp/derpserver"
	"tailscale.com/net/wsconn"
	"tailscale.com/types/key"

	"github.com/fastderp/relay"
)

// dialTSWebSocket connects to serverURL the way Tailscale's js/wasm client
// does: a coder/websocket connection with the "derp" subprotocol, read and
// written as binary messages through tailscale.com/net/wsconn, carrying a
// derp.Client. It waits for the ServerInfo.
func dialTSWebSocket(t *testing.T, name, serverURL string, tlsConfig *tls.Config) *tsPeer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), recvTimeout)
	defer cancel()
	tr := &http.Transport{TLSClientConfig: tlsConfig}
	t.Cleanup(tr.CloseIdleConnections)
	wc, _, err := websocket.Dial(ctx, serverURL, &websocket.DialOptions{
		Subprotocols: []string{"derp"},
		HTTPClient:   &http.Client{Transport: tr},
	})
	if err != nil {
		t.Fatalf("%s: websocket.Dial(%s): %v", name, serverURL, err)
	}
	if wc.Subprotocol() != "derp" {
		t.Fatalf("%s: server chose subprotocol %q", name, wc.Subprotocol())
	}
	nc := wsconn.NetConn(context.Background(), wc, websocket.MessageBinary, "server")
	t.Cleanup(func() { nc.Close() })
	priv := key.NewNode()
	c, err := derp.NewClient(priv, nc, bufio.NewReadWriter(bufio.NewReader(nc), bufio.NewWriter(nc)), t.Logf)
	if err != nil {
		t.Fatalf("%s: derp.NewClient over WebSocket: %v", name, err)
	}
	return rawTSPeer(t, name, priv, c, nc)
}

// TestTailscaleWebSocketClientOurServer runs Tailscale's WebSocket client
// stack against our server, over TLS and plain HTTP, next to our own
// WebSocket client and Tailscale's DERP-over-HTTP client; packets up to
// MaxPacketSize go every way.
func TestTailscaleWebSocketClientOurServer(t *testing.T) {
	for _, useTLS := range []bool{true, false} {
		name := "plain"
		if useTLS {
			name = "TLS"
		}
		t.Run(name, func(t *testing.T) {
			checkNoLeaks(t)
			s := newOurServer(t)
			var url string
			var clientTLS *tls.Config
			if useTLS {
				cert, pool := selfSignedCert(t)
				cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
				relay.AppendMetaCert(cfg, s.MetaCert())
				url = serveTLS(t, derpMux(s), cfg)
				clientTLS = &tls.Config{RootCAs: pool}
			} else {
				url = servePlain(t, derpMux(s))
			}
			tsWS := dialTSWebSocket(t, "tailscale websocket", url, clientTLS)
			tsHTTP, _ := dialTSHTTP(t, "tailscale derphttp", url, clientTLS)
			ours, hs := dialFastStart(t, "our websocket", &relay.FastStart{TLSConfig: clientTLS, WebSocket: true}, url)
			if hs.Path != relay.UpgradePath || !strings.Contains(hs.Reason, "WebSocket") {
				t.Errorf("our WebSocket handshake %+v", hs)
			}
			if got := relayKey(tsWS.serverKey()); got != s.PublicKey() {
				t.Errorf("tailscale WebSocket client learned server key %v, want %v", got, s.PublicKey())
			}
			exchange(t, tsWS, ours)
			tsToTS(t, tsWS, tsHTTP, testPackets("ws to http")...)
			tsToTS(t, tsHTTP, tsWS, testPackets("http to ws")...)
			tsPingPong(t, tsWS, [8]byte{'w', 's', 0, 0, 0, 0, 0, 1})
			if st := s.Stats(); st.WebSocketAccepts != 2 {
				t.Errorf("server counted %d WebSocket accepts, want 2", st.WebSocketAccepts)
			}
		})
	}
}

// TestOurWebSocketClientTailscaleServer dials Tailscale's server, wrapped
// with derpserver.AddWebSocketSupport, with our WebSocket client, and
// relays with a Tailscale WebSocket client and a Tailscale derphttp client.
func TestOurWebSocketClientTailscaleServer(t *testing.T) {
	checkNoLeaks(t)
	cert, pool := selfSignedCert(t)
	s := newTSServer(t)
	url := serveTLS(t, derpMux(derpserver.AddWebSocketSupport(s, derpserver.Handler(s))), tsServerTLSConfig(cert, s, 0))
	clientTLS := &tls.Config{RootCAs: pool}

	ours, hs := dialFastStart(t, "our websocket", &relay.FastStart{TLSConfig: clientTLS, WebSocket: true}, url)
	if hs.Path != relay.UpgradePath || hs.TLSVersion != tls.VersionTLS13 || hs.ServerKey != relayKey(s.PublicKey()) {
		t.Errorf("handshake %+v, want the upgrade path over TLS 1.3 with key %v", hs, relayKey(s.PublicKey()))
	}
	tsWS := dialTSWebSocket(t, "tailscale websocket", url, clientTLS)
	tsHTTP, _ := dialTSHTTP(t, "tailscale derphttp", url, clientTLS)
	// Big packets go only between ours and the derphttp client: ours
	// cuts its stream into messages of 32 KiB, which the server's
	// coder/websocket accepts, and reads the server's whole-frame
	// messages of any size. Tailscale's own WebSocket pair cannot carry
	// frames over 32 KiB (each side refuses the other's bigger messages),
	// so it gets small packets; TestTailscaleWebSocketClientOurServer
	// shows that with our server it carries MaxPacketSize both ways.
	small := [][]byte{payload("ws small"), {}}
	tsToOurs(t, tsWS, ours, small...)
	oursToTS(t, ours, tsWS, small...)
	exchange(t, tsHTTP, ours)
	ourPingPong(t, ours, [8]byte{'w', 's', 0, 0, 0, 0, 0, 2})
}

// TestOurClientThroughProxyTailscaleServer dials Tailscale's server over TLS
// 1.3 with the meta cert through an HTTP CONNECT proxy: the tunnel goes to
// the URL's host and port and fast start works inside it, both over DERP's
// own upgrade and over WebSocket.
func TestOurClientThroughProxyTailscaleServer(t *testing.T) {
	checkNoLeaks(t)
	cert, pool := selfSignedCert(t)
	s := newTSServer(t)
	url := serveTLS(t, derpMux(derpserver.AddWebSocketSupport(s, derpserver.Handler(s))), tsServerTLSConfig(cert, s, 0))
	proxyURL, targets := startConnectProxy(t)
	fs := &relay.FastStart{TLSConfig: &tls.Config{RootCAs: pool}, Proxy: http.ProxyURL(proxyURL)}
	ours, hs := dialFastStart(t, "ours via proxy", fs, url)
	if hs.Path != relay.FastPath || hs.KeySource != "meta-cert" {
		t.Errorf("handshake through the proxy %+v, want the fast path with the meta cert", hs)
	}
	wfs := *fs
	wfs.WebSocket = true
	oursWS, _ := dialFastStart(t, "ours via proxy, websocket", &wfs, url)
	ts, _ := dialTSHTTP(t, "tailscale derphttp", url, &tls.Config{RootCAs: pool})
	exchange(t, ts, ours)
	oursToTS(t, oursWS, ts, payload("ws via proxy"))
	host := strings.TrimSuffix(strings.TrimPrefix(url, "https://"), "/derp")
	if got := targets(); len(got) != 2 || got[0] != host || got[1] != host {
		t.Errorf("proxy saw CONNECT %q, want %s twice", got, host)
	}
}

// startConnectProxy runs a minimal HTTP CONNECT proxy on 127.0.0.1 (through
// acceptLoop) and returns its URL and a function listing the targets it
// was asked for.
func startConnectProxy(t *testing.T) (*neturl.URL, func() []string) {
	t.Helper()
	var mu sync.Mutex
	var targets []string
	var ups []net.Conn
	tunnel := func(_ context.Context, c net.Conn, brw *bufio.ReadWriter, _ string) {
		defer c.Close()
		req, err := http.ReadRequest(brw.Reader)
		if err != nil || req.Method != http.MethodConnect {
			return
		}
		up, err := net.Dial("tcp", req.Host)
		if err != nil {
			return
		}
		mu.Lock()
		targets = append(targets, req.Host)
		ups = append(ups, up)
		mu.Unlock()
		io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n")
		done := make(chan struct{})
		go func() { io.Copy(up, brw.Reader); up.Close(); close(done) }()
		io.Copy(c, up)
		c.Close()
		<-done
	}
	closeTunnels := func() error {
		mu.Lock()
		defer mu.Unlock()
		for _, up := range ups {
			up.Close()
		}
		return nil
	}
	addr := acceptLoop(t, tunnel, closeTunnels)
	return &neturl.URL{Scheme: "http", Host: addr}, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), targets...)
	}
}
