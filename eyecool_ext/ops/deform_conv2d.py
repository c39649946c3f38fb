"""Deformable convolution (DCN v1 and modulated v2), torchvision's op on eyecool's kernels, and
``DeformConv2d``, a layer that predicts its own offsets (the network's semantic branch calls the op through its
own ``eyecool.modeling.semantic_head.DeformableConv3x3``, which follows ``model.ops``).

The op is registered in C++ (``torch.ops.eyecool.deform_conv2d``); this module adds the typed wrapper, the fake
kernels that let ``torch.compile`` trace it, and its autograd formula, whose backward calls the registered
``eyecool::_deform_conv2d_backward`` op.

As torchvision's, ``deform_conv2d`` and ``DeformConv2d`` work under ``torch.jit.script`` (typed signatures; the
eager checks and fallback sit behind ``torch.jit.is_scripting()``) and ``torch.fx.symbolic_trace`` (a call with
traced values records one ``call_function`` node, wherever it is called from).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.fx
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from eyecool_ext import _extension, reference
from eyecool_ext._utils import IntPair, ShapeError, pair
from eyecool_ext._utils import check_deform_conv2d_args

_Proxy = torch.fx.Proxy


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  stride: BroadcastingList2[int] = 1, padding: BroadcastingList2[int] = 0,
                  dilation: BroadcastingList2[int] = 1, mask: Optional[Tensor] = None) -> Tensor:
    """Deformable convolution with torchvision's exact semantics (``torchvision.ops.deform_conv2d``).

    Every kernel point ``k = i * kw + j`` of output pixel ``(h, w)`` samples the input bilinearly at
    ``(h * stride_h - pad_h + i * dilation_h + dy, w * stride_w - pad_w + j * dilation_w + dx)``, where
    ``(dy, dx)`` are offset channels ``2k, 2k + 1`` of the channel's offset group; samples are zero outside the
    image. With ``mask`` (DCN v2) every sample is multiplied by mask channel ``k`` of its offset group.

    Args:
        input: ``Tensor[N, C_in, H, W]`` (float, double; half and bfloat16 accumulate in float). Any N, also 0.
        offset: ``Tensor[N, 2 * offset_groups * kh * kw, H_out, W_out]``; ``offset_groups`` is inferred from
            it and must divide ``C_in``.
        weight: ``Tensor[C_out, C_in / groups, kh, kw]``; ``groups`` is inferred from it.
        bias: ``Tensor[C_out]`` or None.
        stride, padding, dilation: an int or ``(h, w)``; the defaults 1, 0, 1 are torchvision's ``(1, 1)``,
            ``(0, 0)``, ``(1, 1)`` (ints, so that TorchScript accepts an int here too).
        mask: ``Tensor[N, offset_groups * kh * kw, H_out, W_out]`` modulation (DCN v2), or None (DCN v1).

    Returns:
        ``Tensor[N, C_out, H_out, W_out]`` with ``H_out = (H + 2 pad_h - (dilation_h (kh - 1) + 1)) // stride_h + 1``
        (``W_out`` likewise). Differentiable in input, offset, weight, bias and mask.

    Raises:
        ShapeError (``eyecool_ext._utils``): a shape, dtype or device that does not fit, with the expected and
            the given shapes. It is a ValueError and also a RuntimeError, the type torchvision raises for wrongly
            sized inputs, so code written for either catches it. The message names the argument, the expected
            and the given shape; for offsets or a mask with the wrong number of channels it leads with
            torchvision's words ("the shape of the offset tensor at dimension 1 is not valid", "mask.shape[1] is
            not valid"), and those come first, as in torchvision, when a call has other problems too.

    TorchScript: ``torch.jit.script`` compiles this function (and ``DeformConv2d``) to a direct call of
    ``torch.ops.eyecool.deform_conv2d``; scripted code needs the compiled extension, and the kernel's own checks
    (``TORCH_CHECK``, raised as ``torch.jit.Error``) replace the Python ones. ``torch.fx.symbolic_trace`` records
    the call as one node.
    """
    if not torch.jit.is_scripting():
        # TorchScript does not compile this branch, but its parser reads it: the eager code (a try statement,
        # generators) lives in a function of its own.
        return _deform_conv2d_eager(input, offset, weight, bias, stride, padding, dilation, mask)
    return _deform_conv2d_scripted(input, offset, weight, bias, stride, padding, dilation, mask)


def _deform_conv2d_eager(input, offset, weight, bias, stride, padding, dilation, mask):
    if (isinstance(input, _Proxy) or isinstance(offset, _Proxy) or isinstance(weight, _Proxy)
            or isinstance(bias, _Proxy) or isinstance(mask, _Proxy)):
        # torch.fx tracing: one node that calls this function again with real tensors.
        proxy = next(t for t in (input, offset, weight, bias, mask) if isinstance(t, _Proxy))
        return proxy.tracer.create_proxy("call_function", deform_conv2d,
                                         (input, offset, weight, bias, stride, padding, dilation, mask), {})
    try:
        shape = check_deform_conv2d_args(input, offset, weight, bias, stride, padding, dilation, mask)
    except ValueError as exc:
        raise ShapeError(_in_torchvision_order(str(exc), offset, weight, mask)) from None
    tensors = [t for t in (input, offset, weight, bias, mask) if t is not None]
    if not _extension.use_compiled("deform_conv2d", *tensors):
        return reference.deform_conv2d(input, offset, weight, bias, shape.stride, shape.padding, shape.dilation,
                                       mask)
    return torch.ops.eyecool.deform_conv2d(input, offset, weight, mask, bias, list(shape.stride),
                                           list(shape.padding), list(shape.dilation))


def _in_torchvision_order(message: str, offset, weight, mask) -> str:
    """The error to report for a call that fails the checks: torchvision checks the offset's channels first (in
    Python), then the mask's channels (in C++) before the dtypes, and says "the shape of the offset tensor at
    dimension 1 is not valid" / "mask.shape[1] is not valid"; so the message leads with the problem torchvision
    would report, in its words, followed by eyecool's (expected and given shapes). Runs on the error path only."""
    try:
        taps = int(weight.shape[2]) * int(weight.shape[3])
        channels = int(offset.shape[1])
        if offset.dim() != 4 or weight.dim() != 4 or taps == 0:
            return message
        if channels == 0 or channels % (2 * taps):
            head = "deform_conv2d: the shape of the offset tensor at dimension 1 is not valid: "
            if "offset must have 2 * offset_groups * kh * kw" in message:
                return head + message[len("deform_conv2d: "):]
            return (head + f"offset must have 2 * offset_groups * kh * kw = a positive multiple of {2 * taps} "
                    f"channels for a {weight.shape[2]}x{weight.shape[3]} kernel, got offset {tuple(offset.shape)} "
                    f"(and: {message})")
        expected = channels // 2
        if mask is not None and mask.dim() == 4 and int(mask.shape[1]) != expected:
            head = "deform_conv2d: mask.shape[1] is not valid: "
            if message.startswith("deform_conv2d: mask must have shape"):
                return head + message[len("deform_conv2d: "):]
            return (head + f"mask must have offset_groups * kh * kw = {expected} channels, got mask "
                    f"{tuple(mask.shape)} (and: {message})")
    except (AttributeError, IndexError, TypeError):  # not tensors of the expected rank: the message stands
        pass
    return message


if _extension.has_op("deform_conv2d"):

    def _deform_conv2d_scripted(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor],
                                stride: List[int], padding: List[int], dilation: List[int],
                                mask: Optional[Tensor]) -> Tensor:
        return torch.ops.eyecool.deform_conv2d(input, offset, weight, mask, bias, stride, padding, dilation)
else:

    def _deform_conv2d_scripted(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor],
                                stride: List[int], padding: List[int], dilation: List[int],
                                mask: Optional[Tensor]) -> Tensor:
        raise RuntimeError("eyecool_ext: deform_conv2d under torch.jit.script needs the compiled extension (the "
                           "reference fallback is not scriptable); rebuild it with `make install`")


class DeformConv2d(nn.Module):
    """A deformable convolution layer that predicts its own offsets (and, for DCN v2, its modulation).

    The offsets come from a plain convolution over the layer's input with the layer's kernel size, stride,
    padding and dilation (``2 * offset_groups * kh * kw`` channels); with ``modulated=True`` a second one gives
    ``offset_groups * kh * kw`` mask channels through ``2 * sigmoid``. Both are zero-initialised (UPSNet's
    choice), so a new layer computes exactly the plain convolution with its ``weight`` and ``bias``: offsets 0 and
    modulation ``2 * sigmoid(0) = 1`` (the factor 2 keeps that identity; DCN v2's plain sigmoid would start at
    half the convolution).

    For users of the op library: the network's semantic branch (docs/design.md section 5) does not use this
    layer but ``eyecool.modeling.semantic_head.DeformableConv3x3`` (DCN v1, 3x3), which calls ``deform_conv2d``
    through the op backend that ``model.ops`` selects.

    Differences from ``torchvision.ops.DeformConv2d``, which takes its offsets (and mask) as inputs: the
    arguments after ``groups`` are ``offset_groups, bias, modulated`` (pass ``bias`` by keyword), the layer owns
    ``offset_conv`` (and ``mask_conv``), so its ``state_dict`` has their weights too, and ``forward(x)`` predicts
    the offsets. ``forward(x, offset, mask=None)`` is torchvision's call: it uses the given offsets (offset groups
    inferred from their shape) and mask (None: DCN v1, whatever ``modulated`` says) and leaves the layer's own
    offset and mask convolutions unused. The layer works under ``torch.jit.script`` and ``torch.fx``; traced as
    the root module, ``symbolic_trace`` makes ``offset`` and ``mask`` inputs (torchvision's call), so trace
    ``symbolic_trace(layer, concrete_args={"offset": None, "mask": None})`` for the self-predicting form (inside
    a traced model, ``self.layer(x)`` traces the offset convolutions as it is).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1, offset_groups: int = 1,
                 bias: bool = True, modulated: bool = False):
        super().__init__()
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                             f"groups ({groups})")
        if offset_groups <= 0 or in_channels % offset_groups:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by offset_groups ({offset_groups})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair(kernel_size, "kernel_size", 1)
        self.stride = pair(stride, "stride", 1)
        self.padding = pair(padding, "padding", 0)
        self.dilation = pair(dilation, "dilation", 1)
        self.groups = groups
        self.offset_groups = offset_groups
        self.modulated = modulated
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.offset_conv = nn.Conv2d(in_channels, 2 * offset_groups * kh * kw, self.kernel_size, self.stride,
                                     self.padding, self.dilation)
        self.mask_conv = (nn.Conv2d(in_channels, offset_groups * kh * kw, self.kernel_size, self.stride,
                                    self.padding, self.dilation) if modulated else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``weight`` and ``bias`` as ``nn.Conv2d`` initialises them; offset and mask convolutions to zero."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        for conv in (self.offset_conv, self.mask_conv):
            if conv is not None:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def offsets_and_mask(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """x ``[N, C_in, H, W]`` -> offsets ``[N, 2 G kh kw, H_out, W_out]`` and mask ``[N, G kh kw, H_out, W_out]``
        (None unless modulated)."""
        offset = self.offset_conv(x)
        mask = 2 * torch.sigmoid(self.mask_conv(x)) if self.mask_conv is not None else None
        return offset, mask

    def forward(self, x: Tensor, offset: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        """x ``[N, C_in, H, W]`` -> ``[N, C_out, H_out, W_out]``, with the layer's own offsets (and mask); or
        with the ``offset`` (and ``mask``) given, as torchvision's ``DeformConv2d.forward(input, offset, mask)``."""
        if offset is None:
            if mask is not None:
                raise ValueError("DeformConv2d: a mask was given without offsets; pass both (torchvision's call) "
                                 "or neither (the layer predicts them)")
            offset, mask = self.offsets_and_mask(x)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}")
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.offset_groups != 1:
            s += f", offset_groups={self.offset_groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.modulated:
            s += ", modulated=True"
        return s


if _extension.has_op("deform_conv2d"):

    def _output_size(input, weight, stride, padding, dilation):
        out_h = (input.size(2) + 2 * padding[0] - (dilation[0] * (weight.size(2) - 1) + 1)) // stride[0] + 1
        out_w = (input.size(3) + 2 * padding[1] - (dilation[1] * (weight.size(3) - 1) + 1)) // stride[1] + 1
        return out_h, out_w

    @torch.library.register_fake("eyecool::deform_conv2d")
    def _deform_conv2d_fake(input, offset, weight, mask, bias, stride, padding, dilation):
        torch._check(input.dim() == 4 and offset.dim() == 4 and weight.dim() == 4,
                     lambda: "input, offset and weight must be 4-d")
        out_h, out_w = _output_size(input, weight, stride, padding, dilation)
        torch._check(offset.size(2) == out_h and offset.size(3) == out_w,
                     lambda: "offset must have the output's spatial size")
        return input.new_empty((input.size(0), weight.size(0), out_h, out_w))

    @torch.library.register_fake("eyecool::_deform_conv2d_backward")
    def _deform_conv2d_backward_fake(grad, input, offset, weight, mask, stride, padding, dilation):
        grad_mask = torch.empty_like(mask) if mask is not None else input.new_empty((0,))
        return (torch.empty_like(input), torch.empty_like(offset), torch.empty_like(weight), grad_mask,
                weight.new_empty((weight.size(0),)))

    def _deform_conv2d_setup_context(ctx, inputs, output):
        input, offset, weight, mask, bias, stride, padding, dilation = inputs
        ctx.save_for_backward(input, offset, weight, mask)
        ctx.args = (stride, padding, dilation)
        ctx.has_bias = bias is not None

    def _deform_conv2d_backward(ctx, grad):
        input, offset, weight, mask = ctx.saved_tensors
        grad_input, grad_offset, grad_weight, grad_mask, grad_bias = torch.ops.eyecool._deform_conv2d_backward(
            grad, input, offset, weight, mask, *ctx.args)
        return (grad_input, grad_offset, grad_weight, grad_mask if mask is not None else None,
                grad_bias if ctx.has_bias else None, None, None, None)

    torch.library.register_autograd("eyecool::deform_conv2d", _deform_conv2d_backward,
                                    setup_context=_deform_conv2d_setup_context)
