package train

import (
	"strconv"

	"github.com/pipeswarm/pipeswarm/p2p/codec"
)

func itoa(i int) string { return strconv.Itoa(i) }

// allReduce is a stand-in for reduce.Reference.
func allReduce(c codec.Spec, ys [][]float32) (avg []float32, own [][]float32, sent []int64) {
	n := len(ys[0])
	R := len(ys)
	own = make([][]float32, R)
	sum := make([]float32, n)
	for r, y := range ys {
		own[r] = make([]float32, n)
		if err := c.Decode(own[r], c.Encode(nil, y)); err != nil {
			panic(err)
		}
		for i := range sum {
			sum[i] += own[r][i]
		}
	}
	for i := range sum {
		sum[i] /= float32(R)
	}
	avg = make([]float32, n)
	enc := c.Encode(nil, sum)
	if err := c.Decode(avg, enc); err != nil {
		panic(err)
	}
	sent = make([]int64, R)
	for r := range sent {
		sent[r] = 2 * int64(len(enc)) * int64(R-1) / int64(R)
	}
	return avg, own, sent
}
