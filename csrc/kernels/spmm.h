// Torch-free interface of the sparse kernels: the packed weight layout and the
// per-ISA kernel table. Nothing here includes a torch header, so every ISA
// translation unit can include it under its own `#pragma GCC target`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "lists.h"

namespace sparsecpu {
namespace kernels {

// ---------------------------------------------------------------------------
// Packed weight: offset-CSR, CSR-blocked (format version 4). One int32 buffer:
//
//   header      kHeaderWords words, see HeaderField
//   seg_ptr     S + 1 words: start of each segment, counted in nonzero blocks
//   seg_rows    S words: first row (within its row block) of each segment
//   fp32 buffers (datatype kF32):
//     values      nnz words, fp32 bit patterns, block_rows per nonzero block
//   int8 buffers (datatype kInt8):
//     row_scales  out_features words, fp32: each output row's weight scale
//     row_wsums   out_features words, int32: the sum of each row's int8 values
//     values      ceil(nnz / 4) words holding nnz int8 values, block_cols per block
//   offsets     ceil(blocks / 2) words holding one uint16 per nonzero block: its
//               (first) input feature, counted from the first feature of its K-block
//
// Nonzeros are stored in blocks of block_rows x block_cols: block_rows consecutive
// output rows (a row group) times block_cols consecutive input features. fp32 buffers
// have block_cols 1 and block_rows 1 (plain CSR) or kTallBlockRows, when the weight has
// that structure: the kernel then loads each activation once for all the rows of a
// block. int8 buffers have block_rows 1 and block_cols 1 or kWideBlockCols (1 x 4
// blocks, which fill the 4-way int8 dot products; their first feature is a multiple of
// 4). A block's values are consecutive, zeros inside a block included;
// blocks = nnz / (block_rows * block_cols).
//
// int8 values are the weight quantized per output row, symmetric: q = clamp(nearbyint(w *
// (127 / max|w_row|)), -127, 127), row_scales[r] = max|w_row| / 127 (0 for a row of zeros),
// row_wsums[r] = sum of the row's q (docs/kernels.md#int8-kernels). Their K-blocks are
// multiples of 4 features (kWideBlockCols).
//
// Output rows are grouped in row blocks of `row_block` rows (a multiple of
// block_rows) and the input dimension in K-blocks of `k_block` features. A segment
// holds the blocks of one row group inside one K-block (S = out_features /
// block_rows * num_k_blocks); segments are ordered
//   for row block rb: for K-block kb: for row group g in rb
// so that a row block's partial sums can stay in one L1-resident tile while a
// K-block's activations stay in L1 too. Inside one (row block, K-block) the
// segments are sorted by length, so consecutive segments have similar lengths and
// the exit of the nonzero loop is predictable; seg_rows says which tile rows each
// segment accumulates into. The kernel multiplies
// an offset by the row stride of the activation panel it reads (`panel_width` floats,
// or PackedLinearView::feature_stride).
// ---------------------------------------------------------------------------
constexpr int32_t kPackedMagic = 0x31435053;  // "SPC1" little-endian
constexpr int32_t kPackedVersion = 4;
// Offsets are 16-bit, relative to their K-block: K-blocks hold at most this many features.
constexpr int64_t kMaxKBlock = 65536;
constexpr int64_t kHeaderWords = 16;
// Rows of the one multi-row block shape, "tall" 4 x 1 blocks: block_rows is 1 or this.
constexpr int64_t kTallBlockRows = 4;
// Features of the one multi-feature block shape, "wide" 1 x 4 blocks of int8 buffers:
// block_cols is 1 or this. Also the features of one int8 dot product (a "quad").
constexpr int64_t kWideBlockCols = 4;
// int8 buffers: at most this many input features, so that no int32 accumulator can
// overflow (127 * 127 * 131072 < 2^31).
constexpr int64_t kMaxInt8InFeatures = 131072;

// The header's words, X(enumerator, name) in word order from word 0 (names as
// Python's ops.HEADER_FIELDS spells them); the other words up to kHeaderWords are 0.
#define SPARSECPU_FOR_EACH_HEADER_FIELD(X) \
  X(kMagic, magic)                         \
  X(kVersion, version)                     \
  X(kOutFeatures, out_features)            \
  X(kInFeatures, in_features)              \
  X(kKBlock, k_block)                      \
  X(kNumKBlocks, num_k_blocks)             \
  X(kRowBlock, row_block)                  \
  X(kNumRowBlocks, num_row_blocks)         \
  X(kNnz, nnz)                             \
  X(kBlockRows, block_rows)                \
  X(kDatatype, datatype)                   \
  X(kBlockCols, block_cols)

enum HeaderField : int {
#define SPARSECPU_ENUMERATOR(e, name) e,
  SPARSECPU_FOR_EACH_HEADER_FIELD(SPARSECPU_ENUMERATOR)
#undef SPARSECPU_ENUMERATOR
  kNumHeaderFields
};
static_assert(kNumHeaderFields <= kHeaderWords, "the header fields fit in the header");

constexpr const char* kHeaderFieldNames[] = {
#define SPARSECPU_NAME(e, name) #name,
    SPARSECPU_FOR_EACH_HEADER_FIELD(SPARSECPU_NAME)
#undef SPARSECPU_NAME
};

// v clamped into [0, hi] with one compare: a negative v reads as a huge unsigned. Unsigned,
// so that widening it to an index costs nothing.
inline uint32_t clamp_index(int32_t v, uint32_t hi) {
  return static_cast<uint32_t>(v) <= hi ? static_cast<uint32_t>(v) : hi;
}

// Read-only view of a packed buffer; pointers into it.
//
// The kernels trust only the header (checked on every call, and copied into the view)
// and the sizes it implies, never the contents (checked once per buffer, see
// view_packed_linear), so that a buffer edited after its check without a version bump
// cannot make them read or write out of bounds: per segment they clamp its end
// (seg_ptr) into [0, blocks] and start it where the previous one ended (an inverted
// range runs nothing), and clamp its seg_rows entry into the row block. An offset
// (at most 65535) stays inside the panel because the panel has panel_rows(gemv) rows:
// the panel kernels (spmm_row_block) mask every offset with offset_mask, one AND per
// nonzero, so their panels need offset_mask + 1 rows from the last K-block's first
// feature; the GEMV kernels (spmv_row_block), whose panels are at most kMaxGemvTokens
// wide, take kMaxKBlock rows there instead and mask nothing (cheaper, measured in
// docs/packed_format.md). For a buffer that passed the check none of this changes a value.
struct PackedLinearView {
  int64_t out_features = 0;
  int64_t in_features = 0;
  int64_t k_block = 0;
  int64_t num_k_blocks = 0;
  int64_t row_block = 0;
  int64_t num_row_blocks = 0;
  int64_t nnz = 0;         // stored values: blocks * block_rows * block_cols
  int64_t block_rows = 1;  // rows per nonzero block (1 or kTallBlockRows)
  int64_t block_cols = 1;  // features per nonzero block (1 or kWideBlockCols, int8 only)
  Datatype datatype = Datatype::kF32;
  int32_t blocks = 0;      // nonzero blocks: nnz / (block_rows * block_cols)
  int64_t offset_mask = 0;  // pow2ceil(k_block) - 1: every valid offset is below k_block
  // Floats from one feature of the activation panel to the next: 0 for the panel's width
  // (a panel of rows, every buffer as packed), else the ISA's vector width (fp32 1 x 1
  // blocks only): conv_chain's tap layout, whose features are rows of a band image a
  // whole number of registers apart (csrc/ops/tap_weights.h). Not in the header: set on
  // a view by whoever hands the kernels such a panel, which then needs
  // panel_rows(false) * feature_stride floats from the last K-block's first feature plus
  // the panel's width.
  int64_t feature_stride = 0;
  const int32_t* seg_ptr = nullptr;
  const int32_t* seg_rows = nullptr;
  const float* values = nullptr;       // fp32: block j's values at values + j * block_rows
  const int8_t* int8_values = nullptr;  // int8: block j's values at int8_values + j * block_cols
  const float* row_scales = nullptr;   // int8: per output row
  const int32_t* row_wsums = nullptr;  // int8: per output row
  const uint16_t* offsets = nullptr;

  int64_t rows_in_block(int64_t rb) const {
    const int64_t begin = rb * row_block;
    return (out_features - begin < row_block) ? out_features - begin : row_block;
  }
  // Segments (row groups) of row block rb in each K-block.
  int64_t segments_in_block(int64_t rb) const { return rows_in_block(rb) / block_rows; }
  // Index of segment s of (row block rb, K-block kb).
  int64_t segment(int64_t rb, int64_t kb, int64_t s) const {
    return (rb * row_block * num_k_blocks) / block_rows + kb * segments_in_block(rb) + s;
  }
  // Stored values of row block rb (its work, zeros inside blocks included).
  int64_t block_nnz(int64_t rb) const {
    const int64_t first = segment(rb, 0, 0);
    const int64_t end = first + segments_in_block(rb) * num_k_blocks;
    const int64_t count = int64_t{clamp_index(seg_ptr[end], blocks)} - clamp_index(seg_ptr[first], blocks);
    return (count > 0 ? count : 0) * block_rows * block_cols;
  }
  // Rows an activation panel for this weight must have, for the panel kernels or the
  // GEMV kernels (gemv): the kernels may read them all. K-block kb's offsets reach row
  // kb * k_block + offset_mask once masked, kb * k_block + 65535 unmasked. Rows past
  // in_features are read only for a corrupted buffer; their contents do not matter.
  // For an int8 buffer a multiple of 4: whole quads (QuantizedPanel).
  int64_t panel_rows(bool gemv) const {
    return (num_k_blocks - 1) * k_block + (gemv ? kMaxKBlock : offset_mask + 1);
  }
};

// How pack_linear packs a weight: block sizes, block shape and datatype.
struct PackOptions {
  // <= 0: one K-block over all inputs (at most kMaxKBlock features: wider inputs get
  // K-blocks of kMaxKBlock). int8: a multiple of kWideBlockCols once clamped to the
  // inputs (one K-block over 5 inputs has k_block 8).
  int64_t k_block = 0;
  int64_t row_block = 1;
  int64_t block_rows = 1;  // 1 or kTallBlockRows (fp32 only); divides out_features and row_block
  int64_t block_cols = 1;  // 1 or kWideBlockCols (int8 only)
  Datatype datatype = Datatype::kF32;
};

// Packs a dense row-major [out_features, in_features] matrix (row stride `row_stride`
// floats). The options must be valid (the ops check them); an int8 weight must be finite.
std::vector<int32_t> pack_linear(const float* weight, int64_t out_features, int64_t in_features,
                                 int64_t row_stride, const PackOptions& options);

// The options a buffer was packed with (its K-block as stored).
PackOptions pack_options_of(const PackedLinearView& w);

// The nonzeros of a row-major [out_features, in_features] matrix, and its nonzero
// kTallBlockRows x 1 blocks (groups of kTallBlockRows consecutive rows sharing a
// feature; the last out_features % kTallBlockRows rows are in none): what the default
// packing choices need (ops.default_block_rows, ops.default_k_block), in one pass.
struct NonzeroCounts {
  int64_t nonzeros = 0;
  int64_t tall_blocks = 0;
};
NonzeroCounts count_nonzeros_f32(const float* weight, int64_t out_features, int64_t in_features,
                                 int64_t row_stride);

// Validates a packed buffer of `words` int32 and returns a view of it. On a
// bad buffer returns false and writes the reason to `error`. The header and sizes
// are always checked (O(1)); with `check_contents` also every segment pointer,
// segment row and offset, and an int8 buffer's values, scales and sums (O(nnz)), so
// that no buffer can make a kernel read out of bounds.
bool view_packed_linear(const int32_t* data, int64_t words, bool check_contents,
                        PackedLinearView* view, std::string* error);

// Starts row block rb's tile [rows_in_block][panel_width] from the bias (zeros when
// bias is null): the first step of the kernels that accumulate in the tile. Defined
// in pack.cpp, compiled for no particular ISA, so every ISA's kernels may call it.
void fill_tile_with_bias(const PackedLinearView& w, int64_t rb, const float* bias,
                         int64_t panel_width, float* tile);

// ---------------------------------------------------------------------------
// Kernels.
// ---------------------------------------------------------------------------
// Activation, the register tiles (kMaxTileVectors, kTallStripVectors,
// kMaxGemvTokens) and the ISAs are listed in lists.h.

// An activation panel holds up to `max_panel_width` tokens of the input,
// feature-major: panel[i * panel_width + t] is feature i of token t.
// panel_width is a multiple of `vector_width`; padding tokens are zero. The kernels
// may read w.panel_rows(gemv) >= in_features rows of it (allocate them; PackedLinearView).
struct SpmmKernels {
  const char* isa;
  int64_t vector_width;     // floats per SIMD register (1 for scalar)
  int64_t max_panel_width;  // tokens per full panel

  // Copies tokens [0, tokens) of x (token stride / feature stride in floats)
  // into a panel of width panel_width, zero-padding tokens >= `tokens`.
  void (*pack_panel)(const float* x, int64_t tokens, int64_t in_features,
                     int64_t token_stride, int64_t feature_stride,
                     int64_t panel_width, float* panel);

  // Accumulates K-blocks [kb_begin, kb_end) of row block rb for one panel into
  // tile [rows_in_block][panel_width]: kb_begin == 0 starts from the bias,
  // kb_end == num_k_blocks finishes with the activation. Calling it K-block by
  // K-block over many row blocks keeps one K-block's activations in L1 while the
  // partial sums of those row blocks wait in L2.
  void (*spmm_row_block)(const PackedLinearView& w, int64_t rb, int64_t kb_begin,
                         int64_t kb_end, const float* panel, int64_t panel_width,
                         const float* bias, Activation act, float* tile);

  // The same for a narrow panel of 1..kMaxGemvTokens tokens (panel_width ==
  // tokens, no padding): batch-1 decoding and other memory-bound cases.
  void (*spmv_row_block)(const PackedLinearView& w, int64_t rb, int64_t kb_begin,
                         int64_t kb_end, const float* panel, int64_t panel_width,
                         const float* bias, Activation act, float* tile);

  // Writes tile [rows][panel_width] transposed: y[t * y_stride + o] =
  // tile[o * panel_width + t] for o < rows, t < tokens.
  void (*unpack_tile)(const float* tile, int64_t rows, int64_t panel_width,
                      int64_t tokens, float* y, int64_t y_stride);

  // One output row of one channel of a dense depthwise convolution (conv_chain's
  // MobileNet layers): out[x] = act(bias + sum_t w[t] * taps[t][x]) for x < count,
  // each of the num_taps taps a run of count floats (the caller points tap (i, j) of a
  // stride-1 kernel at input row i from column j; it splits strided rows into phases).
  void (*depthwise_row)(const float* const* taps, const float* w, int64_t num_taps, float bias,
                        Activation act, int64_t count, float* out);

  // out[i] = act(a[i] + b[i]) for i < count (out may be a): a residual add and the
  // activation after it (conv_chain's identity shortcut).
  void (*residual_row)(const float* a, const float* b, Activation act, int64_t count, float* out);

  // to[i] = from[i * step] for i < count (step >= 1): conv_chain's copies of pixel runs
  // into panels and band images, tens of floats each, too short for memmove's call to
  // pay (step 2: a stride-2 layer's pixels, GCC's vector loop for the ISA).
  void (*copy_row)(const float* from, int64_t step, int64_t count, float* to);

  // to[r * to_pitch + i] = from[r * from_pitch + i * step] for r < rows, i < count:
  // copy_row for several rows in one call (a 7 x 7 image's rows, 7 pixels each, copied
  // into a panel: one call per row cost more than the copy).
  void (*copy_rows)(const float* from, int64_t from_pitch, int64_t step, int64_t count, int64_t rows, float* to,
                    int64_t to_pitch);
};

// The AVX2 panel copies (8x8 transposes, spmm_f32__avx2.cpp), which the AVX-512
// table uses too: every CPU with AVX-512 has AVX2. Signatures as in SpmmKernels.
void pack_panel_avx2(const float* x, int64_t tokens, int64_t in_features, int64_t token_stride,
                     int64_t feature_stride, int64_t panel_width, float* panel);
void unpack_tile_avx2(const float* tile, int64_t rows, int64_t panel_width, int64_t tokens,
                      float* y, int64_t y_stride);

// The scalar panel copies (plain loops, spmm_f32__scalar.cpp), which the portable vec16
// table uses too. Signatures as in SpmmKernels.
void pack_panel_scalar(const float* x, int64_t tokens, int64_t in_features, int64_t token_stride,
                       int64_t feature_stride, int64_t panel_width, float* panel);
void unpack_tile_scalar(const float* tile, int64_t rows, int64_t panel_width, int64_t tokens,
                        float* y, int64_t y_stride);
// The scalar activation `act` of x (lists.h, spmm_f32__scalar.cpp), which the scalar int8
// kernels use too.
float activate_scalar(float x, Activation act);
// The scalar depthwise and residual rows (spmm_f32__scalar.cpp), which the portable vec16
// table uses too. Signatures as in SpmmKernels.
void depthwise_row_scalar(const float* const* taps, const float* w, int64_t num_taps, float bias,
                          Activation act, int64_t count, float* out);
void residual_row_scalar(const float* a, const float* b, Activation act, int64_t count, float* out);
// The scalar copies (spmm_f32__scalar.cpp). Signatures as in SpmmKernels.
void copy_row_scalar(const float* from, int64_t step, int64_t count, float* to);
void copy_rows_scalar(const float* from, int64_t from_pitch, int64_t step, int64_t count, int64_t rows, float* to,
                      int64_t to_pitch);

// ---------------------------------------------------------------------------
// int8 kernels (datatype kInt8; docs/kernels.md#int8-kernels).
// ---------------------------------------------------------------------------
// An int8 buffer's activation panel: each token's activations quantized to 7-bit
// unsigned integers (quantize_token), feature-major in quads of kWideBlockCols features,
// feature 4q + c of token t at quads[(q * panel_width + t) * 4 + c]: one SIMD load of
// 4 * kWidth bytes is 4 features of kWidth tokens, the operand of a 4-way int8 dot product
// per token. Tokens past the real ones and features past in_features are 0 (a padding
// token has scale 0). The kernels may read w.panel_rows(gemv) / 4 quads and, for a
// 1-token GEMV panel, 3 bytes past them (allocate them).
struct QuantizedPanel {
  uint8_t* quads;
  float* scales;         // [panel_width]: each token's scale; NaN for a token with a non-finite value
  int32_t* zero_points;  // [panel_width]: each token's zero point, in [0, 127]
};

// How one token's activations are quantized, the same on every ISA so that every
// kernel computes the same integers: over its range [lo, hi] = [min(min x, 0),
// max(max x, 0)], scale = (hi - lo) / 127, inv_scale = 127 / (hi - lo) (float
// divisions), zero_point = nearbyint(-lo * inv_scale), and each activation becomes
// quantize_activation(x). A token of zeros, or whose range is so small that inv_scale
// overflows, gets scale 0 (it contributes nothing); a token with a NaN or an infinity, or
// whose range overflows, gets scale NaN (its outputs are NaN).
struct TokenQuantization {
  float scale;
  float inv_scale;
  int32_t zero_point;
};
TokenQuantization quantize_token(float lowest, float highest, bool finite);

// clamp(nearbyint(x * inv_scale) + zero_point, 0, 127) in float (round half to even, a
// NaN clamped to 0): exactly what the SIMD quantizers compute lane by lane (their max
// returns the second operand on NaN, as `v > 0 ? v : 0` does).
inline float quantize_activation(float x, float inv_scale, float zero_point) {
  float v = __builtin_nearbyintf(x * inv_scale) + zero_point;
  v = v > 0.0f ? v : 0.0f;
  return v < 127.0f ? v : 127.0f;
}

// The int8 kernels of one ISA. Partial sums cross K-blocks as int32 in the float tile
// [rows_in_block][panel_width] (the same bytes); after the last K-block the kernel writes
// there, as floats, y = fma(row_scale * token_scale, float(acc - zero_point * row_wsum),
// bias) and then the activation (docs/kernels.md#int8-kernels).
struct Qd8Kernels {
  const char* isa;          // the name in its kernel names
  int64_t vector_width;     // tokens per SIMD register (1 for scalar)
  int64_t max_panel_width;  // tokens per full panel

  // Quantizes tokens [0, tokens) of x (token stride / feature stride in floats) into a
  // panel of width panel_width (QuantizedPanel), zero-padding tokens >= `tokens` and the
  // last quad's features >= in_features.
  void (*quantize_panel)(const float* x, int64_t tokens, int64_t in_features, int64_t token_stride,
                         int64_t feature_stride, int64_t panel_width, const QuantizedPanel& panel);

  // As SpmmKernels::spmm_row_block, over a quantized panel.
  void (*spmm_row_block)(const PackedLinearView& w, int64_t rb, int64_t kb_begin, int64_t kb_end,
                         const QuantizedPanel& panel, int64_t panel_width, const float* bias, Activation act,
                         float* tile);

  // The same for a narrow panel of 1..kMaxGemvTokens tokens (panel_width == tokens).
  void (*spmv_row_block)(const PackedLinearView& w, int64_t rb, int64_t kb_begin, int64_t kb_end,
                         const QuantizedPanel& panel, int64_t panel_width, const float* bias, Activation act,
                         float* tile);

  // As SpmmKernels::unpack_tile.
  void (*unpack_tile)(const float* tile, int64_t rows, int64_t panel_width, int64_t tokens, float* y,
                      int64_t y_stride);
};

// The scalar quantizer (any strides, spmm_qd8__scalar.cpp) and the AVX2 one
// (spmm_qd8__avx2.cpp), which the AVX-512 VNNI table uses too. Signatures as in Qd8Kernels.
void quantize_panel_scalar(const float* x, int64_t tokens, int64_t in_features, int64_t token_stride,
                           int64_t feature_stride, int64_t panel_width, const QuantizedPanel& panel);
void quantize_panel_avx2(const float* x, int64_t tokens, int64_t in_features, int64_t token_stride,
                         int64_t feature_stride, int64_t panel_width, const QuantizedPanel& panel);

// int8 kernel tables (spmm_qd8__<isa>.cpp), named by lists.h's ISA list.
extern const Qd8Kernels kQd8Scalar;
extern const Qd8Kernels kQd8Avx2;
extern const Qd8Kernels kQd8Avx512Vnni;

// fp32 kernel tables, one per ISA of lists.h (defined in spmm_f32__<isa>.cpp).
#define SPARSECPU_DECLARE_TABLE(name, f32_table, int8_table, cpu_has, may_default) \
  extern const SpmmKernels f32_table;
SPARSECPU_FOR_EACH_ISA(SPARSECPU_DECLARE_TABLE)
#undef SPARSECPU_DECLARE_TABLE

// Names of the register tiles an ISA's kernels instantiate for one datatype, e.g.
// "spmm_f32_1x64__avx2": 1 output row x 64 tokens; "spmm_qd8_f32_qc8w_1x4x64__avx2":
// int8, 1 x 4 blocks, 64 tokens. Empty for an unknown ISA.
std::vector<std::string> spmm_kernel_names(const std::string& isa, Datatype datatype);

// The fp32 table of the ISA named `isa` (lists.h), or null.
const SpmmKernels* kernels_named(const std::string& isa);
// Its int8 table on this CPU, or null.
const Qd8Kernels* qd8_kernels_named(const std::string& isa);

// "a, b, c": a list's names for an error message.
std::string joined(const char* const* names, size_t count);

// Run-time ISA choice: the best the CPU supports (the last of lists.h's ISAs that may be
// the default), unless TORCH_SPARSECPU_ISA (any name of lists.h's ISAs) or set_isa()
// forces one.
bool cpu_supports(const std::string& isa);
std::vector<std::string> available_isas();
const SpmmKernels& active_kernels();
const Qd8Kernels& active_qd8_kernels();
// The name of the active ISA.
const char* active_isa();
// Returns false (and changes nothing) if the name is unknown or unsupported.
bool set_isa(const std::string& isa, std::string* error);

}  // namespace kernels
}  // namespace sparsecpu
