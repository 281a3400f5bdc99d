// Package interop holds tests only: they run package relay
// (github.com/fastderp/relay) against Tailscale's own DERP implementation
// (tailscale.com/derp, derp/derphttp and derp/derpserver), over real TCP
// and TLS connections on the loopback interface, in both directions:
// Tailscale clients through a relay.Server, and relay.Clients through
// Tailscale's server, with and without the fast-start handshake.
//
// It is a separate module so that the relay library itself never depends
// on tailscale.com. Run it with
//
//	cd interop && go test -race ./...
package interop
