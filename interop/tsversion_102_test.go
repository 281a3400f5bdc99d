//go:build ts102

package interop

import (
	"tailscale.com/derp"
	"tailscale.com/types/key"
)

// See tsversion_test.go. tailscale.com v1.102.5 has no app name in
// PeerPresent and takes ForwardPacket's payload as a slice.

const tsSendsAppName = false

func tsForwardPacket(c *derp.Client, src, dst key.NodePublic, pkt []byte) error {
	return c.ForwardPacket(src, dst, pkt)
}

func tsPeerAppName(derp.PeerPresentMessage) string { return "" }

const (
	tsUnknownFrame65569 = "[] and open"
	tsUnknownFrame1MiB1 = "[] and open"
	tsAppName33         = `[ServerInfo({"version":2})] and open`
)

const tsPeerPresentLen = 51
