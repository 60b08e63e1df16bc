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
from typing import Mapping, Optional

from megatron_miniplm.models.config import model_from_spec
from megatron_miniplm.pipeline.config import ConfigError, located
from megatron_miniplm.pipeline.config import size_label
from megatron_miniplm.pipeline.stages import ALL, Graph, expand

BASELINES = ("uniform", "teacher", "reference", ALL)


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


def check(graph: Graph, sources: Optional[Mapping[str, str]] = None) -> None:
    """Refuse a config that cannot run, naming every problem at once, each with where its
    setting was given (``sources``: key -> FILE:LINE, $VARIABLE or command line)."""
    shape, teacher_tokenizer = _teacher_files(graph.teacher_source())
    sizes = _sizes(graph.cfg)
    problems = [*sizes, *_data(graph), *_tokenizers(graph.cfg, teacher_tokenizer), *_selection(graph.cfg),
                *_students(graph.cfg), *_saving_baseline(graph)]
    if not sizes:  # the layout's checks divide by these sizes
        problems += _layout(graph, shape)
    if shape:
        positions = shape.get("max_position_embeddings")
        if positions is not None and positions < graph.cfg.seq_length:
            problems.append(f"seq_length {graph.cfg.seq_length} exceeds the teacher's {positions} positions "
                            f"(teacher.load)")
    if problems:
        problems = [located(problem, sources or {}) for problem in problems]
        raise ConfigError("the pipeline config cannot run:\n  - " + "\n  - ".join(problems))


def _sizes(cfg) -> list[str]:
    """Counts and sizes that must be at least 1 (the layout and the batches divide by them)."""
    par = cfg.parallel
    counts = {f"parallel.{name}": getattr(par, name) for name in (
        "nnodes", "nproc_per_node", "tensor_model_parallel_size", "pipeline_model_parallel_size",
        "expert_model_parallel_size")}
    for where, spec in (("reference", cfg.reference), ("student", cfg.student)):
        counts[f"{where}.train.micro_batch_size"] = spec.train.micro_batch_size
        counts[f"{where}.train.global_batch_size"] = spec.train.global_batch_size
    counts.update({"scoring.micro_batch_size": cfg.scoring.micro_batch_size,
                   "evaluation.micro_batch_size": cfg.evaluation.micro_batch_size,
                   "preprocess.workers": cfg.preprocess.workers,
                   "corpus.demo_chars_per_domain": cfg.corpus.demo_chars_per_domain})
    problems = [f"{key} {value}: must be at least 1" for key, value in counts.items()
                if value is not None and value < 1]
    if not 1 <= par.master_port <= 65535:
        problems.append(f"parallel.master_port {par.master_port}: a TCP port, 1 to 65535")
    return problems


def _data(graph: Graph) -> list[str]:
    """The corpus and the teacher exist; the split's settings hold together."""
    cfg, problems = graph.cfg, []
    if cfg.corpus.train is not None:
        if not cfg.corpus.test:
            problems.append("corpus.train is set but corpus.test is not: the comparison needs held-out documents")
        for key, patterns in (("corpus.train", cfg.corpus.train), ("corpus.test", cfg.corpus.test or [])):
            for pattern in patterns:
                if not any(os.path.exists(p) for p in expand([pattern])):
                    problems.append(f"{key}: no file matches {pattern!r}")
    teacher = graph.teacher_source()
    if not os.path.exists(teacher):
        problems.append(f"teacher.load: {teacher} does not exist")
    if cfg.seq_length < 2:
        problems.append(f"seq_length {cfg.seq_length}: needs at least 2")
    try:
        cfg.split.stage_config(input_prefix="in", ref_prefix="ref", rest_prefix="rest", seed=cfg.seed).validate()
    except (TypeError, ValueError) as e:
        problems.append(f"split: {e}")
    return problems


def _tokenizers(cfg, teacher_tokenizer: Optional[str]) -> list[str]:
    """Teacher, reference, students and data share one tokenizer (the students may have their own)."""
    problems = []
    if cfg.tokenizer:
        tokenizer_json = cfg.tokenizer if os.path.isfile(cfg.tokenizer) else os.path.join(cfg.tokenizer, "tokenizer.json")
        if not os.path.exists(cfg.tokenizer):
            problems.append(f"tokenizer: {cfg.tokenizer} does not exist")
        elif teacher_tokenizer and _sha256(tokenizer_json) != _sha256(teacher_tokenizer):
            problems.append(f"tokenizer ({cfg.tokenizer}) differs from the teacher's ({teacher_tokenizer}, "
                            f"teacher.load): teacher, reference, students and data must share one tokenizer")
    if cfg.student_tokenizer:
        if not os.path.exists(cfg.student_tokenizer):
            problems.append(f"student_tokenizer: {cfg.student_tokenizer} does not exist")
        if cfg.vanilla_kd.enabled:
            problems.append("vanilla_kd.enabled with student_tokenizer: Vanilla KD needs the teacher's vocabulary "
                            "(token-level distillation); leave student_tokenizer unset or disable vanilla_kd")
        if cfg.seqkd.enabled:
            problems.append("seqkd.enabled with student_tokenizer: the SeqKD corpus is in the teacher's tokens; "
                            "leave student_tokenizer unset or disable seqkd")
    return problems


def _selection(cfg) -> list[str]:
    """MiniPLM's selection, and baselines that each keep its token budget."""
    problems = []
    try:
        cfg.selection.stage_config(method="difference", seed=cfg.seed)
    except (TypeError, ValueError) as e:
        problems.append(f"selection: {e}")
    baselines = cfg.selection.baselines
    bad = [b for b in baselines if b not in BASELINES]
    if bad or len(set(baselines)) != len(baselines):
        problems.append(f"selection.baselines {baselines}: each of {', '.join(BASELINES)} at most once")
    if ALL in baselines and cfg.student_tokenizer:
        problems.append(f"selection.baselines {ALL} with student_tokenizer: the whole corpus is not re-tokenized "
                        f"for the students; leave one of them out")
    return problems


def _students(cfg) -> list[str]:
    """The students' seeds and the Vanilla KD student."""
    problems = []
    seeds = cfg.student_seeds
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
                              or len(set(seeds)) != len(seeds)):
        problems.append(f"student_seeds {seeds!r}: a non-empty list of distinct integers")
    if cfg.student_runs < 1:
        problems.append(f"student_runs {cfg.student_runs}: at least 1")
    sizes = cfg.student.sizes
    if sizes is not None:
        labels = [size_label(s) for s in sizes]
        if not sizes or len(set(labels)) != len(labels):
            problems.append(f"student.sizes {labels}: a non-empty list of distinct sizes")
    kd, par = cfg.vanilla_kd, cfg.parallel
    if kd.enabled:
        if "uniform" not in cfg.selection.baselines:
            problems.append("vanilla_kd.enabled needs the uniform baseline (selection.baselines): the Vanilla KD "
                            "student trains on the uniform sample")
        if par.pipeline_model_parallel_size > 1:
            problems.append("vanilla_kd.enabled: Vanilla KD does not support pipeline parallelism "
                            f"(parallel.pipeline_model_parallel_size {par.pipeline_model_parallel_size})")
        try:
            kd.stage_config(kd_teacher_load="teacher")
        except (TypeError, ValueError) as e:
            problems.append(f"vanilla_kd: {e}")
    if cfg.seqkd.enabled:
        try:
            cfg.seqkd.stage_config(data_path="rest", load="teacher", output_prefix="seqkd",
                                   tensor_model_parallel_size=par.tensor_model_parallel_size, bf16=False,
                                   seed=cfg.seed, progress=False)
        except (TypeError, ValueError) as e:
            problems.append(f"seqkd: {e}")
        if cfg.seqkd.max_length is None and cfg.seqkd.prompt_length >= cfg.seq_length + 1:
            problems.append(f"seqkd.prompt_length {cfg.seqkd.prompt_length} leaves nothing to generate in "
                            f"sequences of seq_length + 1 = {cfg.seq_length + 1} tokens")
    return problems


def _saving_baseline(graph: Graph) -> list[str]:
    """The computation saving's baseline is one of the students' methods."""
    baseline = graph.cfg.evaluation.saving_baseline
    methods = list(dict.fromkeys(label.partition("@")[0] for _, label, _ in graph.students))
    if baseline is None or baseline in methods:
        return []
    return [f"evaluation.saving_baseline {baseline!r}: not a student of this pipeline ({', '.join(methods)})"]


def _layout(graph: Graph, teacher_shape: Optional[dict]) -> list[str]:
    """The parallel layout divides every model and batch."""
    cfg, par, problems = graph.cfg, graph.cfg.parallel, []
    world = par.nnodes * par.nproc_per_node
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if not 0 <= par.node_rank < par.nnodes:
        problems.append(f"parallel.node_rank {par.node_rank} is not in [0, parallel.nnodes {par.nnodes})")
    if world % (tp * pp):
        problems.append(f"parallel: {par.nnodes} node(s) x {par.nproc_per_node} process(es) is not divisible by "
                        f"tensor_model_parallel_size {tp} x pipeline_model_parallel_size {pp}")
    if par.launcher == "srun" and "SLURM_JOB_ID" not in os.environ:
        problems.append("parallel.launcher srun: not inside a Slurm job (no SLURM_JOB_ID)")
    dp = max(1, world // (tp * pp))
    models = [("reference", cfg.reference)]
    models += ([(f"student.sizes[{k}]", graph.student_model(size_label(s))) for k, s in enumerate(cfg.student.sizes)]
               if cfg.student.sizes else [("student", cfg.student)])
    for where, spec in models:
        problems += _model(graph, where, spec, tp, pp, dp)
    if teacher_shape and "num_attention_heads" in teacher_shape:
        heads = teacher_shape["num_attention_heads"]
        layers = teacher_shape.get("num_layers", teacher_shape.get("num_hidden_layers"))
        kv = teacher_shape.get("num_query_groups") or teacher_shape.get("num_key_value_heads") or heads
        if heads % tp or kv % tp:
            problems.append(f"parallel.tensor_model_parallel_size {tp} does not divide the teacher's {heads} "
                            f"attention heads / {kv} key-value heads (teacher.load)")
        if layers and layers % pp:
            problems.append(f"parallel.pipeline_model_parallel_size {pp} does not divide the teacher's {layers} layers")
    return problems + _experts(par.expert_model_parallel_size, dp, teacher_shape)


def _experts(ep: int, dp: int, teacher_shape: Optional[dict]) -> list[str]:
    """Expert parallelism splits the teacher's experts over data-parallel ranks: both divide."""
    if ep == 1:
        return []
    problems = []
    if dp % ep:
        problems.append(f"parallel.expert_model_parallel_size {ep} does not divide the {dp} data-parallel ranks "
                        f"(nodes x processes / (tensor x pipeline parallel sizes))")
    if teacher_shape:  # a megatron model_config.json or a transformers config.json
        experts = teacher_shape.get("num_experts") or teacher_shape.get("num_local_experts")
        if not experts:
            problems.append(f"parallel.expert_model_parallel_size {ep}: the teacher (teacher.load) has no experts "
                            f"to split")
        elif experts % ep:
            problems.append(f"parallel.expert_model_parallel_size {ep} does not divide the teacher's {experts} experts")
    return problems


def _model(graph: Graph, where: str, spec, tp: int, pp: int, dp: int) -> list[str]:
    """A reference or student model: its shape, its training settings, its fit to the layout."""
    problems = []
    try:
        train = graph.train_config(spec, "", {"data": ""}, "", 1)
        if train.global_batch_size % (train.micro_batch_size * dp):
            problems.append(f"{where}.train: global_batch_size {train.global_batch_size} is not divisible by "
                            f"micro_batch_size {train.micro_batch_size} x data-parallel size {dp} (parallel)")
    except (TypeError, ValueError) as e:
        problems.append(f"{where}.train: {e}")
    if spec.epochs <= 0:
        problems.append(f"{where}.epochs {spec.epochs}: must be positive")
    if spec.train_iters is not None and spec.train_iters < 1:
        problems.append(f"{where}.train_iters {spec.train_iters}: must be positive")
    try:
        model = model_from_spec(spec.model)
    except (ConfigError, ValueError) as e:
        return problems + [f"{where}.model: {e}"]
    if model.num_attention_heads % tp or model.kv_heads % tp:
        problems.append(f"parallel.tensor_model_parallel_size {tp} does not divide the {model.num_attention_heads} "
                        f"attention heads / {model.kv_heads} key-value heads of {where}.model")
    if model.num_layers % pp:
        problems.append(f"parallel.pipeline_model_parallel_size {pp} does not divide the {model.num_layers} layers "
                        f"of {where}.model")
    return problems
