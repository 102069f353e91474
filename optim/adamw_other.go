//go:build !amd64 || purego

package optim

var vecAVX512 = false

func (k *adamwStep) runVec(p, g, m, v []float32, keep float32) int { return 0 }
