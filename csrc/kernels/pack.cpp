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
                                     int64_t row_block) {
  if (k_block <= 0 || k_block > in_features) k_block = in_features > 0 ? in_features : 1;
  k_block = std::min(k_block, kMaxKBlock);
  if (row_block <= 0) row_block = 1;
  const int64_t num_k_blocks = in_features > 0 ? ceil_div(in_features, k_block) : 1;
  const int64_t num_row_blocks = ceil_div(out_features, row_block);

  int64_t nnz = 0;
  for (int64_t o = 0; o < out_features; ++o) {
    for (int64_t i = 0; i < in_features; ++i) nnz += weight[o * row_stride + i] != 0.0f;
  }
  const int64_t segments = out_features * num_k_blocks;
  std::vector<int32_t> packed(kHeaderWords + 2 * segments + 1 + nnz + (nnz + 1) / 2, 0);
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

  int32_t* seg_ptr = header + kHeaderWords;
  int32_t* seg_rows = seg_ptr + segments + 1;
  int32_t* values = seg_rows + segments;
  uint16_t* offsets = reinterpret_cast<uint16_t*>(values + nnz);
  int64_t segment = 0;
  int32_t next = 0;
  for (int64_t rb = 0; rb < num_row_blocks; ++rb) {
    const int64_t row_begin = rb * row_block;
    const int64_t row_end = std::min(row_begin + row_block, out_features);
    for (int64_t kb = 0; kb < num_k_blocks; ++kb) {
      const int64_t col_begin = kb * k_block;
      const int64_t col_end = std::min(col_begin + k_block, in_features);
      // Segments of this (row block, K-block) in order of length (stable).
      std::vector<int64_t> order(row_end - row_begin), length(row_end - row_begin, 0);
      std::iota(order.begin(), order.end(), int64_t{0});
      for (int64_t r = 0; r < row_end - row_begin; ++r) {
        for (int64_t i = col_begin; i < col_end; ++i) length[r] += weight[(row_begin + r) * row_stride + i] != 0.0f;
      }
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return length[a] < length[b]; });
      for (int64_t r : order) {
        seg_rows[segment] = static_cast<int32_t>(r);
        seg_ptr[segment++] = next;
        for (int64_t i = col_begin; i < col_end; ++i) {
          const float v = weight[(row_begin + r) * row_stride + i];
          if (v == 0.0f) continue;
          std::memcpy(&values[next], &v, sizeof(float));
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
  const bool dims_ok = v.out_features >= 0 && v.in_features >= 0 && v.k_block > 0 &&
                       v.row_block > 0 && v.nnz >= 0 &&
                       v.num_row_blocks == ceil_div(v.out_features, v.row_block) &&
                       v.num_k_blocks == (v.in_features > 0 ? ceil_div(v.in_features, v.k_block) : 1);
  const int64_t segments = v.out_features * v.num_k_blocks;
  if (!dims_ok || v.k_block > kMaxKBlock || words != kHeaderWords + 2 * segments + 1 + v.nnz + (v.nnz + 1) / 2) {
    *error = "inconsistent header or buffer size";
    return false;
  }
  v.seg_ptr = data + kHeaderWords;
  if (v.seg_ptr[0] != 0 || v.seg_ptr[segments] != v.nnz) {
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
      for (int64_t s = v.segment(rb, 0, 0); s < v.segment(rb, 0, 0) + rows * v.num_k_blocks; ++s) {
        if (v.seg_rows[s] < 0 || v.seg_rows[s] >= rows) {
          *error = "segment " + std::to_string(s) + " names row " + std::to_string(v.seg_rows[s]) +
                   " outside its block of " + std::to_string(rows) + " rows";
          return false;
        }
      }
    }
    for (int64_t rb = 0; rb < v.num_row_blocks; ++rb) {  // offsets inside their K-block
      for (int64_t kb = 0; kb < v.num_k_blocks; ++kb) {
        const int64_t limit = std::min(v.k_block, v.in_features - kb * v.k_block);
        const int64_t first = v.segment(rb, kb, 0), last = first + v.rows_in_block(rb);
        for (int64_t j = v.seg_ptr[first]; j < v.seg_ptr[last]; ++j) {
          if (v.offsets[j] >= limit) {
            *error = "offset of nonzero " + std::to_string(j) + " outside its K-block";
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
