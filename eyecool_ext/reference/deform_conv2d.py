"""Deformable convolution (DCN v1, modulated v2) in plain PyTorch: the test oracle for the kernels and their
fallback.

It gathers every bilinear tap of every (output pixel, kernel point, channel) at once and contracts them with the
weight in one einsum, so memory grows with N * C_in * kh * kw * H_out * W_out: meant for tests and small inputs.
Autograd through the gathers gives all five gradients; the sampling follows torchvision's kernels (zero padding
outside the image, a point at or beyond one pixel outside contributes nothing, except to the offset gradient on
row or column -1 exactly, as torchvision's).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from eyecool_ext._autocast import reference_policy
from eyecool_ext._utils import IntPair, check_deform_conv2d_args


@reference_policy("deform_conv2d", ("input", "offset", "weight", "mask", "bias"))
def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  stride: IntPair = (1, 1), padding: IntPair = (0, 0), dilation: IntPair = (1, 1),
                  mask: Optional[Tensor] = None) -> Tensor:
    """Reference deformable convolution with torchvision's signature and semantics; see
    ``eyecool_ext.ops.deform_conv2d``."""
    shape = check_deform_conv2d_args(input, offset, weight, bias, stride, padding, dilation, mask)
    n, c_in, height, width = input.shape
    c_out, c_in_per_group, kh, kw = weight.shape
    taps = kh * kw
    groups, offset_groups = shape.groups, shape.offset_groups
    out_h, out_w = shape.out_height, shape.out_width
    pixels = out_h * out_w
    acc = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    device = input.device

    # Sampling positions [N, offset_groups, kh*kw, H_out, W_out]: the regular grid plus the learnt offsets
    # (offset channel 2k is the y shift of kernel point k, 2k+1 its x shift).
    ky = torch.arange(kh, device=device, dtype=acc) * shape.dilation[0]
    kx = torch.arange(kw, device=device, dtype=acc) * shape.dilation[1]
    oy = torch.arange(out_h, device=device, dtype=acc) * shape.stride[0] - shape.padding[0]
    ox = torch.arange(out_w, device=device, dtype=acc) * shape.stride[1] - shape.padding[1]
    grid_y = (oy.view(1, 1, out_h, 1) + ky.view(kh, 1, 1, 1)).expand(kh, kw, out_h, out_w).reshape(taps, out_h, out_w)
    grid_x = (ox.view(1, 1, 1, out_w) + kx.view(1, kw, 1, 1)).expand(kh, kw, out_h, out_w).reshape(taps, out_h, out_w)
    off = offset.to(acc).reshape(n, offset_groups, taps, 2, out_h, out_w)
    y = grid_y + off[:, :, :, 0]
    x = grid_x + off[:, :, :, 1]

    # torchvision's bilinear_interpolate: nothing at or beyond one pixel outside, zero-valued taps outside. The band
    # is closed at -1: on row or column -1 exactly the taps inside the image have weight 0 (so the value is 0 for
    # finite inputs), but their weights' derivative is not, which gives torchvision's offset gradient there.
    inside = (y >= -1) & (y < height) & (x >= -1) & (x < width)
    y_low = torch.floor(y.detach())
    x_low = torch.floor(x.detach())
    ly = y - y_low
    lx = x - x_low
    hy = 1 - ly
    hx = 1 - lx
    y_low = torch.where(inside, y_low, torch.zeros_like(y_low)).to(torch.long)
    x_low = torch.where(inside, x_low, torch.zeros_like(x_low)).to(torch.long)

    channels_per_offset_group = c_in // offset_groups
    image = input.to(acc).reshape(n, offset_groups, channels_per_offset_group, height * width)
    samples = taps * pixels

    def tap(yi: Tensor, xi: Tensor, w: Tensor) -> Tensor:
        ok = inside & (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
        index = (yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)).view(n, offset_groups, 1, samples)
        values = image.gather(3, index.expand(n, offset_groups, channels_per_offset_group, samples))
        w = torch.where(ok, w, torch.zeros_like(w)).view(n, offset_groups, 1, samples)
        return values * w

    columns = (tap(y_low, x_low, hy * hx) + tap(y_low, x_low + 1, hy * lx)
               + tap(y_low + 1, x_low, ly * hx) + tap(y_low + 1, x_low + 1, ly * lx))
    if mask is not None:
        columns = columns * mask.to(acc).reshape(n, offset_groups, 1, samples)
    # [N, C_in, kh*kw, P] -> per weight group [N, groups, C_in/groups * kh*kw, P], matching weight's flattening.
    columns = columns.view(n, groups, c_in_per_group * taps, pixels)
    w = weight.to(acc).reshape(groups, c_out // groups, c_in_per_group * taps)
    out = torch.einsum("gok,ngkp->ngop", w, columns).reshape(n, c_out, out_h, out_w)
    if bias is not None:
        out = out + bias.to(acc).view(1, c_out, 1, 1)
    return out.to(input.dtype)
