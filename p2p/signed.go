package p2p

import (
	"errors"
	"fmt"
	"slices"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
)

// signDomain separates run signatures from anything else a key signs.
const signDomain = "pipeswarm-run-v1\x00"

// ErrBadSignature is wrapped by every error Verify returns. It wraps
// ErrViolation: a peer that sends a plan that is unsigned or whose signature
// does not hold should be penalised.
var ErrBadSignature = NewViolation("p2p: bad signature")

// ErrUntrusted is wrapped by VerifyTrusted when a valid signature comes
// from a key that is not trusted. It is not a violation: an honest launcher
// this node does not trust signs validly.
var ErrUntrusted = errors.New("p2p: untrusted signer")

// Signed is a payload signed by a launcher. Runs are announced as Signed
// run assignments; nodes accept only those from launchers they trust.
type Signed struct {
	Payload []byte `json:"payload"` // e.g. a JSON run assignment
	PubKey  []byte `json:"pubkey"`  // crypto.MarshalPublicKey of the signer
	Sig     []byte `json:"sig"`
}

func signedMessage(payload []byte) []byte {
	return append([]byte(signDomain), payload...)
}

// Sign signs payload with k over the domain-separated message
// "pipeswarm-run-v1\x00" + payload. The result holds its own copy of payload.
func Sign(k crypto.PrivKey, payload []byte) (*Signed, error) {
	if k == nil {
		return nil, errors.New("p2p: sign: nil key")
	}
	sig, err := k.Sign(signedMessage(payload))
	if err != nil {
		return nil, fmt.Errorf("p2p: sign: %w", err)
	}
	pub, err := crypto.MarshalPublicKey(k.GetPublic())
	if err != nil {
		return nil, fmt.Errorf("p2p: sign: %w", err)
	}
	return &Signed{Payload: slices.Clone(payload), PubKey: pub, Sig: sig}, nil
}

// Verify checks the signature and returns the signer's peer ID. Any
// failure (a missing or unparsable key, a wrong signature) wraps
// ErrBadSignature. A valid signature says only who signed; see
// VerifyTrusted.
func (s *Signed) Verify() (peer.ID, error) {
	if s == nil {
		return "", fmt.Errorf("%w: missing", ErrBadSignature)
	}
	pub, err := crypto.UnmarshalPublicKey(s.PubKey)
	if err != nil {
		return "", fmt.Errorf("%w: public key: %w", ErrBadSignature, err)
	}
	ok, err := pub.Verify(signedMessage(s.Payload), s.Sig)
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrBadSignature, err)
	}
	if !ok {
		return "", fmt.Errorf("%w: signature does not match payload and key", ErrBadSignature)
	}
	id, err := peer.IDFromPublicKey(pub)
	if err != nil {
		return "", fmt.Errorf("%w: signer id: %w", ErrBadSignature, err)
	}
	return id, nil
}

// VerifyTrusted is Verify plus a check that the signer is one of trusted;
// an untrusted signer's error wraps ErrUntrusted.
func (s *Signed) VerifyTrusted(trusted []peer.ID) (peer.ID, error) {
	id, err := s.Verify()
	if err != nil {
		return "", err
	}
	if !slices.Contains(trusted, id) {
		return id, fmt.Errorf("%w: %s", ErrUntrusted, id)
	}
	return id, nil
}
