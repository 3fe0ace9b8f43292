// AVX-512 VNNI kernels of int8 buffers: 16 tokens per register, 4-way dot products by
// vpdpbusd (unsigned activations x signed weights, summed into int32 in one instruction,
// without saturation). The panel quantizer and the tile copy are the AVX2 ones. Run by
// the avx512 ISA where the CPU has AVX512-VNNI (lists.h).
// GCC 12's AVX-512 headers warn about their own _mm512_undefined_ps() once inlined
// (GCC bug 105593, see spmm_f32__avx512.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "spmm.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,fma")

namespace sparsecpu {
namespace kernels {
namespace {

#include "vec_avx512-inl.h"

struct IVec {
  using T = __m512i;
  static constexpr int64_t kWidth = 16;
  static T zero() { return _mm512_setzero_si512(); }
  static T set1(int32_t v) { return _mm512_set1_epi32(v); }
  static T load(const void* p) { return _mm512_loadu_si512(p); }
  static void store(void* p, T v) { _mm512_storeu_si512(p, v); }
  static T load_first(const void* p, Vec::Mask m) { return _mm512_maskz_loadu_epi32(m, p); }
  static T add(T a, T b) { return _mm512_add_epi32(a, b); }
  static T sub(T a, T b) { return _mm512_sub_epi32(a, b); }
  static T mullo(T a, T b) { return _mm512_mullo_epi32(a, b); }
  static Vec::T to_float(T v) { return _mm512_cvtepi32_ps(v); }
  static T dot4(T acc, T x, T w) { return _mm512_dpbusd_epi32(acc, x, w); }
  static int32_t sum(T v) { return _mm512_reduce_add_epi32(v); }
  static T widen_bytes(const int8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static T gather(const uint8_t* base, const uint16_t* offsets, uint32_t mask) {
    const __m512i lanes = _mm512_and_si512(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(offsets))),
                                           _mm512_set1_epi32(static_cast<int32_t>(mask)));
    return _mm512_i32gather_epi32(lanes, base, 1);
  }
};

#include "spmm_qd8_simd-inl.h"

// The largest K-block spmv_qd8_1x1x1_vbmi takes: an offset is then one byte.
constexpr int64_t kVbmiMaxKBlock = 256;

// spmv_qd8_f32_qc8w_1x1x1__avx512vbmi: one token, 1 x 1 blocks, K-blocks of at most 256
// features, on CPUs with AVX-512 VBMI too (Ice Lake, Zen 4). The token's 256 bytes of a
// K-block sit in four registers; 64 nonzeros at a time, their offsets narrowed to bytes
// pick their activations out of them with two vpermi2b (7-bit indices into 128 bytes) and
// one blend on the offsets' bit 7, and one vpdpbusd adds the 64 products to 16 lanes:
// about 12 instructions per 64 nonzeros where a gather takes one per nonzero and the
// scalar loop five. A segment's tail is masked (weights 0). Offsets are cut to their low
// 8 bits: whatever a buffer holds, nothing outside the four registers is read.
__attribute__((target("avx512vbmi"))) void spmv_qd8_1x1x1_vbmi(const PackedLinearView& w, int64_t rb,
                                                               int64_t kb_begin, int64_t kb_end,
                                                               const QuantizedPanel& panel, const float* bias,
                                                               Activation act, float* tile) {
  const int64_t groups = w.segments_in_block(rb);
  if (kb_begin == 0) __builtin_memset(tile, 0, static_cast<size_t>(w.rows_in_block(rb)) * sizeof(float));
  const uint32_t last_row = static_cast<uint32_t>(w.rows_in_block(rb) - 1), blocks = w.blocks;
  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t first_segment = w.segment(rb, kb, 0);
    const int32_t* seg = w.seg_ptr + first_segment;
    const int32_t* seg_rows = w.seg_rows + first_segment;
    const uint8_t* quads_kb = panel.quads + kb * w.k_block;  // a GEMV panel has 65536 bytes from here
    __m512i table[4];
    for (int t = 0; t < 4; ++t) table[t] = _mm512_loadu_si512(quads_kb + 64 * t);
    const auto dot64 = [&](__m512i acc, const uint16_t* offsets, const int8_t* values, uint64_t lanes) {
      const __m256i low = _mm512_cvtepi16_epi8(_mm512_maskz_loadu_epi16(static_cast<__mmask32>(lanes), offsets));
      const __m256i high =
          _mm512_cvtepi16_epi8(_mm512_maskz_loadu_epi16(static_cast<__mmask32>(lanes >> 32), offsets + 32));
      const __m512i index = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
      const __m512i x = _mm512_mask_blend_epi8(_mm512_movepi8_mask(index),
                                               _mm512_permutex2var_epi8(table[0], index, table[1]),
                                               _mm512_permutex2var_epi8(table[2], index, table[3]));
      return _mm512_dpbusd_epi32(acc, x, _mm512_maskz_loadu_epi8(lanes, values));
    };
    int32_t next = clamp_index(seg[0], blocks);  // a segment starts where the previous one ends
    for (int64_t s = 0; s < groups; ++s) {
      uint32_t* out = reinterpret_cast<uint32_t*>(tile) + clamp_index(seg_rows[s], last_row);
      int32_t j = next;
      const int32_t end = clamp_index(seg[s + 1], blocks);
      next = end;
      __m512i acc = _mm512_setzero_si512();
      for (; j + 64 <= end; j += 64) acc = dot64(acc, w.offsets + j, w.int8_values + j, ~uint64_t{0});
      if (j < end) acc = dot64(acc, w.offsets + j, w.int8_values + j, (uint64_t{1} << (end - j)) - 1);
      *out += static_cast<uint32_t>(_mm512_reduce_add_epi32(acc));
    }
  }
  if (kb_end == w.num_k_blocks) finish_gemv_tile(w, rb, panel, 1, bias, act, tile);
}

// The GEMV kernels, with spmv_qd8_1x1x1_vbmi where it applies.
void spmv_qd8_row_block_avx512(const PackedLinearView& w, int64_t rb, int64_t kb_begin, int64_t kb_end,
                               const QuantizedPanel& panel, int64_t panel_width, const float* bias, Activation act,
                               float* tile) {
  static const bool has_vbmi = __builtin_cpu_supports("avx512vbmi");
  if (has_vbmi && panel_width == 1 && w.block_cols == 1 && w.k_block <= kVbmiMaxKBlock) {
    return spmv_qd8_1x1x1_vbmi(w, rb, kb_begin, kb_end, panel, bias, act, tile);
  }
  spmv_qd8_row_block_simd(w, rb, kb_begin, kb_end, panel, panel_width, bias, act, tile);
}

}  // namespace
}  // namespace kernels
}  // namespace sparsecpu

#pragma GCC pop_options

namespace sparsecpu {
namespace kernels {
const Qd8Kernels kQd8Avx512Vnni = {"avx512vnni", IVec::kWidth, IVec::kWidth * kMaxTileVectors, &quantize_panel_avx2,
                                   &spmm_qd8_row_block_simd, &spmv_qd8_row_block_avx512, &unpack_tile_avx2};
}  // namespace kernels
}  // namespace sparsecpu
