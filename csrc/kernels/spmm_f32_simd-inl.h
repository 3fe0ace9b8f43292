// Register-tiled offset-CSR SpMM, generic over one SIMD ISA.
//
// Included by spmm_f32__<isa>.cpp inside an anonymous namespace, after that file
// has switched on its ISA (`#pragma GCC target`) and defined `Vec`, the ISA's
// register type and operations:
//   Vec::T, Vec::kWidth (floats per register),
//   zero, set1, load, store, add, mul, div, fma(a, b, c) = a*b + c, min, max, xor_,
//   floor, pow2(n) = 2^n for an integer-valued n in [-127, 127];
//   Mask, first(n) (the first n <= kWidth lanes), load_first / store_first (masked:
//   the other lanes' memory is neither read nor written).
// No system or torch header may be included from here (only the -inl files of this
// folder): everything instantiated below is compiled for this ISA only and must not
// leak into shared inline functions.
// The activations and tiles instantiated are those of lists.h.

#include "activations_simd-inl.h"

// ---- the microkernel ------------------------------------------------------------

// The activations applied to the accumulators on their way to the store (one or two
// instructions a register); the others get a pass over the stored row.
constexpr bool applied_on_store(Activation act) { return act == Activation::kRelu || act == Activation::kRelu6; }

// Stores a register tile's kRows rows, `stride` floats apart, with kAct (kNone or one
// applied_on_store) applied on the way.
template <Activation kAct, int kRows, int kVectors>
inline void store_tile(const Vec::T (&acc)[kRows][kVectors], int64_t stride, float* out) {
  static_assert(kAct == Activation::kNone || applied_on_store(kAct));
  for (int m = 0; m < kRows; ++m) {
    for (int v = 0; v < kVectors; ++v) {
      Vec::T x = acc[m][v];
      if constexpr (kAct != Activation::kNone) x = activate(x, kAct);
      Vec::store(out + m * stride + v * Vec::kWidth, x);
    }
  }
}

// spmm_f32_<kRows>x<kVectors*kWidth>: for each row group of row block rb (one row,
// or one kTallBlockRows x 1 block row), kRows x kVectors registers accumulate bias +
// sum_j value_j * panel[offset_j] over tokens [first_token, first_token + kVectors *
// kWidth). Each nonzero block costs kVectors loads of activations, kRows broadcasts
// and kRows * kVectors FMAs: tall blocks reuse every activation load kRows times.
// A 1-row tile spans the whole panel, so its row stride is a compile-time constant;
// a tall tile covers one strip of it. Partial sums cross K-blocks through the tile,
// which stays in L1/L2 (row_block x panel width floats). After the last K-block ReLU
// and ReLU6 are applied to the accumulators as they are stored; other activations to
// the row just stored, while it is in L1: their arithmetic fills FMA slots the
// load-bound nonzero loop leaves idle. Segment ranges and rows are
// clamped and offsets masked (PackedLinearView): nothing a buffer holds leaves the
// panel, the tile or the packed arrays.
// kRegisterFeatures: the panel's features are one register apart (feature_stride, a
// 1-row tile only), not a tile row.
template <int kRows, int kVectors, bool kRegisterFeatures = false>
void spmm_register_tile(const PackedLinearView& w, int64_t rb, int64_t kb_begin, int64_t kb_end,
                        const float* panel, int64_t panel_width, int64_t first_token,
                        const float* bias, Activation act, float* tile) {
  static_assert(kRows == 1 || !kRegisterFeatures, "register-apart features: 1-row tiles only");
  const int64_t stride = kRows == 1 ? kVectors * Vec::kWidth : panel_width;
  const int64_t feature_stride = kRegisterFeatures ? Vec::kWidth : stride;  // floats from feature to feature
  // Accumulator sets of a 1-row tile: 4 for one register, 2 for two (4 FMA chains
  // each), 1 for wider tiles, where more sets do not pay (docs/kernels.md#the-microkernel).
  constexpr int kSets = kRows > 1 || kVectors >= 3 ? 1 : kVectors == 2 ? 2 : 4;
  const int64_t groups = w.segments_in_block(rb);
  const int64_t first_row = rb * w.row_block;
  const uint32_t last_row = static_cast<uint32_t>(w.rows_in_block(rb) - kRows), blocks = w.blocks;
  const int64_t offset_mask = w.offset_mask;  // one AND per nonzero
  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t first_segment = w.segment(rb, kb, 0);
    const int32_t* seg = w.seg_ptr + first_segment;
    const int32_t* seg_rows = w.seg_rows + first_segment;
    int32_t next = clamp_index(seg[0], blocks);  // a segment starts where the previous one ends
    const float* panel_kb = panel + kb * w.k_block * feature_stride + first_token;  // this K-block's features
    const bool finish = act != Activation::kNone && kb == w.num_k_blocks - 1;
    const Activation store_act = finish && applied_on_store(act) ? act : Activation::kNone;
    for (int64_t s = 0; s < groups; ++s) {
      const int64_t r = clamp_index(seg_rows[s], last_row);
      float* out = tile + r * stride + first_token;
      Vec::T acc[kRows][kVectors];
      for (int m = 0; m < kRows; ++m) {
        if (kb == 0) {
          const Vec::T b = Vec::set1(bias != nullptr ? bias[first_row + r + m] : 0.0f);
          for (int v = 0; v < kVectors; ++v) acc[m][v] = b;
        } else {
          for (int v = 0; v < kVectors; ++v) acc[m][v] = Vec::load(out + m * stride + v * Vec::kWidth);
        }
      }
      int32_t j = next;
      const int32_t end = clamp_index(seg[s + 1], blocks);
      next = end;
      if (kSets > 1) {
        // A narrow 1-row tile has too few accumulators to hide the FMA latency: kSets
        // sets take consecutive nonzeros in turn and are summed at the end.
        Vec::T extra[kSets > 1 ? kSets - 1 : 1][kVectors];
        for (int q = 0; q + 1 < kSets; ++q) {
          for (int v = 0; v < kVectors; ++v) extra[q][v] = Vec::zero();
        }
        for (; j + kSets <= end; j += kSets) {
          const float* x = panel_kb + (w.offsets[j] & offset_mask) * feature_stride;
          const Vec::T value = Vec::set1(w.values[j]);
          for (int v = 0; v < kVectors; ++v) acc[0][v] = Vec::fma(value, Vec::load(x + v * Vec::kWidth), acc[0][v]);
#pragma GCC unroll 4
          for (int q = 0; q + 1 < kSets; ++q) {
            const float* xq = panel_kb + (w.offsets[j + 1 + q] & offset_mask) * feature_stride;
            const Vec::T value_q = Vec::set1(w.values[j + 1 + q]);
            for (int v = 0; v < kVectors; ++v) {
              extra[q][v] = Vec::fma(value_q, Vec::load(xq + v * Vec::kWidth), extra[q][v]);
            }
          }
        }
        for (int q = 0; q + 1 < kSets; ++q) {
          for (int v = 0; v < kVectors; ++v) acc[0][v] = Vec::add(acc[0][v], extra[q][v]);
        }
      }
#pragma GCC unroll 2
      for (; j < end; ++j) {  // every nonzero, or those left over from the sets
        // Tall strips AND in 32 bits: GCC's register allocation then measured the AVX-512
        // 4 x 48 strip 2-3% faster than with the 64-bit AND.
        const int64_t row = kRows == 1 ? w.offsets[j] & offset_mask
                                       : w.offsets[j] & static_cast<uint32_t>(offset_mask);
        const float* x = panel_kb + row * feature_stride;
        if (kRows == 1) {
          const Vec::T value = Vec::set1(w.values[j]);
          for (int v = 0; v < kVectors; ++v) acc[0][v] = Vec::fma(value, Vec::load(x + v * Vec::kWidth), acc[0][v]);
        } else {
          Vec::T xv[kVectors];
          for (int v = 0; v < kVectors; ++v) xv[v] = Vec::load(x + v * Vec::kWidth);
          for (int m = 0; m < kRows; ++m) {
            const Vec::T value = Vec::set1(w.values[static_cast<int64_t>(j) * kRows + m]);
            for (int v = 0; v < kVectors; ++v) acc[m][v] = Vec::fma(value, xv[v], acc[m][v]);
          }
        }
      }
      if (store_act == Activation::kRelu) {
        store_tile<Activation::kRelu>(acc, stride, out);
      } else if (store_act == Activation::kRelu6) {
        store_tile<Activation::kRelu6>(acc, stride, out);
      } else {
        store_tile<Activation::kNone>(acc, stride, out);
      }
      // Other activations: a pass of their own. With activate() in the store loop, GCC
      // keeps the accumulators on the stack in every segment (cost in
      // docs/kernels.md#epilogue-activations).
      if (finish && store_act == Activation::kNone) {
        for (int m = 0; m < kRows; ++m) {
          for (int v = 0; v < kVectors; ++v) {
            float* at = out + m * stride + v * Vec::kWidth;
            Vec::store(at, activate(Vec::load(at), act));
          }
        }
      }
    }
  }
}

// spmv_f32_<kRows>x<kTokens>: few tokens. Each nonzero block's value(s) and offset are
// read once for all kTokens tokens. The panel is [in_features][kTokens], the tile
// [rows][kTokens] exactly (no padding): a feature's kTokens activations are loaded as
// the first kTokens lanes of one register (a masked load, which reads nothing past
// them), so a nonzero costs three loads (offset, value, activations) and one FMA
// whatever the token count. Four partial sums (a 1-row group) or the kRows rows of a
// tall block (independent chains already) hide the FMA latency. One token in a 1-row
// group keeps scalar code: one lane of a register FMA does no more work than a scalar
// FMA, and the scalar loop is faster (docs/kernels.md#small-token-counts-the-gemv-kernels).
// Segments are bounded as in spmm_register_tile; offsets are not masked: a GEMV panel has
// kMaxKBlock rows past its last K-block's first feature (PackedLinearView::panel_rows).
// out[i] += lanes[i] for i < n (n a compile-time constant at every call): a plain
// store of the register and scalar adds, cheaper than a masked store.
inline void add_first_lanes(Vec::T lanes, int n, float* out) {
  float values[Vec::kWidth];
  Vec::store(values, lanes);
  for (int i = 0; i < n; ++i) out[i] += values[i];
}

// Sum over nonzero blocks j in [j, end) of the products fma_into(j, acc) adds, kept in
// four partial sums (consecutive blocks in turn) so the FMA latency does not serialise
// the loop.
template <typename FmaInto>
inline Vec::T four_partial_sums(int32_t j, int32_t end, FmaInto fma_into) {
  Vec::T acc[4] = {Vec::zero(), Vec::zero(), Vec::zero(), Vec::zero()};
  for (; j + 4 <= end; j += 4) {
    for (int q = 0; q < 4; ++q) acc[q] = fma_into(j + q, acc[q]);
  }
  for (; j < end; ++j) acc[0] = fma_into(j, acc[0]);
  return Vec::add(Vec::add(acc[0], acc[1]), Vec::add(acc[2], acc[3]));
}

template <int kRows, int kTokens>
__attribute__((noinline, optimize("no-tree-vectorize"))) void spmv_register_tile(
    const PackedLinearView& w, int64_t rb, int64_t kb_begin, int64_t kb_end, const float* panel,
    const float* bias, Activation act, float* tile) {
  static_assert(kTokens <= Vec::kWidth, "a feature's activations fill one register at most");
  const int64_t rows = w.rows_in_block(rb);
  const int64_t groups = w.segments_in_block(rb);
  if (kb_begin == 0) fill_tile_with_bias(w, rb, bias, kTokens, tile);
  const Vec::Mask tokens = Vec::first(kTokens);
  const uint32_t last_row = static_cast<uint32_t>(rows - kRows), blocks = w.blocks;
  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t first_segment = w.segment(rb, kb, 0);
    const int32_t* seg = w.seg_ptr + first_segment;
    const int32_t* seg_rows = w.seg_rows + first_segment;
    const float* panel_kb = panel + kb * w.k_block * kTokens;  // this K-block's features
    int32_t next = clamp_index(seg[0], blocks);  // a segment starts where the previous one ends
    for (int64_t s = 0; s < groups; ++s) {
      float* out = tile + static_cast<int64_t>(clamp_index(seg_rows[s], last_row)) * kTokens;
      int32_t j = next;
      const int32_t end = clamp_index(seg[s + 1], blocks);
      next = end;
      if (kRows > 1 && kTokens == 1) {
        // Lanes are the block's rows: its kRows values (consecutive) times one activation.
        const Vec::Mask block_rows = Vec::first(kRows);
        add_first_lanes(four_partial_sums(j, end, [&](int32_t i, Vec::T acc) {
                          const Vec::T values = Vec::load_first(w.values + static_cast<int64_t>(i) * kRows, block_rows);
                          return Vec::fma(values, Vec::set1(panel_kb[w.offsets[i]]), acc);
                        }),
                        kRows, out);
      } else if (kRows > 1) {
        Vec::T acc[kRows];
        for (int m = 0; m < kRows; ++m) acc[m] = Vec::zero();
        for (; j < end; ++j) {
          const Vec::T x = Vec::load_first(panel_kb + static_cast<int64_t>(w.offsets[j]) * kTokens, tokens);
          const float* value = w.values + static_cast<int64_t>(j) * kRows;
          for (int m = 0; m < kRows; ++m) acc[m] = Vec::fma(Vec::set1(value[m]), x, acc[m]);
        }
        for (int m = 0; m < kRows; ++m) add_first_lanes(acc[m], kTokens, out + m * kTokens);
      } else if (kTokens == 1) {
        float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f, acc3 = 0.0f;
        for (; j + 4 <= end; j += 4) {
          acc0 += w.values[j] * panel_kb[w.offsets[j]];
          acc1 += w.values[j + 1] * panel_kb[w.offsets[j + 1]];
          acc2 += w.values[j + 2] * panel_kb[w.offsets[j + 2]];
          acc3 += w.values[j + 3] * panel_kb[w.offsets[j + 3]];
        }
        for (; j < end; ++j) acc0 += w.values[j] * panel_kb[w.offsets[j]];
        out[0] += (acc0 + acc1) + (acc2 + acc3);
      } else {
        add_first_lanes(four_partial_sums(j, end, [&](int32_t i, Vec::T acc) {
                          const Vec::T x = Vec::load_first(panel_kb + static_cast<int64_t>(w.offsets[i]) * kTokens, tokens);
                          return Vec::fma(Vec::set1(w.values[i]), x, acc);
                        }),
                        kTokens, out);
      }
    }
  }
  if (act != Activation::kNone && kb_end == w.num_k_blocks) {
    // The neighbouring row block's partial sums may follow the tile: touch only
    // rows * kTokens floats, the last partial register masked.
    const int64_t n = rows * kTokens, full = n / Vec::kWidth * Vec::kWidth;
    for (int64_t i = 0; i < full; i += Vec::kWidth) Vec::store(tile + i, activate(Vec::load(tile + i), act));
    if (full < n) {
      const Vec::Mask rest = Vec::first(static_cast<int>(n - full));
      Vec::store_first(tile + full, activate(Vec::load_first(tile + full, rest), act), rest);
    }
  }
}

void spmv_row_block_simd(const PackedLinearView& w, int64_t rb, int64_t kb_begin, int64_t kb_end,
                         const float* panel, int64_t panel_width, const float* bias, Activation act,
                         float* tile) {
  constexpr int kTall = static_cast<int>(kTallBlockRows);
  switch (panel_width) {
#define SPARSECPU_GEMV_CASE(N)                                                                   \
  case N:                                                                                        \
    return w.block_rows == 1 ? spmv_register_tile<1, N>(w, rb, kb_begin, kb_end, panel, bias, act, tile) \
                             : spmv_register_tile<kTall, N>(w, rb, kb_begin, kb_end, panel, bias, act, tile);
    SPARSECPU_FOR_EACH_GEMV_TILE(SPARSECPU_GEMV_CASE)
#undef SPARSECPU_GEMV_CASE
    default:
      return;  // unreachable: the caller uses this for 1..kMaxGemvTokens tokens
  }
}

// 1 x 1 blocks: register tiles of 1 row x 1..kMaxTileVectors vectors, the whole
// panel (whose features may be a register apart: feature_stride). Tall blocks:
// kTallBlockRows rows x kTallStripVectors vectors in strips across the panel; a narrower
// tile takes the rest. (The tile lists are in lists.h.)
void spmm_row_block_simd(const PackedLinearView& w, int64_t rb, int64_t kb_begin, int64_t kb_end,
                         const float* panel, int64_t panel_width, const float* bias, Activation act,
                         float* tile) {
  const int64_t vectors = panel_width / Vec::kWidth;
  if (w.block_rows == 1) {
    switch (vectors) {
#define SPARSECPU_TILE_CASE(V)                                                                                  \
  case V:                                                                                                       \
    return w.feature_stride != 0                                                                                \
               ? spmm_register_tile<1, V, true>(w, rb, kb_begin, kb_end, panel, panel_width, 0, bias, act, tile) \
               : spmm_register_tile<1, V>(w, rb, kb_begin, kb_end, panel, panel_width, 0, bias, act, tile);
      SPARSECPU_FOR_EACH_TILE(SPARSECPU_TILE_CASE)
#undef SPARSECPU_TILE_CASE
      default:
        return;  // unreachable: the caller sizes panels to 1..kMaxTileVectors registers
    }
  }
  constexpr int kRows = static_cast<int>(kTallBlockRows);
  int64_t v = 0;
  for (; v + kTallStripVectors <= vectors; v += kTallStripVectors) {
    spmm_register_tile<kRows, kTallStripVectors>(w, rb, kb_begin, kb_end, panel, panel_width, v * Vec::kWidth,
                                                 bias, act, tile);
  }
  switch (vectors - v) {  // the rest of the panel, narrower than a strip
#define SPARSECPU_TALL_TILE_CASE(V) \
  case V:                           \
    return spmm_register_tile<kRows, V>(w, rb, kb_begin, kb_end, panel, panel_width, v * Vec::kWidth, bias, act, tile);
    SPARSECPU_FOR_EACH_TALL_TILE(SPARSECPU_TALL_TILE_CASE)
#undef SPARSECPU_TALL_TILE_CASE
    default:
      return;  // 0: no rest
  }
}

// ---- dense depthwise rows (conv_chain) ------------------------------------------------

// SpmmKernels::depthwise_row: kDepthwiseVectors registers of outputs at a time, each
// tap's weight broadcast once for all of them; the last partial register masked.
constexpr int64_t kDepthwiseVectors = 2;

void depthwise_row_simd(const float* const* taps, const float* w, int64_t num_taps, float bias, Activation act,
                        int64_t count, float* out) {
  constexpr int64_t kStep = kDepthwiseVectors * Vec::kWidth;
  int64_t x = 0;
  for (; x + kStep <= count; x += kStep) {
    Vec::T sums[kDepthwiseVectors];
    for (int64_t v = 0; v < kDepthwiseVectors; ++v) sums[v] = Vec::set1(bias);
    for (int64_t t = 0; t < num_taps; ++t) {
      const Vec::T weight = Vec::set1(w[t]);
      for (int64_t v = 0; v < kDepthwiseVectors; ++v) {
        sums[v] = Vec::fma(weight, Vec::load(taps[t] + x + v * Vec::kWidth), sums[v]);
      }
    }
    for (int64_t v = 0; v < kDepthwiseVectors; ++v) Vec::store(out + x + v * Vec::kWidth, activate(sums[v], act));
  }
  for (; x < count; x += Vec::kWidth) {
    const auto lanes = Vec::first(static_cast<int>(count - x < Vec::kWidth ? count - x : Vec::kWidth));
    Vec::T sum = Vec::set1(bias);
    for (int64_t t = 0; t < num_taps; ++t) sum = Vec::fma(Vec::set1(w[t]), Vec::load_first(taps[t] + x, lanes), sum);
    Vec::store_first(out + x, activate(sum, act), lanes);
  }
}

// SpmmKernels::residual_row.
void residual_row_simd(const float* a, const float* b, Activation act, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + Vec::kWidth <= count; i += Vec::kWidth) {
    Vec::store(out + i, activate(Vec::add(Vec::load(a + i), Vec::load(b + i)), act));
  }
  if (i < count) {
    const auto lanes = Vec::first(static_cast<int>(count - i));
    Vec::store_first(out + i, activate(Vec::add(Vec::load_first(a + i, lanes), Vec::load_first(b + i, lanes)), act),
                     lanes);
  }
}

// SpmmKernels::copy_row: whole registers, then the first lanes of one (step 1); GCC
// vectorizes the constant-step loop for this ISA (step 2).
void copy_row_simd(const float* from, int64_t step, int64_t count, float* to) {
  if (step == 1) {
    int64_t i = 0;
    for (; i + Vec::kWidth <= count; i += Vec::kWidth) Vec::store(to + i, Vec::load(from + i));
    if (i < count) {
      const auto lanes = Vec::first(static_cast<int>(count - i));
      Vec::store_first(to + i, Vec::load_first(from + i, lanes), lanes);
    }
  } else if (step == 2) {
    for (int64_t i = 0; i < count; ++i) to[i] = from[2 * i];
  } else {
    for (int64_t i = 0; i < count; ++i) to[i] = from[i * step];
  }
}

// SpmmKernels::copy_rows: rows shorter than a register one masked load and store each
// (step 1), others by copy_row_simd.
void copy_rows_simd(const float* from, int64_t from_pitch, int64_t step, int64_t count, int64_t rows, float* to,
                    int64_t to_pitch) {
  if (step == 1 && count < Vec::kWidth) {
    const auto lanes = Vec::first(static_cast<int>(count));
    for (int64_t r = 0; r < rows; ++r) {
      Vec::store_first(to + r * to_pitch, Vec::load_first(from + r * from_pitch, lanes), lanes);
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) copy_row_simd(from + r * from_pitch, step, count, to + r * to_pitch);
}
