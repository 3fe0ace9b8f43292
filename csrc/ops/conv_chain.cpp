// sparsecpu::conv_chain: consecutive sparse convolutions (a ResNet bottleneck, its
// residual included) run as tensor columns, band of output rows by band. Each thread
// takes a contiguous range of bands and carries each through every layer: a layer
// computes the rows the next one needs (a k x k layer's halo rows are kept from the
// thread's previous band, or computed by the first band of its range: never shared
// between threads), so a band's intermediate images stay in the thread's L2 cache
// (docs/tile_planner.md#tensor-columns-for-convolutions-conv_chain). For small images
// (7 x 7) the planner may give each image to all threads together instead, as one band
// whose every layer's output channels they share out (Team, split_channels).
//
// Layout of the work. A layer's input is either the previous layer's output tile
// (a 1 x 1 convolution, stride 1, no padding: the tile is its panel, as in
// linear_chain) or a band image: the rows of its input it needs, channel-major and
// zero-padded, written by the previous layer straight into that layout. A k x k layer
// with stride 1 computes wide rows: every column of the padded input is a token, so
// each of its panel's feature rows is one contiguous run of the band image (no
// per-row copies); the tokens past a row's outputs are dropped when the rows are
// written out. Where rows rounded up to whole registers waste little, such a layer
// reads its band image in place (the tap layout, tap_weights.h): the previous layer
// writes one copy of its rows per kernel column, shifted, and the k x k weight is
// packed so that its features are places in that image, a whole number of registers
// apart, which the kernels read in place: no panel is copied at all. A k x k layer of
// stride 2 takes the tap layout too, its band image split into phases of even and odd
// rows and columns (BandImage), so that its taps are whole rows apart as well. The first layer
// reads the chain's input in place the same way when its channel planes are whole
// registers (ChainLayer::in_place).
//
// A MobileNet inverted residual's depthwise convolution (a layer whose packed entry is
// empty; weight [channels, 1, kernel_h, kernel_w]) runs dense inside the column:
// it reads its band image like a k x k layer but multiplies each channel's rows by its
// own kernel (SpmmKernels::depthwise_row) straight into its output tile, which the next
// 1 x 1 layer reads. Its memory round trip, not its arithmetic, is what costs outside
// the chain. Paddings may differ per side (TensorFlow's "same" padding, HF MobileNetV2's
// default, pads a stride-2 layer only at the bottom and right).
//
// The residual: with `shortcut` and a last weight of only the previous layer's channels
// (an identity shortcut), the last layer's tile gets the chain's input added (read in
// place, at stride 1) before its activation, on its way out. With a last weight of more
// channels (a projection shortcut), the last layer (1 x 1) reads the chain's input too,
// sampled at the chain's stride, as extra input channels after the previous layer's:
// its weight is [W_last | W_shortcut] (or [W_last | I] for an identity shortcut) and
// its bias the sum of both, so act(W_last h + W_shortcut x + b) -- add and final
// activation included -- is one sparse product.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu_caches.h"
#include "packed_weights.h"
#include "prefetch.h"
#include "sparse_layer.h"
#include "tap_weights.h"

namespace sparsecpu {
namespace {

using kernels::Activation;
using kernels::PackedLinearView;

// A k x k layer of stride 1 with 1 x 1 blocks reads its band image in place (tap
// layout) when its rows, rounded up to whole registers, hold at most 1/8 dropped
// tokens; else it computes wide rows when the dropped tokens (kernel_w - 1 per row) are
// at most 1/8 of a row; else exactly its output columns, copied row by row.
constexpr int64_t kMaxDroppedTokensDenominator = 8;
// The per-panel work of one stored nonzero in the band planner's cost, in registers of
// multiply-adds (band_cost).
constexpr int64_t kNonzeroOverheadVectors = 1;
// What the band planner charges, in band_cost's units (multiply-adds per token), for
// each float of a band's window past the L2 cache: read back from L3 rather than L2, once
// per band (plan_bands). On ResNet-50 and MobileNetV2, 8 to 32 pick the same bands
// (docs/tile_planner.md).
constexpr int64_t kL3FloatCost = 8;
// What the planner charges a team (split_channels) for each barrier its members wait
// at, in band_cost's units: half a microsecond's work (100 more barriers per image made
// a 7 x 7 bottleneck 45 us slower; docs/tile_planner.md).
constexpr int64_t kTeamSyncCost = 20000;
// The first layer reads the input in place (ChainLayer::in_place) only where it has at
// least kMinInPlaceChannels input channels (with fewer the copy it saves is small, and
// the kernels' reads of unaligned planes cost more: MobileNetV2's expand layers, 16-32
// channels, ran 6% slower end to end) and its packing, which goes through a dense
// [out, in * plane / register width] matrix once per weight, takes at most
// kMaxInPlacePackingFloats (64 MiB).
constexpr int64_t kMinInPlaceChannels = 128;
constexpr int64_t kMaxInPlacePackingFloats = int64_t{1} << 24;

// One convolution of the chain and the sizes of its input and output images.
struct ChainLayer {
  PackedLinearView w;
  const float* bias = nullptr;
  Activation act = Activation::kNone;
  int64_t kernel_h = 1, kernel_w = 1, stride_h = 1, stride_w = 1;
  int64_t pad_top = 0, pad_bottom = 0, pad_left = 0, pad_right = 0;
  // A dense depthwise layer: its weight, [out_channels][kernel_h * kernel_w] (w unused).
  const float* depthwise_weight = nullptr;
  bool depthwise() const { return depthwise_weight != nullptr; }
  int64_t in_channels = 0, out_channels = 0;  // in_channels: the convolution's, without the shortcut's
  int64_t in_h = 0, in_w = 0, out_h = 0, out_w = 0;
  bool reads_tile = false;  // its panel is the previous layer's output tile
  // Tokens per output row in its panels: out_w, or for wide rows padded_w() (tap
  // layout: `pitch`).
  int64_t token_pitch = 0;
  // Its band image, unless it reads a tile: phases * `copies` planes per channel
  // (copies: kernel_w in the tap layout, else 1) of window_rows / phases rows (rounded
  // up) of `pitch` floats, plane_stride floats apart (set when the bands are planned),
  // and band_image_floats in all.
  int64_t copies = 1, pitch = 0, window_rows = 0, plane_stride = 0, band_image_floats = 0;
  // A tap layer of stride 2 splits its band image into phases (BandImage): 2, and its
  // pitch holds half a padded row. Else 1.
  int64_t phases = 1;
  // Tap layout: its panels are tokens of the band image itself, features a register
  // apart (tap_weights.h); a panel may read up to tap_read_past floats past the last
  // plane (a full panel). 0 otherwise.
  int64_t tap_read_past = 0;
  bool taps() const { return tap_read_past > 0; }
  // The first layer (1 x 1, stride 1, kMinInPlaceChannels inputs or more) of a chain
  // whose input planes are a whole number of registers: its weight packed to read the
  // input image in place, features one channel plane apart (tap_weights.h;
  // feature_stride set), for every panel that starts on a register boundary and ends
  // inside the image (the others copy: reading from an unaligned start splits every load
  // across two cache lines). Unset otherwise.
  PackedLinearView in_place;
  bool reads_input_in_place() const { return in_place.out_features > 0; }

  int64_t padded_w() const { return in_w + pad_left + pad_right; }
  bool padded() const { return pad_top != 0 || pad_bottom != 0 || pad_left != 0 || pad_right != 0; }
  int64_t conv_features() const { return in_channels * kernel_h * kernel_w; }
  // Features copied into its panel per token: none for a depthwise or tap layer, the
  // shortcut's alone for one that reads the previous tile, else all.
  int64_t copied_features() const {
    if (depthwise() || taps()) return 0;
    return reads_tile ? w.in_features - conv_features() : w.in_features;
  }
  // Rows of its (padded) input that output rows [first, end) read: [first * stride_h, input_end(end)).
  int64_t input_end(int64_t end) const { return (end - 1) * stride_h + kernel_h; }
};

// Element (c, row, col) of an image at data + c * channel_stride + row * row_stride +
// col * col_stride.
struct ImageView {
  const float* data;
  int64_t channel_stride, row_stride, col_stride;
  ImageView from_channel(int64_t c) const { return {data + c * channel_stride, channel_stride, row_stride, col_stride}; }
};

// A layer's band image: the padded input rows [first_row, first_row + rows) it reads,
// channel by channel. A channel has `copies` planes: plane j holds padded pixel (row,
// col + j) at (row - first_row) * pitch + col (one plane, but kernel_w shifted ones in
// the tap layout). Planes are plane_stride floats apart. A tap layer of stride 2 has two
// `phases` of rows and of columns: the planes of channel c's even rows, then of its odd
// rows, plane j holding padded pixel (row, 2 * col + j) at (row - first_row) / 2 * pitch
// + col (first_row is even), so that its taps, too, are whole rows apart.
struct BandImage {
  float* data;
  int64_t copies, plane_stride, pitch, first_row, rows, phases = 1;  // phases: 1 or 2
  // Divisions by `phases` as shifts (an idiv per row piece showed in profiles).
  int64_t phase_shift() const { return phases - 1; }
  float* at(int64_t c, int64_t j, int64_t row, int64_t col) const {
    const int64_t plane = (c * phases + (row & phase_shift())) * copies + j;
    return data + plane * plane_stride + ((row - first_row) >> phase_shift()) * pitch + col;
  }
  // The image from channel c on.
  BandImage from_channel(int64_t c) const {
    BandImage image = *this;
    image.data += c * phases * copies * plane_stride;
    return image;
  }
};

// Tokens [first, first + count) of a band whose rows hold `pitch` tokens each, of which
// the first `valid` are output pixels (wide rows: the others are dropped).
struct TokenRange {
  int64_t first, count, pitch, valid;

  // f(t, r, q, pixels, run) for each piece of the range inside one row: `run` tokens
  // from token first + t, in band row r from column q; the first `pixels` are pixels.
  template <typename F>
  void for_each_row(F f) const {
    for (int64_t t = 0; t < count;) {
      const int64_t r = (first + t) / pitch, q = (first + t) % pitch;
      const int64_t run = std::min(count - t, pitch - q);
      f(t, r, q, std::max<int64_t>(0, std::min(run, valid - q)), run);
      t += run;
    }
  }
  // As for_each_row, but a stretch of whole rows (q = 0, run = pitch) comes as one call
  // f(t, r, q, pixels, run, rows) for its `rows` rows: row r + i from token t + i * pitch.
  template <typename F>
  void for_each_row_run(F f) const {
    for (int64_t t = 0; t < count;) {
      const int64_t r = (first + t) / pitch, q = (first + t) % pitch;
      const int64_t run = std::min(count - t, pitch - q);
      const int64_t rows = q == 0 && run == pitch ? (count - t) / pitch : 1;
      f(t, r, q, std::max<int64_t>(0, std::min(run, valid - q)), run, rows);
      t += rows * run;
    }
  }
  bool all_pixels() const { return valid == pitch; }
};

// Band rows are cut into panels as wide as possible but equal, in whole registers
// (the last takes the rest): sparse_linear_2d's rule, without GEMV panels (a band is
// never that narrow but at image edges, where a padded register costs little).
struct PanelCut {
  int64_t tokens, width;  // width: of every panel but the last
  PanelCut(const kernels::SpmmKernels& k, int64_t tokens) : tokens(tokens) {
    const int64_t panels = ceil_div(tokens, k.max_panel_width);
    width = ceil_div(ceil_div(tokens, panels), k.vector_width) * k.vector_width;
  }
  int64_t num_panels() const { return ceil_div(tokens, width); }
  int64_t tokens_in(int64_t p) const { return std::min(width, tokens - p * width); }
};

struct Chain {
  std::vector<ChainLayer> layers;
  // Stages: runs of layers [first, last] that go panel by panel, each but the first
  // reading the previous one's tile.
  std::vector<std::pair<size_t, size_t>> stages;
  bool shortcut = false;
  // An identity shortcut: the input is added to the last tile, then `shortcut_act` (the
  // last layer's kernels apply none).
  bool identity_shortcut = false;
  Activation shortcut_act = Activation::kNone;
  int64_t shortcut_stride_h = 1, shortcut_stride_w = 1;  // the chain's stride: the product of its layers'
  int64_t batch = 0, in_channels = 0;
  const ChainLayer& last() const { return layers.back(); }
};

// Output rows [first, end) of every layer for the band of the last layer's rows
// [first, end): each layer computes exactly the rows the next one reads.
std::vector<std::pair<int64_t, int64_t>> band_rows(const Chain& chain, int64_t first, int64_t end) {
  std::vector<std::pair<int64_t, int64_t>> rows(chain.layers.size());
  rows.back() = {first, end};
  for (size_t l = chain.layers.size() - 1; l > 0; --l) {
    const ChainLayer& layer = chain.layers[l];
    rows[l - 1] = {std::max<int64_t>(0, rows[l].first * layer.stride_h - layer.pad_top),
                   std::min(layer.in_h, layer.input_end(rows[l].second) - layer.pad_top)};
  }
  return rows;
}

// Rolling bands: a thread takes a contiguous range of bands and keeps the rows its
// consecutive bands of one image share (a k x k layer's halo) in the band images,
// rather than computing them twice; only the first band of its range computes its halo.
// The rows each layer computes for a band whose band_rows() are `rows`: all of them, or
// with `previous` (the band_rows() of the thread's band before it) those after the
// rows that band computed.
std::vector<std::pair<int64_t, int64_t>> computed_rows(std::vector<std::pair<int64_t, int64_t>> rows,
                                                       const std::vector<std::pair<int64_t, int64_t>>* previous) {
  if (previous != nullptr) {
    for (size_t l = 0; l < rows.size(); ++l) rows[l].first = std::max(rows[l].first, (*previous)[l].second);
  }
  return rows;
}

// Tokens of a stage for output rows [first, end): wide rows hold token_pitch tokens,
// of which the last row keeps only its pixels.
int64_t stage_tokens(const ChainLayer& first_layer, std::pair<int64_t, int64_t> rows) {
  return (rows.second - rows.first - 1) * first_layer.token_pitch + first_layer.out_w;
}

// Padded input rows of `layer` that its output rows [first, end) read.
int64_t padded_rows(const ChainLayer& layer, std::pair<int64_t, int64_t> rows) {
  return layer.input_end(rows.second) - rows.first * layer.stride_h;
}

// The threads that run one band together (split_channels): each layer's row blocks,
// its panel's features and its output channels are shared out among them, and they
// wait for each other (sync) wherever one reads what another wrote. Their band images
// and panels are one BandScratch. A thread alone is the team {0, 1}.
struct Team {
  int64_t member = 0, size = 1;
  // This member's share [first, end) of `count` items.
  std::pair<int64_t, int64_t> share(int64_t count) const {
    return {count * member / size, count * (member + 1) / size};
  }
  // This member's share of a layer's row blocks, balanced by their work as
  // sparse_linear_2d's threads are (balanced_chunk_starts).
  std::pair<int64_t, int64_t> share_row_blocks(const PackedLinearView& w) const {
    if (size == 1) return {0, w.num_row_blocks};
    std::vector<int64_t> work_prefix(w.num_row_blocks + 1, 0);
    for (int64_t rb = 0; rb < w.num_row_blocks; ++rb) work_prefix[rb + 1] = work_prefix[rb] + row_block_work(w, rb);
    const std::vector<int64_t> starts = balanced_chunk_starts(work_prefix, size);
    return {starts[member], starts[member + 1]};
  }
  void sync() const {
    if (size > 1) {
#pragma omp barrier
    }
  }
};

// ---- copying into panels ----------------------------------------------------------

// The runs of a panel's tokens in consecutive channel planes of the output (and of the
// identity shortcut's input) are a few cache lines each and a plane apart. The
// hardware prefetchers follow a stride only inside a page, so with planes a page or
// more apart each run would start with misses: write_tile_to_output then asks for the
// runs kPrefetchChannels channels ahead (docs/tile_planner.md, "The residual on the
// way out", has the measurement).
constexpr int64_t kPageFloats = 4096 / sizeof(float);
constexpr int64_t kPrefetchChannels = 4;
bool prefetch_planes(int64_t channel_stride) { return channel_stride >= kPageFloats; }

// Whether p is on a register boundary of the ISA: none of the kernels' loads from p on
// (whole registers apart) then straddles two cache lines.
bool register_aligned(const kernels::SpmmKernels& k, const float* p) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(k.vector_width * sizeof(float)) == 0;
}

// The tokens of `tokens` from one plane of an image into row (token t at row[t], zeros
// for the dropped tokens of wide rows): token (band row r, column q) at from + r *
// row_step + q * step. A stretch of whole rows (a 7 x 7 image's) is one copy_rows call,
// not one copy_row per row.
void copy_tokens(const kernels::SpmmKernels& k, const float* from, int64_t row_step, int64_t step,
                 const TokenRange& tokens, float* row) {
  tokens.for_each_row_run([&](int64_t t, int64_t r, int64_t q, int64_t pixels, int64_t run, int64_t rows) {
    k.copy_rows(from + r * row_step + q * step, row_step, step, pixels, rows, row + t, tokens.pitch);
    for (int64_t i = 0; i < rows && pixels < run; ++i) {
      std::fill(row + t + i * tokens.pitch + pixels, row + t + i * tokens.pitch + run, 0.0f);
    }
  });
}

// Panel rows from an input image: channels [first_channel, end_channel) of the tokens
// of `tokens` into rows (channel c at rows + (c - first_channel) * width), zeros past
// the pixels up to `width`. Token (band row r, column q) is pixel (first_row + r *
// stride_h, q * stride_w). Channel-major images are copied row by row; others
// (channels-last) are transposed 8 pixels at a time by k.pack_panel.
void pack_image_tokens(const kernels::SpmmKernels& k, const ImageView& image, int64_t first_row, int64_t stride_h,
                       int64_t stride_w, const TokenRange& tokens, int64_t first_channel, int64_t end_channel,
                       int64_t width, float* rows) {
  const int64_t channels = end_channel - first_channel;
  const float* origin = image.data + first_channel * image.channel_stride + first_row * image.row_stride;
  const int64_t pixel_stride = stride_w * image.col_stride;
  // Consecutive tokens are consecutive pixels in memory: one run for the whole range.
  const bool one_run = tokens.all_pixels() && stride_h * image.row_stride == tokens.pitch * pixel_stride;
  if (image.col_stride == 1) {
    for (int64_t c = 0; c < channels; ++c) {
      const float* plane = origin + c * image.channel_stride;
      float* row = rows + c * width;
      if (one_run && stride_w == 1) {
        k.copy_row(plane + tokens.first, 1, tokens.count, row);
      } else {
        copy_tokens(k, plane, stride_h * image.row_stride, pixel_stride, tokens, row);
      }
      std::fill(row + tokens.count, row + width, 0.0f);
    }
    return;
  }
  thread_local ScratchBuffer chunk_buffer;
  constexpr int64_t kChunk = 8;  // pack_panel's transposing fast path takes 8 x 8 blocks
  float* chunk = chunk_buffer.get(static_cast<size_t>(channels * kChunk));
  const auto transpose = [&](const float* pixels, int64_t count, int64_t t) {
    for (int64_t done = 0; done < count; done += kChunk) {
      const int64_t n = std::min(kChunk, count - done);
      k.pack_panel(pixels + done * pixel_stride, n, channels, pixel_stride, image.channel_stride, kChunk, chunk);
      for (int64_t c = 0; c < channels; ++c) k.copy_row(chunk + c * kChunk, 1, n, rows + c * width + t + done);
    }
  };
  if (one_run) {
    transpose(origin + tokens.first * pixel_stride, tokens.count, 0);
  } else {
    tokens.for_each_row([&](int64_t t, int64_t r, int64_t q, int64_t pixels, int64_t run) {
      transpose(origin + r * stride_h * image.row_stride + q * pixel_stride, pixels, t);
      for (int64_t c = 0; c < channels; ++c) std::fill(rows + c * width + t + pixels, rows + c * width + t + run, 0.0f);
    });
  }
  for (int64_t c = 0; c < channels; ++c) std::fill(rows + c * width + tokens.count, rows + (c + 1) * width, 0.0f);
}

// Panel rows of a layer that reads a band image: features [first, end) of the
// convolution, (c, i, j) in weight.flatten(1)'s order. Feature (c, i, j) of token
// (band row r, column q) is padded pixel (first_output_row * stride_h + r * stride_h +
// i, q * stride_w + j): with wide rows one contiguous run of the image.
void pack_band_features(const kernels::SpmmKernels& k, const ChainLayer& layer, const BandImage& image,
                        int64_t first_output_row, const TokenRange& tokens, int64_t first, int64_t end, int64_t width,
                        float* panel) {
  const int64_t taps = layer.kernel_h * layer.kernel_w;
  const int64_t row_step = layer.stride_h * image.pitch;
  const bool one_run = layer.stride_w == 1 && row_step == tokens.pitch;
  for (int64_t f = first; f < end; ++f) {
    const int64_t c = f / taps, i = f % taps / layer.kernel_w, j = f % layer.kernel_w;
    const float* plane = image.at(c, 0, first_output_row * layer.stride_h + i, j);
    float* row = panel + f * width;
    if (one_run) {
      k.copy_row(plane + tokens.first, 1, tokens.count, row);
    } else {
      copy_tokens(k, plane, row_step, layer.stride_w, tokens, row);
    }
    std::fill(row + tokens.count, row + width, 0.0f);
  }
}

// ---- writing tiles out ----------------------------------------------------------------

// Writes the pixels of an output tile [channels][width] into the band image of the
// next layer: token (band row r, column q) is output row first_output_row + r, at
// padded row + pad_top, padded column q + pad_left, i.e. column q + pad_left - j of plane j
// (pixels left of a shifted plane's first column are not in it); with two phases,
// column (q + pad_left - j) / 2 of plane j for the pixels where that divides.
void write_tile_to_band(const kernels::SpmmKernels& k, const float* tile, int64_t channels, int64_t width,
                        const TokenRange& tokens, int64_t first_output_row, const ChainLayer& next,
                        const BandImage& image) {
  const int64_t shift = image.phase_shift();
  for (int64_t c = 0; c < channels; ++c) {
    tokens.for_each_row_run([&](int64_t t, int64_t r, int64_t q, int64_t pixels, int64_t, int64_t rows) {
      // Rows shorter than a register (14 x 14 and 7 x 7 images) go plane by plane, one
      // copy_rows call each (a plane's rows follow each other, image.pitch apart);
      // longer ones row by row, each into every plane (faster there). A strided layer's
      // image has two phases, but rows that short never do: its output rows would be too
      // short for the tap layout.
      const bool by_plane = rows > 1 && pixels < k.vector_width && image.phases == 1;
      for (int64_t i = 0; i < (by_plane ? 1 : rows); ++i) {
        const int64_t row = first_output_row + r + i + next.pad_top;
        const float* from = tile + c * width + t + i * tokens.pitch;
        for (int64_t j = 0; j < image.copies; ++j) {
          int64_t skip = std::max<int64_t>(0, j - next.pad_left - q);
          skip += (q + skip + next.pad_left - j) & shift;  // the first pixel of plane j's phase
          if (skip >= pixels) continue;
          const int64_t count = (pixels - skip + shift) >> shift, column = (q + skip + next.pad_left - j) >> shift;
          float* to = image.at(c, j, row, column);
          if (by_plane) {
            k.copy_rows(from + skip, tokens.pitch, 1, count, rows, to, image.pitch);
          } else {
            k.copy_row(from + skip, image.phases, count, to);
          }
        }
      }
    });
  }
}

// Zeroes the padding rows (above and below the image) among the band image's rows
// [first, end).
void zero_padding_rows(const ChainLayer& layer, const BandImage& image, int64_t first, int64_t end) {
  for (int64_t c = 0; c < layer.in_channels; ++c) {
    for (int64_t j = 0; j < image.copies; ++j) {
      for (int64_t row = first; row < end; ++row) {
        if (row < layer.pad_top || row >= layer.pad_top + layer.in_h) {
          float* at = image.at(c, j, row, 0);
          std::fill(at, at + image.pitch, 0.0f);
        }
      }
    }
  }
}

// Readies a band image for its first band of a thread's range (a team: each member its
// share): zeroes its whole window and a tap layer's panel width after its last plane,
// so that what no layer writes there is zero: padding rows and columns, the floats
// after each plane's last row, the dropped tokens a tap layer's last panel reads past the
// last plane. One fill of the window took less time than filling only those (a few
// floats per row: thousands of fills per image; docs/tile_planner.md, "Zeroing a band
// image"). Nothing but the zeroing writes a padding column, so they stay zero through
// the thread's later bands.
void zero_band_image(const ChainLayer& layer, const BandImage& image, const Team& team) {
  const int64_t floats = image.at(layer.in_channels, 0, image.first_row, 0) + layer.tap_read_past - image.data;
  const auto [first, end] = team.share(floats);
  std::fill(image.data + first, image.data + end, 0.0f);
}

// Moves a band image's window down to start at row `first` for the thread's next band,
// keeping its rows [first, kept_end) (the previous band wrote them and this band reads
// them again: the halo), and zeroes the padding rows among the rows the window gains up
// to `end`. `image` is the window as it was.
void roll_band_image(const ChainLayer& layer, BandImage& image, int64_t first, int64_t kept_end, int64_t end) {
  const int64_t shift = (first - image.first_row) / image.phases;  // rows of a plane
  if (shift > 0 && kept_end > first) {
    for (int64_t plane = 0; plane < layer.in_channels * image.phases * image.copies; ++plane) {
      float* rows = image.data + plane * image.plane_stride;
      std::copy_n(rows + shift * image.pitch, ceil_div(kept_end - first, image.phases) * image.pitch, rows);
    }
  }
  image.first_row = first;
  zero_padding_rows(layer, image, std::max(first, kept_end), end);
}

// Writes the pixels of the last layer's tile into the output image y (one image):
// token (band row r, column q) is pixel (first_output_row + r, q).
// With `residual` (an image of y's size and strides: an identity shortcut at stride 1,
// both channel-major), writes act(tile + residual) instead, in the same pass.
void write_tile_to_output(const kernels::SpmmKernels& k, const float* tile, int64_t channels, int64_t width,
                          const TokenRange& tokens, int64_t first_output_row, const ImageView& y,
                          const ImageView* residual = nullptr, Activation act = Activation::kNone) {
  float* origin = const_cast<float*>(y.data) + first_output_row * y.row_stride;
  // Rows of pixels follow each other in y: one run for the whole range.
  const bool one_run = tokens.all_pixels() && y.row_stride == tokens.pitch * y.col_stride;
  if (y.col_stride == 1) {
    const auto write = [&](const float* from, int64_t count, int64_t c, int64_t offset) {
      float* to = origin + c * y.channel_stride + offset;
      if (residual == nullptr) {
        k.copy_row(from, 1, count, to);
      } else {
        const float* added = residual->data + c * residual->channel_stride + first_output_row * residual->row_stride;
        k.residual_row(from, added + offset, act, count, to);
      }
    };
    const bool prefetch = prefetch_planes(y.channel_stride);
    for (int64_t c = 0; c < channels; ++c) {
      if (one_run) {
        if (prefetch && c + kPrefetchChannels < channels) {
          const int64_t ahead = c + kPrefetchChannels;
          prefetch_lines(origin + ahead * y.channel_stride + tokens.first, tokens.count * sizeof(float),
                         /*for_writing=*/true);
          if (residual != nullptr) {
            prefetch_lines(residual->data + ahead * residual->channel_stride + first_output_row * residual->row_stride +
                               tokens.first,
                           tokens.count * sizeof(float));
          }
        }
        write(tile + c * width, tokens.count, c, tokens.first);
        continue;
      }
      tokens.for_each_row([&](int64_t t, int64_t r, int64_t q, int64_t pixels, int64_t) {
        write(tile + c * width + t, pixels, c, r * y.row_stride + q);
      });
    }
    return;
  }
  if (one_run) {  // one transpose
    k.unpack_tile(tile, channels, width, tokens.count, origin + tokens.first * y.col_stride, y.col_stride);
    return;
  }
  tokens.for_each_row([&](int64_t t, int64_t r, int64_t q, int64_t pixels, int64_t) {
    k.unpack_tile(tile + t, channels, width, pixels, origin + r * y.row_stride + q * y.col_stride, y.col_stride);
  });
}

// ---- one band -----------------------------------------------------------------------

// A thread's buffers, grow-only and reused across bands and calls: the band image of
// each layer that reads one, and the two panels a stage alternates between (a layer's
// panel, its output tile = the next layer's panel).
struct BandScratch {
  std::vector<ScratchBuffer> images;
  ScratchBuffer panels[2];
};

// Floats of each of the two panel buffers: any layer's panel (the rows its kernels may
// read, PackedLinearView::panel_rows; a tap layer's is its band image) or output tile,
// `width` tokens wide.
int64_t panel_buffer_floats(const kernels::SpmmKernels& k, const Chain& chain, int64_t width) {
  int64_t floats = 0;
  for (const ChainLayer& layer : chain.layers) {
    if (layer.depthwise()) {  // its output tile only
      floats = std::max(floats, layer.out_channels * width);
      continue;
    }
    const PackedLinearView& w = layer.w;
    const int64_t panel_rows = layer.taps() ? 0 : std::max(w.panel_rows(false), w.in_features);
    floats = std::max({floats, panel_rows * width, w.num_row_blocks * w.row_block * width});
  }
  return floats + k.vector_width;
}

// Sizes a thread's or a team's buffers for the chain's band images and two panels of
// panel_floats (before a team's members share them: run_band's get()s then only read).
void size_scratch(BandScratch& scratch, const Chain& chain, int64_t panel_floats) {
  scratch.images.resize(chain.layers.size());
  for (const auto& stage : chain.stages) {
    if (stage.first > 0) scratch.images[stage.first].get(static_cast<size_t>(chain.layers[stage.first].band_image_floats));
  }
  for (ScratchBuffer& panel : scratch.panels) panel.get(static_cast<size_t>(panel_floats));
}

// tile[c][t] = act(tile[c][t] + x(c, token t)) for the tokens of `tokens` (exact rows of
// the output): an identity shortcut and the activation after it. Token (band row r,
// column q) is input pixel ((first_output_row + r) * stride_h, q * stride_w).
void add_input_and_activate(const kernels::SpmmKernels& k, float* tile, int64_t channels, int64_t width,
                            const TokenRange& tokens, int64_t first_output_row, const ImageView& x, int64_t stride_h,
                            int64_t stride_w, Activation act) {
  const int64_t step = stride_w * x.col_stride;
  thread_local std::vector<float> gathered;  // a strided row of x, made contiguous
  for (int64_t c = 0; c < channels; ++c) {
    tokens.for_each_row([&](int64_t t, int64_t r, int64_t q, int64_t pixels, int64_t) {
      const float* in = x.data + c * x.channel_stride + (first_output_row + r) * stride_h * x.row_stride + q * step;
      if (step != 1) {
        gathered.resize(static_cast<size_t>(pixels));
        for (int64_t i = 0; i < pixels; ++i) gathered[i] = in[i * step];
        in = gathered.data();
      }
      float* row = tile + c * width + t;
      k.residual_row(row, in, act, pixels, row);
    });
  }
}

// Channels [first_channel, end_channel) of a dense depthwise layer's output tile
// [channels][width] for the tokens of `tokens` (exact rows) from its band image: each
// piece of an output row is one depthwise_row call per channel over the channel's
// nonzero taps (a pruned depthwise weight's zeros cost nothing). A strided layer's input rows are first split into phases (phase p
// holds columns p, p + stride, ...), so that every tap reads contiguous floats.
void depthwise_tile(const kernels::SpmmKernels& k, const ChainLayer& layer, const BandImage& image,
                    int64_t first_output_row, const TokenRange& tokens, int64_t width, int64_t first_channel,
                    int64_t end_channel, float* tile) {
  const int64_t taps = layer.kernel_h * layer.kernel_w, stride = layer.stride_w;
  thread_local std::vector<const float*> tap_rows;
  thread_local std::vector<float> tap_weights, phases;
  thread_local std::vector<int64_t> tap_index;  // i * kernel_w + j of each nonzero tap
  tap_rows.resize(static_cast<size_t>(taps));
  for (int64_t c = first_channel; c < end_channel; ++c) {
    tap_weights.clear();
    tap_index.clear();
    for (int64_t t = 0; t < taps; ++t) {
      const float w = layer.depthwise_weight[c * taps + t];
      if (w != 0.0f) {
        tap_weights.push_back(w);
        tap_index.push_back(t);
      }
    }
    const float bias = layer.bias == nullptr ? 0.0f : layer.bias[c];
    float* out = tile + c * width;
    tokens.for_each_row([&](int64_t t, int64_t r, int64_t q, int64_t pixels, int64_t) {
      const int64_t first_input_row = (first_output_row + r) * layer.stride_h;
      const auto row = [&](int64_t i) { return image.at(c, 0, first_input_row + i, q * stride); };
      // Phase p of input row i from output column q: the columns (q + x) * stride + p,
      // up to (pixels - 1) * stride + kernel_w - 1 (what the taps of phase p read).
      const int64_t phase_length = pixels + (layer.kernel_w - 1) / stride;
      if (stride > 1) {
        phases.resize(static_cast<size_t>(layer.kernel_h * stride * phase_length));
        for (int64_t i = 0; i < layer.kernel_h; ++i) {
          for (int64_t p = 0; p < std::min(stride, layer.kernel_w); ++p) {
            const int64_t length = pixels + (layer.kernel_w - 1 - p) / stride;
            float* phase = phases.data() + (i * stride + p) * phase_length;
            for (int64_t x = 0; x < length; ++x) phase[x] = row(i)[x * stride + p];
          }
        }
      }
      for (size_t n = 0; n < tap_index.size(); ++n) {
        const int64_t i = tap_index[n] / layer.kernel_w, j = tap_index[n] % layer.kernel_w;
        tap_rows[n] = stride == 1 ? row(i) + j : phases.data() + (i * stride + j % stride) * phase_length + j / stride;
      }
      k.depthwise_row(tap_rows.data(), tap_weights.data(), static_cast<int64_t>(tap_index.size()), bias, layer.act,
                      pixels, out + t);
    });
    std::fill(out + tokens.count, out + width, 0.0f);
  }
}

// Runs the band of the last layer's output rows [first_row, end_row) of image n
// through every layer into y, as member of `team` (alone: {0, 1}). The scratch's
// buffers must be sized already when the team has more than one member (size_scratch).
// previous_first: the first row of the thread's band before it, of the same image (its
// end is first_row), or -1 when it has none (rolling bands, computed_rows; a team
// never rolls).
void run_band(const kernels::SpmmKernels& k, const Chain& chain, const ImageView& x, const ImageView& y,
              int64_t first_row, int64_t end_row, int64_t previous_first, int64_t panel_floats,
              BandScratch& scratch, const Team& team) {
  const size_t num_layers = chain.layers.size();
  const bool rolling = previous_first >= 0;
  const auto needed = band_rows(chain, first_row, end_row);
  std::vector<std::pair<int64_t, int64_t>> previous;
  if (rolling) previous = band_rows(chain, previous_first, first_row);
  const auto rows = computed_rows(needed, rolling ? &previous : nullptr);
  std::vector<BandImage> images(num_layers, BandImage{nullptr, 1, 0, 0, 0, 0});
  float* panels[2] = {scratch.panels[0].get(static_cast<size_t>(panel_floats)),
                      scratch.panels[1].get(static_cast<size_t>(panel_floats))};

  for (const auto& stage : chain.stages) {  // the band images, written by the stage before
    const size_t l = stage.first;
    if (l == 0) continue;
    const ChainLayer& head = chain.layers[l];
    float* data = scratch.images[l].get(static_cast<size_t>(head.band_image_floats));
    const int64_t first = needed[l].first * head.stride_h;
    if (rolling) {  // keeps the rows the stage before computed for the previous band
      images[l] = BandImage{data, head.copies, head.plane_stride, head.pitch, previous[l].first * head.stride_h,
                            head.window_rows, head.phases};
      roll_band_image(head, images[l], first, previous[l - 1].second + head.pad_top, head.input_end(needed[l].second));
    } else {
      images[l] = BandImage{data, head.copies, head.plane_stride, head.pitch, first, head.window_rows, head.phases};
      zero_band_image(head, images[l], team);
    }
  }
  if (!rolling) team.sync();  // every share zeroed before any member writes a tile there
  for (const auto& [first_layer, last_layer] : chain.stages) {
    const ChainLayer& head = chain.layers[first_layer];
    const auto out_rows = rows[first_layer];
    if (out_rows.first >= out_rows.second) continue;  // all kept from the previous band
    const bool writes_output = last_layer == num_layers - 1;
    const PanelCut cut(k, stage_tokens(head, out_rows));
    for (int64_t p = 0; p < cut.num_panels(); ++p) {
      const TokenRange tokens{p * cut.width, cut.tokens_in(p), head.token_pitch, head.out_w};
      const int64_t width = ceil_div(tokens.count, k.vector_width) * k.vector_width;
      int current = 0;  // panels[current]: the input panel of layer l
      int64_t first_channel = 0, end_channel = 0;  // of the tile this member computed
      for (size_t l = first_layer; l <= last_layer; ++l) {
        const ChainLayer& layer = chain.layers[l];
        float* panel = panels[current];
        // Copies panel rows [first, end) that are not already there: the convolution's
        // features (unless the panel is the previous tile), then the shortcut's.
        const auto pack = [&](int64_t first, int64_t end) {
          const int64_t conv_end = std::min(end, layer.conv_features());
          if (!layer.reads_tile && first < conv_end) {
            if (l == 0) {
              pack_image_tokens(k, x, out_rows.first * layer.stride_h, layer.stride_h, layer.stride_w, tokens, first,
                                conv_end, width, panel + first * width);
            } else {
              pack_band_features(k, layer, images[l], out_rows.first, tokens, first, conv_end, width, panel);
            }
          }
          const int64_t shortcut_first = std::max(first, layer.conv_features());
          if (chain.shortcut && l == num_layers - 1 && shortcut_first < end) {
            pack_image_tokens(k, x, out_rows.first * chain.shortcut_stride_h, chain.shortcut_stride_h,
                              chain.shortcut_stride_w, tokens, shortcut_first - layer.conv_features(),
                              end - layer.conv_features(), width, panel + shortcut_first * width);
          }
        };
        const PackedLinearView& w = layer.w;
        float* tile = panels[1 - current];
        // This member's row blocks (a depthwise layer's: channels).
        const auto [rb_begin, rb_end] =
            layer.depthwise() ? team.share(layer.out_channels) : team.share_row_blocks(w);
        end_channel = layer.depthwise() ? rb_end : std::min(w.out_features, rb_end * w.row_block);
        first_channel = layer.depthwise() ? rb_begin : std::min(end_channel, rb_begin * w.row_block);
        float* rows_tile = tile + first_channel * width;
        // The first layer's panel is the input itself when it starts on a register
        // boundary and ends inside the image.
        const float* input_panel = x.data + out_rows.first * x.row_stride + tokens.first;
        if (l == 0 && layer.reads_input_in_place() && register_aligned(k, input_panel) &&
            input_panel + width <= x.data + x.channel_stride) {
          run_row_blocks(k, layer.in_place, rb_begin, rb_end, input_panel, width, /*gemv=*/false, layer.bias,
                         layer.act, rows_tile);
        } else if (layer.depthwise()) {
          depthwise_tile(k, layer, images[l], out_rows.first, tokens, width, rb_begin, rb_end, tile);
        } else if (layer.taps()) {  // its panel is its band image, from this panel's first token on
          run_row_blocks(k, w, rb_begin, rb_end, images[l].at(0, 0, out_rows.first * layer.stride_h, 0) + tokens.first,
                         width, /*gemv=*/false, layer.bias, layer.act, rows_tile);
        } else if (team.size > 1 || panel_fits_l2(w, width)) {  // a team packs its shares, then waits
          if (layer.copied_features() > 0) {
            const auto [first, end] = team.share(w.in_features);
            pack(first, end);
            team.sync();
          }
          run_row_blocks(k, w, rb_begin, rb_end, panel, width, /*gemv=*/false, layer.bias, layer.act, rows_tile);
        } else {  // a K-block slice at a time, right before the kernels sweep it
          run_row_blocks(k, w, 0, w.num_row_blocks, panel, width, /*gemv=*/false, layer.bias, layer.act, tile,
                         [&](int64_t kb) { pack(kb * w.k_block, std::min(w.in_features, (kb + 1) * w.k_block)); });
        }
        if (l < last_layer) team.sync();  // the next layer reads the whole tile
        current = 1 - current;
      }
      const int64_t channels = end_channel - first_channel;
      const float* tile = panels[current] + first_channel * width;
      // An identity shortcut: the input added on the way out where it has the output's
      // layout (stride 1, channel-major), else in a pass over the tile before.
      const bool add_on_write = chain.identity_shortcut && chain.shortcut_stride_h == 1 &&
                                chain.shortcut_stride_w == 1 && x.col_stride == 1 && y.col_stride == 1 &&
                                x.row_stride == y.row_stride;
      const ImageView x_rows = x.from_channel(first_channel);
      if (writes_output && chain.identity_shortcut && !add_on_write) {
        add_input_and_activate(k, panels[current] + first_channel * width, channels, width, tokens, out_rows.first,
                               x_rows, chain.shortcut_stride_h, chain.shortcut_stride_w, chain.shortcut_act);
      }
      if (writes_output) {
        write_tile_to_output(k, tile, channels, width, tokens, out_rows.first, y.from_channel(first_channel),
                             add_on_write ? &x_rows : nullptr, chain.shortcut_act);
      } else {
        write_tile_to_band(k, tile, channels, width, tokens, out_rows.first, chain.layers[last_layer + 1],
                           images[last_layer + 1].from_channel(first_channel));
      }
      team.sync();  // the next panel's or stage's layers read this one's writes, or reuse its buffers
    }
  }
}

// ---- the tile planner -------------------------------------------------------------

// How a layer reads its input (reads_tile, or its band image's layout) and the pitch
// of its tokens. A 1 x 1 layer (stride 1, no padding) after a layer of exact rows reads
// that layer's tile; after wide rows it reads a band image of exact rows instead: the
// wide tile's rows would have to be copied (and the shortcut's and output's pixels)
// piece by piece, for every one of its channels. A k x k layer of stride 1 takes the
// tap layout or wide rows (kMaxDroppedTokensDenominator).
void choose_layout(ChainLayer& layer, const ChainLayer* previous, const kernels::SpmmKernels& k) {
  const bool stride_1 = layer.stride_h == 1 && layer.stride_w == 1;
  const bool one_by_one = layer.kernel_h == 1 && layer.kernel_w == 1;
  const bool k_by_k = previous != nullptr && !one_by_one;
  if (layer.depthwise()) {  // exact rows of its band image, one plane per channel
    layer.pitch = layer.padded_w();
    layer.token_pitch = layer.out_w;
    return;
  }
  layer.reads_tile = previous != nullptr && one_by_one && stride_1 && !layer.padded() &&
                     previous->token_pitch == previous->out_w;
  const bool stride_2 = layer.stride_h == 2 && layer.stride_w == 2;
  const int64_t phases = stride_2 ? 2 : 1;
  const int64_t register_pitch = ceil_div(ceil_div(layer.padded_w(), phases), k.vector_width) * k.vector_width;
  const bool taps = k_by_k && (stride_1 || stride_2) && layer.w.block_rows == 1 &&
                    (register_pitch - layer.out_w) * kMaxDroppedTokensDenominator <= register_pitch;
  const bool wide = k_by_k && layer.stride_w == 1 &&
                    (layer.kernel_w - 1) * kMaxDroppedTokensDenominator <= layer.padded_w();
  layer.pitch = taps ? register_pitch : layer.padded_w();
  if (taps) {
    layer.copies = layer.kernel_w;
    layer.phases = phases;
    layer.tap_read_past = k.max_panel_width;
  }
  layer.token_pitch = layer.reads_tile ? previous->token_pitch : (taps || wide ? layer.pitch : layer.out_w);
}

// Work of computing the rows `rows` of each layer (a band's computed_rows), in the
// units of sparse_linear_2d's cost (multiply-adds and per-row overhead per token), plus
// one unit per float copied into a panel or written out, plus, per panel, each stored
// nonzero's own work (its offset and value loaded, the value broadcast): about
// kNonzeroOverheadVectors registers' multiply-adds, whatever the panel's width. Narrow
// panels pay it over fewer tokens (measured: 1-row bands of a 14 x 14 bottleneck ran
// 1.45x as long as 4-row bands, docs/tile_planner.md).
int64_t band_cost(const Chain& chain, const kernels::SpmmKernels& k, const std::vector<std::pair<int64_t, int64_t>>& rows) {
  int64_t cost = 0;
  for (const auto& [first_layer, last_layer] : chain.stages) {
    const ChainLayer& head = chain.layers[first_layer];
    if (rows[first_layer].first >= rows[first_layer].second) continue;
    const PanelCut cut(k, stage_tokens(head, rows[first_layer]));
    int64_t per_token = 0, per_panel = 0;
    for (size_t l = first_layer; l <= last_layer; ++l) {
      const ChainLayer& layer = chain.layers[l];
      if (layer.depthwise()) {  // dense multiply-adds, no copy
        per_token += layer.out_channels * (layer.kernel_h * layer.kernel_w + 2);
        continue;
      }
      per_token += layer.w.nnz + 2 * layer.w.out_features + layer.copied_features();
      per_panel += layer.w.nnz * k.vector_width * kNonzeroOverheadVectors;
    }
    const size_t next = last_layer + 1;
    per_token += chain.layers[last_layer].out_channels *
                 (next < chain.layers.size() ? ceil_div(chain.layers[next].copies, chain.layers[next].phases) : 1);
    cost += cut.num_panels() * (cut.width * per_token + per_panel);
  }
  return cost;
}

// Bytes of a layer's weight as its kernels read it: each stored value and its 16-bit
// offset (packed_format.md), or a depthwise layer's dense taps.
int64_t weight_bytes(const ChainLayer& layer) {
  if (layer.depthwise()) return layer.out_channels * layer.kernel_h * layer.kernel_w * static_cast<int64_t>(sizeof(float));
  return layer.w.nnz * static_cast<int64_t>(sizeof(float)) + layer.w.blocks * static_cast<int64_t>(sizeof(uint16_t));
}

// Bytes a band reads again after touching them, which should stay in L2 in between: the
// chain's weights (read by every panel of the band), the rows of its band images
// (band_rows() `rows`: written by one stage, read back by the next) and, with a
// shortcut, the input rows under the band's output, which the first layer reads at the
// band's start and the last layer again at its end. The rest of the input the first
// layer reads, and the output it writes, are touched once: they are not counted.
int64_t band_window_bytes(const Chain& chain, const std::vector<std::pair<int64_t, int64_t>>& rows) {
  const ChainLayer& first = chain.layers.front();
  int64_t floats = chain.shortcut ? first.in_channels * (rows.back().second - rows.back().first) * first.in_w : 0;
  for (const auto& [first_layer, last_layer] : chain.stages) {
    if (first_layer == 0) continue;
    const ChainLayer& head = chain.layers[first_layer];
    floats += head.in_channels * head.phases * head.copies * ceil_div(padded_rows(head, rows[first_layer]), head.phases) *
              head.pitch;
  }
  int64_t bytes = floats * static_cast<int64_t>(sizeof(float));
  for (const ChainLayer& layer : chain.layers) bytes += weight_bytes(layer);
  return bytes;
}

// How a chain runs: `bands` bands per image, each taken by one thread, or with
// split_channels each image as one band that all threads run together (Team).
struct BandPlan {
  int64_t bands = 1;
  bool split_channels = false;
};

// Barriers a team waits at for one image (run_band): once its band images are zeroed,
// then per panel of a stage after each packed panel, between the stage's layers, and
// after its writes.
int64_t team_syncs(const Chain& chain, const kernels::SpmmKernels& k) {
  const auto rows = band_rows(chain, 0, chain.last().out_h);
  int64_t syncs = 1;
  for (const auto& [first_layer, last_layer] : chain.stages) {
    int64_t per_panel = 1 + static_cast<int64_t>(last_layer - first_layer);
    for (size_t l = first_layer; l <= last_layer; ++l) {
      const ChainLayer& layer = chain.layers[l];
      per_panel += layer.copied_features() > 0 && !(l == 0 && layer.reads_input_in_place()) ? 1 : 0;
    }
    syncs += PanelCut(k, stage_tokens(chain.layers[first_layer], rows[first_layer])).num_panels() * per_panel;
  }
  return syncs;
}

// Bands per image, or a team per image. Threads take contiguous ranges of
// ceil(batch * B / T) of the B bands (at::parallel_for's split) and roll through them
// (computed_rows): only the first of a range computes its halo. So the makespan is that
// many bands of ceil(height / B) rows without a halo, plus one halo; more bands keep
// threads busy, and a band's rows cut into panels waste less or more. Each band also
// reads its window (band_window_bytes) again; what of it exceeds the L2 cache comes back
// from L3, at kL3FloatCost per float and band. Among the heights whose window fits L2 or
// the thread's share of L3 (which bounds the band images' memory), the planner takes the
// band count of least makespan plus that charge (the fewest bands on a tie); when none
// fits, one row per band. A team (split_channels) costs each member a 1/T share of a
// whole image's band, weights included (each member reads only its rows'), plus
// kTeamSyncCost per barrier; the planner takes it when that is less. band_rows > 0
// overrides it (bands, no team); split_channels, when set, decides the team.
BandPlan plan_bands(const Chain& chain, const kernels::SpmmKernels& k, int64_t band_rows_override,
                    std::optional<bool> split_channels) {
  const int64_t height = chain.last().out_h;
  if (band_rows_override > 0) return {ceil_div(height, std::min(band_rows_override, height)), false};
  if (split_channels.value_or(false)) return {1, true};
  const int64_t threads = at::get_num_threads();
  const int64_t l2_budget = l2_cache_bytes(), l3_budget = l3_cache_bytes() / std::max<int64_t>(1, threads);
  const auto past_l2_floats = [&](int64_t window) {
    return std::max<int64_t>(0, window - l2_budget) / static_cast<int64_t>(sizeof(float));
  };
  int64_t best_bands = height, best_cost = -1;
  for (int64_t bands = 1; bands <= height; ++bands) {
    const int64_t rows = ceil_div(height, bands);
    if (ceil_div(height, rows) != bands) continue;  // the same height as a smaller count
    const int64_t first = (height - rows) / 2;  // an inner band: halos on both sides
    const auto needed = band_rows(chain, first, first + rows);
    const int64_t window = band_window_bytes(chain, needed);
    if (window > std::max(l2_budget, l3_budget)) continue;
    const int64_t with_halo = band_cost(chain, k, needed);
    int64_t rolled = with_halo;
    if (first > 0) {
      const auto previous = band_rows(chain, std::max<int64_t>(0, first - rows), first);
      rolled = band_cost(chain, k, computed_rows(needed, &previous));
    }
    const int64_t bands_per_thread = ceil_div(chain.batch * bands, threads);
    const int64_t cost = bands_per_thread * (rolled + past_l2_floats(window) * kL3FloatCost) + (with_halo - rolled);
    if (best_cost < 0 || cost < best_cost) best_bands = bands, best_cost = cost;
  }
  if (threads > 1 && !split_channels.has_value()) {
    const auto whole = band_rows(chain, 0, height);
    int64_t weights = 0;
    for (const ChainLayer& layer : chain.layers) weights += weight_bytes(layer);
    const int64_t window = band_window_bytes(chain, whole) - weights + weights / threads;
    const int64_t team_cost =
        chain.batch * (band_cost(chain, k, whole) / threads + past_l2_floats(window) * kL3FloatCost +
                       team_syncs(chain, k) * kTeamSyncCost);
    if (window <= std::max(l2_budget, l3_budget) && (best_cost < 0 || team_cost < best_cost)) return {1, true};
  }
  return {best_bands, false};
}

// ---- the op -----------------------------------------------------------------------------

// Output rows [first, end) of band `band` of `bands` over the last layer's `height` rows.
std::pair<int64_t, int64_t> band_of(int64_t height, int64_t bands, int64_t band) {
  return {band * height / bands, (band + 1) * height / bands};
}

// Sizes each band image's window for the most rows any of the `bands` bands reads, and
// packs each tap layer's weight for its image's geometry (held by *tap_packed). Returns
// the most tokens a stage of a band has. (Not from one inner band alone: when the bands
// are at most one row shorter than the image, none has halos on both sides, and a band
// at the bottom edge can need more rows than one at the top.)
int64_t size_band_images(const kernels::SpmmKernels& k, Chain& chain, int64_t bands, at::TensorList weights,
                         std::vector<at::Tensor>* tap_packed) {
  std::vector<int64_t> most_rows(chain.layers.size(), 0), stage_most_tokens(chain.layers.size(), 0);
  for (int64_t band = 0; band < bands; ++band) {
    const auto [first, end] = band_of(chain.last().out_h, bands, band);
    const auto rows = band_rows(chain, first, end);
    for (const auto& stage : chain.stages) {
      const ChainLayer& head = chain.layers[stage.first];
      most_rows[stage.first] = std::max(most_rows[stage.first], padded_rows(head, rows[stage.first]));
      stage_most_tokens[stage.first] = std::max(stage_most_tokens[stage.first], stage_tokens(head, rows[stage.first]));
    }
  }
  int64_t most_tokens = 1;
  for (const auto& stage : chain.stages) {
    ChainLayer& head = chain.layers[stage.first];
    const int64_t tokens = stage_most_tokens[stage.first];
    most_tokens = std::max(most_tokens, tokens);
    if (stage.first == 0) continue;
    head.window_rows = most_rows[stage.first];
    // whole registers, whole lines
    head.plane_stride = ceil_div(ceil_div(head.window_rows, head.phases) * head.pitch, 16) * 16;
    head.band_image_floats = head.in_channels * head.phases * head.copies * head.plane_stride;
    if (head.taps()) {
      tap_packed->push_back(tap_packed_weight(weights[stage.first], head.w, head.pitch, k.vector_width,
                                              head.plane_stride, head.phases));
      head.w = checked_view(tap_packed->back());
      TORCH_INTERNAL_ASSERT(head.w.block_rows == 1, "a feature stride is for 1 x 1 blocks (choose_layout)");
      head.w.feature_stride = k.vector_width;
      // The kernels may read panel_rows() features, then a panel, from any panel's first
      // token on (its first output row's, at most a plane into the image, plus its first
      // token).
      head.band_image_floats = std::max(head.band_image_floats,
                                        head.plane_stride + tokens + head.w.panel_rows(false) * k.vector_width) +
                               head.tap_read_past;
    }
  }
  return most_tokens;
}

bool is_channels_last(const at::Tensor& t) { return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast; }

at::Tensor conv_chain_cpu(const at::Tensor& input, at::TensorList weights, at::TensorList packed,
                          const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef strides,
                          at::IntArrayRef paddings, const std::vector<std::string>& activations, bool shortcut,
                          int64_t band_rows_override, std::optional<bool> split_channels) {
  const char* op = "sparsecpu::conv_chain";
  const kernels::SpmmKernels& k = kernels::active_kernels();
  const size_t n = weights.size();
  TORCH_CHECK_VALUE(n >= 1 && packed.size() == n && biases.size() == n && activations.size() == n, op,
                    ": weights, packed, biases and activations must have the same length >= 1, got ", weights.size(),
                    ", ", packed.size(), ", ", biases.size(), ", ", activations.size());
  TORCH_CHECK_VALUE(strides.size() == 2 * n && (paddings.size() == 2 * n || paddings.size() == 4 * n), op,
                    ": strides must hold 2 values (height, width) per layer and paddings 2 (height, width) or 4 (top, "
                    "bottom, left, right) per layer: ",
                    2 * n, " and ", 2 * n, " or ", 4 * n, " values, got ", strides.size(), " and ", paddings.size());
  const size_t pads_per_layer = paddings.size() / n;
  TORCH_CHECK_VALUE(band_rows_override >= 0, op, ": band_rows must be >= 0 (0: the planner's choice), got ",
                    band_rows_override);
  TORCH_CHECK_VALUE(!(split_channels.value_or(false) && band_rows_override > 0), op,
                    ": split_channels=True runs each image as one band: it takes no band_rows, got band_rows=",
                    band_rows_override);
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat && input.device().is_cpu(), op,
                    ": input must be a float32 CPU tensor, got ", input.scalar_type(), " on ", input.device());
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be [batch, channels, height, width], got shape ",
                    input.sizes());
  Chain chain;
  chain.shortcut = shortcut;
  chain.batch = input.size(0);
  chain.in_channels = input.size(1);
  std::vector<at::Tensor> packed_now, bias_tensors, depthwise_weights;  // held while the views are used
  int64_t channels = input.size(1), height = input.size(2), width = input.size(3);
  for (size_t l = 0; l < n; ++l) {
    const at::Tensor& weight = weights[l];
    TORCH_CHECK_VALUE(weight.dim() == 4, op, ": weights[", l,
                      "] must be [out_channels, in_channels, kernel_h, kernel_w], got shape ", weight.sizes());
    ChainLayer layer;
    const bool reads_shortcut = shortcut && l == n - 1;
    if (packed[l].numel() == 0) {  // a dense depthwise layer
      TORCH_CHECK_VALUE(l > 0 && !reads_shortcut && weight.size(0) == channels && weight.size(1) == 1 &&
                            weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
                        op, ": packed[", l, "] is empty, which makes layer ", l, " a dense depthwise convolution: weights[", l, "] ",
                        "must be a float32 CPU [", channels, ", 1, kernel_h, kernel_w] weight (the previous layer's ",
                        channels, " channels) and neither the first layer nor the shortcut's, got ",
                        weight.scalar_type(), " of shape ", weight.sizes());
      depthwise_weights.push_back(weight.contiguous());
      layer.depthwise_weight = depthwise_weights.back().data_ptr<float>();
      const auto& bias = biases.get(l);
      if (bias.has_value()) {
        TORCH_CHECK_VALUE(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == channels, op,
                          ": biases[", l, "] must be a float32 [", channels, "] tensor, got ", bias->scalar_type(),
                          " of shape ", bias->sizes());
        bias_tensors.push_back(bias->contiguous());
      }
      layer.bias = bias.has_value() ? bias_tensors.back().data_ptr<float>() : nullptr;
    } else {
      packed_now.push_back(packed_for(weight, packed[l]));
      layer.w = checked_view(packed_now.back());
      TORCH_CHECK_VALUE(layer.w.datatype == kernels::Datatype::kF32, op, ": packed[", l,
                        "] is an int8 buffer (pack_linear(..., quantize=\"int8\")); conv_chain runs fp32 buffers only");
      bias_tensors.push_back(checked_bias(layer.w, weight.flatten(1), biases.get(l), op));
      layer.bias = data_or_null(bias_tensors.back());
    }
    layer.act = parse_activation(activations[l]);
    layer.kernel_h = weight.size(2);
    layer.kernel_w = weight.size(3);
    layer.stride_h = strides[2 * l];
    layer.stride_w = strides[2 * l + 1];
    const int64_t* pads = paddings.data() + pads_per_layer * l;
    layer.pad_top = pads[0];
    layer.pad_bottom = pads[pads_per_layer == 4 ? 1 : 0];
    layer.pad_left = pads[pads_per_layer == 4 ? 2 : 1];
    layer.pad_right = pads[pads_per_layer == 4 ? 3 : 1];
    const auto padding = [&] {
      return c10::str("padding (top ", layer.pad_top, ", bottom ", layer.pad_bottom, ", left ", layer.pad_left,
                      ", right ", layer.pad_right, ")");
    };
    TORCH_CHECK_VALUE(layer.stride_h >= 1 && layer.stride_w >= 1 && layer.pad_top >= 0 && layer.pad_bottom >= 0 &&
                          layer.pad_left >= 0 && layer.pad_right >= 0,
                      op, ": layer ", l, " needs strides >= 1 and paddings >= 0, got stride (", layer.stride_h, ", ",
                      layer.stride_w, "), ", padding());
    const bool one_by_one = layer.kernel_h == 1 && layer.kernel_w == 1;
    TORCH_CHECK_VALUE(l > 0 || (one_by_one && !layer.padded()), op,
                      ": the first layer must be a 1 x 1 convolution without padding, got a ", layer.kernel_h, " x ",
                      layer.kernel_w, " kernel with ", padding());
    if (reads_shortcut && weight.size(1) == channels) {  // an identity shortcut: x is added
      TORCH_CHECK_VALUE(weight.size(0) == input.size(1), op, ": with shortcut=True, weights[", l,
                        "] takes only the previous layer's ", channels,
                        " channels, which makes the shortcut the input itself, added to its output: it must have the "
                        "input's ",
                        input.size(1), " output channels, got ", weight.size(0),
                        " (a projection shortcut appends its weight along the input channels)");
      chain.identity_shortcut = true;
      chain.shortcut_act = layer.act;
      layer.act = Activation::kNone;
    }
    const int64_t expected_in =
        layer.depthwise() ? 1 : channels + (reads_shortcut && !chain.identity_shortcut ? input.size(1) : 0);
    TORCH_CHECK_VALUE(weight.size(1) == expected_in, op, ": weights[", l, "] takes ", weight.size(1),
                      " input channels, expected ", expected_in,
                      reads_shortcut ? " (the previous layer's, then the input's for a projection shortcut)"
                                     : (l == 0 ? " (the input's)" : " (the previous layer's output channels)"));
    TORCH_CHECK_VALUE(!reads_shortcut || (one_by_one && layer.stride_h == 1 && layer.stride_w == 1 && !layer.padded()),
                      op, ": with shortcut=True the last layer must be a 1 x 1 convolution, stride 1, no padding");
    layer.in_channels = channels;
    layer.out_channels = weight.size(0);
    layer.in_h = height;
    layer.in_w = width;
    const int64_t spare_h = height + layer.pad_top + layer.pad_bottom - layer.kernel_h;
    const int64_t spare_w = width + layer.pad_left + layer.pad_right - layer.kernel_w;
    TORCH_CHECK_VALUE(height > 0 && width > 0 && spare_h >= 0 && spare_w >= 0, op, ": layer ", l, "'s input of ",
                      height, " x ", width, " is smaller than its ", layer.kernel_h, " x ", layer.kernel_w,
                      " kernel with ", padding());
    layer.out_h = spare_h / layer.stride_h + 1;
    layer.out_w = spare_w / layer.stride_w + 1;
    choose_layout(layer, l == 0 ? nullptr : &chain.layers[l - 1], k);
    if (!layer.reads_tile) chain.stages.push_back({l, l});
    chain.stages.back().second = l;
    chain.shortcut_stride_h *= layer.stride_h;
    chain.shortcut_stride_w *= layer.stride_w;
    channels = layer.out_channels;
    height = layer.out_h;
    width = layer.out_w;
    chain.layers.push_back(layer);
  }
  if (shortcut) {
    const int64_t sampled_h = (input.size(2) - 1) / chain.shortcut_stride_h + 1;
    const int64_t sampled_w = (input.size(3) - 1) / chain.shortcut_stride_w + 1;
    TORCH_CHECK_VALUE(sampled_h == height && sampled_w == width, op, ": the shortcut samples the ", input.size(2),
                      " x ", input.size(3), " input at the chain's stride (", chain.shortcut_stride_h, ", ",
                      chain.shortcut_stride_w, ") into ", sampled_h, " x ", sampled_w,
                      " pixels, but the chain's output is ", height, " x ", width);
  }
  const bool channels_last = is_channels_last(input);
  at::Tensor y = at::empty({chain.batch, channels, height, width},
                           input.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                       : at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  // The input as the kernels read it: rows of pixels with any strides (a
  // channels-last-like input is transposed 8 pixels at a time; see pack_image_tokens).
  const at::Tensor x = channels_last || input.stride(3) == 1 ? input : input.contiguous();
  std::vector<at::Tensor> tap_packed;  // held while the views are used
  // The first layer reads whole channel planes of the input in place: rows one after
  // the other (a band's tokens contiguous), planes whole registers apart.
  ChainLayer& first = chain.layers.front();
  const int64_t plane = x.size(2) * x.size(3);
  if (n >= 2 && !channels_last && first.stride_h == 1 && first.stride_w == 1 && k.vector_width >= 8 &&
      x.stride(3) == 1 && x.stride(2) == x.size(3) && x.stride(1) == plane && plane % k.vector_width == 0 &&
      first.w.block_rows == 1 && first.in_channels >= kMinInPlaceChannels &&
      first.out_channels * first.in_channels * (plane / k.vector_width) <= kMaxInPlacePackingFloats) {
    tap_packed.push_back(tap_packed_weight(weights[0], first.w, k.vector_width, k.vector_width, plane, 1));
    first.in_place = checked_view(tap_packed.back());
    first.in_place.feature_stride = k.vector_width;
  }
  const BandPlan plan = plan_bands(chain, k, band_rows_override, split_channels);
  const int64_t bands = plan.bands;
  const int64_t most_tokens = size_band_images(k, chain, bands, weights, &tap_packed);
  // No panel is wider than the most tokens of any stage, nor than a full panel.
  const int64_t widest = std::min(k.max_panel_width, ceil_div(most_tokens, k.vector_width) * k.vector_width);
  const int64_t panel_floats = panel_buffer_floats(k, chain, widest);
  const float* x_data = x.data_ptr<float>();
  float* y_data = y.data_ptr<float>();
  if (plan.split_channels) {
    thread_local BandScratch calling_thread_scratch;
    BandScratch& team_scratch = calling_thread_scratch;  // the caller's, not each member's thread_local
    size_scratch(team_scratch, chain, panel_floats);
#pragma omp parallel num_threads(at::get_num_threads())
    {
      const Team team{omp_get_thread_num(), omp_get_num_threads()};
      for (int64_t image = 0; image < chain.batch; ++image) {
        const ImageView x_image{x_data + image * x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
        const ImageView y_image{y_data + image * y.stride(0), y.stride(1), y.stride(2), y.stride(3)};
        run_band(k, chain, x_image, y_image, 0, height, -1, panel_floats, team_scratch, team);
      }
    }
    for (ScratchBuffer& buffer : team_scratch.images) buffer.release_if_large();
    for (ScratchBuffer& buffer : team_scratch.panels) buffer.release_if_large();
    return y;
  }
  at::parallel_for(0, chain.batch * bands, 1, [&](int64_t begin, int64_t end) {
    thread_local BandScratch scratch;
    size_scratch(scratch, chain, panel_floats);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t image = item / bands, band = item % bands;
      const ImageView x_image{x_data + image * x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
      const ImageView y_image{y_data + image * y.stride(0), y.stride(1), y.stride(2), y.stride(3)};
      const auto [first_row, end_row] = band_of(height, bands, band);
      // Rolling bands: the band before, when this thread ran it.
      const int64_t previous_first = item > begin && band > 0 ? band_of(height, bands, band - 1).first : -1;
      run_band(k, chain, x_image, y_image, first_row, end_row, previous_first, panel_floats, scratch, Team{});
    }
    for (ScratchBuffer& buffer : scratch.images) buffer.release_if_large();
    for (ScratchBuffer& buffer : scratch.panels) buffer.release_if_large();
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsecpu, CPU, m) {
  m.impl("conv_chain", &conv_chain_cpu);
}

}  // namespace sparsecpu
