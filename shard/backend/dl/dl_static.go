//go:build nodlopen

package dl

// Available reports whether this binary can load libraries at run time.
const Available = false

func open(string) (uintptr, error) { return 0, ErrNoLoader }

func lookup(uintptr, string) (uintptr, error) { return 0, ErrNoLoader }

func register(any, uintptr) {}
