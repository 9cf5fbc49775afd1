"""One fake trial process for tests/test_tracking_server.py: logs like a real trial does, through
study.tracking.TrialRun (the product's own path), ``epochs`` epochs of ``METRICS`` metrics.

    python tests/_tracking_trial.py URI EXPERIMENT_ID PARENT_RUN_ID TRIAL_ID EPOCHS PAUSE_S
"""
from __future__ import annotations

import os
import sys
import time

from study import contract as C
from study.tracking import TrialRun

METRICS = 12   # about what one epoch of a real trial logs (loss, accuracy, lr, variance, ...)


def main(uri: str, experiment_id: str, parent: str, trial_id: str, epochs: str,
         pause_s: str) -> None:
    run = TrialRun(uri, experiment_id, parent, trial_id,
                   {"arm": "mlp/sgd/base", "lr": 0.1, "batch_size": 32, "seed": trial_id},
                   tags={"family": "sgd", "arm": "mlp/sgd/base"},
                   dataset={"name": "fake", "digest": "0", "source": "/nowhere"})
    go = os.environ.get("TRIAL_GO_FILE")     # the test releases every trial at once
    while go and not os.path.exists(go):
        time.sleep(0.1)
    for epoch in range(1, int(epochs) + 1):
        run.log({f"metric_{i}": epoch + i / 100 for i in range(METRICS)}, step=epoch)
        run.flush()   # as at a checkpoint: each epoch's write meets the server (or its restart)
        time.sleep(float(pause_s))
    run.end(C.FINISHED)


if __name__ == "__main__":
    main(*sys.argv[1:])
