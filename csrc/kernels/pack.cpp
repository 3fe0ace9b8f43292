// Packing a dense weight into the offset-CSR, CSR-blocked layout of spmm.h.
#include <algorithm>
#include <cstring>
#include <numeric>

#include "spmm.h"

namespace sparsecpu {
namespace kernels {

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A block (row group g, feature i) of BlockRows rows is stored when any of its
// values is nonzero. Two passes over the weight, both without branches on the
// values (random zeros would mispredict about every other element): one counts each
// segment's blocks, one writes them in segment order, each block at the next free
// slot and the slot kept only when the block is nonzero.
template <int64_t BlockRows>
std::vector<int32_t> pack_with_block_rows(const float* weight, int64_t out_features, int64_t in_features,
                                          int64_t row_stride, int64_t k_block, int64_t row_block) {
  const int64_t num_k_blocks = in_features > 0 ? ceil_div(in_features, k_block) : 1;
  const int64_t num_row_blocks = ceil_div(out_features, row_block);
  const int64_t num_groups = out_features / BlockRows;
  const auto block_is_nonzero = [&](int64_t g, int64_t i) {
    bool nonzero = false;
    for (int64_t m = 0; m < BlockRows; ++m) nonzero |= weight[(g * BlockRows + m) * row_stride + i] != 0.0f;
    return nonzero;
  };

  // length[g * num_k_blocks + kb]: nonzero blocks of group g in K-block kb.
  std::vector<int32_t> length(static_cast<size_t>(num_groups * num_k_blocks), 0);
  int64_t blocks = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    for (int64_t kb = 0; kb < num_k_blocks; ++kb) {
      int32_t count = 0;
      for (int64_t i = kb * k_block; i < std::min((kb + 1) * k_block, in_features); ++i) {
        count += block_is_nonzero(g, i);
      }
      length[g * num_k_blocks + kb] = count;
      blocks += count;
    }
  }
  const int64_t nnz = blocks * BlockRows;
  const int64_t segments = num_groups * num_k_blocks;
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
  header[kBlockRows] = static_cast<int32_t>(BlockRows);

  int32_t* seg_ptr = header + kHeaderWords;
  int32_t* seg_rows = seg_ptr + segments + 1;
  // Written one slot past the last block (a zero block's values and offset land in
  // the slot the next block overwrites), then copied into the buffer.
  std::vector<float> values(static_cast<size_t>((blocks + 1) * BlockRows));
  std::vector<uint16_t> offsets(static_cast<size_t>(blocks + 1));
  int64_t segment = 0;
  int64_t next = 0;  // next block
  std::vector<int64_t> order;
  for (int64_t rb = 0; rb < num_row_blocks; ++rb) {
    const int64_t first_group = rb * row_block / BlockRows;
    const int64_t groups = (std::min(out_features, (rb + 1) * row_block) - rb * row_block) / BlockRows;
    for (int64_t kb = 0; kb < num_k_blocks; ++kb) {
      const int64_t col_begin = kb * k_block;
      const int64_t col_end = std::min(col_begin + k_block, in_features);
      // Segments of this (row block, K-block) in order of length (stable).
      order.resize(groups);
      std::iota(order.begin(), order.end(), int64_t{0});
      const auto length_of = [&](int64_t g) { return length[(first_group + g) * num_k_blocks + kb]; };
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return length_of(a) < length_of(b); });
      for (int64_t g : order) {
        seg_rows[segment] = static_cast<int32_t>(g * BlockRows);
        seg_ptr[segment++] = static_cast<int32_t>(next);
        const float* rows = weight + (first_group + g) * BlockRows * row_stride;
        for (int64_t i = col_begin; i < col_end; ++i) {
          bool nonzero = false;
          for (int64_t m = 0; m < BlockRows; ++m) {
            const float v = rows[m * row_stride + i];
            values[next * BlockRows + m] = v;
            nonzero |= v != 0.0f;
          }
          offsets[next] = static_cast<uint16_t>(i - col_begin);
          next += nonzero;
        }
      }
    }
  }
  seg_ptr[segment] = static_cast<int32_t>(next);
  std::memcpy(seg_rows + segments, values.data(), static_cast<size_t>(nnz) * sizeof(float));
  std::memcpy(seg_rows + segments + nnz, offsets.data(), static_cast<size_t>(blocks) * sizeof(uint16_t));
  return packed;
}

}  // namespace

std::vector<int32_t> pack_linear_f32(const float* weight, int64_t out_features,
                                     int64_t in_features, int64_t row_stride, int64_t k_block,
                                     int64_t row_block, int64_t block_rows) {
  if (k_block <= 0 || k_block > in_features) k_block = in_features > 0 ? in_features : 1;
  k_block = std::min(k_block, kMaxKBlock);
  if (row_block <= 0) row_block = 1;
  return block_rows == kTallBlockRows
             ? pack_with_block_rows<kTallBlockRows>(weight, out_features, in_features, row_stride, k_block, row_block)
             : pack_with_block_rows<1>(weight, out_features, in_features, row_stride, k_block, row_block);
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
