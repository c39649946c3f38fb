"""RPN-FCN fusion (RFF, the Eyecool report): gate the RPN objectness of every level with the semantic branch's
foreground probability, in one fused op.

``fg = sum over the thing channels of softmax(sem_logits)`` is computed with an online softmax in one sweep over
the logits (no ``[N, S + K, H, W]`` temporary). The op keeps each pixel's softmax statistics (max, sum of
``exp(x - max)``, fg: ``[3, N, H, W]``, 3 values per pixel instead of the softmax's S + K) as its second output,
so the backward reads every logit once and takes one exp per logit. The op is ``torch.ops.eyecool.fg_fusion``
(returning ``(fused levels, softmax_stats)``); this module adds the typed wrapper and the fake kernels. Its autograd
formula is C++ (``csrc/fg_fusion_autograd.cpp``, backward ``torch.ops.eyecool._fg_fusion_backward``), unlike the
other ops': the Python ``register_autograd`` path cost ~0.45 ms of a ~2 ms training step here.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from eyecool_ext import _extension, reference
from eyecool_ext._utils import check_fg_fusion_args


def fg_fusion(sem_logits: Tensor, rpn_logits: Sequence[Tensor], num_stuff: int, mode: str = "logit") -> List[Tensor]:
    """Fuse the semantic foreground probability into the RPN objectness of every level.

    ``fg = sum_{c >= num_stuff} softmax(sem_logits, dim=1)[:, c]``, ``fg_l = adaptive_avg_pool2d(fg, (H_l, W_l))``;
    returns ``rpn_logits[l] * fg_l`` (``mode="logit"``, the paper's formula) or ``sigmoid(rpn_logits[l]) * fg_l``
    (``mode="prob"``, fused probabilities). ``fg_l`` broadcasts over the anchor channels. Differentiable with
    respect to both inputs (detach ``sem_logits`` to stop the gradient into the semantic branch).

    Args:
        sem_logits: ``Tensor[N, S + K, H, W]`` semantic logits, stuff channels first (stride 4 in the network).
        rpn_logits: list of ``Tensor[N, A, H_l, W_l]`` objectness logits, one per level; same dtype and device.
        num_stuff: S, the number of stuff channels (``0 <= num_stuff < S + K``).
        mode: ``"logit"`` or ``"prob"``.

    Returns:
        list of ``Tensor[N, A, H_l, W_l]``, one per level.
    """
    levels = check_fg_fusion_args(sem_logits, rpn_logits, num_stuff, mode)
    if not _extension.use_compiled("fg_fusion", sem_logits, *levels):
        return reference.fg_fusion(sem_logits, levels, num_stuff, mode)
    fused, _softmax_stats = torch.ops.eyecool.fg_fusion(sem_logits, levels, int(num_stuff), mode)
    return list(fused)


def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in (ATen's opmath type): float for half and bfloat16."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


if _extension.has_op("fg_fusion"):

    @torch.library.register_fake("eyecool::fg_fusion")
    def _fg_fusion_fake(sem_logits, rpn_logits, num_stuff, mode):
        torch._check(sem_logits.dim() == 4, lambda: "sem_logits must be [N, S + K, H, W]")
        n, _, h, w = sem_logits.shape
        stats = sem_logits.new_empty((3, n, h, w), dtype=_opmath_dtype(sem_logits.dtype))
        return [torch.empty_like(level) for level in rpn_logits], stats

    @torch.library.register_fake("eyecool::_fg_fusion_backward")
    def _fg_fusion_backward_fake(grads, sem_logits, rpn_logits, softmax_stats, num_stuff, mode):
        return torch.empty_like(sem_logits), [torch.empty_like(level) for level in rpn_logits]
