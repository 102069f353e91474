package config

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/shard/backend"
)

const (
	launcher = "12D3KooWAkC88sNgQmYS6s3EBH4yw18uirscCMtJKXUhufsxoe7V"
	other    = "12D3KooWJBqi4npEcgyXvYH8EAg1hUyZjSuMh6ADGvPGHLCmE5tj"
)

// full is a valid config with every field written, one value per line.
const full = `data_dir: /var/lib/pipeswarm
listen:
  - /ip4/0.0.0.0/tcp/4001
  - /ip6/::/udp/4001/quic-v1
bootstrap:
  - /dns4/boot.example.org/tcp/4001/p2p/` + other + `
mdns: true
trust:
  - ` + launcher + `
open: false
memory_budget: 12GiB
max_stages: 2
gemm: go
announce: [/ip4/203.0.113.7/tcp/4001]
port_map: false
relays: [/ip4/203.0.113.8/udp/4001/quic-v1/p2p/12D3KooWJBqi4npEcgyXvYH8EAg1hUyZjSuMh6ADGvPGHLCmE5tj]
relay: true
relay_max_duration: 6h
relay_max_data: 8GiB
status: 127.0.0.1:0
keep_runs: 3
`

// fields returns c's exported fields only, for comparing configs from different sources.
func fields(c *Config) Config {
	v := *c
	v.src, v.listenDefault = source{}, false
	return v
}

func mustParse(t *testing.T, src string) *Config {
	t.Helper()
	c, err := Parse([]byte(src), "n.yaml")
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return c
}

func TestParseReadsEveryField(t *testing.T) {
	got := fields(mustParse(t, full))
	want := Config{
		DataDir:          "/var/lib/pipeswarm",
		Listen:           []string{"/ip4/0.0.0.0/tcp/4001", "/ip6/::/udp/4001/quic-v1"},
		Bootstrap:        []string{"/dns4/boot.example.org/tcp/4001/p2p/" + other},
		MDNS:             true,
		Trust:            []string{launcher},
		MemoryBudget:     "12GiB",
		MaxStages:        2,
		Export:           ExportAllow,
		Backends:         []string{},
		GEMM:             "go",
		Announce:         []string{"/ip4/203.0.113.7/tcp/4001"},
		Relays:           []string{"/ip4/203.0.113.8/udp/4001/quic-v1/p2p/" + other},
		Relay:            true,
		RelayMaxDuration: "6h",
		RelayMaxData:     "8GiB",
		Status:           "127.0.0.1:0",
		KeepRuns:         3,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Parse = %+v\nwant %+v", got, want)
	}
}

func TestDefaultsFillWhatTheFileLeavesOut(t *testing.T) {
	c := mustParse(t, "data_dir: d\nopen: true\n")
	if !reflect.DeepEqual(c.Listen, DefaultListen()) || c.MemoryBudget != "4GiB" || c.MaxStages != 1 {
		t.Errorf("defaults: listen %v, memory_budget %q, max_stages %d", c.Listen, c.MemoryBudget, c.MaxStages)
	}
	if got := c.MemoryBudgetBytes(); got != 4<<30 {
		t.Errorf("MemoryBudgetBytes = %d, want %d", got, 4<<30)
	}
	if len(c.Bootstrap) != 0 || c.MDNS || len(c.Trust) != 0 {
		t.Errorf("bootstrap %v, mdns %v, trust %v: want none, false, none", c.Bootstrap, c.MDNS, c.Trust)
	}
}

func TestExplicitEmptyListenIsKept(t *testing.T) {
	c := mustParse(t, "data_dir: d\nopen: true\nlisten: []\n")
	if c.Listen == nil || len(c.Listen) != 0 {
		t.Errorf("listen: [] became %#v, want an empty list", c.Listen)
	}
}

func TestConfigBuiltInGoGetsDefaults(t *testing.T) {
	c := &Config{DataDir: "d", Trust: []string{launcher}}
	c.EnsureDefaults()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if len(c.Listen) != 2 || c.MaxStages != 1 || c.MemoryBudget != DefaultMemoryBudget {
		t.Errorf("EnsureDefaults left %+v", c)
	}
}

func TestValidateNamesFileLineAndField(t *testing.T) {
	for _, tc := range []struct {
		name, src, want string
	}{
		{"listen not a multiaddr", "data_dir: d\nopen: true\nlisten:\n  - /ip4/0.0.0.0/tcp/0\n  - 0.0.0.0:4001\n",
			`n.yaml:5: listen[1]: failed to parse multiaddr "0.0.0.0:4001": `},
		{"bootstrap without peer", "data_dir: d\nopen: true\nbootstrap: [/ip4/1.2.3.4/tcp/4001]\n",
			`n.yaml:3: bootstrap[0]: "/ip4/1.2.3.4/tcp/4001" does not end in /p2p/<peer ID>`},
		{"bootstrap not a multiaddr", "data_dir: d\nopen: true\nbootstrap:\n  - boot.example.org:4001\n",
			`n.yaml:4: bootstrap[0]: failed to parse multiaddr "boot.example.org:4001": `},
		{"trust not a peer ID", "data_dir: d\ntrust:\n  - " + launcher + "\n  - alice\n",
			`n.yaml:4: trust[1]: "alice" is not a peer ID (12D3KooW...): `},
		{"nobody trusted", "data_dir: d\ntrust: []\n",
			"n.yaml:2: trust: no launcher is trusted and open is false, so this node would accept no run: pass --trust ID (or list it under trust:)"},
		{"nobody trusted, trust unwritten", "data_dir: d\n",
			"n.yaml: --trust (trust): no launcher is trusted and open is false"},
		{"trust placeholder", "data_dir: d\ntrust: [LAUNCHER_PEER_ID]\n",
			"n.yaml:2: trust[0]: LAUNCHER_PEER_ID is a placeholder: replace it with the peer ID of the launcher"},
		{"keep_runs negative", "data_dir: d\nopen: true\nkeep_runs: -1\n",
			"n.yaml:3: keep_runs: -1 is negative"},
		{"budget below minimum", "data_dir: d\nopen: true\nmemory_budget: 32MiB\n",
			`n.yaml:3: memory_budget: "32MiB" is below the minimum of 64MiB`},
		{"budget unparseable", "data_dir: d\nopen: true\nmemory_budget: 4 gigs\n",
			`n.yaml:3: memory_budget: size "4 gigs": unknown unit "gigs"`},
		{"budget empty", "data_dir: d\nopen: true\nmemory_budget: \"\"\n",
			`n.yaml:3: memory_budget: empty; want a size such as 4GiB`},
		{"max_stages zero", "data_dir: d\nopen: true\nmax_stages: 0\n",
			"n.yaml:3: max_stages: 0 is less than 1"},
		{"data_dir missing", "open: true\n",
			"n.yaml: --data-dir (data_dir): missing; the node needs a directory"},
		{"status without a port", "data_dir: d\nopen: true\nstatus: 127.0.0.1\n",
			`n.yaml:3: status: "127.0.0.1": want host:port`},
		{"status port out of range", "data_dir: d\nopen: true\nstatus: 127.0.0.1:70000\n",
			`n.yaml:3: status: "127.0.0.1:70000": port "70000" is not a number from 0 to 65535`},
		{"status host a name", "data_dir: d\nopen: true\nstatus: example.org:9090\n",
			`n.yaml:3: status: "example.org:9090": host "example.org" is not an IP address (or localhost)`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.src), "n.yaml")
			if !errors.Is(err, ErrInvalid) || !strings.HasPrefix(err.Error(), tc.want) {
				t.Errorf("error = %v\nwant one starting %q", err, tc.want)
			}
		})
	}
}

func TestValidateReportsEveryProblem(t *testing.T) {
	_, err := Parse([]byte("trust: [bob]\nmax_stages: -1\n"), "n.yaml")
	lines := strings.Split(err.Error(), "\n")
	if len(lines) != 3 {
		t.Fatalf("error has %d problems, want 3 (data_dir, trust, max_stages):\n%v", len(lines), err)
	}
	for i, prefix := range []string{"n.yaml: --data-dir (data_dir):", "n.yaml:1: trust[0]:", "n.yaml:2: max_stages:"} {
		if !strings.HasPrefix(lines[i], prefix) {
			t.Errorf("problem %d = %q, want it to start %q", i, lines[i], prefix)
		}
	}
}

func TestBackendsAreCheckedAndGiveTheOfferedPrecisions(t *testing.T) {
	c, err := Parse([]byte("data_dir: d\nopen: true\nbackends: [cpu32]\n"), "n.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Precisions(); !reflect.DeepEqual(got, []string{"fp32"}) {
		t.Fatalf("backends [cpu32] offer %v, want [fp32]", got)
	}
	c, err = Parse([]byte("data_dir: d\nopen: true\n"), "n.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := c.Precisions(), backend.Precisions(); !reflect.DeepEqual(got, want) {
		t.Fatalf("no backends listed: offer %v, want every one this build has, %v", got, want)
	}
	for src, want := range map[string]string{
		"backends: [fp64]":  `n.yaml:3: backends[0]: unknown backend "fp64"`,
		"backends: [cpu32]": "",
	} {
		_, err := Parse([]byte("data_dir: d\nopen: true\n"+src+"\n"), "n.yaml")
		switch {
		case want == "" && err != nil:
			t.Errorf("%s: %v", src, err)
		case want != "" && (err == nil || !strings.HasPrefix(err.Error(), want)):
			t.Errorf("%s: error %v, want one starting %q", src, err, want)
		}
	}
	if _, err := backend.Open("bf16"); err != nil {
		_, err := Parse([]byte("data_dir: d\nopen: true\nbackends: [bf16]\n"), "n.yaml")
		if err == nil || !strings.Contains(err.Error(), "libdnnl-dev") {
			t.Errorf("bf16 in a build without it: %v, want an error naming libdnnl-dev", err)
		}
	}
}

// A config with no file behind it came from flags: its errors name the flag the user
// typed beside the key.
func TestValidateWithoutFileNamesTheFlagAndTheField(t *testing.T) {
	c := &Config{DataDir: "d", Open: true, MemoryBudget: "1MiB", MaxStages: 1}
	err := c.Validate()
	if !errors.Is(err, ErrInvalid) || err.Error() != `--memory-budget (memory_budget): "1MiB" is below the minimum of 64MiB` {
		t.Errorf("error = %v", err)
	}
	c = &Config{DataDir: "d"}
	c.EnsureDefaults()
	err = c.Validate()
	if err == nil || !strings.HasPrefix(err.Error(), "--trust (trust): no launcher is trusted") || !strings.Contains(err.Error(), "--open") {
		t.Errorf("no --trust, no --open: error = %v, want one naming --trust and --open", err)
	}
	c = &Config{DataDir: "d", Trust: []string{"bob"}}
	c.EnsureDefaults()
	if err := c.Validate(); err == nil || !strings.HasPrefix(err.Error(), `--trust (trust[0]): "bob" is not a peer ID`) {
		t.Errorf("--trust bob: error = %v", err)
	}
}

func TestKeepRunsDefaultsToFiveAndZeroKeepsEveryRun(t *testing.T) {
	if c := mustParse(t, "data_dir: d\nopen: true\n"); c.KeepRuns != DefaultKeepRuns || DefaultKeepRuns != 5 {
		t.Errorf("keep_runs defaults to %d, want 5", c.KeepRuns)
	}
	if c := mustParse(t, "data_dir: d\nopen: true\nkeep_runs: 0\n"); c.KeepRuns != 0 {
		t.Errorf("keep_runs: 0 became %d, want 0 (keep every run)", c.KeepRuns)
	}
}

func TestNATFieldsAreCheckedWithTheirLines(t *testing.T) {
	_, err := Parse([]byte("data_dir: d\nopen: true\nannounce:\n  - /ip4/203.0.113.7/tcp/4001/p2p/12D3KooWAkC88sNgQmYS6s3EBH4yw18uirscCMtJKXUhufsxoe7V\nrelays:\n  - /ip4/203.0.113.8/tcp/4001\nrelay: true\nrelay_max_duration: 0s\n"), "n.yaml")
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("error = %v, want ErrInvalid", err)
	}
	for _, want := range []string{"n.yaml:4: announce[0]:", "n.yaml:6: relays[0]:", "n.yaml:8: relay_max_duration:"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

func TestRelayCandidatesAreTheBootstrapPeersUnlessRelaysAreListed(t *testing.T) {
	const boot = "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWAkC88sNgQmYS6s3EBH4yw18uirscCMtJKXUhufsxoe7V"
	const relay = "/ip4/203.0.113.8/tcp/4001/p2p/12D3KooWAkC88sNgQmYS6s3EBH4yw18uirscCMtJKXUhufsxoe7V"
	c := mustParse(t, "data_dir: d\nopen: true\nbootstrap: ["+boot+"]\n")
	if got := c.RelayCandidates(); len(got) != 1 || got[0] != boot {
		t.Errorf("without relays: %v, want the bootstrap peer", got)
	}
	c = mustParse(t, "data_dir: d\nopen: true\nbootstrap: ["+boot+"]\nrelays: ["+relay+"]\n")
	if got := c.RelayCandidates(); len(got) != 1 || got[0] != relay {
		t.Errorf("with relays: %v, want the relay", got)
	}
	if l := c.RelayLimits(); l.Duration != 24*time.Hour || l.Data != 64<<30 {
		t.Errorf("default relay limits %+v, want 24h and 64GiB", l)
	}
}

func TestOpenAcceptsAnyLauncherWithoutTrust(t *testing.T) {
	c := mustParse(t, "data_dir: d\nopen: true\n")
	if !c.Open || len(c.Trust) != 0 {
		t.Errorf("open %v, trust %v", c.Open, c.Trust)
	}
}

func TestUnknownFieldIsADecodeErrorWithItsLine(t *testing.T) {
	_, err := Parse([]byte("data_dir: d\nopen: true\nmemory: 4GiB\n"), "n.yaml")
	want := `n.yaml:3: unknown field "memory" (known: data_dir, listen, bootstrap, mdns, trust, open, memory_budget, max_stages, export, backends, gemm, corpus, status, keep_runs, announce, port_map, relays, relay, relay_max_duration, relay_max_data)`
	if !errors.Is(err, ErrDecode) || !errors.Is(err, spec.ErrDecode) || err.Error() != want {
		t.Errorf("error = %v\nwant %q", err, want)
	}
	if errors.Is(err, ErrInvalid) {
		t.Errorf("a decode error is reported as invalid too: %v", err)
	}
}

func TestWrongTypesAreDecodeErrors(t *testing.T) {
	for src, want := range map[string]string{
		"data_dir: d\nmdns: yes\n":        `n.yaml:2: mdns: "yes" is not true or false`,
		"data_dir: d\ntrust: " + launcher: `n.yaml:2: trust: expected a list, found the value "` + launcher + `"`,
		"data_dir: d\nmax_stages: 1.5\n":  "n.yaml:2: max_stages: 1.5 is not an integer",
		"data_dir: d\nlisten:\n  -\n":     "n.yaml:3: listen: item 0 is empty",
		"":                                "n.yaml: empty node config",
		"data_dir: [a]\n":                 "n.yaml:1: data_dir: expected a string, found a list",
		"data_dir: d\ndata_dir: e\n":      "n.yaml:2: data_dir: repeated; first given at line 1",
		"data_dir: d\n---\ndata_dir: e\n": "n.yaml:2: more than one YAML document; a node config is one",
	} {
		_, err := Parse([]byte(src), "n.yaml")
		if !errors.Is(err, ErrDecode) || err.Error() != want {
			t.Errorf("Parse(%q) error = %v\nwant %q", src, err, want)
		}
	}
}

func TestDecodeLeavesValidationToTheCaller(t *testing.T) {
	c, err := Decode([]byte("trust: [nope]\n"), "n.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c.DataDir = "/from/a/flag"
	c.EnsureDefaults()
	err = c.Validate()
	if err == nil || strings.Contains(err.Error(), "\n") ||
		!strings.HasPrefix(err.Error(), `n.yaml:1: trust[0]: "nope" is not a peer ID`) {
		t.Errorf("error = %v, want only the trust entry, at its line", err)
	}
}

func TestMarshalRoundTrips(t *testing.T) {
	for _, src := range []string{full, "data_dir: d\nopen: true\n", "data_dir: d\nopen: true\nlisten: []\n"} {
		c := mustParse(t, src)
		text, err := c.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		back, err := Parse(text, "marshalled")
		if err != nil {
			t.Fatalf("Parse(Marshal(c)): %v\n%s", err, text)
		}
		if !reflect.DeepEqual(fields(back), fields(c)) {
			t.Errorf("round trip changed the config:\n%s\nbecame\n%s", c, back)
		}
	}
}

func TestExampleNodeConfigParses(t *testing.T) {
	paths, err := filepath.Glob("../../examples/node*.yaml")
	if err != nil || len(paths) == 0 {
		t.Fatalf("no examples/node*.yaml (%v)", err)
	}
	for _, p := range paths {
		if filepath.Base(p) == "node.yaml" {
			// The example trusts a placeholder, explained until it is replaced.
			if _, err := Load(p); err == nil || !strings.Contains(err.Error(), "trust[0]: LAUNCHER_PEER_ID is a placeholder") {
				t.Errorf("Load(%s) = %v, want the placeholder explained", p, err)
			}
			src, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			c, err := Parse([]byte(strings.Replace(string(src), "- "+TrustPlaceholder, "- "+launcher, 1)), p)
			if err != nil {
				t.Errorf("%s with a launcher's ID: %v", p, err)
				continue
			}
			want := Config{DataDir: "./node-data", Listen: DefaultListen(), Bootstrap: []string{}, KeepRuns: 5,
				Trust: []string{launcher}, Open: false, MemoryBudget: "4GiB", MaxStages: 1, Export: ExportAllow, Backends: []string{}, GEMM: "auto",
				Announce: []string{}, PortMap: true, Relays: []string{}, RelayMaxDuration: "24h", RelayMaxData: "64GiB"}
			if !reflect.DeepEqual(fields(c), want) {
				t.Errorf("examples/node.yaml = %+v\nwant %+v", fields(c), want)
			}
			continue
		}
		if _, err := Load(p); err != nil {
			t.Errorf("Load(%s): %v", p, err)
		}
	}
}

func TestLoadOfMissingFileWrapsNotExist(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.yaml"))
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "nope.yaml") {
		t.Errorf("error = %v, want not-exist naming the file", err)
	}
}

func TestStatusAcceptsHostPortWithPortZeroAndIsOffByDefault(t *testing.T) {
	if c := mustParse(t, "data_dir: d\nopen: true\n"); c.Status != "" {
		t.Errorf("status defaults to %q, want empty (no status server)", c.Status)
	}
	for _, addr := range []string{"127.0.0.1:0", ":9090", "localhost:9090", "[::1]:0", "0.0.0.0:65535"} {
		if c := mustParse(t, "data_dir: d\nopen: true\nstatus: \""+addr+"\"\n"); c.Status != addr {
			t.Errorf("status %q parsed as %q", addr, c.Status)
		}
	}
}

func TestExportConsentDefaultsToAllowAndIsChecked(t *testing.T) {
	c, err := Parse([]byte("data_dir: d\nopen: true\n"), "n.yaml")
	if err != nil || c.Export != ExportAllow || !c.ExportAllowed() {
		t.Fatalf("unset export: %+v, %v; want allow", c, err)
	}
	if c, err = Parse([]byte("data_dir: d\nopen: true\nexport: deny\n"), "n.yaml"); err != nil || c.ExportAllowed() {
		t.Fatalf("export: deny: %+v, %v; want a node that does not consent", c, err)
	}
	_, err = Parse([]byte("data_dir: d\nopen: true\nexport: yes\n"), "n.yaml")
	if want := `n.yaml:3: export: "yes" is not allow or deny`; err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("export: yes: %v; want %q", err, want)
	}
}
