"""What a scoring run computes, and the refusals that protect an output prefix.

A run is named by the dataset (its shards' fingerprints), the model (checkpoint
path, config, checkpoint_info.json) and the settings that change numbers (dtype,
layout, batching, attention, logits chunk) plus the batch plan's digest. The
progress directory and every score file carry that identity; an output prefix that
holds (partial) scores of another dataset, model or settings is refused rather
than overwritten or mixed. They also carry the sizing request and what it came to
(``sizing``): automatically chosen sizes depend on the free memory at start-up, so a
rerun asked for the same sizes takes the recorded ones instead of choosing anew.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from megatron_miniplm.scoring import SCORES_VERSION, resume
from megatron_miniplm.scoring.bucketing import BatchPlan
from megatron_miniplm.scoring.dataset import ScoringDataset, ScoringError
from megatron_miniplm.scoring.model import ModelSource
from megatron_miniplm.scoring.sizing import Sizes, request_of


def output_prefixes(output: str, num_shards: int) -> list[str]:
    """One score file per dataset shard (the layout Difference Sampling reads)."""
    if num_shards == 1:
        return [output]
    return [f"{output}_{i:05d}" for i in range(num_shards)]


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def run_identity(cfg, dataset: ScoringDataset, source: ModelSource, plan: BatchPlan,
                 sizes: Sizes, attention_backend: str) -> dict:
    """Everything a resumed run must share with the killed one to reproduce it bit for bit."""
    return _jsonable({
        "dataset": dataset.identity(),
        "model": source.identity(),
        "settings": {
            "scores_version": SCORES_VERSION,
            "dtype": cfg.dtype_name,
            "tensor_model_parallel_size": cfg.tensor_model_parallel_size,
            "pipeline_model_parallel_size": cfg.pipeline_model_parallel_size,
            "expert_model_parallel_size": cfg.expert_model_parallel_size,
            "micro_batch_size": sizes.micro_batch_size,
            "max_tokens_per_batch": cfg.max_tokens_per_batch,
            "attention_backend": attention_backend,
            "logits_chunk_tokens": sizes.logits_chunk_tokens,
        },
        "plan": {"digest": plan.digest(), "num_batches": len(plan)},
        "sizing": sizes.record(request_of(cfg)),
    })


def recorded_sizes(prefixes: list[str], progress: str, request: dict) -> Optional[Sizes]:
    """The sizes of the run this one resumes (its progress) or repeats (its score files),
    if that run was asked for the same sizes; None otherwise (then they are chosen anew,
    and a run that differs is refused by the checks below as before)."""
    from megatron_miniplm.scoring.score_file import score_paths

    request = _jsonable(request)
    for path in [os.path.join(progress, resume.RUN_FILE)] + [score_paths(p)[1] for p in prefixes]:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        sizing = data.get("sizing") if isinstance(data, dict) else None
        if isinstance(sizing, dict) and sizing.get("request") == request:
            try:
                return Sizes.from_record(sizing)
            except (KeyError, TypeError, ValueError):
                continue
    return None


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def check_progress(directory: str, identity: dict, output: str) -> Optional[dict]:
    """Refuse partial scores of another dataset, another model, or other settings;
    otherwise the recorded run (None when there is no progress yet)."""
    old = resume.read_run(directory)
    if old is None:
        return None
    if old.get("dataset", {}).get("shards") != identity["dataset"]["shards"]:
        raise ScoringError(
            f"output prefix {output}: {directory} holds partial scores of another dataset "
            f"({old.get('dataset', {}).get('prefix')}); use another output prefix or delete {directory}")
    if old.get("model") != identity["model"]:
        raise ScoringError(
            f"output prefix {output}: {directory} holds partial scores of another model "
            f"({old.get('model', {}).get('checkpoint')}); use another output prefix or delete {directory}")
    if old.get("settings") != identity["settings"] or old.get("plan") != identity["plan"]:
        diff = _differences(old.get("settings", {}), identity["settings"])
        raise ScoringError(
            f"output prefix {output}: {directory} holds partial scores computed with other settings "
            f"({'; '.join(diff) or 'batch plan'}); rerun with the same flags to resume, "
            f"or delete {directory} to start over")
    return old


def check_final(prefixes: list[str], dataset: ScoringDataset, identity: dict) -> bool:
    """True when every score file exists and holds this very run; raises if any holds another's."""
    from megatron_miniplm.scoring.score_file import score_paths

    complete = True
    for prefix, shard_meta in zip(prefixes, dataset.shard_metas):
        npy, meta_path = score_paths(prefix)
        if not os.path.exists(meta_path):
            complete = False
            continue
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise ScoringError(f"output prefix: {meta_path} exists but is not readable JSON ({e})") from None
        if not isinstance(meta, dict) or "dataset_fingerprint" not in meta or "model" not in meta:
            raise ScoringError(f"output prefix: {meta_path} exists and is not a score file; use another output prefix")
        if meta.get("dataset_fingerprint") != shard_meta["fingerprint"]:
            raise ScoringError(
                f"--output: {meta_path} holds scores of another dataset "
                f"({meta.get('dataset', {}).get('prefix')}, fingerprint "
                f"{str(meta.get('dataset_fingerprint'))[:12]}...); use another --output")
        if meta.get("model") != identity["model"]:
            raise ScoringError(
                f"--output: {meta_path} holds scores of another model "
                f"({meta.get('model', {}).get('checkpoint')}); use another --output")
        if meta.get("settings") != identity["settings"]:
            diff = _differences(meta.get("settings", {}), identity["settings"])
            raise ScoringError(
                f"--output: {meta_path} holds scores of this dataset and model computed with other "
                f"settings ({'; '.join(diff)}); use another output prefix or delete it to recompute")
        if not os.path.exists(npy):
            complete = False
    return complete
