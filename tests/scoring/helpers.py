"""Tiny datasets and checkpoints for the scoring tests (no tokenizer, no preprocessing run)."""

from __future__ import annotations

import json
import os

import numpy as np

EOD = 0
VOCAB = 500  # padded to 512 by the model: the last 12 rows are megatron padding
TOKENIZER = {"path": "tok.json", "name": "test", "sha256": "a" * 64, "vocab_size": VOCAB,
             "eod_id": EOD, "pad_id": EOD}


def make_instances(n: int, seed: int = 0, max_len: int = 65) -> list[np.ndarray]:
    """Instances of varied lengths (1 .. max_len tokens) with EODs inside, like MiniPLM's."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = 1 if i == 3 else int(rng.integers(2, max_len + 1))
        x = rng.integers(1, VOCAB, size=length)
        for pos in rng.integers(0, length, size=length // 16):
            x[pos] = EOD
        out.append(x.astype(np.int64))
    return out


def write_dataset(prefix: str, instances: list[np.ndarray], tokenizer: dict = TOKENIZER) -> dict:
    """PREFIX.bin/.idx + a PREFIX.meta.json with every key of the preprocessing contract."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_miniplm.data.meta import idx_fingerprint

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for x in instances:
        builder.add_item(torch.from_numpy(x.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    meta = {
        "format_version": 1, "fingerprint": idx_fingerprint(prefix + ".idx"),
        "num_instances": len(instances), "num_tokens": int(sum(len(x) for x in instances)),
        "instance_mode": "miniplm", "seq_length": max(len(x) for x in instances) - 1,
        "tokenizer": dict(tokenizer), "domains": ["default"], "domain_stats": {}, "inputs": [],
        "skipped": {},
    }
    with open(prefix + ".meta.json", "w") as f:
        json.dump(meta, f)
    return meta


def write_sharded(prefix: str, parts: list[list[np.ndarray]]) -> dict:
    """A sharded dataset: PREFIX_0000i shards and a top-level meta listing them."""
    metas = [write_dataset(f"{prefix}_{i:05d}", part) for i, part in enumerate(parts)]
    top = {**metas[0], "num_instances": sum(m["num_instances"] for m in metas),
           "fingerprint": "top-" + "".join(m["fingerprint"][:8] for m in metas),
           "shards": [os.path.basename(f"{prefix}_{i:05d}") for i in range(len(parts))]}
    with open(prefix + ".meta.json", "w") as f:
        json.dump(top, f)
    return top


def save_checkpoint(directory: str, preset: str = "tiny", vocab: int = VOCAB, tokenizer: dict | None = TOKENIZER,
                    seed: int = 3) -> None:
    """A random model at TP=1/PP=1 (run under run_distributed, world 1), with its config
    and, unless ``tokenizer`` is None, a checkpoint_info.json naming the tokenizer."""
    from megatron_miniplm import parallel
    from megatron_miniplm.dist_checkpoint import save_model
    from presets import get_preset
    from megatron_miniplm.models.gpt import build_model

    parallel.initialize(parallel.ParallelConfig(seed=seed))
    config = get_preset(preset).replace(vocab_size=vocab)
    model = build_model(config)
    os.makedirs(directory)
    save_model([model], directory, config)
    if tokenizer is not None:
        with open(os.path.join(directory, "checkpoint_info.json"), "w") as f:
            json.dump({"format_version": 1, "tokenizer": dict(tokenizer)}, f)


# --- torchrun runs of tools/score_docs.py, SIGKILLed mid-run --------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def records(progress_dir: str) -> int:
    """Batch records in a run's progress shards (0 before the run has made them)."""
    from megatron_miniplm.scoring import resume

    try:
        return sum(1 for _ in resume.iter_records(progress_dir))
    except FileNotFoundError:
        return 0


def torchrun_score_docs(args: list, nproc: int = 2):
    """tools/score_docs.py under torchrun, in a session of its own (see kill_tree)."""
    import subprocess
    import sys

    # --standalone: torchrun binds a free rendezvous port itself (no port picked here and
    # then raced for by other processes on a shared machine).
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc-per-node", str(nproc),
           os.path.join(REPO, "tools", "score_docs.py"), *map(str, args), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)


def kill_tree(proc) -> None:
    """SIGKILL torchrun's process group and each worker's: torchrun starts every worker
    in a session of its own, so killing torchrun's group alone would orphan them."""
    import signal

    import psutil

    groups = {os.getpgid(proc.pid)}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            groups.add(os.getpgid(child.pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def run_until_records(args: list, output: str, at_least: int, nproc: int = 2) -> int:
    """Start score_docs.py writing ``output``, SIGKILL everything once its progress holds
    ``at_least`` records; the records it left."""
    import time

    from megatron_miniplm.scoring import resume

    pdir = resume.progress_dir(output)
    proc = torchrun_score_docs([*args, "--output-prefix", output], nproc)
    deadline = time.monotonic() + 240
    while records(pdir) < at_least:
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.002)
    kill_tree(proc)
    assert not os.path.exists(output + ".npy") and not os.path.exists(output + ".meta.json")
    return records(pdir)
