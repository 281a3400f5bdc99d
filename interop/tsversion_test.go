//go:build !ts102

package interop

import (
	"tailscale.com/derp"
	"tailscale.com/types/key"
)

// What differs between the Tailscale releases the interop tests run
// against: this file is for tailscale.com v1.104.5 (go.mod), and
// tsversion_102_test.go for v1.102.5 (go.v1.102.mod, tag ts102).

// tsSendsAppName says whether this release's server sends, and its client
// parses, the app name in PeerPresent.
const tsSendsAppName = true

// tsForwardPacket forwards pkt from src to dst through a Tailscale client.
func tsForwardPacket(c *derp.Client, src, dst key.NodePublic, pkt []byte) error {
	return c.ForwardPacket(src, dst, derp.LoanBytes(pkt))
}

// tsPeerAppName returns the app name of a Tailscale PeerPresent message.
func tsPeerAppName(m derp.PeerPresentMessage) string { return m.AppName }
