//go:build !linux

package relay

// parkSupported reports whether idle sessions can give up their reader
// goroutine on this platform.
const parkSupported = false

// parker parks nothing here: every session keeps its reader goroutine.
type parker struct{}

func (p *parker) add(c *sconn) (uint64, error)    { return 0, errNotParkable }
func (p *parker) remove(c *sconn, id uint64) bool { return false }
