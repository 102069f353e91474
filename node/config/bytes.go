package config

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// units are the suffixes ParseBytes accepts, matched without regard to case: decimal
// (1 GB = 10⁹ bytes) and binary (1 GiB = 2³⁰ bytes), as in the SI and IEC standards.
var units = []struct {
	name string
	size float64
}{
	{"B", 1},
	{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
}

// ParseBytes reads a size in bytes: a plain count ("1000000") or a number, whole or with a
// fractional part, followed by a unit, optionally after a space ("4GiB", "512 MiB",
// "1.5GB"). Units are B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of
// 1024), in any case. A fractional result is rounded down to a whole byte.
func ParseBytes(s string) (int64, error) {
	text := strings.TrimSpace(s)
	end := strings.IndexFunc(text, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if end < 0 {
		end = len(text)
	}
	num, unit := text[:end], strings.TrimSpace(text[end:])
	if !isDecimal(num) {
		return 0, fmt.Errorf("size %q: want a number of bytes, or a number and a unit such as 4GiB, 512MiB or 1.5GB", s)
	}
	if unit == "" {
		if strings.Contains(num, ".") {
			return 0, fmt.Errorf("size %q: a number without a unit counts bytes and must be whole", s)
		}
		n, err := strconv.ParseInt(num, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("size %q is too large", s)
		}
		return n, nil
	}
	size := 0.0
	for _, u := range units {
		if strings.EqualFold(unit, u.name) {
			size = u.size
		}
	}
	if size == 0 {
		return 0, fmt.Errorf("size %q: unknown unit %q (want B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)", s, unit)
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	n := math.Floor(f * size)
	if n >= math.MaxInt64 {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return int64(n), nil
}

// isDecimal reports whether s is digits, optionally with one '.' between digits.
func isDecimal(s string) bool {
	whole, frac, dot := strings.Cut(s, ".")
	digits := func(t string) bool {
		return t != "" && strings.IndexFunc(t, func(r rune) bool { return r < '0' || r > '9' }) < 0
	}
	return digits(whole) && (!dot || digits(frac))
}
