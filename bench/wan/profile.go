package wan

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pipeswarm/pipeswarm/examples"
	"github.com/pipeswarm/pipeswarm/node/spec"
)

// ErrProfile is wrapped by errors about a link profile.
var ErrProfile = errors.New("wan: bad link profile")

// Link is one node's access link: up and down each limited to Mbps, every packet the
// node sends delayed by Latency and dropped with probability Loss. Two nodes with
// the same link see a round trip of 2×Latency.
type Link struct {
	Mbps    float64
	Latency time.Duration
	Loss    float64
}

func (l Link) String() string {
	s := fmt.Sprintf("%g Mbit/s, %g ms one way", l.Mbps, ms(l.Latency))
	if l.Loss > 0 {
		s += fmt.Sprintf(", %g%% loss", 100*l.Loss)
	}
	return s
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// Profile is a named set of links: one for every node, and overrides for some.
type Profile struct {
	Name          string   `yaml:"name"`
	BandwidthMbps float64  `yaml:"bandwidth_mbps"`
	LatencyMs     float64  `yaml:"latency_ms"`
	Loss          float64  `yaml:"loss"`
	Links         []string `yaml:"links"` // "CELL=MBPS/LATENCY_MS[/LOSS]"

	overrides map[string]Link
	order     []string // cells in the order their overrides were given
}

// Profiles are the names of the built-in profiles (examples/wan).
func Profiles() []string {
	ents, _ := fs.ReadDir(examples.WAN, "wan")
	var names []string
	for _, e := range ents {
		names = append(names, strings.TrimSuffix(e.Name(), ".yaml"))
	}
	return names
}

// LoadProfile reads a built-in profile by name, or a profile file by path.
func LoadProfile(nameOrPath string) (*Profile, error) {
	src, err := fs.ReadFile(examples.WAN, "wan/"+nameOrPath+".yaml")
	file := nameOrPath + ".yaml"
	if err != nil {
		if src, err = os.ReadFile(nameOrPath); err != nil {
			if errors.Is(err, fs.ErrNotExist) && !strings.ContainsAny(nameOrPath, "/.") {
				return nil, fmt.Errorf("%w: no profile %q: want one of %s, or a file", ErrProfile, nameOrPath, strings.Join(Profiles(), ", "))
			}
			return nil, fmt.Errorf("%w: %w", ErrProfile, err)
		}
		file = filepath.Base(nameOrPath)
	}
	return ParseProfile(src, file)
}

// ParseProfile decodes a profile strictly: unknown fields and bad values are errors
// naming the file, line and field.
func ParseProfile(src []byte, file string) (*Profile, error) {
	p := &Profile{}
	lines, err := spec.DecodeStrict(src, file, "link profile", p)
	if err != nil {
		return nil, err
	}
	at := func(field string) string { return fmt.Sprintf("%s:%d: %s", file, lines[field], field) }
	var errs []error
	if p.Name == "" {
		p.Name = strings.TrimSuffix(file, filepath.Ext(file))
	}
	if !(p.BandwidthMbps > 0) {
		errs = append(errs, fmt.Errorf("%w: %s: %g: want a bandwidth > 0 (Mbit/s)", ErrProfile, at("bandwidth_mbps"), p.BandwidthMbps))
	}
	if !(p.LatencyMs >= 0) || p.LatencyMs > 10_000 {
		errs = append(errs, fmt.Errorf("%w: %s: %g: want a one-way latency in [0, 10000] ms", ErrProfile, at("latency_ms"), p.LatencyMs))
	}
	if !(p.Loss >= 0 && p.Loss < 1) {
		errs = append(errs, fmt.Errorf("%w: %s: %g: want a fraction in [0, 1)", ErrProfile, at("loss"), p.Loss))
	}
	for i, l := range p.Links {
		if err := p.Override(l); err != nil {
			errs = append(errs, fmt.Errorf("%s:%d: links[%d]: %w", file, lines[fmt.Sprintf("links[%d]", i)], i, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return p, nil
}

// Default is the link every node without an override gets.
func (p *Profile) Default() Link {
	return Link{Mbps: p.BandwidthMbps, Latency: time.Duration(p.LatencyMs * float64(time.Millisecond)), Loss: p.Loss}
}

// Link is cell's link ("s1r0", "launcher").
func (p *Profile) Link(cell string) Link {
	if l, ok := p.overrides[cell]; ok {
		return l
	}
	return p.Default()
}

// Overridden lists the cells with a link of their own, in the order given.
func (p *Profile) Overridden() []string { return slices.Clone(p.order) }

var cellRE = regexp.MustCompile(`^(s\d+r\d+|launcher)$`)

// Override gives one cell its own link: "CELL=MBPS/LATENCY_MS[/LOSS]", e.g.
// "s2r0=10/40" (stage 2 of replica 0 on 10 Mbit/s with 40 ms one way).
func (p *Profile) Override(s string) error {
	cell, figs, ok := strings.Cut(strings.TrimSpace(s), "=")
	parts := strings.Split(figs, "/")
	if !ok || !cellRE.MatchString(cell) || len(parts) < 2 || len(parts) > 3 {
		return fmt.Errorf("%w: link %q: want CELL=MBPS/LATENCY_MS[/LOSS] with CELL sSrR (stage S, replica R) or launcher", ErrProfile, s)
	}
	var v [3]float64
	for i, f := range parts {
		x, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil {
			return fmt.Errorf("%w: link %q: %q is not a number", ErrProfile, s, f)
		}
		v[i] = x
	}
	l := Link{Mbps: v[0], Latency: time.Duration(v[1] * float64(time.Millisecond)), Loss: v[2]}
	switch {
	case !(l.Mbps > 0):
		return fmt.Errorf("%w: link %q: bandwidth %g: want > 0 Mbit/s", ErrProfile, s, v[0])
	case !(v[1] >= 0) || v[1] > 10_000:
		return fmt.Errorf("%w: link %q: latency %g: want [0, 10000] ms", ErrProfile, s, v[1])
	case !(l.Loss >= 0 && l.Loss < 1):
		return fmt.Errorf("%w: link %q: loss %g: want a fraction in [0, 1)", ErrProfile, s, v[2])
	}
	if p.overrides == nil {
		p.overrides = map[string]Link{}
	}
	if _, dup := p.overrides[cell]; !dup {
		p.order = append(p.order, cell)
	}
	p.overrides[cell] = l
	return nil
}

// Adjust sets the default link's figures that are given (negative: keep).
func (p *Profile) Adjust(mbps, latencyMs, loss float64) error {
	if mbps >= 0 {
		if mbps == 0 {
			return fmt.Errorf("%w: --bandwidth 0: want > 0 Mbit/s", ErrProfile)
		}
		p.BandwidthMbps = mbps
	}
	if latencyMs >= 0 {
		p.LatencyMs = latencyMs
	}
	if loss >= 0 {
		if loss >= 1 {
			return fmt.Errorf("%w: --loss %g: want a fraction in [0, 1)", ErrProfile, loss)
		}
		p.Loss = loss
	}
	return nil
}

// Cell names grid cell (stage, replica) as profiles do.
func Cell(stage, replica int) string { return fmt.Sprintf("s%dr%d", stage, replica) }
