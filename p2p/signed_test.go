package p2p

import (
	"encoding/json"
	"errors"
	"testing"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
)

func mustKey(t testing.TB) crypto.PrivKey {
	t.Helper()
	k, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestSignedVerifiesAndNamesItsSigner(t *testing.T) {
	k := mustKey(t)
	payload := []byte(`{"run":"0123","stages":4}`)
	s, err := Sign(k, payload)
	if err != nil {
		t.Fatal(err)
	}
	payload[0] = 'X' // Sign keeps its own copy
	// Through JSON, as it travels.
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	var got Signed
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	id, err := got.Verify()
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if want, _ := PeerID(k); id != want {
		t.Fatalf("signer %s, want %s", id, want)
	}
	if _, err := got.VerifyTrusted([]peer.ID{id}); err != nil {
		t.Fatalf("VerifyTrusted with the signer trusted: %v", err)
	}
}

func TestVerifyRejectsForgeries(t *testing.T) {
	k, other := mustKey(t), mustKey(t)
	good, err := Sign(k, []byte("assign stage 2"))
	if err != nil {
		t.Fatal(err)
	}
	otherPub, _ := crypto.MarshalPublicKey(other.GetPublic())
	undomained, _ := k.Sign(good.Payload) // a signature over the bare payload, without the domain
	for name, s := range map[string]*Signed{
		"tampered payload": {Payload: []byte("assign stage 3"), PubKey: good.PubKey, Sig: good.Sig},
		"wrong key":        {Payload: good.Payload, PubKey: otherPub, Sig: good.Sig},
		"bad sig":          {Payload: good.Payload, PubKey: good.PubKey, Sig: append([]byte{1}, good.Sig[1:]...)},
		"no domain":        {Payload: good.Payload, PubKey: good.PubKey, Sig: undomained},
		"garbage key":      {Payload: good.Payload, PubKey: []byte("not a key"), Sig: good.Sig},
		"empty":            {},
		"nil":              nil,
	} {
		t.Run(name, func(t *testing.T) {
			if id, err := s.Verify(); !errors.Is(err, ErrBadSignature) || !errors.Is(err, ErrViolation) {
				t.Fatalf("got %q, %v; want ErrBadSignature", id, err)
			}
		})
	}
}

func TestVerifyTrustedRejectsAValidSignatureFromAStranger(t *testing.T) {
	s, err := Sign(mustKey(t), []byte("run"))
	if err != nil {
		t.Fatal(err)
	}
	trusted, _ := PeerID(mustKey(t))
	if _, err := s.VerifyTrusted([]peer.ID{trusted}); !errors.Is(err, ErrUntrusted) || errors.Is(err, ErrBadSignature) || errors.Is(err, ErrViolation) {
		t.Fatalf("got %v, want ErrUntrusted", err)
	}
}
