"""One rank of a 2-process toy training (gloo, CPU) in which rank 1 meets a fault: with argv[2] == "nan" a NaN
loss at its third step, with "sigterm" a SIGTERM just before its fourth batch. Started by test_training_faults.py as
two plain processes (RANK / WORLD_SIZE / MASTER_* in the environment) rather than under torchrun, so that no
launcher kills a rank before it has reported: each rank writes the message it stopped with to argv[1]/rank<r>.txt
and exits with status 3 (NaN) or 143 (SIGTERM)."""
import os
import signal
import sys

import torch

from eyecool.engine import init_distributed
from eyecool.engine.distributed import cleanup_distributed
from eyecool.engine.hooks import TrainingInterrupted
from toy import make_toy_trainer

if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, fault = sys.argv[1], sys.argv[2]
    ctx = init_distributed("cpu")
    trainer = make_toy_trainer(out_dir, max_iter=8, batch_size=2, ctx=ctx, dropout=0.0,
                               nan_at_call=2 if ctx.rank == 1 and fault == "nan" else None)
    if ctx.rank == 1 and fault == "sigterm":
        factory = trainer.stream_factory

        def stream_factory(start_batch):
            for i, batch in enumerate(factory(start_batch), start_batch):
                if i == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

        trainer.stream_factory = stream_factory
    try:
        trainer.train()
    except (FloatingPointError, TrainingInterrupted) as error:
        with open(os.path.join(out_dir, f"rank{ctx.rank}.txt"), "w") as f:
            f.write(str(error))
        # The status the trainer chose, without the process group's teardown and the interpreter's finalisation:
        # gloo may abort the process (SIGABRT) there when the other rank has already closed its connections,
        # which is a race between the two exits, not what these tests check.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3 if isinstance(error, FloatingPointError) else error.code)
    cleanup_distributed()
