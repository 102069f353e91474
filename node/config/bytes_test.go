package config

import (
	"strings"
	"testing"
)

func TestParseBytesReadsCountsAndUnits(t *testing.T) {
	for s, want := range map[string]int64{
		"1000000":  1000000,
		"0":        0,
		"4GiB":     4 << 30,
		"512MiB":   512 << 20,
		"512 MiB":  512 << 20,
		" 2GB ":    2e9,
		"1.5GB":    1.5e9,
		"1.5GiB":   3 << 29,
		"64mib":    64 << 20,
		"10KB":     10000,
		"1KiB":     1024,
		"7B":       7,
		"1TiB":     1 << 40,
		"1.0001KB": 1000, // rounded down to a whole byte
	} {
		got, err := ParseBytes(s)
		if err != nil || got != want {
			t.Errorf("ParseBytes(%q) = %d, %v; want %d", s, got, err, want)
		}
	}
}

func TestParseBytesRejectsAnythingElse(t *testing.T) {
	for s, want := range map[string]string{
		"":                     `size "": want a number of bytes, or a number and a unit`,
		"GiB":                  `size "GiB": want a number of bytes`,
		"-1GiB":                `size "-1GiB": want a number of bytes`,
		"4 gigs":               `size "4 gigs": unknown unit "gigs" (want B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)`,
		"4G":                   `size "4G": unknown unit "G"`,
		"1e9":                  `size "1e9": unknown unit "e9"`,
		"1.5":                  `size "1.5": a number without a unit counts bytes and must be whole`,
		"1..5GB":               `size "1..5GB": want a number of bytes`,
		".5GB":                 `size ".5GB": want a number of bytes`,
		"99999999999999999999": `size "99999999999999999999" is too large`,
		"9000000TiB":           `size "9000000TiB" is too large`,
	} {
		_, err := ParseBytes(s)
		if err == nil || !strings.HasPrefix(err.Error(), want) {
			t.Errorf("ParseBytes(%q) error = %v, want one starting %q", s, err, want)
		}
	}
}
