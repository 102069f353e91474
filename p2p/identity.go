package p2p

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
)

// ErrBadKey is wrapped by LoadKey when a file exists but does not hold a
// private key.
var ErrBadKey = errors.New("p2p: not a private key")

// maxKeyFile bounds how much of a key file LoadKey reads; real keys
// (crypto.MarshalPrivateKey of Ed25519, or even RSA-8192) are far smaller.
const maxKeyFile = 64 << 10

// GenerateKey makes a new Ed25519 libp2p private key.
func GenerateKey() (crypto.PrivKey, error) {
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("p2p: generate key: %w", err)
	}
	return k, nil
}

// PeerID is the libp2p peer ID (12D3KooW... for Ed25519) of a key.
func PeerID(k crypto.PrivKey) (peer.ID, error) {
	if k == nil {
		return "", errors.New("p2p: peer id: nil key")
	}
	id, err := peer.IDFromPrivateKey(k)
	if err != nil {
		return "", fmt.Errorf("p2p: peer id: %w", err)
	}
	return id, nil
}

// WriteKey stores k (crypto.MarshalPrivateKey bytes) at path with mode
// 0600. It writes a temporary file in the same directory, syncs it, and
// hard-links it into place, so the key appears whole or not at all and an
// existing file is never overwritten, even by a concurrent writer: that
// case returns an error wrapping fs.ErrExist. On filesystems without hard
// links it falls back to a check and a rename. No temporary file is left
// behind.
func WriteKey(path string, k crypto.PrivKey) error {
	if k == nil {
		return fmt.Errorf("p2p: write key %s: nil key", path)
	}
	b, err := crypto.MarshalPrivateKey(k)
	if err != nil {
		return fmt.Errorf("p2p: write key %s: %w", path, err)
	}
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("p2p: write key %s: %w", path, fs.ErrExist)
	}
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("p2p: write key %s: %w", path, err)
	}
	name := tmp.Name()
	defer os.Remove(name) // after a link the key lives on under path
	if err := writeSynced(tmp, b); err != nil {
		return fmt.Errorf("p2p: write key %s: %w", path, err)
	}
	if err := os.Link(name, path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("p2p: write key %s: %w", path, fs.ErrExist)
		}
		// No hard links here: fall back to check-then-rename.
		if _, serr := os.Lstat(path); serr == nil {
			return fmt.Errorf("p2p: write key %s: %w", path, fs.ErrExist)
		}
		if err := os.Rename(name, path); err != nil {
			return fmt.Errorf("p2p: write key %s: %w", path, err)
		}
	}
	syncDir(dir)
	return nil
}

// writeSynced writes b to f with mode 0600, syncs and closes it.
func writeSynced(f *os.File, b []byte) error {
	err := f.Chmod(0o600)
	if err == nil {
		_, err = f.Write(b)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// syncDir makes a new directory entry durable where the OS supports it;
// failure only weakens durability, so it is ignored.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

// LoadKey reads a key written by WriteKey. A missing file's error wraps
// fs.ErrNotExist; a file that is not a key's wraps ErrBadKey; both name
// the path.
func LoadKey(path string) (crypto.PrivKey, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("p2p: load key: %w", err) // *PathError names the path
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxKeyFile+1))
	if err != nil {
		return nil, fmt.Errorf("p2p: load key %s: %w", path, err)
	}
	if len(b) > maxKeyFile {
		return nil, fmt.Errorf("p2p: load key %s: %w: file larger than %d bytes", path, ErrBadKey, maxKeyFile)
	}
	k, err := crypto.UnmarshalPrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("p2p: load key %s: %w: %w", path, ErrBadKey, err)
	}
	return k, nil
}

// LoadOrCreateKey loads the key at path or, if there is no file there,
// generates one and writes it (creating the parent directory with mode
// 0700 if needed); created says which. If another process creates the file
// first, its key is loaded.
func LoadOrCreateKey(path string) (k crypto.PrivKey, created bool, err error) {
	k, err = LoadKey(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return k, false, err
	}
	if k, err = GenerateKey(); err != nil {
		return nil, false, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, false, fmt.Errorf("p2p: create key %s: %w", path, err)
	}
	if err := WriteKey(path, k); err != nil {
		if errors.Is(err, fs.ErrExist) {
			k, err = LoadKey(path)
			return k, false, err
		}
		return nil, false, err
	}
	return k, true, nil
}
