// The fused activations of lists.h, vectorised over one SIMD ISA's `Vec` (the operations
// listed in spmm_f32_simd-inl.h), and activate(x, act), which applies one of them.
// Included (through spmm_f32_simd-inl.h or spmm_qd8_simd-inl.h) by each ISA's kernel file
// inside an anonymous namespace, after it has switched on its ISA. No header may be
// included from here (see spmm_f32_simd-inl.h).

// exp by Cephes' expf polynomial (about 1 ulp over the clamped range).
inline Vec::T exp_approx(Vec::T x) {
  x = Vec::max(Vec::set1(-88.3762626647949f), x);
  x = Vec::xor_(Vec::max(Vec::set1(-88.3762626647949f), Vec::xor_(x, Vec::set1(-0.0f))),
                Vec::set1(-0.0f));  // min(x, 88.376...)
  const Vec::T n = Vec::floor(Vec::fma(x, Vec::set1(1.44269504088896341f), Vec::set1(0.5f)));
  x = Vec::fma(n, Vec::set1(-0.693359375f), x);
  x = Vec::fma(n, Vec::set1(2.12194440e-4f), x);
  Vec::T y = Vec::set1(1.9875691500e-4f);
  y = Vec::fma(y, x, Vec::set1(1.3981999507e-3f));
  y = Vec::fma(y, x, Vec::set1(8.3334519073e-3f));
  y = Vec::fma(y, x, Vec::set1(4.1665795894e-2f));
  y = Vec::fma(y, x, Vec::set1(1.6666665459e-1f));
  y = Vec::fma(y, x, Vec::set1(5.0000001201e-1f));
  y = Vec::add(Vec::fma(y, Vec::mul(x, x), x), Vec::set1(1.0f));
  return Vec::mul(y, Vec::pow2(n));
}

// erf(z) as z P(z^2) / Q(z^2) on z clamped to [-4, 4] (beyond, erf is +-1 in
// float32): the rational minimax fit Eigen and XLA use for float. Absolute error
// below 4e-7; one division and 12 FMAs, no exp.
inline Vec::T erf_rational(Vec::T z) {
  z = Vec::min(Vec::max(z, Vec::set1(-4.0f)), Vec::set1(4.0f));
  const Vec::T z2 = Vec::mul(z, z);
  Vec::T p = Vec::set1(-2.72614225801306e-10f);
  p = Vec::fma(p, z2, Vec::set1(2.77068142495902e-08f));
  p = Vec::fma(p, z2, Vec::set1(-2.10102402082508e-06f));
  p = Vec::fma(p, z2, Vec::set1(-5.69250639462346e-05f));
  p = Vec::fma(p, z2, Vec::set1(-7.34990630326855e-04f));
  p = Vec::fma(p, z2, Vec::set1(-2.95459980854025e-03f));
  p = Vec::fma(p, z2, Vec::set1(-1.60960333262415e-02f));
  Vec::T q = Vec::set1(-1.45660718464996e-05f);
  q = Vec::fma(q, z2, Vec::set1(-2.13374055278905e-04f));
  q = Vec::fma(q, z2, Vec::set1(-1.68282697438203e-03f));
  q = Vec::fma(q, z2, Vec::set1(-7.37332916720468e-03f));
  q = Vec::fma(q, z2, Vec::set1(-1.42647390514189e-02f));
  return Vec::div(Vec::mul(z, p), q);
}

// 0.5 x (1 + erf(x / sqrt 2)), as F.gelu computes it: the absolute error is below
// 3e-7 max(|x|, 1) (F.gelu's own is 2e-7). Far down the negative tail, where the
// result is tiny, its relative error grows as F.gelu's does.
inline Vec::T activate_gelu(Vec::T x) {
  const Vec::T erf = erf_rational(Vec::mul(x, Vec::set1(0.70710678118654752f)));
  return Vec::mul(Vec::mul(x, Vec::set1(0.5f)), Vec::add(Vec::set1(1.0f), erf));
}

// 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3): no cancellation.
inline Vec::T activate_gelu_tanh(Vec::T x) {
  const Vec::T x3 = Vec::mul(Vec::mul(x, x), x);
  const Vec::T minus_2u = Vec::mul(Vec::set1(-2.0f * 0.79788456080286536f), Vec::fma(Vec::set1(0.044715f), x3, x));
  return Vec::div(x, Vec::add(Vec::set1(1.0f), exp_approx(minus_2u)));
}

inline Vec::T activate_none(Vec::T x) { return x; }

// Vec::max / Vec::min return their second operand when either is NaN (x86's maxps /
// minps), so x goes second: a NaN stays NaN, as in F.relu.
inline Vec::T activate_relu(Vec::T x) { return Vec::max(Vec::zero(), x); }

// min(6, max(0, x)): MobileNet's ReLU6 (NaN stays NaN, as in F.relu6)
inline Vec::T activate_relu6(Vec::T x) { return Vec::min(Vec::set1(6.0f), Vec::max(Vec::zero(), x)); }

// x min(max(x + 3, 0), 6) / 6, as F.hardswish computes it: MobileNetV3's h-swish
inline Vec::T activate_hardswish(Vec::T x) {
  const Vec::T relu6 = Vec::min(Vec::max(Vec::add(x, Vec::set1(3.0f)), Vec::zero()), Vec::set1(6.0f));
  return Vec::div(Vec::mul(x, relu6), Vec::set1(6.0f));
}

// x / (1 + exp(-x))
inline Vec::T activate_silu(Vec::T x) {
  return Vec::div(x, Vec::add(Vec::set1(1.0f), exp_approx(Vec::xor_(x, Vec::set1(-0.0f)))));
}

inline Vec::T activate(Vec::T x, Activation act) {
  SPARSECPU_RETURN_ACTIVATED(act, x);
}

