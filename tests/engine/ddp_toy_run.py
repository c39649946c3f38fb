"""Trains the toy model for a few iterations (under torchrun or alone) and writes metrics.json and the final
weights to the folder given as argv[1]; argv[2] is the per-process batch size. No dropout: the ranks' own
random draws would make the trajectories differ beyond rounding."""
import sys

import torch

from eyecool.engine import init_distributed, setup_logging
from eyecool.engine.distributed import cleanup_distributed
from toy import make_toy_trainer

if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, batch_size = sys.argv[1], int(sys.argv[2])
    ctx = init_distributed("cpu")
    setup_logging(out_dir, ctx.rank)
    trainer = make_toy_trainer(out_dir, max_iter=8, batch_size=batch_size, ctx=ctx, dataset_size=32,
                               dropout=0.0)
    trainer.train()
    cleanup_distributed()
