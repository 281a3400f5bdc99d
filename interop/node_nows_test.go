//go:build ts_omit_netstack && ts_omit_gro && !ts102 && !ts_debug_websockets

package interop

// tsDERPWebSocket: see node_ws_test.go. Without the build tag
// ts_debug_websockets, Tailscale's DERP client cannot dial WebSocket
// (derphttp/websocket_stub.go).
const tsDERPWebSocket = false
