//go:build !cgo || purego || nodnnl

package backend

import "fmt"

// openBF16 reports why this binary has no bf16 backend: it needs oneDNN through cgo.
func openBF16() (Backend, error) {
	return nil, fmt.Errorf("%w: bf16 needs oneDNN, and this binary was built without it (CGO_ENABLED=0, or the purego or nodnnl tag); install libdnnl-dev (apt-get install libdnnl-dev) and rebuild with cgo", ErrUnavailable)
}
