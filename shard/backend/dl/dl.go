// Package dl opens shared libraries at run time, without cgo, through purego: the
// accelerators pipeswarm computes with when they are installed (oneDNN, OpenBLAS; a
// GPU's driver and BLAS would come the same way). A library that is absent is an
// error value, never a failure to start. Building with the nodlopen tag leaves the
// loader out, for a fully static binary that computes with its own kernels only.
package dl

import (
	"errors"
	"fmt"
)

// ErrNoLoader is returned by Open in a binary built with the nodlopen tag.
var ErrNoLoader = errors.New("this binary has no run-time library loader (built with the nodlopen tag)")

// Lib is an opened shared library.
type Lib struct {
	Name string // the file name that opened, e.g. libdnnl.so.2
	h    uintptr
}

// Func binds the function pointer fptr (a pointer to a func variable whose
// signature matches the C function's) to the library's symbol name.
func (l *Lib) Func(fptr any, name string) (err error) {
	sym, err := lookup(l.h, name)
	if err != nil {
		return fmt.Errorf("%s: no symbol %s: %w", l.Name, name, err)
	}
	defer func() {
		// purego panics on a signature it cannot call; that is a bug here, but a
		// library that does not load should never stop the binary.
		if r := recover(); r != nil {
			err = fmt.Errorf("%s: binding %s: %v", l.Name, name, r)
		}
	}()
	register(fptr, sym)
	return nil
}

// Funcs binds each name → fptr of fns, stopping at the first that fails.
func (l *Lib) Funcs(fns map[string]any) error {
	for name, fptr := range fns {
		if err := l.Func(fptr, name); err != nil {
			return err
		}
	}
	return nil
}

// Open opens the first of names (file names the dynamic loader searches for, most
// preferred first) that loads.
func Open(names ...string) (*Lib, error) {
	if !Available {
		return nil, ErrNoLoader
	}
	var first error
	for _, n := range names {
		h, err := open(n)
		if err == nil {
			return &Lib{Name: n, h: h}, nil
		}
		if first == nil {
			first = err
		}
	}
	// The loader's message for the preferred name says enough ("libdnnl.so.2: cannot
	// open shared object file: No such file or directory").
	return nil, first
}
