"""What MiniPLM's comparison needs, checked before any stage runs.

Teacher, reference, students and data share one tokenizer and one sequence length;
the baselines keep the MiniPLM selection's token budget; the students share steps
and seed; the parallel layout divides every model and batch. The config makes most
of these true by construction (one seed, one sequence length, one student section,
baseline budgets taken from the selection); what a config can still get wrong is
refused here, each refusal naming the settings in conflict, all of them at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from megatron_miniplm.pipeline.config import ConfigError
from megatron_miniplm.pipeline.stages import Graph, expand

BASELINES = ("uniform", "teacher", "reference")


def model_from_spec(spec: dict, vocab_size: int = 1):
    """A model mapping of the config (a preset and/or model settings) as a ModelConfig."""
    from megatron_miniplm.models.config import ModelConfig, get_preset

    values = {k: v for k, v in spec.items() if k != "preset"}
    if spec.get("preset"):
        return get_preset(spec["preset"]).replace(**values)
    shape = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")
    missing = [k for k in shape if k not in values]
    if missing:
        raise ConfigError(f"needs a preset or all of {', '.join(shape)} (missing {', '.join(missing)})")
    values.setdefault("vocab_size", vocab_size)
    return ModelConfig(**values)


def _sha256(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _teacher_files(source: str) -> tuple[Optional[dict], Optional[str]]:
    """(model shape, tokenizer.json) of a teacher readable before conversion: an HF
    directory or a megatron checkpoint (a GGUF file holds both inside; checked later by
    the scorer, which refuses a model whose tokenizer differs from the data's)."""
    if not os.path.isdir(source):
        return None, None
    for name in ("model_config.json", "config.json"):
        if os.path.isfile(os.path.join(source, name)):
            with open(os.path.join(source, name)) as f:
                shape = json.load(f)
            break
    else:
        shape = None
    for candidate in ("tokenizer.json", os.path.join("tokenizer", "tokenizer.json")):
        if os.path.isfile(os.path.join(source, candidate)):
            return shape, os.path.join(source, candidate)
    return shape, None


def check(graph: Graph) -> None:
    cfg, par = graph.cfg, graph.cfg.parallel
    problems: list[str] = []

    def refuse(message: str) -> None:
        problems.append(message)

    # data
    if cfg.corpus.train is not None:
        if not cfg.corpus.test:
            refuse("corpus.train is set but corpus.test is not: the comparison needs held-out documents")
        for key, patterns in (("corpus.train", cfg.corpus.train), ("corpus.test", cfg.corpus.test or [])):
            for pattern in patterns:
                if not any(os.path.exists(p) for p in expand([pattern])):
                    refuse(f"{key}: no file matches {pattern!r}")
    teacher = graph.teacher_source()
    if not os.path.exists(teacher):
        refuse(f"teacher.load: {teacher} does not exist")
    if cfg.seq_length < 2:
        refuse(f"seq_length {cfg.seq_length}: needs at least 2")

    # one tokenizer
    shape, teacher_tokenizer = _teacher_files(teacher)
    if cfg.tokenizer:
        tokenizer_json = cfg.tokenizer if os.path.isfile(cfg.tokenizer) else os.path.join(cfg.tokenizer, "tokenizer.json")
        if not os.path.exists(cfg.tokenizer):
            refuse(f"tokenizer: {cfg.tokenizer} does not exist")
        elif teacher_tokenizer and _sha256(tokenizer_json) != _sha256(teacher_tokenizer):
            refuse(f"tokenizer ({cfg.tokenizer}) differs from the teacher's ({teacher_tokenizer}, teacher.load): "
                   f"teacher, reference, students and data must share one tokenizer")

    # one sequence length: the teacher must take it
    if shape:
        positions = shape.get("max_position_embeddings")
        if positions is not None and positions < cfg.seq_length:
            refuse(f"seq_length {cfg.seq_length} exceeds the teacher's {positions} positions (teacher.load)")

    # selection and baselines
    from megatron_miniplm.selection.difference import SelectionConfig

    settings = {k: v for k, v in cfg.selection.items() if k != "baselines"}
    try:
        SelectionConfig(seed=cfg.seed, **settings)
    except (TypeError, ValueError) as e:
        refuse(f"selection: {e}")
    baselines = cfg.selection.get("baselines", [])
    bad = [b for b in baselines if b not in BASELINES]
    if bad or len(set(baselines)) != len(baselines):
        refuse(f"selection.baselines {baselines}: each of {', '.join(BASELINES)} at most once")

    if cfg.student_tokenizer:
        if not os.path.exists(cfg.student_tokenizer):
            refuse(f"student_tokenizer: {cfg.student_tokenizer} does not exist")
        if cfg.vanilla_kd.get("enabled"):
            refuse("vanilla_kd.enabled with student_tokenizer: Vanilla KD needs the teacher's vocabulary "
                   "(token-level distillation); leave student_tokenizer unset or disable vanilla_kd")

    seeds = cfg.student_seeds
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
                              or len(set(seeds)) != len(seeds)):
        refuse(f"student_seeds {seeds!r}: a non-empty list of distinct integers")

    if cfg.vanilla_kd.get("enabled"):
        if "uniform" not in baselines:
            refuse("vanilla_kd.enabled needs the uniform baseline (selection.baselines): the Vanilla KD "
                   "student trains on the uniform sample")
        if par.pipeline_model_parallel_size > 1:
            refuse("vanilla_kd.enabled: Vanilla KD does not support pipeline parallelism "
                   f"(parallel.pipeline_model_parallel_size {par.pipeline_model_parallel_size})")
        from megatron_miniplm.training.kd import KDSettings

        try:
            KDSettings(kd_teacher_load="teacher", **{k: v for k, v in cfg.vanilla_kd.items() if k != "enabled"})
        except (TypeError, ValueError) as e:
            refuse(f"vanilla_kd: {e}")

    from megatron_miniplm.data.split import SplitConfig

    try:
        SplitConfig("in", "ref", "rest", seed=cfg.seed, **cfg.split).validate()
    except (TypeError, ValueError) as e:
        refuse(f"split: {e}")

    # the parallel layout divides every model and batch
    world = par.nnodes * par.nproc_per_node
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if not 0 <= par.node_rank < par.nnodes:
        refuse(f"parallel.node_rank {par.node_rank} is not in [0, parallel.nnodes {par.nnodes})")
    if world % (tp * pp):
        refuse(f"parallel: {par.nnodes} node(s) x {par.nproc_per_node} process(es) is not divisible by "
               f"tensor_model_parallel_size {tp} x pipeline_model_parallel_size {pp}")
    dp = max(1, world // (tp * pp))
    models = []
    for where, lm in (("reference", cfg.reference), ("student", cfg.student)):
        try:
            models.append((f"{where}.model", model_from_spec(lm.model)))
        except (ConfigError, ValueError) as e:
            refuse(f"{where}.model: {e}")
        try:
            train = graph.train_config(lm, "", {"data": ""}, "", 1)
            if train.global_batch_size % (train.micro_batch_size * dp):
                refuse(f"{where}.train: global_batch_size {train.global_batch_size} is not divisible by "
                       f"micro_batch_size {train.micro_batch_size} x data-parallel size {dp} (parallel)")
        except (TypeError, ValueError) as e:
            refuse(f"{where}.train: {e}")
        if lm.epochs <= 0:
            refuse(f"{where}.epochs {lm.epochs}: must be positive")
    if shape and "num_attention_heads" in shape:
        heads, layers = shape["num_attention_heads"], shape.get("num_layers", shape.get("num_hidden_layers"))
        kv = shape.get("num_query_groups") or shape.get("num_key_value_heads") or heads
        if heads % tp or kv % tp:
            refuse(f"parallel.tensor_model_parallel_size {tp} does not divide the teacher's {heads} attention "
                   f"heads / {kv} key-value heads (teacher.load)")
        if layers and layers % pp:
            refuse(f"parallel.pipeline_model_parallel_size {pp} does not divide the teacher's {layers} layers")
    for where, model in models:
        if model.num_attention_heads % tp or model.kv_heads % tp:
            refuse(f"parallel.tensor_model_parallel_size {tp} does not divide the {model.num_attention_heads} "
                   f"attention heads / {model.kv_heads} key-value heads of {where}")
        if model.num_layers % pp:
            refuse(f"parallel.pipeline_model_parallel_size {pp} does not divide the {model.num_layers} layers of {where}")
    if par.launcher == "srun" and "SLURM_JOB_ID" not in os.environ:
        refuse("parallel.launcher srun: not inside a Slurm job (no SLURM_JOB_ID)")

    if problems:
        raise ConfigError("the pipeline config cannot run:\n  - " + "\n  - ".join(problems))
