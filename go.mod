module github.com/fastderp/relay

go 1.26.0

require (
	go4.org/mem v0.0.0-20240501181205-ae6ca9944745
	golang.org/x/crypto v0.59.0
)

require golang.org/x/sys v0.50.0 // indirect
