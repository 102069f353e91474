package assign

import (
	"slices"
	"strings"
	"testing"
)

func TestOffersThatCannotComputeTheRunsPrecisionAreRefused(t *testing.T) {
	offers := []Offer{
		{Peer: "old"}, // a node from before precisions were offered: fp32 only
		{Peer: "fp32", Precisions: []string{"fp32"}},
		{Peer: "both", Precisions: []string{"fp32", "bf16"}},
	}
	for _, tc := range []struct {
		precision string
		kept      []string
	}{{"fp32", []string{"old", "fp32", "both"}}, {"bf16", []string{"both"}}} {
		kept, refusals := ForPrecision(offers, tc.precision)
		var got []string
		for _, o := range kept {
			got = append(got, o.Peer)
		}
		if !slices.Equal(got, tc.kept) || len(refusals) != len(offers)-len(kept) {
			t.Errorf("%s: kept %v, refused %q; want %v kept", tc.precision, got, refusals, tc.kept)
		}
		for _, r := range refusals {
			if !strings.Contains(r, "cannot compute in "+tc.precision) {
				t.Errorf("%s: refusal %q does not say why", tc.precision, r)
			}
		}
	}
}
