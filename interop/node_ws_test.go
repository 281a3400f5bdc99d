//go:build ts_omit_netstack && ts_omit_gro && !ts102 && ts_debug_websockets

package interop

// tsDERPWebSocket reports whether Tailscale's DERP client (derphttp) was
// built with its WebSocket dialer, which native builds get only with the
// build tag ts_debug_websockets (derphttp/websocket.go); it then dials
// WebSocket when TS_DEBUG_DERP_WS_CLIENT is true.
const tsDERPWebSocket = true
