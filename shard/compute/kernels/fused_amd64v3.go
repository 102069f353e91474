//go:build amd64.v3 || amd64.v4 || !amd64

package kernels

// fusedScalar says whether the compiler may fuse the scalar loops' x·y + z into one
// rounding (it does on arm64 and from GOAMD64=v3).
const fusedScalar = true
