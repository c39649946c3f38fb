"""eyecool: the Eyecool panoptic segmentation network (UPSNet-style, with the RFF and DAM fusion modules) on
the C++/CUDA ops of ``eyecool_ext``.

Subpackages: ``eyecool.data`` (COCO panoptic reader, synthetic data set), ``eyecool.modeling`` (the network),
``eyecool.evaluation`` (PQ), ``eyecool.engine`` (training loop); ``eyecool.cli`` is the ``eyecool`` command.

The Python API (every command wraps it): ``eyecool.load_config(path, overrides)``, ``eyecool.train(cfg, out_dir,
resume=False)``, ``eyecool.evaluate(cfg, weights, out_dir=None)`` and ``eyecool.predict(cfg, weights, images)``.
They are imported on first use, so ``import eyecool`` stays light (no torch import).
"""
__version__ = "0.1.0"

# public name -> module that defines it
_LAZY_API = {
    "train": "eyecool.engine.api",
    "evaluate": "eyecool.engine.api",
    "predict": "eyecool.engine.api",
    "load_config": "eyecool.config",
}

__all__ = ["__version__", *_LAZY_API]


def __getattr__(name):
    if name in _LAZY_API:
        import importlib

        value = getattr(importlib.import_module(_LAZY_API[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'eyecool' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY_API))
