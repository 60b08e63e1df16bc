#!/usr/bin/env python
"""Does an offline W&B run of a pipeline's training stage hold its metrics file's scalars?
Reads the run back with the test suite's reader of W&B's own run file
(tests/training/test_wandb.py) and compares every scalar of every iteration.

    python tools/pipeline.py work_dir=WORK wandb.project=miniplm-demo wandb.mode=offline
    PYTHONPATH=tests:tests/training python benchmarks/check_wandb_run.py WORK/student-uniform/*/
"""

import glob
import json
import os
import sys

import test_wandb as wandb_reader

from megatron_miniplm.training.loggers import scalars
from megatron_miniplm.training.metrics import read as read_metrics


def main(stage_dir: str) -> int:
    [run] = glob.glob(os.path.join(stage_dir, "ckpt", "wandb", "wandb", "offline-run-*"))
    run_id, config, history = wandb_reader.read_run(run)
    metrics = read_metrics(os.path.join(stage_dir, "metrics.jsonl"))
    compared = mismatched = 0
    for it, record in sorted(metrics.train.items()):
        want = scalars(record)
        for part in (metrics.throughput, metrics.valid):
            if it in part:
                want.update(scalars(part[it]))
        got = history.get(it, {})
        for name, value in want.items():
            compared += 1
            mismatched += name not in got or abs(got[name] - value) > 1e-12 * max(1.0, abs(value))
    print(json.dumps({"run": run_id, "group": config.get("wandb_group"), "name": config.get("wandb_exp_name"),
                      "steps": len(history), "iterations": len(metrics.train), "scalars": compared,
                      "mismatched": mismatched, "last": history[max(history)]}, indent=1))
    return 1 if mismatched or not compared else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
