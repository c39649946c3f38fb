"""deform_conv2d against torchvision and a dense convolution, at the layer of UPSNet's semantic head.

The "DC subnet" runs deformable 3x3 convolutions on every FPN level (docs/design.md section 5). COCO-sized: its
256->128 layer (modulated, v2) at 64x64 (P3 of a 512x512 image) and 128x128 (P2), batch 1. Demo-sized: the
demo network's first layer (``configs/demo.yaml``: DCN v1 as the network runs it, 64->64) on P2 of a batch of
four 128-pixel images (4 x 32x32). Forward and forward+backward. The dense ``conv2d`` of the same shape is the
floor: deformable sampling can at best add nothing to it. On the CPU also onnxruntime's ``DeformConv`` (ONNX
opset 19, a one-node graph, as many intra-op threads as torch has), forward only, alternating run by run.

Every case names the CPU ISA path that ran ("[avx512]", "[avx2]": the kernel torch.ops.eyecool_cpu.gemm_isa()
reports) and the rows carry the CPU model. ``--isa avx2`` caps every party at AVX2 on an AVX-512 CPU:
EYECOOL_CPU_ISA=avx2 for eyecool, ONEDNN_MAX_CPU_ISA=AVX2 (the dense convolution) and
MKL_ENABLE_INSTRUCTIONS=AVX2 (at::mm, torchvision's GEMM); onnxruntime has no such switch (its MLAS picks
its kernels from the CPU), so its row stays at the CPU's ISA. The script re-runs itself with those variables
set, as they must be read before the libraries start.

    python benchmarks/bench_deform_conv2d.py [cpu|cuda] [--isa avx2]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
from timing import markdown_table, measure, measure_paired, row  # noqa: E402

from eyecool_ext import ops  # noqa: E402
from eyecool_ext.collect_env import cpu_model  # noqa: E402  (the one CPU-name lookup; run.py uses it too)

# The environment of `--isa avx2`: each library's own AVX2 cap.
AVX2_CAPS = {"EYECOOL_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

IN_CHANNELS, OUT_CHANNELS = 256, 128
# (case, batch, in channels, out channels, side, modulated)
LAYERS = (
    ("v2 256->128 3x3 64x64", 1, IN_CHANNELS, OUT_CHANNELS, 64, True),
    ("v2 256->128 3x3 128x128", 1, IN_CHANNELS, OUT_CHANNELS, 128, True),
    ("demo v1 64->64 3x3 4x32x32", 4, 64, 64, 32, False),
)


def layer_inputs(size: int, device: str, seed: int = 0, batch: int = 1, in_channels: int = IN_CHANNELS,
                 out_channels: int = OUT_CHANNELS, modulated: bool = True):
    """(input, offset, weight, bias, mask) of a 3x3 layer on a batch of size x size maps, padding 1; mask is
    None for DCN v1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, size, size, generator=g)
    offset = torch.randn(batch, 18, size, size, generator=g) * 2  # a few pixels, like a trained DCN
    weight = torch.randn(out_channels, in_channels, 3, 3, generator=g) * 0.02
    bias = torch.randn(out_channels, generator=g)
    mask = torch.rand(batch, 9, size, size, generator=g) if modulated else None
    return [None if t is None else t.to(device) for t in (x, offset, weight, bias, mask)]


def _forward_backward(fn, inputs, grad):
    """``fn(*inputs)`` forward and backward; ``inputs`` may hold None (no mask)."""
    def run():
        for t in inputs:
            if t is not None:
                t.grad = None
        fn(*inputs).backward(grad)
    return run


def cpu_isa_path() -> str:
    """The ISA of eyecool's CPU GEMM and channel loops in this process: avx512, avx2 or baseline (at::mm)."""
    return torch.ops.eyecool_cpu.gemm_isa()


def onnxruntime_deform_conv(x, offset, weight, bias, mask, threads: int):
    """A callable running onnxruntime's DeformConv (opset 19) on these tensors (3x3, padding 1, stride 1), or
    None when onnxruntime or onnx is missing."""
    try:
        import numpy as np
        import onnx
        import onnxruntime
        from onnx import TensorProto, helper
    except ImportError:
        return None
    names = ["X", "W", "offset", "B"] + (["mask"] if mask is not None else [])
    tensors = [x, weight, offset, bias] + ([mask] if mask is not None else [])
    node = helper.make_node("DeformConv", names, ["Y"], kernel_shape=list(weight.shape[2:]), pads=[1, 1, 1, 1],
                            strides=[1, 1], dilations=[1, 1], group=1, offset_group=offset.shape[1] // 18)
    graph = helper.make_graph(
        [node], "deform_conv",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(t.shape)) for n, t in zip(names, tensors)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [x.shape[0], weight.shape[0], offset.shape[2],
                                                            offset.shape[3]])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Its pool's threads would otherwise spin after each run, taking the cores from ours in the alternation.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {n: np.ascontiguousarray(t.detach().cpu().numpy()) for n, t in zip(names, tensors)}

    def run():
        return session.run(None, feeds)[0]

    # Same semantics as ours (a wrong graph would time the wrong thing).
    ours = ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask)
    got = torch.from_numpy(run())
    assert torch.allclose(got, ours, atol=1e-3, rtol=1e-3), (got - ours).abs().max()
    return run


def cases(device: str = "cpu"):
    rows = []
    tag = f" [{cpu_isa_path()}]" if device == "cpu" else ""
    machine = dict(cpu=cpu_model(), isa=cpu_isa_path()) if device == "cpu" else {}
    # torchvision's CPU kernel takes seconds per call at 128x128: fewer repeats for it.
    slow_peer = dict(warmup=1, repeat=3) if device == "cpu" else {}
    for case, batch, cin, cout, size, modulated in LAYERS:
        case = case + tag
        x, offset, weight, bias, mask = layer_inputs(size, device, batch=batch, in_channels=cin, out_channels=cout,
                                                     modulated=modulated)

        def ours(x, offset, weight, bias, mask):
            return ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask)

        def theirs(x, offset, weight, bias, mask):
            return torchvision.ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask)

        def dense(x, offset, weight, bias, mask):
            return F.conv2d(x, weight, bias, 1, 1)

        args = (x, offset, weight, bias, mask)
        # Against the dense convolution (the closest ratio, a target of its own) ours and the peer alternate run
        # by run, so that both meet the same moments of the machine; against torchvision's seconds-long kernel
        # ours is timed first.
        with torch.no_grad():
            rows.append(row("deform_conv2d", case + " fwd", device, "float32", measure(lambda: ours(*args), device),
                            "torchvision", measure(lambda: theirs(*args), device, **slow_peer), **machine))
            ours_fwd, dense_fwd = measure_paired(lambda: ours(*args), lambda: dense(*args), device, warmup=2,
                                                 repeat=7)
            rows.append(row("deform_conv2d", case + " fwd", device, "float32", ours_fwd, "dense conv2d", dense_fwd,
                            **machine))
            ort = onnxruntime_deform_conv(*args, threads=torch.get_num_threads()) if device == "cpu" else None
            if ort is not None:
                ours_fwd, ort_fwd = measure_paired(lambda: ours(*args), ort, device, warmup=2, repeat=7)
                rows.append(row("deform_conv2d", case + " fwd", device, "float32", ours_fwd,
                                "onnxruntime DeformConv", ort_fwd, **machine))
        leaves = [None if t is None else t.clone().requires_grad_() for t in args]
        grad = torch.randn(batch, cout, size, size, device=device)
        ours_step, dense_step = _forward_backward(ours, leaves, grad), _forward_backward(dense, leaves, grad)
        rows.append(row("deform_conv2d", case + " fwd+bwd", device, "float32", measure(ours_step, device),
                        "torchvision", measure(_forward_backward(theirs, leaves, grad), device, **slow_peer),
                        **machine))
        ours_fb, dense_fb = measure_paired(ours_step, dense_step, device, warmup=2, repeat=7)
        rows.append(row("deform_conv2d", case + " fwd+bwd", device, "float32", ours_fb, "dense conv2d", dense_fb,
                        **machine))
    return rows


def main(argv) -> int:
    import argparse
    import json
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("device", nargs="?", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--isa", choices=["best", "avx2"], default="best",
                        help="avx2: cap eyecool, oneDNN and MKL at AVX2 (re-runs this script with the caps set)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_CAPS.items()):
        env = dict(os.environ, **AVX2_CAPS)
        return subprocess.call([sys.executable, os.path.abspath(__file__)] + argv, env=env)
    rows = cases(args.device)
    if args.device == "cpu":
        print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; eyecool ISA path: "
              f"{cpu_isa_path()}; caps: " + (", ".join(f"{k}={os.environ[k]}" for k in AVX2_CAPS if k in os.environ)
                                              or "none") + "\n")
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "isa": cpu_isa_path() if args.device == "cpu" else None,
                       "caps": {k: os.environ[k] for k in AVX2_CAPS if k in os.environ},
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
