// `Vec` for AVX-512 F/DQ/BW/VL, 16 floats per register (`__m512`): the float operations
// the kernel templates (spmm_f32_simd-inl.h, spmm_qd8_simd-inl.h, activations_simd-inl.h)
// are written in. Included inside an anonymous namespace by the ISA's kernel files, after
// their `#pragma GCC target`; no header may be included from here.
struct Vec {
  using T = __m512;
  static constexpr int64_t kWidth = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float v) { return _mm512_set1_ps(v); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T div(T a, T b) { return _mm512_div_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T min(T a, T b) { return _mm512_min_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T xor_(T a, T b) { return _mm512_xor_ps(a, b); }
  static T floor(T a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static T pow2(T n) {
    const __m512i biased = _mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
  }
  // The first n lanes (masked lanes are neither read nor written).
  using Mask = __mmask16;
  static Mask first(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static T load_first(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store_first(float* p, T v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
};
