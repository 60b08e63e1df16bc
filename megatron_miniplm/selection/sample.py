"""The whole of tools/difference_sample.py: validate, score, select, write, report.

Every check that can refuse the run (inputs, fingerprints, lengths, non-finite scores,
alpha, budget, an empty selection) happens before the first byte is written.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

import megatron_miniplm
from megatron_miniplm.scoring.score_file import ScoreFileError, check_scores_match, load_scores, score_paths
from megatron_miniplm.selection import blend as blend_io
from megatron_miniplm.selection.difference import RANKINGS, compute_scores, kept_mask, select, write_blend
from megatron_miniplm.selection.config import SelectionConfig, SelectionError
from megatron_miniplm.selection.shards import Shard, concat_lengths, open_shards, shard_offsets
from megatron_miniplm.settings import setting

log = logging.getLogger(__name__)


@dataclass
class SampleRequest:
    """A selection run: inputs, outputs and the selection; its settings are
    tools/difference_sample.py's flags."""

    data_paths: list[str] = setting(
        group="data", flag="--data-path", metavar="PREFIX",
        help="dataset prefixes (a sharded dataset's top-level prefix expands to its shards)")
    output: str = setting(group="output", flag="--output-prefix", metavar="BLEND_PREFIX",
                          help="writes BLEND_PREFIX.npy + .meta.json")
    config: SelectionConfig
    teacher_scores: Optional[list[str]] = setting(None, group="data", metavar="T",
                                                  help="teacher score files, one per shard")
    reference_scores: Optional[list[str]] = setting(None, group="data", metavar="R",
                                                    help="reference score files, one per shard")
    report_dir: Optional[str] = setting(None, group="output", flag="--report", metavar="DIR",
                                        help="write a selection report (tables, histograms, examples)")
    report_examples: int = setting(5, group="output", help="top and bottom instances shown in the report")
    materialize: bool = setting(False, group="output",
                                help="write the selected instances as a new indexed dataset instead of a blend")


@dataclass
class _Scores:
    prefixes: list[str]
    arrays: list[np.ndarray]
    metas: list[dict]


@dataclass
class SampleResult:
    meta: dict  # the blend meta (or the materialized dataset's meta)
    timings: dict = field(default_factory=dict)


def _load_score_set(role: str, prefixes: Optional[list[str]], shards: list[Shard]) -> Optional[_Scores]:
    if not prefixes:
        return None
    if len(prefixes) != len(shards):
        raise SelectionError(f"--{role}-scores: {len(prefixes)} score file(s) for {len(shards)} dataset shard(s); "
                             "give one per shard, in the same order")
    arrays, metas = [], []
    for p, shard in zip(prefixes, shards):
        arr, meta = load_scores(p)
        check_scores_match(p, meta, shard.prefix, shard.meta)
        if arr.shape[0] != shard.num_instances:
            raise ScoreFileError(f"{score_paths(p)[0]}: {arr.shape[0]} rows for {shard.num_instances} instances "
                                 f"of {shard.prefix}")
        arrays.append(arr)
        metas.append(meta)
    return _Scores(list(prefixes), arrays, metas)


def _check_output(req: SampleRequest, shards: list[Shard]) -> None:
    out = os.path.abspath(req.output)
    inputs = [s.prefix for s in shards] + list(req.data_paths)
    inputs += list(req.teacher_scores or []) + list(req.reference_scores or [])
    for p in inputs:
        if os.path.abspath(p) == out:
            raise SelectionError(f"output prefix {req.output}: same prefix as an input ({p}); it would overwrite it")
    if req.report_dir and os.path.exists(req.report_dir) and not os.path.isdir(req.report_dir):
        raise SelectionError(f"report directory {req.report_dir}: exists and is not a directory")
    parent = os.path.dirname(out)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise SelectionError(f"output prefix {req.output}: {parent} is not a directory")
    # Re-running over an earlier output of the same kind is fine; clobbering anything else is not.
    existing_dataset = any(os.path.exists(req.output + ext) for ext in (".bin", ".idx"))
    if not req.materialize and existing_dataset:
        raise SelectionError(f"output prefix {req.output}: a dataset exists there; a blend would overwrite its meta file")
    if req.materialize and blend_io.is_blend(req.output):
        raise SelectionError(f"output prefix {req.output}: a sampled blend exists there; choose another prefix")


def _check_shards(shards: list[Shard], req: SampleRequest) -> None:
    if not shards:
        raise SelectionError("--data-path: no dataset shards")
    hashes = {(s.meta.get("tokenizer") or {}).get("sha256") for s in shards}
    if len(hashes) > 1:
        raise SelectionError("--data-path: the shards were tokenized with different tokenizers "
                             "(tokenizer.sha256 differs); a blend must use one tokenizer")
    if sum(s.num_instances for s in shards) == 0:
        raise SelectionError("--data-path: the dataset has no instances")
    if req.materialize:
        from megatron_miniplm.selection.materialize import check_materializable

        check_materializable(shards)


def _score_entries(output: str, role: str, scores: Optional[_Scores]) -> list[dict]:
    if scores is None:
        return []
    return [{"prefix": blend_io.relative_prefix(output, p), "sha256": m.get("sha256"), "model": m.get("model"),
             "dataset_fingerprint": m.get("dataset_fingerprint")} for p, m in zip(scores.prefixes, scores.metas)]


@dataclass
class _Inputs:
    """The validated inputs of a run: shards, score sets, and the corpus in global order."""

    shards: list[Shard]
    teacher: Optional[_Scores]
    reference: Optional[_Scores]
    offsets: np.ndarray  # int64 [S + 1]: global index of each shard's first instance, then N
    lengths: np.ndarray  # int32 [N]: tokens per instance

    @property
    def num_instances(self) -> int:
        return int(self.offsets[-1])

    @property
    def tokens_total(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))


def _validate(req: SampleRequest) -> _Inputs:
    """Everything that can refuse the run, before anything is written."""
    cfg = req.config
    shards = open_shards(req.data_paths)
    _check_shards(shards, req)
    _check_output(req, shards)
    for role in cfg.models_needed:
        if not getattr(req, f"{role}_scores"):
            raise SelectionError(f"method {cfg.method!r} needs --{role}-scores")
    inputs = _Inputs(shards, _load_score_set("teacher", req.teacher_scores, shards),
                     _load_score_set("reference", req.reference_scores, shards),
                     shard_offsets(shards), concat_lengths(shards))
    if cfg.keep_tokens is not None and cfg.keep_tokens > inputs.tokens_total:
        raise SelectionError(f"--keep-tokens {cfg.keep_tokens:,} is larger than the corpus "
                             f"({inputs.tokens_total:,} tokens)")
    # Every given score file must be usable, whatever the method ranks by.
    teacher, reference = inputs.teacher, inputs.reference
    for kind in [k for k, have in (("teacher", teacher), ("reference", reference)) if have is not None]:
        if kind not in cfg.models_needed:
            compute_scores(kind, _arrays(teacher), _arrays(reference), inputs.offsets,
                           _names(kind, teacher, reference), cfg.num_threads, keep=False)
    return inputs


def _select(inputs: _Inputs, cfg: SelectionConfig, keep_scores: bool):
    """(selection, ranking scores or None); refuses an empty selection."""
    kind = RANKINGS[cfg.method][0] if cfg.method != "uniform" else None
    selection, scores = select(_arrays(inputs.teacher), _arrays(inputs.reference), inputs.offsets, inputs.lengths,
                               cfg, _names(kind, inputs.teacher, inputs.reference) if kind else None,
                               keep_scores=keep_scores)
    if selection.count == 0:
        why = (f"--keep-tokens {cfg.keep_tokens} is smaller than the first-ranked instance" if cfg.keep_tokens
               else f"alpha * N = {cfg.alpha} * {inputs.num_instances} rounds to 0 instances")
        raise SelectionError(f"the selection is empty: {why}")
    return selection, scores


def _blend_summary(req: SampleRequest, inputs: _Inputs, num_selected: int) -> dict:
    """The blend meta, but for "tokens_kept" (summed while the blend is written)."""
    cfg, shards = req.config, inputs.shards
    return {
        "format_version": blend_io.FORMAT_VERSION,
        "kind": blend_io.KIND,
        "datasets": [{"prefix": blend_io.relative_prefix(req.output, s.prefix), "fingerprint": s.fingerprint,
                      "num_instances": s.num_instances, "num_tokens": s.num_tokens} for s in shards],
        "scores": {"teacher": _score_entries(req.output, "teacher", inputs.teacher),
                   "reference": _score_entries(req.output, "reference", inputs.reference)},
        "method": cfg.method,
        "alpha": cfg.alpha,
        "keep_tokens": cfg.keep_tokens,
        "order": cfg.order,
        "seed": int(cfg.seed),
        "num_selected": int(num_selected),
        "tokens_kept": None,
        "num_instances_total": inputs.num_instances,
        "tokens_total": inputs.tokens_total,
        "tokenizer": shards[0].meta.get("tokenizer"),
        "seq_length": shards[0].meta.get("seq_length"),
        "created_by": "tools/difference_sample.py",
        "version": megatron_miniplm.__version__,
    }


def _write(req: SampleRequest, inputs: _Inputs, selection, summary: dict) -> dict:
    """The blend (or, with --materialize, the new dataset); fills summary["tokens_kept"]
    and returns the written meta."""
    cfg = req.config
    os.makedirs(os.path.dirname(os.path.abspath(req.output)), exist_ok=True)
    if req.materialize:
        from megatron_miniplm.selection.materialize import materialize

        rows, summary["tokens_kept"] = write_blend(selection, inputs.offsets, cfg, inputs.lengths)
        selection_meta = {k: v for k, v in summary.items() if k not in ("format_version", "kind", "tokenizer",
                                                                         "seq_length")}
        return materialize(rows, inputs.shards, req.output, selection_meta, cfg.num_threads)
    writer = blend_io.BlendWriter(req.output, selection.count)
    try:
        _, summary["tokens_kept"] = write_blend(selection, inputs.offsets, cfg, inputs.lengths, out=writer.array)
        writer.commit(summary)
    except BaseException:
        writer.abort()
        raise
    return summary


def _report(req: SampleRequest, inputs: _Inputs, selection, scores, summary: dict) -> None:
    """--report: the ranking the method used, or the difference when it used none."""
    from megatron_miniplm.selection.report import ReportInputs, write_report

    cfg, teacher, reference = req.config, inputs.teacher, inputs.reference
    ranking, name, asc = scores, cfg.method, RANKINGS.get(cfg.method, ("", False))[1]
    if ranking is None and teacher is not None and reference is not None:
        ranking = compute_scores("difference", teacher.arrays, reference.arrays, inputs.offsets,
                                 _names("difference", teacher, reference), cfg.num_threads)
        name = "difference"
    write_report(req.report_dir, ReportInputs(
        shards=inputs.shards, offsets=inputs.offsets, lengths=inputs.lengths, kept=kept_mask(selection),
        summary=summary, teacher=_arrays(teacher), reference=_arrays(reference), ranking=ranking,
        ranking_name=name, ranking_ascending=asc, examples=req.report_examples, num_threads=cfg.num_threads))


def run(req: SampleRequest) -> SampleResult:
    """Validate, select, write, report; every refusal comes before the first write."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    inputs = _validate(req)
    timings["validate_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    selection, scores = _select(inputs, req.config, keep_scores=bool(req.report_dir))
    timings["score_and_select_s"] = time.perf_counter() - t1

    summary = _blend_summary(req, inputs, selection.count)
    t2 = time.perf_counter()
    meta = _write(req, inputs, selection, summary)
    timings["write_s"] = time.perf_counter() - t2

    if req.report_dir:
        t3 = time.perf_counter()
        _report(req, inputs, selection, scores, summary)
        timings["report_s"] = time.perf_counter() - t3
    return SampleResult(meta=meta, timings=timings)


def _arrays(scores: Optional[_Scores]) -> Optional[list[np.ndarray]]:
    return scores.arrays if scores is not None else None


def _names(kind: str, teacher: Optional[_Scores], reference: Optional[_Scores]) -> list[str]:
    """How to name shard s's score files in an error about `kind` scores."""
    sets = [x for role, x in (("teacher", teacher), ("reference", reference))
            if x is not None and (kind == "difference" or kind == role)]
    return [" / ".join(score_paths(x.prefixes[s])[0] for x in sets) for s in range(len(sets[0].prefixes))]
