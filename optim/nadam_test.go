package optim

import (
	"bytes"
	"encoding/json"
	"errors"
	"math"
	"math/rand/v2"
	"os/exec"
	"testing"
)

// refNAdam is an independent float64 NAdam written from the formula in the Step doc
// comment.
type refNAdam struct {
	b1, b2, eps, wd, psi float64
	decay                []bool
	m, v                 []float64
	t                    int
	prod                 float64
}

func (r *refNAdam) mu(t int) float64 { return r.b1 * (1 - 0.5*math.Pow(0.96, float64(t)*r.psi)) }

func (r *refNAdam) step(p []float64, g []float32, lr float64) {
	r.t++
	mu, muNext := r.mu(r.t), r.mu(r.t+1)
	r.prod *= mu
	for i := range p {
		if r.decay[i] {
			p[i] -= lr * r.wd * p[i]
		}
		gi := float64(g[i])
		r.m[i] = r.b1*r.m[i] + (1-r.b1)*gi
		r.v[i] = r.b2*r.v[i] + (1-r.b2)*gi*gi
		d := math.Sqrt(r.v[i]/(1-math.Pow(r.b2, float64(r.t)))) + r.eps
		p[i] -= lr*(1-mu)/(1-r.prod)*gi/d + lr*muNext/(1-r.prod*muNext)*r.m[i]/d
	}
}

// nadamCase is a short run: initial weights, a gradient and a learning rate per step.
type nadamCase struct {
	P     []float32   `json:"p"`
	Grads [][]float32 `json:"grads"`
	LRs   []float32   `json:"lrs"`
}

func newNAdamCase(n, steps int, seed uint64) nadamCase {
	rng := rand.New(rand.NewPCG(seed, 1))
	c := nadamCase{P: make([]float32, n)}
	for i := range c.P {
		c.P[i] = float32(rng.NormFloat64())
	}
	for s := range steps {
		g := make([]float32, n)
		for i := range g {
			g[i] = float32(rng.NormFloat64() * math.Pow(10, float64(i%5-2)))
		}
		c.Grads = append(c.Grads, g)
		c.LRs = append(c.LRs, float32(1e-3*float64(1+s%7)))
	}
	return c
}

func TestNAdamMatchesFormula(t *testing.T) {
	const n = 37
	decay := []Segment{{Off: 3, Len: 20}}
	for _, b1 := range []float32{0.9, 0.99} {
		cfg := NAdamConfig{Beta1: b1, Beta2: 0.95, Eps: 1e-8, WeightDecay: 0.1, MomentumDecay: 0.004, Decay: decay}
		c := newNAdamCase(n, 50, 3)
		o, err := NewNAdam(n, cfg)
		if err != nil {
			t.Fatal(err)
		}
		ref := &refNAdam{b1: float64(b1), b2: 0.95, eps: 1e-8, wd: 0.1, psi: 0.004, decay: make([]bool, n),
			m: make([]float64, n), v: make([]float64, n), prod: 1}
		want := make([]float64, n)
		for i, x := range c.P {
			want[i] = float64(x)
			ref.decay[i] = i >= 3 && i < 23
		}
		p := append([]float32(nil), c.P...)
		for s, g := range c.Grads {
			o.Step(p, g, c.LRs[s])
			ref.step(want, g, float64(c.LRs[s]))
		}
		for i := range p {
			if !closeRel(float64(p[i]), want[i], 1e-5) {
				t.Errorf("beta1 %v: p[%d] = %v, want %v", b1, i, p[i], want[i])
			}
		}
	}
}

// TestNAdamMatchesPyTorch runs the same steps through torch.optim.NAdam with
// decoupled weight decay (two parameter groups: with and without decay; a torch
// older than the decoupled_weight_decay option gets its first step, p·(1 − lr·wd),
// done by hand before each step, and one older than 2.0 the fix 2.0 made to the bias
// correction of the look-ahead, Πμ counted μₜ twice).
func TestNAdamMatchesPyTorch(t *testing.T) {
	const py = "/usr/bin/python3"
	if out, err := exec.Command(py, "-c", "import torch").CombinedOutput(); err != nil {
		t.Skipf("%s has no torch (apt install python3-torch): %v %s", py, err, bytes.TrimSpace(out))
	}
	const n, split = 64, 40 // [0, split) decays, [split, n) does not
	for _, b1 := range []float32{0.9, 0.99} {
		c := newNAdamCase(n, 200, 11)
		in, err := json.Marshal(map[string]any{"case": c, "beta1": b1, "split": split})
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(py, "-c", `
import inspect, json, sys, torch
nm = sys.modules[torch.optim.NAdam.__module__]
src = inspect.getsource(nm)
if "mu_product * mu * mu_next" in src:  # torch < 2.0 counted mu twice in the look-ahead's bias correction
    exec(compile(src.replace("mu_product * mu * mu_next", "mu_product * mu_next"), nm.__file__, "exec"), nm.__dict__)
a = json.load(sys.stdin); c = a["case"]; k = a["split"]
p = torch.tensor(c["p"], dtype=torch.float32)
w1 = torch.nn.Parameter(p[:k].clone()); w2 = torch.nn.Parameter(p[k:].clone())
decoupled = "decoupled_weight_decay" in torch.optim.NAdam.__init__.__code__.co_varnames
kw = {"decoupled_weight_decay": True} if decoupled else {}
opt = nm.NAdam([{"params": [w1], "weight_decay": 0.1 if decoupled else 0.0}, {"params": [w2], "weight_decay": 0.0}],
    lr=1.0, betas=(a["beta1"], 0.95), eps=1e-8, momentum_decay=0.004, foreach=False, **kw)
for g, lr in zip(c["grads"], c["lrs"]):
    g = torch.tensor(g, dtype=torch.float32)
    w1.grad = g[:k].clone(); w2.grad = g[k:].clone()
    for grp in opt.param_groups: grp["lr"] = lr
    if not decoupled:  # what decoupled_weight_decay=True does first, in a torch without it
        with torch.no_grad(): w1.mul_(1 - lr * 0.1)
    opt.step()
json.dump(torch.cat([w1.detach(), w2.detach()]).tolist(), sys.stdout)
`)
		cmd.Stdin = bytes.NewReader(in)
		out, err := cmd.Output()
		if err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				t.Fatalf("torch: %v\n%s", err, ee.Stderr)
			}
			t.Fatal(err)
		}
		var want []float64
		if err := json.Unmarshal(out, &want); err != nil {
			t.Fatalf("torch output %q: %v", out, err)
		}
		o, err := NewNAdam(n, NAdamConfig{Beta1: b1, Beta2: 0.95, Eps: 1e-8, WeightDecay: 0.1, MomentumDecay: 0.004,
			Decay: []Segment{{Off: 0, Len: split}}})
		if err != nil {
			t.Fatal(err)
		}
		p := append([]float32(nil), c.P...)
		for s, g := range c.Grads {
			o.Step(p, g, c.LRs[s])
		}
		for i := range p {
			if !closeRel(float64(p[i]), want[i], 1e-5) {
				t.Errorf("beta1 %v: p[%d] = %v, torch %v", b1, i, p[i], want[i])
			}
		}
	}
}

func TestNAdamSetStateResumesExactly(t *testing.T) {
	const n = 19
	c := newNAdamCase(n, 40, 5)
	cfg := DefaultNAdam()
	whole, _ := NewNAdam(n, cfg)
	p := append([]float32(nil), c.P...)
	for s, g := range c.Grads {
		whole.Step(p, g, c.LRs[s])
	}
	first, _ := NewNAdam(n, cfg)
	q := append([]float32(nil), c.P...)
	for s, g := range c.Grads[:25] {
		first.Step(q, g, c.LRs[s])
	}
	m, v := first.Moments()
	second, _ := NewNAdam(n, cfg)
	if err := second.SetState(first.StepCount(), append([]float32(nil), m...), append([]float32(nil), v...)); err != nil {
		t.Fatal(err)
	}
	for s, g := range c.Grads[25:] {
		second.Step(q, g, c.LRs[25+s])
	}
	for i := range p {
		if p[i] != q[i] {
			t.Fatalf("p[%d]: resumed %v, uninterrupted %v", i, q[i], p[i])
		}
	}
	if err := second.SetState(-1, m, v); !errors.Is(err, ErrInvalid) {
		t.Errorf("SetState(-1): %v, want ErrInvalid", err)
	}
	if err := second.SetState(1, m[:3], v); !errors.Is(err, ErrInvalid) {
		t.Errorf("SetState with short m: %v, want ErrInvalid", err)
	}
}

func TestNAdamConfigValidates(t *testing.T) {
	for _, c := range []NAdamConfig{
		{Beta1: 1, Beta2: 0.9, Eps: 1e-8},
		{Beta1: 0.9, Beta2: -0.1, Eps: 1e-8},
		{Beta1: 0.9, Beta2: 0.9, Eps: 0},
		{Beta1: 0.9, Beta2: 0.9, Eps: 1e-8, WeightDecay: float32(math.NaN())},
		{Beta1: 0.9, Beta2: 0.9, Eps: 1e-8, MomentumDecay: -1},
	} {
		if _, err := NewNAdam(4, c); !errors.Is(err, ErrInvalid) {
			t.Errorf("NewNAdam(%+v): %v, want ErrInvalid", c, err)
		}
	}
	if _, err := NewNAdam(4, NAdamConfig{Beta1: 0.9, Beta2: 0.9, Eps: 1e-8, Decay: []Segment{{Off: 2, Len: 3}}}); !errors.Is(err, ErrInvalid) {
		t.Errorf("a decay segment past the end: %v, want ErrInvalid", err)
	}
}

func TestDelayMomentumGrowsTheHorizonByTheDelay(t *testing.T) {
	for _, c := range []struct {
		beta1, delay float64
		want         float32
	}{
		{0.9, 0, 0.9}, {0.9, -1, 0.9}, {0.9, 1, 0.95}, {0.9, 0.25, 0.92}, {0.99, 1, 0.995},
	} {
		if got := DelayMomentum(c.beta1, c.delay); math.Abs(float64(got-c.want)) > 1e-7 {
			t.Errorf("DelayMomentum(%v, %v) = %v, want %v", c.beta1, c.delay, got, c.want)
		}
	}
}

func TestDelayLRShrinksTheStepWithTheSquareRootOfTheDelay(t *testing.T) {
	for _, c := range []struct {
		delay float64
		want  float32
	}{
		{0, 1}, {-1, 1}, {1, float32(1 / math.Sqrt2)}, {3, 0.5}, {0.75, float32(1 / math.Sqrt(1.75))},
	} {
		if got := DelayLR(c.delay); got != c.want {
			t.Errorf("DelayLR(%v) = %v, want %v", c.delay, got, c.want)
		}
	}
}
