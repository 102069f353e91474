//go:build !nodlopen

package dl

import "github.com/ebitengine/purego"

// Available reports whether this binary can load libraries at run time.
const Available = true

func open(name string) (uintptr, error) {
	return purego.Dlopen(name, purego.RTLD_NOW|purego.RTLD_LOCAL)
}

func lookup(h uintptr, name string) (uintptr, error) { return purego.Dlsym(h, name) }

func register(fptr any, sym uintptr) { purego.RegisterFunc(fptr, sym) }
