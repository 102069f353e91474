package p2p

import "errors"

// ErrViolation is wrapped by every error that says a peer broke the protocol:
// a malformed, oversized or unexpected frame or message, a codec other than
// the run's, a non-finite value (every tensor frame claims finite values), a
// bad signature. Only such errors count against a peer (Penalties).
//
// A stream that is reset, times out or ends early (io.ErrUnexpectedEOF), a
// closed connection and a cancelled context are not violations: honest peers
// on lossy links, and peers that crash, do all of that.
var ErrViolation = errors.New("protocol violation")

// NewViolation returns a sentinel error with message msg that wraps
// ErrViolation, for a package's own kind of violation (ErrBadFrame,
// reduce.ErrBadFrame, corpus.ErrBadRequest...), so that errors.Is finds both.
func NewViolation(msg string) error { return &violation{msg} }

type violation struct{ msg string }

func (v *violation) Error() string { return v.msg }
func (v *violation) Unwrap() error { return ErrViolation }
