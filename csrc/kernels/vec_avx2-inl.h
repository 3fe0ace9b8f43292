// `Vec` for AVX2 + FMA, 8 floats per register (`__m256`): the float operations
// the kernel templates (spmm_f32_simd-inl.h, spmm_qd8_simd-inl.h, activations_simd-inl.h)
// are written in. Included inside an anonymous namespace by the ISA's kernel files, after
// their `#pragma GCC target`; no header may be included from here.
struct Vec {
  using T = __m256;
  static constexpr int64_t kWidth = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float v) { return _mm256_set1_ps(v); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T div(T a, T b) { return _mm256_div_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T min(T a, T b) { return _mm256_min_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T xor_(T a, T b) { return _mm256_xor_ps(a, b); }
  static T floor(T a) { return _mm256_floor_ps(a); }
  static T pow2(T n) {
    const __m256i biased = _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  }
  // The first n lanes (masked lanes are neither read nor written).
  using Mask = __m256i;
  static Mask first(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
  static T load_first(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static void store_first(float* p, T v, Mask m) { _mm256_maskstore_ps(p, m, v); }
};
