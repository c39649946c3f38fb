"""Training and evaluation machinery: the training loop (:class:`Trainer`) and its hooks, checkpoints, the
learning-rate schedule, the resumable data stream, process-group helpers and logs. ``eyecool.engine.api``
builds all of it from a configuration (``eyecool.train`` / ``evaluate`` / ``predict``); ``eyecool.engine.cli``
is the command line over that API."""
from .checkpoint import (Checkpointer, capture_rng_state, checkpoint_name, last_checkpoint_path, load_checkpoint,
                         load_model_weights, restore_rng_state, save_checkpoint)
from .distributed import DistributedContext, init_distributed
from .hooks import HookBase, PeriodicCheckpointer, PeriodicEvaluator, StopOnSigterm, TrainingInterrupted
from .events import MetricsWriter, ProgressBar, read_metrics, setup_logging
from .sampling import ResumableTrainingSampler, SeededDataset, ShardSampler, build_training_stream, move_to_device
from .schedule import WarmupMultiStepLR, build_optimizer, linear_scaled_lr
from .trainer import Trainer

__all__ = [
    "Checkpointer", "HookBase", "PeriodicCheckpointer", "PeriodicEvaluator", "StopOnSigterm", "TrainingInterrupted",
    "capture_rng_state", "checkpoint_name", "last_checkpoint_path", "load_checkpoint", "load_model_weights",
    "restore_rng_state", "save_checkpoint", "DistributedContext", "init_distributed", "MetricsWriter",
    "ProgressBar", "read_metrics", "setup_logging", "ResumableTrainingSampler", "SeededDataset", "ShardSampler",
    "build_training_stream", "WarmupMultiStepLR", "build_optimizer", "linear_scaled_lr", "Trainer",
    "move_to_device",
]
