// Package config is the configuration file of the `pipeswarm node` daemon: where it keeps
// its state, where it listens, whom it dials first, whose runs it accepts and how much
// memory it may give them.
//
// It follows the run spec's life (node/spec): Parse (or Load) decodes the file strictly,
// EnsureDefaults fills what the file left out, Validate checks every field, and Marshal
// writes back the effective config. Errors name the file, line and field of what is wrong.
package config

import (
	"cmp"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/shard/backend"
)

// ErrInvalid is wrapped by every error Validate reports.
var ErrInvalid = errors.New("invalid node config")

// ErrDecode is wrapped by every error about the text itself: malformed YAML, an empty file,
// unknown or repeated fields, values of the wrong type. Such errors also wrap spec.ErrDecode,
// whose decoder reads this file too.
var ErrDecode = errors.New("cannot decode node config")

// MinMemoryBudget is the smallest memory budget a node may offer: the fixed overhead a stage
// needs before any parameter (node/assign counts 64 MiB of it).
const MinMemoryBudget = 64 << 20

// Config is the daemon's configuration.
type Config struct {
	// DataDir holds the identity key, checkpoints, logs and the lock. Required, from the
	// file or a flag; a relative path is relative to the daemon's working directory.
	DataDir string `yaml:"data_dir"`
	// Listen lists the multiaddrs to listen on. Default: any IPv4 address, a random port,
	// over TCP and QUIC. An explicit empty list listens nowhere (outbound connections only).
	Listen []string `yaml:"listen"`
	// Bootstrap lists full multiaddrs, ending in /p2p/<peer ID>, dialled at start.
	Bootstrap []string `yaml:"bootstrap"`
	// MDNS turns on discovery of peers on the local network.
	MDNS bool `yaml:"mdns"`
	// Trust lists the peer IDs (12D3KooW...) of launchers whose runs this node accepts.
	Trust []string `yaml:"trust"`
	// Open accepts runs from any launcher, trusted or not.
	Open bool `yaml:"open"`
	// MemoryBudget is the memory this node offers to the stages it holds, as ParseBytes
	// reads it: "4GiB", "512MiB", "2GB". Default "4GiB"; at least 64 MiB.
	MemoryBudget string `yaml:"memory_budget"`
	// MaxStages is how many stages this node may hold at once. Default 1.
	MaxStages int `yaml:"max_stages"`
	// Export says whether this node lets the launcher of a run it trained collect the
	// weights of its stage, to assemble the model, where the run's spec says export:
	// allowed: "allow" (the default) or "deny".
	Export string `yaml:"export"`
	// Backends lists the compute backends this node runs stages on, cpu32 (fp32) and
	// bf16; its offers advertise their precisions. Default: every backend this binary
	// and CPU can run (an empty list).
	Backends []string `yaml:"backends"`
	// GEMM is the provider of the stages' matrix products: auto (the default:
	// pipeswarm's Go kernels, or oneDNN where libdnnl loads on a CPU with AVX2 but not
	// AVX-512), go, onednn or openblas. Precision is the run's; the provider is this
	// node's own, so replicas of a stage may use different ones.
	GEMM string `yaml:"gemm"`
	// Corpus is a local copy of run text (a file, a directory of text files, or .jsonl),
	// used instead of fetching from the launcher whenever the parts a run needs hash the
	// same as the launcher's. Empty: always fetch (and cache in the data directory).
	Corpus string `yaml:"corpus"`
	// Status is host:port where the node serves its status page, /api/status and
	// Prometheus /metrics over HTTP; port 0 picks a free port, and the address bound
	// is written to <data_dir>/status_addr. Empty (the default): no status server, so
	// that many nodes can share a machine.
	Status string `yaml:"status"`
	// KeepRuns is how many run folders (DataDir/runs/<run ID>: checkpoints, state,
	// logs) the node keeps: at start and whenever a run ends it removes the oldest
	// beyond the newest KeepRuns, never one it holds now nor one a kept run resumed
	// from. Default 5; 0 keeps every run.
	KeepRuns int `yaml:"keep_runs"`

	// Announce lists addresses others should dial besides the ones the node listens on,
	// e.g. a cloud box's or a router's forwarded port: /ip4/203.0.113.7/tcp/4001 (no /p2p).
	Announce []string `yaml:"announce"`
	// PortMap asks the router to forward the listen ports (UPnP IGD, NAT-PMP). Default true.
	PortMap bool `yaml:"port_map"`
	// Relays lists full multiaddrs (ending in /p2p/<peer ID>) of relays to reserve a slot
	// on while the node is not reachable. Empty: the bootstrap peers are tried, and those
	// that serve as relays are used.
	Relays []string `yaml:"relays"`
	// Relay makes this node a circuit relay for nodes that are not reachable: for a
	// bootstrap node with a public address.
	Relay bool `yaml:"relay"`
	// RelayMaxDuration is how long one relayed connection may last, as Go's
	// time.ParseDuration reads it. Default "24h" (go-libp2p's 2 minutes fit no run).
	RelayMaxDuration string `yaml:"relay_max_duration"`
	// RelayMaxData is how many bytes one relayed connection may carry each way, as
	// ParseBytes reads it. Default "64GiB" (go-libp2p's is 128 KiB).
	RelayMaxData string `yaml:"relay_max_data"`

	// src remembers where each field was written, so that Validate can point at its line and
	// EnsureDefaults leaves alone what the file set on purpose ("listen: []").
	src source
	// listenDefault: Listen is DefaultListen because nothing set it; the node then
	// keeps the ports it was given on first start (see ListenIsDefault).
	listenDefault bool
}

// ListenIsDefault reports whether Listen was filled in by EnsureDefaults: neither the
// file nor a flag said where to listen, so the node picks ports on its first start and
// keeps them in its data directory (a stable address to give others, and to forward).
func (c *Config) ListenIsDefault() bool { return c.listenDefault }

// DefaultListen is where a node listens unless told otherwise: every IPv4 interface, a
// port the system picks, over TCP and QUIC.
func DefaultListen() []string {
	return []string{"/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"}
}

// DefaultKeepRuns is how many run folders a node keeps unless told otherwise.
const DefaultKeepRuns = 5

// TrustPlaceholder stands in the example config where a launcher's peer ID goes;
// Validate explains it rather than calling it a bad peer ID.
const TrustPlaceholder = "LAUNCHER_PEER_ID"

// Values of Export.
const (
	ExportAllow = "allow"
	ExportDeny  = "deny"
)

// DefaultMemoryBudget is the memory budget of a node whose config names none.
const DefaultMemoryBudget = "4GiB"

// Default limits of one relayed connection through a node with relay: true.
const (
	DefaultRelayMaxDuration = "24h"
	DefaultRelayMaxData     = "64GiB"
)

// source is where a config came from. The map is written only while decoding.
type source struct {
	file  string
	lines map[string]int // field path ("trust", "trust[2]") -> line
}

func (src source) written(path string) bool {
	_, ok := src.lines[path]
	return ok
}

// Load reads the config file at path and parses it with Parse.
func Load(path string) (*Config, error) {
	src, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load node config: %w", err)
	}
	return Parse(src, path)
}

// Parse decodes a config from YAML, fills defaults and validates it. name is used in error
// messages ("node.yaml:7: trust: ..."). Unknown fields are errors. All problems are returned
// together, joined; if the text does not decode, only the decoding problems are.
func Parse(src []byte, name string) (*Config, error) {
	c, err := Decode(src, name)
	if err != nil {
		return nil, err
	}
	c.EnsureDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// Decode only decodes a config from YAML, strictly, without defaults or validation, for a
// caller that overrides fields (from flags, say) before calling EnsureDefaults and Validate.
// Validate still names the lines of the fields that came from the file.
func Decode(src []byte, name string) (*Config, error) {
	c := &Config{}
	lines, err := spec.DecodeStrict(src, name, "node config", c)
	if err != nil {
		return nil, decodeError{err}
	}
	c.src = source{file: name, lines: lines}
	return c, nil
}

// decodeError adds ErrDecode to a decoding error without changing its text.
type decodeError struct{ err error }

func (e decodeError) Error() string   { return e.err.Error() }
func (e decodeError) Unwrap() []error { return []error{ErrDecode, e.err} }

// EnsureDefaults fills the fields that are unset and were not written in the file.
// A value written in the file is kept even if it is empty or zero ("listen: []",
// "max_stages: 0"), so that Validate can say what is wrong with it.
func (c *Config) EnsureDefaults() {
	if c.Listen == nil && !c.src.written("listen") {
		c.Listen, c.listenDefault = DefaultListen(), true
	}
	// No bootstrap peers and no trusted launchers are empty lists rather than nil, so that
	// a config reads back from Marshal exactly as it was.
	if c.Bootstrap == nil {
		c.Bootstrap = []string{}
	}
	if c.Trust == nil {
		c.Trust = []string{}
	}
	if c.Backends == nil {
		c.Backends = []string{}
	}
	if c.GEMM == "" {
		c.GEMM = "auto"
	}
	if c.MemoryBudget == "" && !c.src.written("memory_budget") {
		c.MemoryBudget = DefaultMemoryBudget
	}
	if c.MaxStages == 0 && !c.src.written("max_stages") {
		c.MaxStages = 1
	}
	if c.KeepRuns == 0 && !c.src.written("keep_runs") {
		c.KeepRuns = DefaultKeepRuns
	}
	if c.Export == "" && !c.src.written("export") {
		c.Export = ExportAllow
	}
	if c.Announce == nil {
		c.Announce = []string{}
	}
	if c.Relays == nil {
		c.Relays = []string{}
	}
	if !c.PortMap && !c.src.written("port_map") {
		c.PortMap = true
	}
	if c.RelayMaxDuration == "" && !c.src.written("relay_max_duration") {
		c.RelayMaxDuration = DefaultRelayMaxDuration
	}
	if c.RelayMaxData == "" && !c.src.written("relay_max_data") {
		c.RelayMaxData = DefaultRelayMaxData
	}
}

// Precisions are what the node's backends compute in (fp32, bf16), as its offers
// advertise them.
func (c *Config) Precisions() []string {
	if len(c.Backends) == 0 {
		return backend.Precisions()
	}
	var out []string
	for _, name := range c.Backends {
		if be, err := backend.OpenWith(name, cmp.Or(c.GEMM, "auto")); err == nil && !slices.Contains(out, be.Precision()) {
			out = append(out, be.Precision())
		}
	}
	return out
}

// Validate checks every field and returns all problems joined, each wrapping ErrInvalid.
// For a config that came from a file, each problem names its line.
func (c *Config) Validate() error {
	v := &checker{src: c.src}
	if c.DataDir == "" {
		v.failf("data_dir", "missing; the node needs a directory for its key, checkpoints and lock: pass --data-dir DIR or set data_dir:")
	}
	for i, s := range c.Listen {
		if _, err := ma.NewMultiaddr(s); err != nil {
			v.item("listen", i, "%v", err) // names s: failed to parse multiaddr "...": why
		}
	}
	for i, s := range c.Bootstrap {
		m, err := ma.NewMultiaddr(s)
		if err != nil {
			v.item("bootstrap", i, "%v", err)
			continue
		}
		if _, err := peer.AddrInfoFromP2pAddr(m); err != nil {
			v.item("bootstrap", i, "%q does not end in /p2p/<peer ID>; a bootstrap address must name the peer to dial", s)
		}
	}
	for i, s := range c.Trust {
		if s == TrustPlaceholder {
			v.item("trust", i, "%s is a placeholder: replace it with the peer ID of the launcher whose runs this node should train "+
				"('pipeswarm keygen --out launcher.key' printed it; 'pipeswarm keygen --show launcher.key' prints it again), or pass --trust ID", s)
			continue
		}
		if _, err := peer.Decode(s); err != nil {
			v.item("trust", i, "%q is not a peer ID (12D3KooW...): %v", s, err)
		}
	}
	if len(c.Trust) == 0 && !c.Open {
		v.failf("trust", "no launcher is trusted and open is false, so this node would accept no run: pass --trust ID (or list it under trust:) "+
			"with the peer ID of the launcher's key ('pipeswarm keygen --show launcher.key' prints it); or pass --open (open: true) to train any launcher's runs")
	}
	switch n, err := ParseBytes(c.MemoryBudget); {
	case c.MemoryBudget == "":
		v.failf("memory_budget", "empty; want a size such as 4GiB")
	case err != nil:
		v.failf("memory_budget", "%v", err)
	case n < MinMemoryBudget:
		v.failf("memory_budget", "%q is below the minimum of 64MiB", c.MemoryBudget)
	}
	if c.Status != "" {
		if err := checkHostPort(c.Status); err != nil {
			v.failf("status", "%v", err)
		}
	}
	if c.MaxStages < 1 {
		v.failf("max_stages", "%d is less than 1", c.MaxStages)
	}
	if c.KeepRuns < 0 {
		v.failf("keep_runs", "%d is negative; want how many run folders to keep (0 keeps every one)", c.KeepRuns)
	}
	if c.GEMM != "" {
		if _, err := backend.OpenGEMM(c.GEMM); err != nil {
			v.failf("gemm", "%v", err) // says what to install
		}
	}
	// A config built in code may leave it out: the zero value allows, as the default does.
	if c.Export != "" && c.Export != ExportAllow && c.Export != ExportDeny {
		v.failf("export", "%q is not %s or %s", c.Export, ExportAllow, ExportDeny)
	}
	for i, name := range c.Backends {
		if _, err := backend.OpenWith(name, cmp.Or(c.GEMM, "auto")); err != nil {
			v.item("backends", i, "%v", err) // says what to install
		}
	}
	for i, s := range c.Announce {
		if err := p2p.CheckAnnounce(s); err != nil {
			v.item("announce", i, "%v", err)
		}
	}
	for i, s := range c.Relays {
		m, err := ma.NewMultiaddr(s)
		if err != nil {
			v.item("relays", i, "%v", err)
			continue
		}
		if _, err := peer.AddrInfoFromP2pAddr(m); err != nil {
			v.item("relays", i, "%q does not end in /p2p/<peer ID>; a relay address must name the relay", s)
		}
	}
	// The limits matter only to a relay; a config built in code may leave them out.
	if d, err := time.ParseDuration(c.RelayMaxDuration); (c.Relay || c.RelayMaxDuration != "") && (err != nil || d <= 0) {
		v.failf("relay_max_duration", "%q: want a positive duration such as 24h", c.RelayMaxDuration)
	}
	if n, err := ParseBytes(c.RelayMaxData); (c.Relay || c.RelayMaxData != "") && (err != nil || n <= 0) {
		v.failf("relay_max_data", "%q: want a size such as 64GiB", c.RelayMaxData)
	}
	return errors.Join(v.errs...)
}

// ExportAllowed reports whether the node consents to its stages' weights being
// collected by their runs' launchers (export: allow, the default).
func (c *Config) ExportAllowed() bool { return c.Export != ExportDeny }

// RelayLimits are the limits of one relayed connection through this node, or the
// defaults where the config's do not parse (Validate reports that).
func (c *Config) RelayLimits() p2p.RelayLimits {
	l := p2p.DefaultRelayLimits()
	if d, err := time.ParseDuration(c.RelayMaxDuration); err == nil && d > 0 {
		l.Duration = d
	}
	if n, err := ParseBytes(c.RelayMaxData); err == nil && n > 0 {
		l.Data = n
	}
	return l
}

// RelayCandidates are the relays the node reserves a slot on when not reachable:
// Relays, or the bootstrap peers if Relays is empty.
func (c *Config) RelayCandidates() []string {
	if len(c.Relays) > 0 {
		return c.Relays
	}
	return c.Bootstrap
}

// MemoryBudgetBytes is the memory budget in bytes, or 0 if it does not parse (Validate
// reports that).
func (c *Config) MemoryBudgetBytes() int64 {
	n, err := ParseBytes(c.MemoryBudget)
	if err != nil {
		return 0
	}
	return n
}

// Marshal returns the config as YAML, every field included, so that a node can record the
// configuration it runs with. Parse(Marshal(c)) gives back c.
func (c *Config) Marshal() ([]byte, error) { return spec.EncodeYAML(c) }

// String returns the same text as Marshal.
func (c *Config) String() string {
	b, err := c.Marshal()
	if err != nil {
		return "<" + err.Error() + ">"
	}
	return string(b)
}

// checker collects validation problems, locating each through the config's source.
type checker struct {
	src  source
	errs []error
}

func (v *checker) failf(path, format string, args ...any) {
	v.at(path, v.src.lines[path], format, args...)
}

// item reports a problem with item i of the list field path, at the item's own line.
func (v *checker) item(path string, i int, format string, args ...any) {
	line, ok := v.src.lines[fmt.Sprintf("%s[%d]", path, i)]
	if !ok {
		line = v.src.lines[path]
	}
	v.at(fmt.Sprintf("%s[%d]", path, i), line, format, args...)
}

func (v *checker) at(field string, line int, format string, args ...any) {
	// A value not written in the file came from a flag (or a default): name the flag
	// the user typed as well as the key.
	if f := flagOf[strings.SplitN(field, "[", 2)[0]]; line == 0 && f != "" {
		field = f + " (" + field + ")"
	}
	v.errs = append(v.errs, spec.FieldProblem(v.src.file, line, field, fmt.Sprintf(format, args...), ErrInvalid))
}

// flagOf names the `pipeswarm node` flag that sets each config key.
var flagOf = map[string]string{
	"data_dir": "--data-dir", "listen": "--listen", "bootstrap": "--bootstrap", "trust": "--trust", "open": "--open",
	"mdns": "--mdns", "memory_budget": "--memory-budget", "backends": "--backend", "corpus": "--corpus",
	"status": "--status", "announce": "--announce", "relay": "--relay", "keep_runs": "--keep-runs", "export": "--export",
}

// checkHostPort checks a TCP listen address: host:port with an IP address (or
// localhost, or nothing for every interface) and a port from 0 (any free one) to 65535.
func checkHostPort(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q: want host:port, e.g. 127.0.0.1:9090 (port 0 picks a free one)", addr)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("%q: port %q is not a number from 0 to 65535", addr, port)
	}
	if host != "" && host != "localhost" && net.ParseIP(host) == nil {
		return fmt.Errorf("%q: host %q is not an IP address (or localhost)", addr, host)
	}
	return nil
}
