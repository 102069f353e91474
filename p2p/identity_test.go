package p2p

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestKeyFileRoundTripsWithMode0600(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "node.key")
	k := mustKey(t)
	if err := WriteKey(path, k); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", st.Mode().Perm())
	}
	got, err := LoadKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Equals(k) {
		t.Fatal("loaded key differs from the written one")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("directory holds %d entries, want only the key (no temp files)", len(entries))
	}
}

func TestWriteKeyRefusesToOverwrite(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "node.key")
	first := mustKey(t)
	if err := WriteKey(path, first); err != nil {
		t.Fatal(err)
	}
	err := WriteKey(path, mustKey(t))
	if !errors.Is(err, fs.ErrExist) || !strings.Contains(err.Error(), path) {
		t.Fatalf("got %v, want fs.ErrExist naming %s", err, path)
	}
	if got, _ := LoadKey(path); got == nil || !got.Equals(first) {
		t.Fatal("the original key was changed")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("a refused write left %d entries", len(entries))
	}
}

func TestLoadKeyNamesThePathOfAMissingOrBadFile(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.key")
	if _, err := LoadKey(missing); !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing: got %v", err)
	}
	bad := filepath.Join(dir, "bad.key")
	if err := os.WriteFile(bad, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadKey(bad); !errors.Is(err, ErrBadKey) || !strings.Contains(err.Error(), bad) {
		t.Errorf("bad: got %v", err)
	}
}

func TestLoadOrCreateKeyKeepsOnePeerIDAcrossCalls(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "node.key") // parent created on demand
	k1, created, err := LoadOrCreateKey(path)
	if err != nil || !created {
		t.Fatalf("first call: created=%v err=%v", created, err)
	}
	k2, created, err := LoadOrCreateKey(path)
	if err != nil || created {
		t.Fatalf("second call: created=%v err=%v", created, err)
	}
	id1, _ := PeerID(k1)
	id2, _ := PeerID(k2)
	if id1 != id2 {
		t.Fatalf("peer id changed: %s then %s", id1, id2)
	}
	if !strings.HasPrefix(id1.String(), "12D3KooW") {
		t.Fatalf("peer id %s is not an Ed25519 id", id1)
	}
}

func TestLoadOrCreateKeyDoesNotReplaceACorruptKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "node.key")
	if err := os.WriteFile(path, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreateKey(path); !errors.Is(err, ErrBadKey) {
		t.Fatalf("got %v, want ErrBadKey", err)
	}
}
