// Package interop holds tests only: they run package relay
// (github.com/fastderp/relay) against Tailscale's own DERP implementation
// (tailscale.com/derp, derp/derphttp and derp/derpserver), over real TCP
// and TLS connections on the loopback interface, in both directions:
// Tailscale clients through a relay.Server, and relay.Clients through
// Tailscale's server, with and without the fast-start handshake.
//
// With the build tags ts_omit_netstack and ts_omit_gro, the tests also run
// two real Tailscale data planes (magicsock and wireguard-go, without
// gvisor's netstack, which those tags leave out) that exchange traffic
// only through one relay.Server or two meshed ones (node_test.go; not with
// tag ts102), and one whose login the server's admission hook refuses for
// a while (node_refused_test.go). With the build tag ts_debug_websockets
// as well, the nodes also reach the relay.Server over WebSocket, with
// Tailscale's own WebSocket client (native builds have it only with that
// tag). The tags change nothing the other tests use.
//
// It is a separate module so that the relay library itself never depends
// on tailscale.com. Run it with
//
//	cd interop && go test -race ./...
//	cd interop && go test -race -tags ts_omit_netstack,ts_omit_gro,ts_debug_websockets ./...
package interop
