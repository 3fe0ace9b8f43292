// Register-tiled offset-CSR SpMM of int8 buffers (qd8 activations, qc8w weights, fp32
// output), generic over one SIMD ISA.
//
// Included by spmm_qd8__<isa>.cpp inside an anonymous namespace, after that file has
// switched on its ISA (`#pragma GCC target`) and defined `Vec` (the float operations of
// spmm_f32_simd-inl.h) and `IVec`, its int32 register of kWidth tokens:
//   IVec::T, IVec::kWidth (== Vec::kWidth), zero, set1, load, store (unaligned, any
//   pointer), load_first(p, Vec::Mask) (masked, as Vec::load_first), add, sub, mullo,
//   to_float, sum (of the lanes, modulo 2^32); widen_bytes(p): kWidth int8 values, each
//   zero-extended into its lane; gather(base, offsets, mask): lane i the 4 bytes at
//   base + (offsets[i] & mask), for kWidth uint16 offsets;
//   dot4(acc, x, w): acc plus, in each int32 lane, the 4 products of x's unsigned bytes
//   and w's signed bytes (exact for x <= 127: vpmaddubsw cannot saturate, see
//   docs/kernels.md#int8-kernels).
// No system or torch header may be included from here (see spmm_f32_simd-inl.h).

#include "activations_simd-inl.h"

// The int8 block weights of nonzero block j, as the 4 bytes one dot4 lane multiplies with
// the quad of features the block's offset falls in: a 1 x 4 block's 4 values, a 1 x 1
// block's value in byte offset % 4 and zeros elsewhere.
template <int kBlockCols>
inline int32_t block_weights(const PackedLinearView& w, int64_t j, uint32_t offset) {
  if (kBlockCols == 4) {
    int32_t quad;
    __builtin_memcpy(&quad, w.int8_values + j * 4, sizeof(quad));
    return quad;
  }
  return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint8_t>(w.int8_values[j])) << ((offset & 3) * 8));
}

// The epilogue of one output row, a register of tokens at a time (docs/kernels.md#int8-kernels):
// fma(row_scale * token_scale, float(acc - zero_point * row_wsum), bias), in that order on
// every ISA (no other product or sum for the compiler to contract).
struct RowDequantization {
  IVec::T wsum;
  Vec::T scale;
  Vec::T bias;

  RowDequantization(const PackedLinearView& w, int64_t row, const float* bias_or_null)
      : wsum(IVec::set1(w.row_wsums[row])),
        scale(Vec::set1(w.row_scales[row])),
        bias(Vec::set1(bias_or_null != nullptr ? bias_or_null[row] : 0.0f)) {}

  Vec::T apply(IVec::T acc, IVec::T zero_points, Vec::T token_scales) const {
    const IVec::T exact = IVec::sub(acc, IVec::mullo(zero_points, wsum));
    return Vec::fma(Vec::mul(scale, token_scales), IVec::to_float(exact), bias);
  }
};

// spmm_qd8_f32_qc8w_1x<kBlockCols>x<kVectors*kWidth>: for each row of row block rb,
// kVectors registers of int32 sums accumulate sum_j dot4(panel quad of offset_j,
// weights_j) over the whole panel (kVectors * kWidth tokens). Each nonzero block costs
// one broadcast of its 4 weight bytes, kVectors loads and kVectors dot4s. Partial sums
// cross K-blocks as int32 through the tile; after the last K-block each row is
// dequantized (RowDequantization) and stored as floats, then activated in a pass of
// its own, while in L1 (as in spmm_f32_simd-inl.h). Segment ranges and rows are clamped
// and offsets masked (PackedLinearView): nothing a buffer holds leaves the panel, the
// tile or the packed arrays.
template <int kBlockCols, int kVectors>
void spmm_qd8_register_tile(const PackedLinearView& w, int64_t rb, int64_t kb_begin, int64_t kb_end,
                            const QuantizedPanel& panel, const float* bias, Activation act, float* tile) {
  constexpr int64_t kStride = kVectors * IVec::kWidth;  // tokens of the panel
  const int64_t groups = w.segments_in_block(rb);
  const int64_t first_row = rb * w.row_block;
  const uint32_t last_row = static_cast<uint32_t>(w.rows_in_block(rb) - 1), blocks = w.blocks;
  // An offset's quad starts at byte (offset / 4) * 4 * kStride: one AND with the mask
  // (which keeps it inside the panel) and ~3, one multiply.
  const uint32_t quad_mask = static_cast<uint32_t>(w.offset_mask) & ~3u;
  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t first_segment = w.segment(rb, kb, 0);
    const int32_t* seg = w.seg_ptr + first_segment;
    const int32_t* seg_rows = w.seg_rows + first_segment;
    int32_t next = clamp_index(seg[0], blocks);  // a segment starts where the previous one ends
    const uint8_t* quads_kb = panel.quads + kb * w.k_block * kStride;  // this K-block's quads
    const bool finish = kb == w.num_k_blocks - 1;
    for (int64_t s = 0; s < groups; ++s) {
      const int64_t r = clamp_index(seg_rows[s], last_row);
      float* out = tile + r * kStride;
      IVec::T acc[kVectors];
      for (int v = 0; v < kVectors; ++v) acc[v] = kb == 0 ? IVec::zero() : IVec::load(out + v * IVec::kWidth);
      int32_t j = next;
      const int32_t end = clamp_index(seg[s + 1], blocks);
      next = end;
#pragma GCC unroll 2
      for (; j < end; ++j) {
        const uint32_t offset = w.offsets[j];
        const uint8_t* x = quads_kb + static_cast<int64_t>(offset & quad_mask) * kStride;
        const IVec::T weights = IVec::set1(block_weights<kBlockCols>(w, j, offset));
        for (int v = 0; v < kVectors; ++v) acc[v] = IVec::dot4(acc[v], IVec::load(x + v * IVec::kWidth * 4), weights);
      }
      if (!finish) {
        for (int v = 0; v < kVectors; ++v) IVec::store(out + v * IVec::kWidth, acc[v]);
        continue;
      }
      const RowDequantization row(w, first_row + r, bias);
      for (int v = 0; v < kVectors; ++v) {
        const int64_t token = v * IVec::kWidth;
        Vec::store(out + token, row.apply(acc[v], IVec::load(panel.zero_points + token), Vec::load(panel.scales + token)));
      }
      if (act != Activation::kNone) {
        for (int v = 0; v < kVectors; ++v) {
          float* at = out + v * Vec::kWidth;
          Vec::store(at, activate(Vec::load(at), act));
        }
      }
    }
  }
}

// out[i] += lanes[i] for i < n, modulo 2^32 (a corrupted buffer may overflow).
inline void add_first_int_lanes(IVec::T lanes, int n, float* out) {
  int32_t values[IVec::kWidth];
  IVec::store(values, lanes);
  uint32_t* sums = reinterpret_cast<uint32_t*>(out);
  for (int i = 0; i < n; ++i) sums[i] += static_cast<uint32_t>(values[i]);
}

// After a GEMV tile's last K-block: each row's `tokens` sums (the first lanes of one
// register) dequantized and activated in place; the neighbouring row block's partial
// sums may follow the tile: masked.
inline void finish_gemv_tile(const PackedLinearView& w, int64_t rb, const QuantizedPanel& panel, int64_t tokens,
                             const float* bias, Activation act, float* tile) {
  const Vec::Mask lanes = Vec::first(static_cast<int>(tokens));
  const IVec::T zero_points = IVec::load_first(panel.zero_points, lanes);
  const Vec::T scales = Vec::load_first(panel.scales, lanes);
  for (int64_t r = 0; r < w.rows_in_block(rb); ++r) {
    float* at = tile + r * tokens;
    const RowDequantization row(w, rb * w.row_block + r, bias);
    Vec::store_first(at, activate(row.apply(IVec::load_first(at, lanes), zero_points, scales), act), lanes);
  }
}

// spmv_qd8_f32_qc8w_1x<kBlockCols>x<kTokens>: few tokens (as spmv_register_tile in
// spmm_f32_simd-inl.h). The panel is [quads][kTokens][4] and the tile [rows][kTokens],
// unpadded: a quad's kTokens x 4 bytes are the first kTokens int32 lanes of one masked
// load, one dot4 per block whatever the token count, in four partial sums. One token
// keeps scalar code. Offsets are not masked: a GEMV panel has kMaxKBlock features past
// its last K-block's first feature (PackedLinearView::panel_rows).
template <int kBlockCols, int kTokens>
__attribute__((noinline, optimize("no-tree-vectorize"))) void spmv_qd8_register_tile(
    const PackedLinearView& w, int64_t rb, int64_t kb_begin, int64_t kb_end, const QuantizedPanel& panel,
    const float* bias, Activation act, float* tile) {
  static_assert(kTokens <= IVec::kWidth, "a quad's tokens fill one register at most");
  const int64_t rows = w.rows_in_block(rb), groups = w.segments_in_block(rb);
  if (kb_begin == 0) __builtin_memset(tile, 0, static_cast<size_t>(rows * kTokens) * sizeof(float));
  const Vec::Mask tokens = Vec::first(kTokens);
  const uint32_t last_row = static_cast<uint32_t>(rows - 1), blocks = w.blocks;
  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t first_segment = w.segment(rb, kb, 0);
    const int32_t* seg = w.seg_ptr + first_segment;
    const int32_t* seg_rows = w.seg_rows + first_segment;
    const uint8_t* quads_kb = panel.quads + kb * w.k_block * kTokens;  // this K-block's quads
    int32_t next = clamp_index(seg[0], blocks);  // a segment starts where the previous one ends
    for (int64_t s = 0; s < groups; ++s) {
      float* out = tile + static_cast<int64_t>(clamp_index(seg_rows[s], last_row)) * kTokens;
      int32_t j = next;
      const int32_t end = clamp_index(seg[s + 1], blocks);
      next = end;
      if (kTokens == 1) {
        // One token: its quad is 4 consecutive bytes, feature f at quads_kb[f]. kWidth
        // blocks at a time: their quads gathered (one dword per lane, the lane's block's
        // quad; a 1 x 1 block's feature in byte 0 of a dword that starts at it) against
        // their weights (a 1 x 4 block's 4 bytes; a 1 x 1 block's byte, zero-extended:
        // the other 3 bytes of its dword count 0), two accumulators for dot4's latency.
        IVec::T acc[2] = {IVec::zero(), IVec::zero()};
        const uint32_t quad = kBlockCols == 4 ? ~3u : ~0u;
        for (; j + 2 * IVec::kWidth <= end; j += 2 * IVec::kWidth) {
          for (int q = 0; q < 2; ++q) {
            const int32_t i = j + q * static_cast<int32_t>(IVec::kWidth);
            const IVec::T weights = kBlockCols == 4 ? IVec::load(w.int8_values + static_cast<int64_t>(i) * 4)
                                                    : IVec::widen_bytes(w.int8_values + i);
            acc[q] = IVec::dot4(acc[q], IVec::gather(quads_kb, w.offsets + i, quad), weights);
          }
        }
        uint32_t rest = 0;
        for (; j < end; ++j) {
          const uint8_t* x = quads_kb + (w.offsets[j] & quad);
          for (int c = 0; c < kBlockCols; ++c) rest += static_cast<uint32_t>(w.int8_values[j * kBlockCols + c] * x[c]);
        }
        *reinterpret_cast<uint32_t*>(out) += rest + static_cast<uint32_t>(IVec::sum(IVec::add(acc[0], acc[1])));
        continue;
      }
      IVec::T acc[4] = {IVec::zero(), IVec::zero(), IVec::zero(), IVec::zero()};
      const auto dot = [&](int32_t i, IVec::T sum) {
        const uint32_t offset = w.offsets[i];
        const IVec::T x = IVec::load_first(quads_kb + static_cast<int64_t>(offset & ~3u) * kTokens, tokens);
        return IVec::dot4(sum, x, IVec::set1(block_weights<kBlockCols>(w, i, offset)));
      };
      for (; j + 4 <= end; j += 4) {
        for (int q = 0; q < 4; ++q) acc[q] = dot(j + q, acc[q]);
      }
      for (; j < end; ++j) acc[0] = dot(j, acc[0]);
      add_first_int_lanes(IVec::add(IVec::add(acc[0], acc[1]), IVec::add(acc[2], acc[3])), kTokens, out);
    }
  }
  if (kb_end == w.num_k_blocks) finish_gemv_tile(w, rb, panel, kTokens, bias, act, tile);
}

// `case N:` running tile_fn<1 or 4, N> for the buffer's block shape (1 x 1 or 1 x 4).
#define SPARSECPU_QD8_CASE(N, tile_fn)                                                     \
  case N:                                                                                  \
    return w.block_cols == 1 ? tile_fn<1, N>(w, rb, kb_begin, kb_end, panel, bias, act, tile) \
                             : tile_fn<4, N>(w, rb, kb_begin, kb_end, panel, bias, act, tile);

void spmv_qd8_row_block_simd(const PackedLinearView& w, int64_t rb, int64_t kb_begin, int64_t kb_end,
                             const QuantizedPanel& panel, int64_t panel_width, const float* bias, Activation act,
                             float* tile) {
  switch (panel_width) {
#define SPARSECPU_GEMV_CASE(N) SPARSECPU_QD8_CASE(N, spmv_qd8_register_tile)
    SPARSECPU_FOR_EACH_GEMV_TILE(SPARSECPU_GEMV_CASE)
#undef SPARSECPU_GEMV_CASE
    default:
      return;  // unreachable: the caller uses this for 1..kMaxGemvTokens tokens
  }
}

// Register tiles of 1 row x 1..kMaxTileVectors registers, the whole panel (lists.h).
void spmm_qd8_row_block_simd(const PackedLinearView& w, int64_t rb, int64_t kb_begin, int64_t kb_end,
                             const QuantizedPanel& panel, int64_t panel_width, const float* bias, Activation act,
                             float* tile) {
  switch (panel_width / IVec::kWidth) {
#define SPARSECPU_TILE_CASE(V) SPARSECPU_QD8_CASE(V, spmm_qd8_register_tile)
    SPARSECPU_FOR_EACH_TILE(SPARSECPU_TILE_CASE)
#undef SPARSECPU_TILE_CASE
    default:
      return;  // unreachable: the caller sizes panels to 1..kMaxTileVectors registers
  }
}
#undef SPARSECPU_QD8_CASE
