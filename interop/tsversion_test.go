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

// What Tailscale's server does with a frame of an unknown type of 65569
// bytes and of 1 MiB + 1 (v1.104 refuses any longer than a maximal
// SendPacket), and with a ClientInfo whose AppName has 33 bytes (v1.104
// refuses names over 32), as the differential tests write it.
const (
	tsUnknownFrame65569 = "[] then closed"
	tsUnknownFrame1MiB1 = "[] then closed"
	tsAppName33         = "[] then closed"
)

// tsPeerPresentLen is the length of a PeerPresent frame from Tailscale's
// server for a client without an app name (v1.104 adds its length byte).
const tsPeerPresentLen = 52
