// Packing a dense weight into the offset-CSR, CSR-blocked layout of spmm.h.
#include <algorithm>
#include <cstring>
#include <numeric>

#include "spmm.h"

namespace sparsecpu {
namespace kernels {

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

std::vector<int32_t> pack_linear_f32(const float* weight, int64_t out_features,
                                     int64_t in_features, int64_t row_stride, int64_t k_block,
                                     int64_t row_block, int64_t block_rows) {
  if (k_block <= 0 || k_block > in_features) k_block = in_features > 0 ? in_features : 1;
  k_block = std::min(k_block, kMaxKBlock);
  if (row_block <= 0) row_block = 1;
  const int64_t num_k_blocks = in_features > 0 ? ceil_div(in_features, k_block) : 1;
  const int64_t num_row_blocks = ceil_div(out_features, row_block);
  const auto at = [&](int64_t row, int64_t feature) { return weight[row * row_stride + feature]; };
  // A block (row group g, feature i) is stored when any of its block_rows values is nonzero.
  const auto block_is_nonzero = [&](int64_t g, int64_t i) {
    for (int64_t m = 0; m < block_rows; ++m) {
      if (at(g * block_rows + m, i) != 0.0f) return true;
    }
    return false;
  };

  int64_t blocks = 0;
  for (int64_t g = 0; g < out_features / block_rows; ++g) {
    for (int64_t i = 0; i < in_features; ++i) blocks += block_is_nonzero(g, i);
  }
  const int64_t nnz = blocks * block_rows;
  const int64_t segments = out_features / block_rows * num_k_blocks;
  std::vector<int32_t> packed(kHeaderWords + 2 * segments + 1 + nnz + (blocks + 1) / 2, 0);
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

  int32_t* seg_ptr = header + kHeaderWords;
  int32_t* seg_rows = seg_ptr + segments + 1;
  int32_t* values = seg_rows + segments;  // float bit patterns
  uint16_t* offsets = reinterpret_cast<uint16_t*>(seg_rows + segments + nnz);
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
        for (int64_t i = col_begin; i < col_end; ++i) length[g] += block_is_nonzero(first_group + g, i);
      }
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return length[a] < length[b]; });
      for (int64_t g : order) {
        seg_rows[segment] = static_cast<int32_t>(g * block_rows);
        seg_ptr[segment++] = next;
        for (int64_t i = col_begin; i < col_end; ++i) {
          if (!block_is_nonzero(first_group + g, i)) continue;
          for (int64_t m = 0; m < block_rows; ++m) {
            const float v = at((first_group + g) * block_rows + m, i);
            std::memcpy(&values[next * block_rows + m], &v, sizeof(float));
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
  const bool blocks_ok = (v.block_rows == 1 || v.block_rows == kTallBlockRows) && v.row_block > 0 &&
                         v.out_features % v.block_rows == 0 && v.row_block % v.block_rows == 0 &&
                         v.nnz % v.block_rows == 0;
  const bool dims_ok = blocks_ok && v.out_features >= 0 && v.in_features >= 0 && v.k_block > 0 &&
                       v.nnz >= 0 && v.num_row_blocks == ceil_div(v.out_features, v.row_block) &&
                       v.num_k_blocks == (v.in_features > 0 ? ceil_div(v.in_features, v.k_block) : 1);
  const int64_t segments = dims_ok ? v.out_features / v.block_rows * v.num_k_blocks : 0;
  const int64_t blocks = dims_ok ? v.nnz / v.block_rows : 0;
  if (!dims_ok || v.k_block > kMaxKBlock || words != kHeaderWords + 2 * segments + 1 + v.nnz + (blocks + 1) / 2) {
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
  v.values = reinterpret_cast<const float*>(v.seg_rows + segments);
  v.offsets = reinterpret_cast<const uint16_t*>(v.seg_rows + segments + v.nnz);
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
    for (int64_t rb = 0; rb < v.num_row_blocks; ++rb) {  // offsets inside their K-block
      for (int64_t kb = 0; kb < v.num_k_blocks; ++kb) {
        const int64_t limit = std::min(v.k_block, v.in_features - kb * v.k_block);
        const int64_t first = v.segment(rb, kb, 0), last = first + v.segments_in_block(rb);
        for (int64_t j = v.seg_ptr[first]; j < v.seg_ptr[last]; ++j) {
          if (v.offsets[j] >= limit) {
            *error = "offset of nonzero block " + std::to_string(j) + " outside its K-block";
            return false;
          }
        }
      }
    }
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

}  // namespace kernels
}  // namespace sparsecpu
