package optim_test

import (
	"fmt"
	"math"

	"github.com/pipeswarm/pipeswarm/optim"
)

// A stage's inner loop: clip the gradient by its global norm, then take an AdamW
// step at the scheduled learning rate, with weight decay on the matrix only.
func ExampleAdamW() {
	// One flat buffer: a 2×2 weight matrix, then a bias of 2.
	params := []float32{0.5, -0.5, 0.25, 1, 0, 0}
	grads := make([]float32, len(params))

	cfg := optim.DefaultAdamW()
	cfg.Decay = []optim.Segment{{Off: 0, Len: 4}} // the matrix, not the bias
	opt, err := optim.NewAdamW(len(params), cfg)
	if err != nil {
		panic(err)
	}
	sched := optim.Cosine{Peak: 0.05, Min: 0.005, Warmup: 10, Total: 500}

	for step := range 500 {
		// Gradient of ½‖p - target‖², standing in for a backward pass.
		for i, p := range params {
			grads[i] = p - float32(i%3)
		}
		norm := math.Sqrt(optim.SumSquares(grads))
		optim.Scale(grads, optim.ClipFactor(norm, 1))
		opt.Step(params, grads, sched.At(step))
	}
	var worst float64
	for i, p := range params {
		worst = max(worst, math.Abs(float64(p)-float64(i%3)))
	}
	fmt.Printf("bias %.2f, largest error %.3f\n", params[4:], worst)
	// Output:
	// bias [1.00 2.00], largest error 0.000
}
