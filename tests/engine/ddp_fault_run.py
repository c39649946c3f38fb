"""One rank of a 2-process toy training (gloo, CPU) whose rank 1 gets a NaN loss at its third step. Started by
test_training_faults.py as two plain processes (RANK / WORLD_SIZE / MASTER_* in the environment) rather than under
torchrun, so that no launcher kills a rank before it has reported: each rank writes the message it stopped with
to argv[1]/rank<r>.txt and exits with status 3."""
import os
import sys

import torch

from eyecool.engine import init_distributed
from eyecool.engine.distributed import cleanup_distributed
from toy import make_toy_trainer

if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir = sys.argv[1]
    ctx = init_distributed("cpu")
    trainer = make_toy_trainer(out_dir, max_iter=8, batch_size=2, ctx=ctx, dropout=0.0,
                               nan_at_call=2 if ctx.rank == 1 else None)
    try:
        trainer.train()
    except FloatingPointError as error:
        with open(os.path.join(out_dir, f"rank{ctx.rank}.txt"), "w") as f:
            f.write(str(error))
        cleanup_distributed()
        sys.exit(3)
    cleanup_distributed()
