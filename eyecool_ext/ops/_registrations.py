"""What ties every op into PyTorch beyond its kernels, registered once when ``eyecool_ext.ops`` is imported:

- ``eyecool_ext.ops.autocast``: the AutocastCPU / AutocastCUDA kernels (each op's mixed-precision policy);
- ``eyecool_ext.onnx``: the TorchScript ONNX exporter's symbolic functions, so that ``torch.onnx.export`` of any
  module that calls the ops works after a plain ``import eyecool_ext``. (The dynamo exporter takes its
  translations as an argument instead: ``eyecool_ext.onnx.translation_table()``.)
"""
from eyecool_ext import onnx  # noqa: F401
from eyecool_ext.ops import autocast  # noqa: F401
