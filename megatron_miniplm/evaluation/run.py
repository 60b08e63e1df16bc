"""The evaluation run behind tools/evaluate.py: every checkpoint's held-out LM loss (scored
at any TP/PP/DP, collective), the paired comparisons, the zero-shot tasks, and what is
written from them (report, curves, JSON with the config that made it)."""

from __future__ import annotations

import math
import os
from typing import Optional

from megatron_miniplm.evaluation.config import EvalConfig
from megatron_miniplm.settings import to_mapping


def evaluate(cfg: EvalConfig) -> dict:
    """Collective when ``cfg.data_path`` is given (every rank calls it). Then the job's rank 0
    alone reads the training FLOPs, runs the zero-shot tasks and writes the outputs, and returns
    the results (``models``, ``comparisons``, ``verdicts``, the paths written); the other ranks
    return ``{}`` at once. None waits for rank 0's tasks: the job's process group is gone after
    the LM loss, and the launcher (torchrun, srun) waits for every process to end."""
    rank0 = is_job_rank0()
    results, losses, documents = lm_loss_results(cfg) if cfg.data_path else ({"models": {}}, {}, None)
    if not rank0:
        return {}
    names = cfg.labels
    models = results["models"]
    for name in dict.fromkeys(names):
        models.setdefault(name, {})
        flops = [f for n, c in zip(names, cfg.load) if n == name for f in [train_flops(c)] if f is not None]
        if flops:
            models[name]["train_flops"] = sum(flops) / len(flops)
        generation = [g for n, c in zip(names, cfg.load) if n == name for g in [generation_flops(c)] if g is not None]
        if generation:
            models[name]["generation_flops"] = sum(generation) / len(generation)
    from megatron_miniplm.evaluation.report import with_compute

    with_compute(results)
    from megatron_miniplm.evaluation import sweep

    if losses and sweep.asked(cfg.labels, cfg.saving_baseline):
        results["scaling"] = sweep_results(cfg, results["models"], losses, documents)
    if cfg.tasks:
        add_task_results(cfg, models)
    write_outputs(cfg, results)
    return results


def is_job_rank0() -> bool:
    """Whether this process is the job's global rank 0 as its launcher placed it (torchrun's
    RANK, else srun's SLURM_PROCID; a process with neither is a world of one). Read from the
    launch environment: the job's process group is gone after the LM loss, and never started
    for tasks alone."""
    from megatron_miniplm.launch import launch_env

    return launch_env().rank == 0


def sweep_results(cfg: EvalConfig, models: dict, losses: dict, documents) -> dict:
    """The size sweep's fits, savings and extrapolation (evaluation/sweep.py); its bootstrap refits
    every curve per draw, so it takes at most 1,000 draws."""
    from megatron_miniplm.evaluation import sweep

    return sweep.analyze(cfg.labels, models, losses, documents, metrics_by_label(cfg),
                         baseline=cfg.saving_baseline, target_flops=cfg.extrapolate_flops,
                         samples=min(cfg.bootstrap_samples, 1000), seed=cfg.bootstrap_seed, level=cfg.confidence)


def metrics_by_label(cfg: EvalConfig) -> dict:
    """{label: [the metrics files of its seeds]} ('-' left out)."""
    runs: dict = {}
    for name, path in zip(cfg.labels, cfg.metrics_file or []):
        if path != "-":
            runs.setdefault(name, []).append(path)
    return runs


def add_task_results(cfg: EvalConfig, models: dict) -> None:
    """Each model's zero-shot tasks, on its first seed's checkpoint (exported to HF and run by
    lm-eval in this process alone)."""
    from megatron_miniplm.evaluation.harness import evaluate_checkpoint

    for name, ckpt in zip(cfg.labels, cfg.load):
        if "tasks" not in models[name]:
            models[name]["tasks"] = evaluate_checkpoint(
                ckpt, cfg.task_names, include_path=cfg.include_path, num_fewshot=cfg.num_fewshot,
                limit=cfg.limit, batch_size=cfg.batch_size,
            )


def expert_parallel_size(checkpoint: str, requested: int) -> int:
    """``requested`` for a checkpoint with experts, 1 for a dense one (nothing to split)."""
    if requested == 1:
        return 1
    from megatron_miniplm.scoring.model import resolve_checkpoint

    return requested if resolve_checkpoint(checkpoint).config.num_experts else 1


def lm_loss_results(cfg: EvalConfig) -> tuple[dict, dict, object]:
    """Every checkpoint scored on the test set (collective), summarized on rank 0; with each
    model's per-instance losses per seed and the test document of each instance (a size
    sweep's resampling units)."""
    from megatron_miniplm import parallel
    from megatron_miniplm.evaluation.compare import instance_losses
    from megatron_miniplm.evaluation.lm_loss import score_test_set
    from megatron_miniplm.evaluation.report import summarize, test_documents, test_domains

    names = cfg.labels
    runs: dict = {}
    try:
        for name, ckpt, prefix in zip(names, cfg.load, score_prefixes(cfg)):
            scores = score_test_set(
                ckpt, cfg.data_path, prefix,
                micro_batch_size=cfg.micro_batch_size, bf16=cfg.bf16,
                tensor_model_parallel_size=cfg.tensor_model_parallel_size,
                pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
                expert_model_parallel_size=expert_parallel_size(ckpt, cfg.expert_model_parallel_size), progress=False,
            )
            if scores is not None:
                runs.setdefault(name, []).append((ckpt, scores))
    finally:
        parallel.destroy()
    if not runs:  # not rank 0
        return {"models": {}}, {}, None
    domains, domain_names = test_domains(cfg.data_path)
    documents = test_documents(cfg.data_path, domains)
    seeds = {name: [training_seed(ckpt) for ckpt, _ in model_runs] for name, model_runs in runs.items()}
    losses = {name: [instance_losses(scores) for _, scores in model_runs] for name, model_runs in runs.items()}
    return summarize(runs, domains, domain_names, documents=documents, bootstrap_samples=cfg.bootstrap_samples,
                     seed=cfg.bootstrap_seed, level=cfg.confidence, training_seeds=seeds), losses, documents


def score_prefixes(cfg: EvalConfig) -> list[str]:
    """Where each checkpoint's per-instance scores go, in ``--load`` order: OUTPUT_DIR/LABEL-TEST,
    the seeds after a label's first as LABEL-seedK."""
    names, data_name = cfg.labels, os.path.basename(cfg.data_path)
    prefixes = []
    for k, name in enumerate(names):
        seed = sum(1 for n in names[:k] if n == name)
        label = name if seed == 0 else f"{name}-seed{seed + 1}"
        prefixes.append(os.path.join(cfg.output_dir, f"{label}-{data_name}"))
    return prefixes


def outputs(cfg: EvalConfig) -> list[tuple[str, str]]:
    """What an evaluation writes, as (path, how messages name it): the score files of each
    checkpoint, the report directory and the JSON, where asked."""
    found = [(p, f"--output-dir {cfg.output_dir} ({os.path.basename(p)})")
             for p in (score_prefixes(cfg) if cfg.data_path else [])]
    found += [(path, f"{flag} {path}") for flag, path in (("--report-dir", cfg.report_dir), ("--json", cfg.json))
              if path]
    return found


def write_outputs(cfg: EvalConfig, results: dict) -> None:
    """The report and the curves where asked (their paths go into ``results``), then the JSON."""
    if cfg.report_dir:
        from megatron_miniplm.evaluation.report import write_report

        curves = None
        runs = metrics_by_label(cfg)
        if runs:
            from megatron_miniplm.evaluation.curves import plot_curves

            curves = plot_curves(runs, os.path.join(cfg.report_dir, "curves.png"))
            results["curves"] = curves
        if results.get("scaling", {}).get("points"):
            from megatron_miniplm.evaluation.sweep import plot

            results["scaling"]["plot"] = plot(results["scaling"], os.path.join(cfg.report_dir, "scaling.png"))
        if results["models"] and "comparisons" in results:
            path = os.path.join(cfg.report_dir, "evaluation_report.md")
            write_report(path, results, curves=os.path.basename(curves) if curves else None)
            results["report"] = path
    if cfg.json:
        from megatron_miniplm.atomic_io import write_json_atomic

        write_json_atomic(cfg.json, finite_or_null(dict(results, config=to_mapping(cfg))), allow_nan=False)


def finite_or_null(value):
    """``value`` with every float that is not finite replaced by None: JSON has no NaN or
    infinity (Python writes them, other readers refuse the file), and null is what the
    results mean by them: an undefined saving, an interval end without a bound."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def training_seed(checkpoint: str) -> Optional[int]:
    """The --seed a trainer's checkpoint was trained with (its run_config.json); None for other
    checkpoints (a converted model)."""
    import json

    from megatron_miniplm.dist_checkpoint import resolve_checkpoint_dir

    try:
        with open(os.path.join(resolve_checkpoint_dir(checkpoint), "run_config.json"), encoding="utf-8") as f:
            return json.load(f).get("seed")
    except (OSError, ValueError, AttributeError):
        return None


def generation_flops(checkpoint: str):
    """The teacher's forward FLOPs that generated the data a trainer's checkpoint was trained on
    (a SeqKD corpus: its meta's "generation" record, tools/generate_corpus.py); None for a model
    trained on other data, or for other checkpoints."""
    import json

    from megatron_miniplm.data.meta import meta_path
    from megatron_miniplm.dist_checkpoint import resolve_checkpoint_dir

    try:
        with open(os.path.join(resolve_checkpoint_dir(checkpoint), "run_config.json"), encoding="utf-8") as f:
            data_paths = json.load(f).get("data_path") or []
        records = []
        for prefix in data_paths:
            if os.path.exists(meta_path(prefix)):
                with open(meta_path(prefix), encoding="utf-8") as f:
                    records.append(json.load(f).get("generation"))
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    flops = [r["teacher_forward_flops"] for r in records if isinstance(r, dict) and "teacher_forward_flops" in r]
    return sum(flops) if flops else None


def train_flops(checkpoint: str):
    """The training FLOPs a trainer's checkpoint records (the KD teacher's forward included);
    None for other checkpoints (a converted model)."""
    from megatron.core import dist_checkpointing

    from megatron_miniplm.dist_checkpoint import resolve_checkpoint_dir

    try:
        state = dist_checkpointing.load_common_state_dict(resolve_checkpoint_dir(checkpoint))
    except Exception:  # not a dist checkpoint of ours: no record to read
        return None
    return state.get("train_state", {}).get("consumed_flops")
