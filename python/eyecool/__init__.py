"""eyecool: the Eyecool panoptic segmentation network (UPSNet-style, with the RFF and DAM fusion modules) on
the C++/CUDA ops of ``eyecool_ext``.

Subpackages: ``eyecool.data`` (COCO panoptic reader, synthetic data set), ``eyecool.modeling`` (the network),
``eyecool.evaluation`` (PQ), ``eyecool.engine`` (training loop); ``eyecool.cli`` is the ``eyecool`` command.
"""
__version__ = "0.1.0"
