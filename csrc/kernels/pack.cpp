// Packing a dense weight into the offset-CSR, CSR-blocked layout of spmm.h (fp32 or
// int8), validating a packed buffer, and the per-token quantization of the int8 kernels.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "spmm.h"

namespace sparsecpu {
namespace kernels {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Words of each section after the header and the segments: the values (and an int8
// buffer's scales and sums) and the offsets.
int64_t value_words(Datatype datatype, int64_t out_features, int64_t nnz) {
  return datatype == Datatype::kInt8 ? 2 * out_features + ceil_div(nnz, 4) : nnz;
}
int64_t buffer_words(Datatype datatype, int64_t out_features, int64_t segments, int64_t nnz, int64_t blocks) {
  return kHeaderWords + 2 * segments + 1 + value_words(datatype, out_features, nnz) + ceil_div(blocks, 2);
}

// The per-row symmetric int8 quantization of docs/packed_format.md: scale max|w| / 127
// (0 for a row of zeros) and the reciprocal the values are multiplied by.
struct RowQuantization {
  float scale;
  float inv_scale;
};
RowQuantization quantize_row(const float* row, int64_t in_features) {
  float largest = 0.0f;
  for (int64_t i = 0; i < in_features; ++i) largest = std::max(largest, std::fabs(row[i]));
  if (largest == 0.0f) return {0.0f, 0.0f};
  return {largest / 127.0f, 127.0f / largest};
}
int8_t quantize_weight(float w, float inv_scale) {
  const float q = std::nearbyint(w * inv_scale);
  return static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
}

}  // namespace

std::vector<int32_t> pack_linear(const float* weight, int64_t out_features, int64_t in_features,
                                 int64_t row_stride, const PackOptions& options) {
  const bool int8 = options.datatype == Datatype::kInt8;
  const int64_t block_rows = options.block_rows, block_cols = options.block_cols;
  int64_t k_block = options.k_block;
  if (k_block <= 0 || k_block > in_features) k_block = in_features > 0 ? in_features : 1;
  k_block = std::min(k_block, kMaxKBlock);
  if (int8) k_block = ceil_div(k_block, kWideBlockCols) * kWideBlockCols;  // whole quads
  const int64_t row_block = options.row_block > 0 ? options.row_block : 1;
  const int64_t num_k_blocks = in_features > 0 ? ceil_div(in_features, k_block) : 1;
  const int64_t num_row_blocks = ceil_div(out_features, row_block);
  const auto at = [&](int64_t row, int64_t feature) {
    return feature < in_features ? weight[row * row_stride + feature] : 0.0f;
  };
  // A block (row group g, features from i) is stored when any of its values is nonzero.
  const auto block_is_nonzero = [&](int64_t g, int64_t i) {
    for (int64_t m = 0; m < block_rows; ++m) {
      for (int64_t c = 0; c < block_cols; ++c) {
        if (at(g * block_rows + m, i + c) != 0.0f) return true;
      }
    }
    return false;
  };

  int64_t blocks = 0;
  for (int64_t g = 0; g < out_features / block_rows; ++g) {
    for (int64_t i = 0; i < in_features; i += block_cols) blocks += block_is_nonzero(g, i);
  }
  const int64_t nnz = blocks * block_rows * block_cols;
  const int64_t segments = out_features / block_rows * num_k_blocks;
  std::vector<int32_t> packed(buffer_words(options.datatype, out_features, segments, nnz, blocks), 0);
  int32_t* header = packed.data();
  header[kMagic] = kPackedMagic;
  header[kVersion] = kPackedVersion;
  header[kOutFeatures] = static_cast<int32_t>(out_features);
  header[kInFeatures] = static_cast<int32_t>(in_features);
  header[kKBlock] = static_cast<int32_t>(k_block);
  header[kNumKBlocks] = static_cast<int32_t>(num_k_blocks);
  header[kRowBlock] = static_cast<int32_t>(row_block);
  header[kNumRowBlocks] = static_cast<int32_t>(num_row_blocks);
  header[kNnz] = static_cast<int32_t>(nnz);
  header[kBlockRows] = static_cast<int32_t>(block_rows);
  header[kDatatype] = static_cast<int32_t>(options.datatype);
  header[kBlockCols] = static_cast<int32_t>(block_cols);

  int32_t* seg_ptr = header + kHeaderWords;
  int32_t* seg_rows = seg_ptr + segments + 1;
  int32_t* values = seg_rows + segments;  // fp32: float bit patterns
  float* row_scales = reinterpret_cast<float*>(values);
  int32_t* row_wsums = values + out_features;
  int8_t* int8_values = reinterpret_cast<int8_t*>(values + 2 * out_features);
  uint16_t* offsets = reinterpret_cast<uint16_t*>(values + value_words(options.datatype, out_features, nnz));
  std::vector<RowQuantization> rows(int8 ? out_features : 0);
  for (int64_t r = 0; r < static_cast<int64_t>(rows.size()); ++r) {
    rows[r] = quantize_row(weight + r * row_stride, in_features);
    row_scales[r] = rows[r].scale;
  }
  int64_t segment = 0;
  int32_t next = 0;  // next block
  for (int64_t rb = 0; rb < num_row_blocks; ++rb) {
    const int64_t first_group = rb * row_block / block_rows;
    const int64_t groups = (std::min(out_features, (rb + 1) * row_block) - rb * row_block) / block_rows;
    for (int64_t kb = 0; kb < num_k_blocks; ++kb) {
      const int64_t col_begin = kb * k_block;
      const int64_t col_end = std::min(col_begin + k_block, in_features);
      // Segments of this (row block, K-block) in order of length (stable).
      std::vector<int64_t> order(groups), length(groups, 0);
      std::iota(order.begin(), order.end(), int64_t{0});
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t i = col_begin; i < col_end; i += block_cols) length[g] += block_is_nonzero(first_group + g, i);
      }
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return length[a] < length[b]; });
      for (int64_t g : order) {
        seg_rows[segment] = static_cast<int32_t>(g * block_rows);
        seg_ptr[segment++] = next;
        for (int64_t i = col_begin; i < col_end; i += block_cols) {
          if (!block_is_nonzero(first_group + g, i)) continue;
          for (int64_t m = 0; m < block_rows; ++m) {
            const int64_t row = (first_group + g) * block_rows + m;
            for (int64_t c = 0; c < block_cols; ++c) {
              const float v = at(row, i + c);
              const int64_t index = (next * block_rows + m) * block_cols + c;
              if (int8) {
                int8_values[index] = quantize_weight(v, rows[row].inv_scale);
                row_wsums[row] += int8_values[index];
              } else {
                std::memcpy(&values[index], &v, sizeof(float));
              }
            }
          }
          offsets[next] = static_cast<uint16_t>(i - col_begin);
          ++next;
        }
      }
    }
  }
  seg_ptr[segment] = next;
  return packed;
}

PackOptions pack_options_of(const PackedLinearView& w) {
  PackOptions options;
  options.k_block = w.k_block;
  options.row_block = w.row_block;
  options.block_rows = w.block_rows;
  options.block_cols = w.block_cols;
  options.datatype = w.datatype;
  return options;
}

NonzeroCounts count_nonzeros_f32(const float* weight, int64_t out_features, int64_t in_features,
                                 int64_t row_stride) {
  NonzeroCounts counts;
  for (int64_t g = 0; g < out_features / kTallBlockRows; ++g) {
    for (int64_t i = 0; i < in_features; ++i) {
      int64_t in_block = 0;
      for (int64_t m = 0; m < kTallBlockRows; ++m) in_block += weight[(g * kTallBlockRows + m) * row_stride + i] != 0.0f;
      counts.nonzeros += in_block;
      counts.tall_blocks += in_block != 0;
    }
  }
  for (int64_t row = out_features / kTallBlockRows * kTallBlockRows; row < out_features; ++row) {
    for (int64_t i = 0; i < in_features; ++i) counts.nonzeros += weight[row * row_stride + i] != 0.0f;
  }
  return counts;
}

namespace {

// An int8 buffer's values in [-127, 127], its scales finite and >= 0, and each row's sum
// that of its values (rows found through the segments, which were checked before).
bool int8_contents_ok(const PackedLinearView& v, std::string* error) {
  for (int64_t j = 0; j < v.nnz; ++j) {
    if (v.int8_values[j] == -128) {
      *error = "int8 value " + std::to_string(j) + " is -128, outside [-127, 127]";
      return false;
    }
  }
  std::vector<int64_t> sums(v.out_features, 0);
  for (int64_t rb = 0; rb < v.num_row_blocks; ++rb) {
    const int64_t first = v.segment(rb, 0, 0);
    for (int64_t s = first; s < first + v.segments_in_block(rb) * v.num_k_blocks; ++s) {
      for (int64_t j = v.seg_ptr[s] * v.block_cols; j < v.seg_ptr[s + 1] * v.block_cols; ++j) {
        sums[rb * v.row_block + v.seg_rows[s]] += v.int8_values[j];
      }
    }
  }
  for (int64_t r = 0; r < v.out_features; ++r) {
    if (!(v.row_scales[r] >= 0.0f && v.row_scales[r] <= std::numeric_limits<float>::max()) ||
        sums[r] != v.row_wsums[r]) {
      *error = "row " + std::to_string(r) + "'s int8 scale or sum of values is wrong";
      return false;
    }
  }
  return true;
}

}  // namespace

bool view_packed_linear(const int32_t* data, int64_t words, bool check_contents,
                        PackedLinearView* view, std::string* error) {
  if (words < kHeaderWords) {
    *error = "buffer shorter than the header";
    return false;
  }
  if (data[kMagic] != kPackedMagic) {
    *error = "bad magic number (not a sparsecpu packed linear weight)";
    return false;
  }
  if (data[kVersion] != kPackedVersion) {
    *error = "format version " + std::to_string(data[kVersion]) + ", this build reads version " +
             std::to_string(kPackedVersion) + "; repack the weight";
    return false;
  }
  PackedLinearView v;
  v.out_features = data[kOutFeatures];
  v.in_features = data[kInFeatures];
  v.k_block = data[kKBlock];
  v.num_k_blocks = data[kNumKBlocks];
  v.row_block = data[kRowBlock];
  v.num_row_blocks = data[kNumRowBlocks];
  v.nnz = data[kNnz];
  v.block_rows = data[kBlockRows];
  v.block_cols = data[kBlockCols];
  const int32_t datatype = data[kDatatype];
  const bool int8 = datatype == static_cast<int32_t>(Datatype::kInt8);
  v.datatype = int8 ? Datatype::kInt8 : Datatype::kF32;
  // fp32: R x 1 blocks, R in {1, 4}; int8: 1 x C blocks, C in {1, 4}, K-blocks of whole quads.
  const bool shape_ok = int8 ? v.block_rows == 1 && (v.block_cols == 1 || v.block_cols == kWideBlockCols) &&
                                   v.k_block % kWideBlockCols == 0 && v.in_features <= kMaxInt8InFeatures
                             : datatype == static_cast<int32_t>(Datatype::kF32) && v.block_cols == 1 &&
                                   (v.block_rows == 1 || v.block_rows == kTallBlockRows);
  const int64_t block_size = v.block_rows * v.block_cols;
  const bool blocks_ok = shape_ok && v.row_block > 0 && v.out_features % v.block_rows == 0 &&
                         v.row_block % v.block_rows == 0 && v.nnz % block_size == 0;
  const bool dims_ok = blocks_ok && v.out_features >= 0 && v.in_features >= 0 && v.k_block > 0 &&
                       v.nnz >= 0 && v.num_row_blocks == ceil_div(v.out_features, v.row_block) &&
                       v.num_k_blocks == (v.in_features > 0 ? ceil_div(v.in_features, v.k_block) : 1);
  const int64_t segments = dims_ok ? v.out_features / v.block_rows * v.num_k_blocks : 0;
  const int64_t blocks = dims_ok ? v.nnz / block_size : 0;
  if (!dims_ok || v.k_block > kMaxKBlock ||
      words != buffer_words(v.datatype, v.out_features, segments, v.nnz, blocks)) {
    *error = "inconsistent header or buffer size";
    return false;
  }
  v.blocks = static_cast<int32_t>(blocks);
  v.offset_mask = 0;
  while (v.offset_mask + 1 < v.k_block) v.offset_mask = v.offset_mask * 2 + 1;
  v.seg_ptr = data + kHeaderWords;
  if (v.seg_ptr[0] != 0 || v.seg_ptr[segments] != blocks) {
    *error = "segment pointers do not cover the nonzeros";
    return false;
  }
  v.seg_rows = v.seg_ptr + segments + 1;
  const int32_t* values = v.seg_rows + segments;
  if (int8) {
    v.row_scales = reinterpret_cast<const float*>(values);
    v.row_wsums = values + v.out_features;
    v.int8_values = reinterpret_cast<const int8_t*>(values + 2 * v.out_features);
  } else {
    v.values = reinterpret_cast<const float*>(values);
  }
  v.offsets = reinterpret_cast<const uint16_t*>(values + value_words(v.datatype, v.out_features, v.nnz));
  if (check_contents) {
    for (int64_t s = 0; s < segments; ++s) {
      if (v.seg_ptr[s + 1] < v.seg_ptr[s]) {
        *error = "segment pointers are not ascending at segment " + std::to_string(s);
        return false;
      }
    }
    for (int64_t rb = 0; rb < v.num_row_blocks; ++rb) {
      const int64_t rows = v.rows_in_block(rb);
      const int64_t first = v.segment(rb, 0, 0);
      for (int64_t s = first; s < first + v.segments_in_block(rb) * v.num_k_blocks; ++s) {
        if (v.seg_rows[s] < 0 || v.seg_rows[s] >= rows || v.seg_rows[s] % v.block_rows != 0) {
          *error = "segment " + std::to_string(s) + " names row " + std::to_string(v.seg_rows[s]) +
                   " outside its block of " + std::to_string(rows) + " rows or off its row group";
          return false;
        }
      }
    }
    for (int64_t rb = 0; rb < v.num_row_blocks; ++rb) {  // offsets inside their K-block, on a block boundary
      for (int64_t kb = 0; kb < v.num_k_blocks; ++kb) {
        const int64_t limit = std::min(v.k_block, v.in_features - kb * v.k_block);
        const int64_t first = v.segment(rb, kb, 0), last = first + v.segments_in_block(rb);
        for (int64_t j = v.seg_ptr[first]; j < v.seg_ptr[last]; ++j) {
          if (v.offsets[j] >= limit || v.offsets[j] % v.block_cols != 0) {
            *error = "offset of nonzero block " + std::to_string(j) + " outside its K-block or off its block";
            return false;
          }
        }
      }
    }
    if (int8 && !int8_contents_ok(v, error)) return false;
  }
  *view = v;
  return true;
}

void fill_tile_with_bias(const PackedLinearView& w, int64_t rb, const float* bias,
                         int64_t panel_width, float* tile) {
  const int64_t rows = w.rows_in_block(rb);
  for (int64_t r = 0; r < rows; ++r) {
    const float value = bias != nullptr ? bias[rb * w.row_block + r] : 0.0f;
    for (int64_t t = 0; t < panel_width; ++t) tile[r * panel_width + t] = value;
  }
}

TokenQuantization quantize_token(float lowest, float highest, bool finite) {
  lowest = std::min(lowest, 0.0f);
  highest = std::max(highest, 0.0f);
  const float range = highest - lowest;
  if (!finite || !(range <= std::numeric_limits<float>::max())) {
    return {std::numeric_limits<float>::quiet_NaN(), 0.0f, 0};
  }
  const float inv_scale = 127.0f / range;  // inf for a range of 0 (or nearly 0)
  if (!(inv_scale <= std::numeric_limits<float>::max())) return {0.0f, 0.0f, 0};
  const float zero_point = std::min(127.0f, std::nearbyint(-lowest * inv_scale));
  return {range / 127.0f, inv_scale, static_cast<int32_t>(zero_point)};
}

}  // namespace kernels
}  // namespace sparsecpu
