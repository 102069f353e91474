//go:build !amd64 || purego

package kernels

var vecAVX512 = false

func expVec(dst, src []float32) int                    { return 0 }
func swigluVec(m, g, u []float32) int                  { return 0 }
func swigluBackwardVec(dg, du, dm, g, u []float32) int { return 0 }

func maxVec(x []float32) (float32, bool)                          { return 0, false }
func expSubSumVec(x []float32, m float32, part *[16]float32) bool { return false }
func scaleVec(x []float32, s float32) bool                        { return false }
func dotVec(a, b []float32, part *[16]float32) bool               { return false }
func softmaxGradVec(dp, p []float32, scale, dot float32) bool     { return false }
func rmsScaleVec(out, w, x []float32, r float32) bool             { return false }

func rmsBackwardDotVec(dw, w, g, x []float32, r float32, part *[16]float32) bool { return false }
func rmsBackwardDxVec(dx, w, g, x []float32, r, c float32) bool                  { return false }
