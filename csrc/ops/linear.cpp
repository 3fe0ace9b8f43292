// ATen glue for the sparse linear ops: schemas, argument checks, the split of
// work over threads. No SIMD here: kernels come from kernels::active_kernels().
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

#include "../kernels/spmm.h"
#include "sparse_layer.h"

namespace sparsecpu {
using kernels::Activation;
using kernels::PackedLinearView;

Activation parse_activation(c10::string_view name) {
  for (size_t i = 0; i < kernels::kNumActivations; ++i) {
    if (name == kernels::kActivationNames[i]) return static_cast<Activation>(i);
  }
  TORCH_CHECK_VALUE(false, "sparsecpu: unknown activation '", name, "'; expected one of ",
                    kernels::joined(kernels::kActivationNames, kernels::kNumActivations));
}

namespace {

// Packed buffers whose contents were checked in full, keyed by address and
// identified by size, version counter and a fingerprint of their first and last
// words. The O(nnz) check then runs once per buffer, not once per call; any
// in-place change of the buffer bumps its version and forces a new check.
class CheckedBuffers {
 public:
  bool contains(const at::Tensor& packed) {
    std::lock_guard<std::mutex> guard(mutex_);
    auto it = checked_.find(packed.data_ptr());
    return it != checked_.end() && it->second == identity(packed);
  }
  void insert(const at::Tensor& packed) {
    std::lock_guard<std::mutex> guard(mutex_);
    if (checked_.size() >= 4096) checked_.clear();
    checked_[packed.data_ptr()] = identity(packed);
  }

 private:
  struct Identity {
    int64_t words;
    uint32_t version;
    uint64_t fingerprint;
    bool operator==(const Identity& other) const {
      return words == other.words && version == other.version && fingerprint == other.fingerprint;
    }
  };
  static Identity identity(const at::Tensor& packed) {
    const int32_t* data = packed.data_ptr<int32_t>();
    const int64_t words = packed.numel();
    uint64_t hash = 1469598103934665603ull;  // FNV-1a over the first and last 64 words
    auto mix = [&](int64_t i) { hash = (hash ^ static_cast<uint32_t>(data[i])) * 1099511628211ull; };
    for (int64_t i = 0; i < std::min<int64_t>(words, 64); ++i) mix(i);
    for (int64_t i = std::max<int64_t>(64, words - 64); i < words; ++i) mix(i);
    // Inference tensors carry no version counter (and cannot be edited outside inference mode).
    const uint32_t version =
        packed.is_inference() ? 0 : packed.unsafeGetTensorImpl()->version_counter().current_version();
    return {words, version, hash};
  }
  std::mutex mutex_;
  std::unordered_map<const void*, Identity> checked_;
};

}  // namespace

PackedLinearView checked_view(const at::Tensor& packed) {
  TORCH_CHECK_VALUE(packed.device().is_cpu() && packed.scalar_type() == at::kInt &&
                        packed.dim() == 1 && packed.is_contiguous(),
                    "sparsecpu: packed must be a contiguous 1-D int32 CPU tensor made by "
                    "sparsecpu::pack_linear, got ", packed.scalar_type(), " of shape ",
                    packed.sizes());
  static CheckedBuffers checked;
  const bool check_contents = !checked.contains(packed);
  PackedLinearView view;
  std::string error;
  TORCH_CHECK_VALUE(kernels::view_packed_linear(packed.data_ptr<int32_t>(), packed.numel(),
                                                check_contents, &view, &error),
                    "sparsecpu: packed weight rejected: ", error);
  if (check_contents) checked.insert(packed);
  return view;
}

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row blocks are scheduled in groups whose partial sums (the tile) fit in
// kTileGroupBytes; each group's tile is unpacked while it is still in cache.
// Within a group, a panel that fits in L2 is swept row block by row block (the
// weights then stream in storage order, which the prefetcher follows: it decides
// GEMV speed); a larger panel is swept K-block by K-block over the whole group,
// so each K-block's activations are read from L1 by every row of the group and the
// panel comes from L3 once per group rather than once per row block.
constexpr int64_t kPanelInL2Bytes = 256 * 1024;
constexpr int64_t kTileGroupBytes = 256 * 1024;

bool panel_fits_l2(const PackedLinearView& w, int64_t width) {
  return w.in_features * width * 4 <= kPanelInL2Bytes;
}

// Row blocks per group for a panel of `width` tokens: small groups (the tile near
// L1) when the panel fits in L2 and sweeping it again is cheap.
int64_t row_blocks_per_group(const PackedLinearView& w, int64_t width) {
  const int64_t group_bytes = panel_fits_l2(w, width) ? kTileGroupBytes / 4 : kTileGroupBytes;
  return std::max<int64_t>(1, group_bytes / (w.row_block * width * 4));
}

// Grow-only scratch memory for one call site and thread: a fresh std::vector per
// call would zero it and, past glibc's mmap threshold, page-fault it every time.
// Buffers above kRetainedFloats are released after each use (release_if_large),
// so a thread keeps at most a few of 4 MiB each between calls.
//
// Cache-line aligned: panel and tile rows are whole lines (16 floats per AVX-512
// register, 64 per AVX2 panel), so no vector load splits across two lines. Plain
// `new float[]` returns 16-byte alignment (page + 16 above glibc's mmap threshold),
// which split every other AVX2 load and cost the 1 x 64 kernel ~20%.
class ScratchBuffer {
 public:
  float* get(size_t floats) {
    if (floats > capacity_) {
      data_.reset(static_cast<float*>(::operator new[](floats * sizeof(float), std::align_val_t{kCacheLine})));
      capacity_ = floats;
    }
    return data_.get();
  }
  void release_if_large() {
    if (capacity_ > kRetainedFloats) {
      data_.reset();
      capacity_ = 0;
    }
  }

 private:
  static constexpr size_t kRetainedFloats = size_t{1} << 20;  // 4 MiB
  static constexpr size_t kCacheLine = 64;
  struct AlignedDelete {
    void operator()(float* p) const { ::operator delete[](p, std::align_val_t{kCacheLine}); }
  };
  std::unique_ptr<float[], AlignedDelete> data_;
  size_t capacity_ = 0;
};

// How a layer's tokens are cut into panels for the kernels of one ISA.
struct PanelPlan {
  const kernels::SpmmKernels& k;
  int64_t tokens;
  int64_t max_width;  // tokens per full panel

  int64_t num_panels() const { return ceil_div(tokens, max_width); }
  int64_t tokens_in(int64_t p) const { return std::min(max_width, tokens - p * max_width); }
  // Panels of up to kMaxGemvTokens tokens run the GEMV kernels unpadded; wider
  // panels are padded to whole registers.
  bool is_gemv(int64_t p) const { return k.vector_width > 1 && tokens_in(p) <= kernels::kMaxGemvTokens; }
  int64_t width_of(int64_t p) const {
    return is_gemv(p) ? tokens_in(p) : ceil_div(tokens_in(p), k.vector_width) * k.vector_width;
  }
};

// Panels as wide as possible but equal, in whole registers: 196 tokens (a 14 x 14
// feature map) make 4 panels of 56 rather than 3 of 64 and a 4-token remainder, which
// would run the GEMV kernel over the whole weight for 2% of the tokens.
int64_t balanced_panel_width(const kernels::SpmmKernels& k, int64_t tokens) {
  if (tokens <= k.max_panel_width) return k.max_panel_width;
  const int64_t panels = ceil_div(tokens, k.max_panel_width);
  return ceil_div(ceil_div(tokens, panels), k.vector_width) * k.vector_width;
}

// Runs row blocks [rb_begin, rb_end) of one layer over one panel into `tile`
// (row block rb at tile + (rb - rb_begin) * row_block * width, i.e. the rows of
// the output panel in order), group by group of row_blocks_per_group. For a panel
// larger than L2, `before_k_block(kb)`, when given, runs before each group starts
// on K-block kb (to pack that slice of the panel just in time).
void run_row_blocks(const kernels::SpmmKernels& k, const PackedLinearView& w, int64_t rb_begin,
                    int64_t rb_end, const float* panel, int64_t width, bool gemv, const float* bias,
                    Activation act, float* tile,
                    const std::function<void(int64_t)>& before_k_block = nullptr) {
  const auto row_block_fn = gemv ? k.spmv_row_block : k.spmm_row_block;
  const auto tile_of = [&](int64_t rb) { return tile + (rb - rb_begin) * w.row_block * width; };
  if (panel_fits_l2(w, width)) {
    for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
      row_block_fn(w, rb, 0, w.num_k_blocks, panel, width, bias, act, tile_of(rb));
    }
    return;
  }
  const int64_t group = row_blocks_per_group(w, width);
  for (int64_t g = rb_begin; g < rb_end; g += group) {
    const int64_t g_end = std::min(rb_end, g + group);
    for (int64_t kb = 0; kb < w.num_k_blocks; ++kb) {
      if (before_k_block) before_k_block(kb);
      for (int64_t rb = g; rb < g_end; ++rb) row_block_fn(w, rb, kb, kb + 1, panel, width, bias, act, tile_of(rb));
    }
  }
}

// Tile [rows][width] (tokens [0, tokens) valid) into y laid out as `out`, y pointing
// at the tile's first token and row.
void write_tile(const kernels::SpmmKernels& k, const float* tile, int64_t rows, int64_t width, int64_t tokens,
                float* y, OutputLayout out) {
  if (out.feature_stride == 1) return k.unpack_tile(tile, rows, width, tokens, y, out.token_stride);
  for (int64_t o = 0; o < rows; ++o) std::copy_n(tile + o * width, tokens, y + o * out.feature_stride);
}

}  // namespace

PanelSource strided_source(const float* x, int64_t token_stride, int64_t feature_stride) {
  const kernels::SpmmKernels& k = kernels::active_kernels();
  return [&k, x, token_stride, feature_stride](int64_t first_token, int64_t tokens, int64_t first_feature,
                                               int64_t features, int64_t width, float* rows) {
    k.pack_panel(x + first_token * token_stride + first_feature * feature_stride, tokens, features, token_stride,
                 feature_stride, width, rows);
  };
}

// y[t, o] = act(bias[o] + sum_i W[o, i] x[t, i]) for the `tokens` tokens that `source`
// copies into panels, into a y laid out as `out`.
//
// The tokens are cut into balanced panels; every (panel, row block) pair
// is a work item. Items are split into one contiguous chunk per thread, balanced by
// nonzeros; a chunk runs group by group of row blocks, each group unpacked into y as
// soon as it is done. Each thread packs the panels it uses into its own buffer right
// before using them, so a panel is read from L2, never from L3, and no thread waits
// for another's packing: a panel that fits in L2 whole, when the chunk reaches it; a
// larger one slice by slice, right before each K-block is swept.
void sparse_linear_2d(const PackedLinearView& w, const PanelSource& source, int64_t tokens, const float* bias,
                      Activation act, float* y, OutputLayout out) {
  const kernels::SpmmKernels& k = kernels::active_kernels();
  const PanelPlan plan{k, tokens, balanced_panel_width(k, tokens)};
  const int64_t num_panels = plan.num_panels();
  const int64_t panel_floats = w.in_features * plan.max_width;
  const auto pack_features = [&](int64_t p, int64_t first, int64_t count, float* panel) {
    const int64_t width = plan.width_of(p);
    source(p * plan.max_width, plan.tokens_in(p), first, count, width, panel + first * width);
  };

  const int64_t num_items = num_panels * w.num_row_blocks;
  std::vector<int64_t> cost_prefix(num_items + 1, 0);
  for (int64_t item = 0; item < num_items; ++item) {
    const int64_t p = item / w.num_row_blocks, rb = item % w.num_row_blocks;
    cost_prefix[item + 1] = cost_prefix[item] +
                            plan.width_of(p) * (w.block_nnz(rb) + 2 * w.rows_in_block(rb));
  }
  const int64_t num_chunks = std::min<int64_t>(num_items, at::get_num_threads());
  std::vector<int64_t> chunk_start(num_chunks + 1, num_items);
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t target = cost_prefix[num_items] * c / num_chunks;
    chunk_start[c] = std::lower_bound(cost_prefix.begin(), cost_prefix.end(), target) - cost_prefix.begin();
  }
  chunk_start[0] = 0;

  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    thread_local ScratchBuffer tile_buffer, panel_buffer;
    float* panel = panel_buffer.get(static_cast<size_t>(panel_floats));
    for (int64_t c = begin; c < end; ++c) {
      int64_t packed_panel = -1;  // the panel whole in `panel`, if any
      for (int64_t item = chunk_start[c]; item < chunk_start[c + 1];) {
        // One group: consecutive row blocks of one panel, at most one tile group.
        const int64_t p = item / w.num_row_blocks, rb_begin = item % w.num_row_blocks;
        const int64_t width = plan.width_of(p);
        const int64_t rb_end = std::min({w.num_row_blocks, rb_begin + chunk_start[c + 1] - item,
                                         rb_begin + row_blocks_per_group(w, width)});
        const int64_t first_row = rb_begin * w.row_block;
        const int64_t rows = std::min(w.out_features, rb_end * w.row_block) - first_row;
        float* tile = tile_buffer.get(static_cast<size_t>((rb_end - rb_begin) * w.row_block * width + k.vector_width));
        if (panel_fits_l2(w, width)) {
          if (packed_panel != p) pack_features(p, 0, w.in_features, panel);
          packed_panel = p;
          run_row_blocks(k, w, rb_begin, rb_end, panel, width, plan.is_gemv(p), bias, act, tile);
        } else {
          const auto pack_slice = [&](int64_t kb) {
            const int64_t first = kb * w.k_block;
            pack_features(p, first, std::min(w.k_block, w.in_features - first), panel);
          };
          packed_panel = -1;
          run_row_blocks(k, w, rb_begin, rb_end, panel, width, plan.is_gemv(p), bias, act, tile, pack_slice);
        }
        write_tile(k, tile, rows, width, plan.tokens_in(p),
                   y + p * plan.max_width * out.token_stride + first_row * out.feature_stride, out);
        item += rb_end - rb_begin;
      }
    }
    panel_buffer.release_if_large();
  });
}

namespace {

// A pair of chained layers whose second layer reads a panel larger than L2 but
// writes a tile that fits in one tile group runs as a pipeline (run_layer_pair):
// the intermediate then never makes a round trip through L3.
bool pipelines_into(const PackedLinearView& second, int64_t width, bool gemv) {
  return !gemv && !panel_fits_l2(second, width) &&
         second.num_row_blocks * second.row_block * width * 4 <= kTileGroupBytes;
}

// Layer `first` over `input` into `middle`, group by group; as soon as the rows
// first has finished cover one of `second`'s K-blocks, second runs that K-block
// over all its row blocks into `output` (its whole tile, waiting in L2), reading
// rows of `middle` that were written moments ago and are still in L1/L2.
void run_layer_pair(const kernels::SpmmKernels& k, const PackedLinearView& first,
                    const PackedLinearView& second, const float* input, int64_t width,
                    const float* first_bias, Activation first_act, const float* second_bias,
                    Activation second_act, float* middle, float* output) {
  const int64_t group = row_blocks_per_group(first, width);
  int64_t next_kb = 0;  // second's next K-block to run
  for (int64_t g = 0; g < first.num_row_blocks; g += group) {
    const int64_t g_end = std::min(first.num_row_blocks, g + group);
    run_row_blocks(k, first, g, g_end, input, width, /*gemv=*/false, first_bias, first_act,
                   middle + g * first.row_block * width);
    const int64_t rows_done = std::min(first.out_features, g_end * first.row_block);
    for (; next_kb < second.num_k_blocks &&
           std::min((next_kb + 1) * second.k_block, second.in_features) <= rows_done;
         ++next_kb) {
      for (int64_t rb = 0; rb < second.num_row_blocks; ++rb) {
        k.spmm_row_block(second, rb, next_kb, next_kb + 1, middle, width, second_bias, second_act,
                         output + rb * second.row_block * width);
      }
    }
  }
}

// Tensor columns: every layer of a chain over one panel of tokens before the next
// panel, so intermediate activations never leave the thread's caches as a whole
// tensor and never change layout: a layer's output tile is already the next layer's
// input panel. Threads take whole panels; panels shrink (down to one register) when
// there are fewer panels than threads.
void sparse_linear_chain_2d(const std::vector<PackedLinearView>& layers, const float* x,
                            int64_t tokens, int64_t token_stride, int64_t feature_stride,
                            const std::vector<const float*>& biases,
                            const std::vector<Activation>& acts, float* y) {
  const kernels::SpmmKernels& k = kernels::active_kernels();
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = ceil_div(ceil_div(tokens, threads), k.vector_width) * k.vector_width;
  const PanelPlan plan{k, tokens, std::max(k.vector_width, std::min(k.max_panel_width, per_thread))};
  int64_t max_features = layers.front().in_features;
  for (const PackedLinearView& w : layers) {
    max_features = std::max(max_features, w.num_row_blocks * w.row_block);
  }
  const PackedLinearView& last = layers.back();
  const size_t n = layers.size();
  at::parallel_for(0, plan.num_panels(), 1, [&](int64_t begin, int64_t end) {
    const size_t buffer_floats = static_cast<size_t>(max_features * plan.max_width + k.vector_width);
    thread_local ScratchBuffer buffers[3];
    float* panels[3];
    for (int b = 0; b < 3; ++b) panels[b] = buffers[b].get(buffer_floats);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t width = plan.width_of(p);
      const bool gemv = plan.is_gemv(p);
      int current = 0;  // panels[current] holds the input of layer l
      k.pack_panel(x + p * plan.max_width * token_stride, plan.tokens_in(p), layers.front().in_features,
                   token_stride, feature_stride, width, panels[current]);
      for (size_t l = 0; l < n;) {
        float* next = panels[(current + 1) % 3];
        if (l + 1 < n && pipelines_into(layers[l + 1], width, gemv)) {
          float* after = panels[(current + 2) % 3];
          run_layer_pair(k, layers[l], layers[l + 1], panels[current], width, biases[l], acts[l],
                         biases[l + 1], acts[l + 1], next, after);
          current = (current + 2) % 3;
          l += 2;
        } else {
          run_row_blocks(k, layers[l], 0, layers[l].num_row_blocks, panels[current], width, gemv,
                         biases[l], acts[l], next);
          current = (current + 1) % 3;
          l += 1;
        }
      }
      k.unpack_tile(panels[current], last.out_features, width, plan.tokens_in(p),
                    y + p * plan.max_width * last.out_features, last.out_features);
    }
    for (ScratchBuffer& buffer : buffers) buffer.release_if_large();
  });
}

}  // namespace

// Checks one layer's weight and bias against its packed buffer; returns the
// bias as a contiguous tensor (undefined when absent).
at::Tensor checked_bias(const PackedLinearView& w, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == w.out_features && weight.size(1) == w.in_features,
                    op, ": weight of shape ", weight.sizes(), " does not match the packed weight [",
                    w.out_features, ", ", w.in_features, "]");
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK_VALUE(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == w.out_features,
                    op, ": bias must be float32 of shape [", w.out_features, "], got ",
                    bias->scalar_type(), " of shape ", bias->sizes());
  return bias->contiguous();
}

namespace {

void check_input(const at::Tensor& input, int64_t in_features, const char* op) {
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat && input.device().is_cpu(), op,
                    ": input must be a float32 CPU tensor, got ", input.scalar_type(), " on ",
                    input.device());
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) == in_features, op, ": input of shape ",
                    input.sizes(), " does not end in in_features=", in_features, " of the packed weight");
}

at::Tensor empty_output(const at::Tensor& input, int64_t out_features) {
  std::vector<int64_t> out_sizes(input.sizes().begin(), input.sizes().end());
  out_sizes.back() = out_features;
  return at::empty(out_sizes, input.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace

const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

namespace {

at::Tensor linear_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& packed,
                      const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const PackedLinearView w = checked_view(packed);
  const Activation act = parse_activation(activation);
  check_input(input, w.in_features, "sparsecpu::linear");
  const at::Tensor bias_c = checked_bias(w, weight, bias, "sparsecpu::linear");
  at::Tensor y = empty_output(input, w.out_features);
  const at::Tensor x2d = input.reshape({-1, w.in_features});
  const int64_t tokens = x2d.size(0);
  if (tokens == 0 || w.out_features == 0) return y;
  sparse_linear_2d(w, strided_source(x2d.data_ptr<float>(), x2d.stride(0), x2d.stride(1)), tokens,
                   data_or_null(bias_c), act, y.data_ptr<float>(), OutputLayout{w.out_features, 1});
  return y;
}

at::Tensor linear_chain_cpu(const at::Tensor& input, at::TensorList weights, at::TensorList packed,
                            const c10::List<std::optional<at::Tensor>>& biases,
                            const std::vector<std::string>& activations) {
  const char* op = "sparsecpu::linear_chain";
  const size_t n = weights.size();
  TORCH_CHECK_VALUE(n >= 1 && packed.size() == n && biases.size() == n && activations.size() == n, op,
                    ": weights, packed, biases and activations must have the same length >= 1, got ",
                    weights.size(), ", ", packed.size(), ", ", biases.size(), ", ", activations.size());
  std::vector<PackedLinearView> layers;
  std::vector<at::Tensor> bias_tensors;
  std::vector<const float*> bias_ptrs;
  std::vector<Activation> acts;
  for (size_t l = 0; l < n; ++l) {
    layers.push_back(checked_view(packed[l]));
    TORCH_CHECK_VALUE(l == 0 || layers[l].in_features == layers[l - 1].out_features, op, ": layer ", l,
                      " takes ", layers[l].in_features, " features but layer ", l - 1, " gives ",
                      layers[l - 1].out_features);
    bias_tensors.push_back(checked_bias(layers[l], weights[l], biases.get(l), op));
    bias_ptrs.push_back(data_or_null(bias_tensors.back()));
    acts.push_back(parse_activation(activations[l]));
  }
  check_input(input, layers.front().in_features, op);
  at::Tensor y = empty_output(input, layers.back().out_features);
  const at::Tensor x2d = input.reshape({-1, layers.front().in_features});
  const int64_t tokens = x2d.size(0);
  if (tokens == 0 || layers.back().out_features == 0) return y;
  sparse_linear_chain_2d(layers, x2d.data_ptr<float>(), tokens, x2d.stride(0), x2d.stride(1), bias_ptrs,
                         acts, y.data_ptr<float>());
  return y;
}

at::Tensor pack_linear_cpu(const at::Tensor& weight, int64_t k_block, int64_t row_block, int64_t block_rows) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
                    "sparsecpu::pack_linear: weight must be a 2-D float32 CPU tensor, got ",
                    weight.scalar_type(), " of shape ", weight.sizes(), " on ", weight.device());
  TORCH_CHECK_VALUE(k_block >= 0 && k_block <= kernels::kMaxKBlock,
                    "sparsecpu::pack_linear: k_block must be in [0, ", kernels::kMaxKBlock,
                    "] (0: one K-block), got ", k_block);
  TORCH_CHECK_VALUE(row_block >= 1, "sparsecpu::pack_linear: row_block must be >= 1, got ", row_block);
  TORCH_CHECK_VALUE(block_rows == 1 || block_rows == kernels::kTallBlockRows,
                    "sparsecpu::pack_linear: block_rows must be 1 or ", kernels::kTallBlockRows, ", got ",
                    block_rows);
  TORCH_CHECK_VALUE(weight.size(0) % block_rows == 0 && row_block % block_rows == 0,
                    "sparsecpu::pack_linear: block_rows=", block_rows, " must divide out_features (",
                    weight.size(0), ") and row_block (", row_block, ")");
  TORCH_CHECK_VALUE(weight.numel() < (int64_t{1} << 30),
                    "sparsecpu::pack_linear: weights of 2^30 or more elements are not supported");
  const at::Tensor w = weight.contiguous();
  std::vector<int32_t> words = kernels::pack_linear_f32(w.data_ptr<float>(), w.size(0), w.size(1),
                                                        w.size(1), k_block, row_block, block_rows);
  at::Tensor packed = at::empty({static_cast<int64_t>(words.size())}, weight.options().dtype(at::kInt));
  std::copy(words.begin(), words.end(), packed.data_ptr<int32_t>());
  return packed;
}

}  // namespace

TORCH_LIBRARY(sparsecpu, m) {
  // row_block's default is ops.DEFAULT_ROW_BLOCK (a test checks they agree).
  m.def("pack_linear(Tensor weight, int k_block=128, int row_block=128, int block_rows=1) -> Tensor");
  m.def("linear(Tensor input, Tensor weight, Tensor packed, Tensor? bias=None, str activation=\"none\") -> Tensor");
  m.def("linear_chain(Tensor input, Tensor[] weights, Tensor[] packed, Tensor?[] biases, str[] activations) -> Tensor");
  // flexible_layout: Inductor may hand conv2d channels-last input (its layout
  // optimisation for graphs with convolutions) instead of converting it to NCHW.
  m.def("conv2d(Tensor input, Tensor weight, Tensor packed, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
        "int[2] dilation=1, str activation=\"none\") -> Tensor",
        {at::Tag::flexible_layout});
}

TORCH_LIBRARY_IMPL(sparsecpu, CPU, m) {
  m.impl("pack_linear", &pack_linear_cpu);
  m.impl("linear", &linear_cpu);
  m.impl("linear_chain", &linear_chain_cpu);
}

}  // namespace sparsecpu
