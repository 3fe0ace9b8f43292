// A k x k convolution's weight packed for conv_chain's tap layout, in which the kernels
// read a band image in place instead of a panel of shifted copies.
//
// The tap layout (conv_chain.cpp): each input channel c of the band keeps kernel_w
// planes, plane j holding the zero-padded rows shifted left by j columns, each row
// `pitch` floats, planes plane_stride floats apart (both multiples of the ISA's vector
// width). A panel starting at token t of the band (rows of `pitch` tokens) then finds
// feature (c, i, j) -- padded pixel (row + i, column + j) -- at planes + t + ((c *
// kernel_w + j) * plane_stride + i * pitch): a whole number of registers from the
// panel's start, whatever the panel's width. Packed with those register numbers as its
// input features, and run with PackedLinearView::feature_stride set to the vector
// width, the weight reads the band image itself as its panel.
//
// A stride-2 layer's band image has two phases (conv_chain.cpp's BandImage): per
// channel, kernel_w planes of its even padded rows, then kernel_w of its odd rows, plane j
// holding the columns j, j + 2, ... of each row. Feature (c, i, j) then lies at planes +
// t + (((c * 2 + i % 2) * kernel_w + j) * plane_stride + i / 2 * pitch): `phases` = 2.
//
// A 1 x 1 weight packed with one plane per channel (kernel_w = 1, plane_stride the
// input's channel plane) reads the chain's input image in place the same way:
// conv_chain's first layer over an input whose planes are whole registers.
#pragma once

#include <ATen/ATen.h>

#include "../kernels/spmm.h"

namespace sparsecpu {

// `weight` [out, in, kernel_h, kernel_w] packed over (in * phases * kernel_w *
// plane_stride / feature_stride) tap features as above, feature_stride floats apart, with like's
// row_block and block_rows and K-blocks of as many input channels as like's K-blocks
// hold. Packed once per weight (as it is now) and geometry, then cached for as long as
// the weight lives.
at::Tensor tap_packed_weight(const at::Tensor& weight, const kernels::PackedLinearView& like, int64_t pitch,
                             int64_t feature_stride, int64_t plane_stride, int64_t phases);

}  // namespace sparsecpu
