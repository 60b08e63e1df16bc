"""MiniPLM's stages, from a resolved pipeline config.

Each stage knows what it is made with (``settings``, plus the identity of outside
files it reads and the fingerprints of the stages it reads from), the commands that
make it, and how to tell that it finished. Its outputs live in a directory named by
its fingerprint, so a changed setting never resumes or overwrites another run's
outputs; stages that read a changed stage get new fingerprints too.

    corpus -> teacher -> data -> split -> reference -> score-teacher, score-reference
           -> select -> student-miniplm, student-<baseline>... -> evaluate
    (seqkd.enabled: teacher, split -> generate-seqkd -> student-seqkd -> evaluate)
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from megatron_miniplm.models.config import ModelConfig, model_from_spec
from megatron_miniplm.generation import GENERATION_VERSION
from megatron_miniplm.pipeline.config import PipelineConfig, size_label, size_spec
from megatron_miniplm.scoring import SCORES_VERSION
from megatron_miniplm.selection.config import SelectionConfig
from megatron_miniplm.settings import cli_fields, flag_of, to_argv
from megatron_miniplm.training.flops import flops_matched_kd_iterations

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SINGLE, DISTRIBUTED = "single", "distributed"
# The data-limited setting's baseline (selection.baselines): all of the corpus D (the split's
# rest), repeated to the students' token budget, against MiniPLM's selection repeated to it.
ALL = "all"


def tool(name: str) -> str:
    return os.path.join(REPO, "tools", name)


@dataclass
class Stage:
    name: str
    kind: str  # SINGLE: one process on the first node; DISTRIBUTED: every rank of the job
    settings: dict
    deps: list[str] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)  # outside files: path -> [size, mtime_ns]
    # commands(out_dir, dirs of the stages read) -> the commands, run in order: each an argv, or
    # a function returning one, called when the commands before it have run (its settings come
    # from what they wrote, e.g. a baseline's token budget from the MiniPLM selection)
    commands: Callable[[str, dict], list[Union[list[str], Callable[[], list[str]]]]] = None
    # missing(out_dir, dirs of the stages read) -> what is missing from its outputs, None once
    # they are complete (a stage stopped by SIGTERM exits 0 before it is complete)
    missing: Callable[[str, dict], Optional[str]] = lambda out, dirs: None
    # progress(out_dir, dirs of the stages read) -> how far a running stage is, from what its
    # tool writes as it goes (None: nothing to tell)
    progress: Optional[Callable[[str, dict], Optional[str]]] = None
    fingerprint: str = ""

    def compute_fingerprint(self, upstream: dict) -> str:
        blob = json.dumps({"stage": self.name, "settings": self.settings, "inputs": self.inputs,
                           "deps": {dep: upstream[dep] for dep in self.deps}}, sort_keys=True, default=str)
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self.fingerprint


PRECISION_RECORD = "bf16.json"


def resolve_bf16(cfg: PipelineConfig) -> tuple[bool, str]:
    """bf16 or not for every model stage, and why. ``auto`` is decided once per work directory:
    the decision the first run recorded (``record_bf16``) is reused, because on some CPUs it
    comes from a timing, and a timing that flips near its threshold must not change every
    model stage's fingerprint and rerun them. ``true`` / ``false`` are taken as given."""
    if cfg.bf16 != "auto":
        return bool(cfg.bf16), "set"
    path = os.path.join(os.path.abspath(cfg.work_dir), PRECISION_RECORD)
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
        return bool(recorded["bf16"]), f"auto, as first decided for this work directory ({path}): {recorded['reason']}"
    except (OSError, ValueError, KeyError, TypeError):
        from megatron_miniplm import platform

        bf16, why = platform.bf16_is_fast()
        return bf16, f"auto: {why}"


def record_bf16(graph: "Graph") -> None:
    """Keep ``auto``'s decision for the later runs on this work directory (run once, by the
    first node, before any stage)."""
    if graph.cfg.bf16 != "auto":
        return
    from megatron_miniplm.atomic_io import write_json_atomic

    path = os.path.join(os.path.abspath(graph.cfg.work_dir), PRECISION_RECORD)
    if not os.path.exists(path):
        write_json_atomic(path, {"bf16": graph.bf16, "reason": graph.bf16_reason.removeprefix("auto: ")})


def file_identity(paths: list[str]) -> dict:
    """path -> [size, mtime_ns] of each file (every file under a directory): what a stage
    reading outside files is fingerprinted by (cheap for 100 GB corpora)."""
    out = {}
    for path in paths:
        path = os.path.abspath(path)
        files = ([os.path.join(dirs, f) for dirs, _, fs in os.walk(path) for f in fs] if os.path.isdir(path) else [path])
        for f in sorted(files):
            try:
                st = os.stat(f)
                out[f] = [st.st_size, st.st_mtime_ns]
            except OSError:  # missing: the invariants refuse it before anything runs
                out[f] = None
    return out


def expand(patterns: list[str]) -> list[str]:
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern))
        files.extend(matched or [pattern])
    return files


def _read_meta(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _iterations(epochs: float, tokens: int, global_batch: int, seq: int) -> int:
    return max(1, -(-int(epochs * tokens) // (global_batch * seq)))


def model_flags(spec: dict) -> list[str]:
    """tools/pretrain_gpt.py's model flags for a config's model mapping."""

    argv = ["--model-preset", spec["preset"]] if spec.get("preset") else []
    for f, tp in cli_fields(ModelConfig):
        if f.name not in spec:
            continue
        value = spec[f.name]
        if isinstance(value, bool):
            if value != f.default:
                argv.append(flag_of(f))
        else:
            argv += [flag_of(f), str(value)]
    return argv


def _score_files(prefix: str) -> list[str]:
    """A scoring output's score prefixes: PREFIX, or PREFIX_00000 ... for a sharded dataset."""
    if os.path.exists(prefix + ".meta.json"):
        return [prefix]
    return sorted(p[: -len(".meta.json")] for p in glob.glob(prefix + "_[0-9][0-9][0-9][0-9][0-9].meta.json"))


class Graph:
    """The stages of one config, in the order they run, with their fingerprints."""

    def __init__(self, cfg: PipelineConfig, python: str = sys.executable):
        self.cfg, self.python = cfg, python
        self.bf16, self.bf16_reason = resolve_bf16(cfg)
        self.stages: list[Stage] = []
        self._build()
        prints: dict = {}
        for stage in self.stages:
            prints[stage.name] = stage.compute_fingerprint(prints)

    def __getitem__(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def out_dir(self, stage: Stage) -> str:
        return os.path.join(os.path.abspath(self.cfg.work_dir), stage.name, stage.fingerprint)

    # ---- the stages -----------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        py = self.python
        if cfg.corpus.train is None:
            self.stages.append(Stage(
                "corpus", SINGLE, {"chars_per_domain": cfg.corpus.demo_chars_per_domain, "seed": cfg.seed},
                commands=lambda out, dirs: [[py, tool("build_demo_corpus.py"), "--output-dir", out, "--chars-per-domain",
                                          str(cfg.corpus.demo_chars_per_domain), "--seed", str(cfg.seed)]]))
        self._teacher()
        self._data()
        self._split()
        self._train("reference", cfg.reference, data_stage="split", data_name="ref")
        for model in ("teacher", "reference"):
            self._score(model)
        self._select()
        if cfg.student_tokenizer:
            self._retokenize()
        if cfg.seqkd.enabled:
            self._generate()
        for stage, label, seed in self.students:
            method, _, size = label.partition("@")
            model = self.student_model(size)
            if method == "student-vanilla-kd":
                # online distillation on the uniform sample, with the students' steps and seeds
                self._train(stage, model, data_stage=self.student_data, data_name="uniform", seed=seed,
                            kd=cfg.vanilla_kd)
            elif method == "student-seqkd":
                # the teacher's samples, at the students' token budget (MiniPLM's selection's)
                self._train(stage, model, data_stage="generate-seqkd", data_name="seqkd", seed=seed,
                            budget_stage="select")
            elif method == f"student-{ALL}":
                # the data-limited baseline: all of D (the split's rest), repeated to the students' tokens
                self._train(stage, model, data_stage="split", data_name="rest", seed=seed, budget_stage="select")
            else:
                self._train(stage, model, data_stage=self.student_data, data_name=method[len("student-"):],
                            seed=seed)
        self._evaluate()

    @property
    def student_names(self) -> list[str]:
        """The students trained on a selection: MiniPLM's and each baseline's."""
        return ["miniplm", *(b for b in self.cfg.selection.baselines if b != ALL)]

    @property
    def sizes(self) -> list[str]:
        """The students' sizes by name (``student.sizes``); [""]: the one ``student.model``."""
        return [size_label(s) for s in self.cfg.student.sizes] if self.cfg.student.sizes else [""]

    def student_model(self, size: str):
        """The students' section at one of their sizes ("": as configured)."""
        if not size:
            return self.cfg.student
        spec = next(size_spec(s) for s in self.cfg.student.sizes if size_label(s) == size)
        return dataclasses.replace(self.cfg.student, model=dict(spec), sizes=None)

    @property
    def student_data(self) -> str:
        """The stage holding the students' data: the selections, or their re-tokenized text."""
        return "retokenize" if self.cfg.student_tokenizer else "select"

    @property
    def student_seeds(self) -> list[int]:
        cfg = self.cfg
        return list(cfg.student_seeds or [cfg.seed + k for k in range(cfg.student_runs)])

    @property
    def students(self) -> list[tuple[str, str, int]]:
        """(stage, model label, seed) of every student stage: MiniPLM's, each baseline's and the
        Vanilla KD one, once per seed (the first seed's stage is named after the model), and once
        per size (labels METHOD@SIZE, as the evaluation reads them) with ``student.sizes``."""
        labels = [f"student-{n}" for n in self.student_names]
        labels += [f"student-{ALL}"] if ALL in self.cfg.selection.baselines else []
        labels += ["student-vanilla-kd"] if self.cfg.vanilla_kd.enabled else []
        labels += ["student-seqkd"] if self.cfg.seqkd.enabled else []
        labels = [f"{label}@{size}" if size else label for size in self.sizes for label in labels]
        return [(label if k == 0 else f"{label}-seed{seed}", label, seed)
                for label in labels for k, seed in enumerate(self.student_seeds)]

    def teacher_source(self) -> str:
        if self.cfg.teacher.load:
            return os.path.abspath(self.cfg.teacher.load)
        from megatron_miniplm.conversion.gguf import find_packaged_gguf

        return find_packaged_gguf()

    def teacher_label(self) -> str:
        if self.cfg.teacher.name:
            return self.cfg.teacher.name
        base = os.path.basename(os.path.normpath(self.teacher_source()))
        return base[:-5] if base.endswith(".gguf") else base

    @staticmethod
    def is_megatron_checkpoint(path: str) -> bool:
        return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "model_config.json")) or
                                        os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt")))

    def _teacher(self) -> None:
        cfg, source = self.cfg, self.teacher_source()
        par = cfg.parallel
        if self.is_megatron_checkpoint(source):
            commands = lambda out, dirs: []  # noqa: E731 - used in place
        else:
            commands = lambda out, dirs: [[self.python, tool("convert_checkpoint.py"), "--direction", "hf-to-megatron",  # noqa: E731
                                        "--load", source, "--save", os.path.join(out, "ckpt"),
                                        "--tensor-model-parallel-size", str(par.tensor_model_parallel_size),
                                        "--pipeline-model-parallel-size", str(par.pipeline_model_parallel_size)]]
        self.stages.append(Stage("teacher", SINGLE, {"source": source}, inputs=file_identity([source]),
                                 commands=commands))

    def teacher_checkpoint(self, dirs: dict) -> str:
        source = self.teacher_source()
        return source if self.is_megatron_checkpoint(source) else os.path.join(dirs["teacher"], "ckpt")

    def tokenizer_path(self, dirs: dict) -> str:
        if self.cfg.tokenizer:
            return os.path.abspath(self.cfg.tokenizer)
        return os.path.join(self.teacher_checkpoint(dirs), "tokenizer")

    def _data(self) -> None:

        cfg = self.cfg
        deps = ["teacher"] + (["corpus"] if cfg.corpus.train is None else [])
        inputs = {}
        if cfg.corpus.train is not None:
            inputs = file_identity(expand(cfg.corpus.train) + expand(cfg.corpus.test or []))
        if cfg.tokenizer:
            inputs.update(file_identity([cfg.tokenizer]))

        def commands(out, dirs):
            argv = []
            for name, files in zip(("train", "test"), self.corpus_files(dirs)):
                pre = cfg.preprocess.stage_config(inputs=list(files), output_prefix=os.path.join(out, name),
                                                  tokenizer=self.tokenizer_path(dirs), seq_length=cfg.seq_length,
                                                  progress=False)
                argv.append([self.python, tool("preprocess_data.py"), *to_argv(pre, only_changed=False)])
            return argv

        self.stages.append(Stage("data", SINGLE, {"preprocess": cfg.preprocess.given(), "seq_length": cfg.seq_length,
                                                  "tokenizer": cfg.tokenizer, "corpus": [cfg.corpus.train, cfg.corpus.test]},
                                 deps=deps, inputs=inputs, commands=commands))

    def corpus_files(self, dirs: dict) -> tuple[list, list]:
        """(train, test) input files: the configured corpus, or the demo corpus stage's."""
        if self.cfg.corpus.train is None:
            return [os.path.join(dirs["corpus"], "train.jsonl")], [os.path.join(dirs["corpus"], "test.jsonl")]
        return list(self.cfg.corpus.train), list(self.cfg.corpus.test)

    def _retokenize(self) -> None:
        """Students of another tokenizer: each selection exported as text and tokenized with
        theirs, and the test documents too."""
        from megatron_miniplm.selection.export import ExportConfig

        cfg = self.cfg
        tokenizer = os.path.abspath(cfg.student_tokenizer)

        def commands(out, dirs):
            argv = []
            for name in self.student_names:
                text = os.path.join(out, f"{name}.jsonl.zst")
                argv.append([self.python, tool("export_selection.py"), *to_argv(ExportConfig(
                    blend=os.path.join(dirs["select"], name), output=text, progress=False))])
                argv.append([self.python, tool("preprocess_data.py"), *to_argv(cfg.preprocess.stage_config(
                    inputs=[text], output_prefix=os.path.join(out, name), tokenizer=tokenizer,
                    seq_length=cfg.seq_length, progress=False), only_changed=False)])
            argv.append([self.python, tool("preprocess_data.py"), *to_argv(cfg.preprocess.stage_config(
                inputs=self.corpus_files(dirs)[1], output_prefix=os.path.join(out, "test"), tokenizer=tokenizer,
                seq_length=cfg.seq_length, progress=False), only_changed=False)])
            return argv

        self.stages.append(Stage("retokenize", SINGLE, {"tokenizer": tokenizer, "preprocess": cfg.preprocess.given(),
                                                        "seq_length": cfg.seq_length},
                                 deps=["select", "data"] + (["corpus"] if cfg.corpus.train is None else []),
                                 inputs=file_identity([tokenizer]), commands=commands))

    def _split(self) -> None:

        cfg = self.cfg

        def commands(out, dirs):
            split = cfg.split.stage_config(input_prefix=os.path.join(dirs["data"], "train"),
                                           ref_prefix=os.path.join(out, "ref"), rest_prefix=os.path.join(out, "rest"),
                                           seed=cfg.seed)
            return [[self.python, tool("split_dataset.py"), *to_argv(split, only_changed=False)]]

        self.stages.append(Stage("split", SINGLE, {"split": cfg.split.given(), "seed": cfg.seed}, deps=["data"],
                                 commands=commands))

    def train_config(self, model, out: str, dirs: dict, data_path: str, iters: int, kd=None,
                     seed: Optional[int] = None, valid_stage: str = "data", stage: str = ""):
        """tools/pretrain_gpt.py's TrainConfig for a model of the config, less its model: that goes
        to the tool as model flags (``model_flags``), which it resolves against the data's
        vocabulary. ``kd``: the Vanilla KD section, for the KD student; ``stage``: its W&B run's name."""
        cfg, par, wandb = self.cfg, self.cfg.parallel, self.cfg.wandb
        kd_settings = kd if kd is not None else type(cfg.vanilla_kd)()  # the defaults: no KD
        return model.train.stage_config(
            model=None, data_path=[data_path], valid_data_path=[os.path.join(dirs[valid_stage], "test")],
            seq_length=cfg.seq_length, seed=cfg.seed if seed is None else seed, bf16=self.bf16,
            tensor_model_parallel_size=par.tensor_model_parallel_size,
            pipeline_model_parallel_size=par.pipeline_model_parallel_size, expert_model_parallel_size=1,
            save=os.path.join(out, "ckpt"), load=os.path.join(out, "ckpt"), train_iters=iters, train_tokens=None,
            metrics_file=os.path.join(out, "metrics.jsonl"), exit_signal_handler=True,
            kd_teacher_load=self.teacher_checkpoint(dirs) if kd is not None else None,
            kd_ratio=kd_settings.kd_ratio, kd_temperature=kd_settings.kd_temperature,
            wandb_project=wandb.project, wandb_entity=wandb.entity, wandb_mode=wandb.mode, wandb_save_dir=None,
            wandb_group=(wandb.group or os.path.basename(os.path.abspath(cfg.work_dir))) if wandb.project else None,
            wandb_exp_name=stage if wandb.project else None)

    def _train(self, name: str, model, *, data_stage: str, data_name: str, kd=None,
               seed: Optional[int] = None, budget_stage: Optional[str] = None) -> None:

        cfg = self.cfg
        # Epochs over D_ref for the reference; for every student over the MiniPLM selection's
        # tokens, so that all students take the same steps (or fixed steps: train_iters). The
        # Vanilla KD student takes fewer where it matches their FLOPs (vanilla_kd.match).
        budget_stage = budget_stage or data_stage
        budget, key = {"split": ("ref", "num_tokens"), "select": ("miniplm", "tokens_kept"),
                       "retokenize": ("miniplm", "num_tokens")}[budget_stage]
        valid_stage = "retokenize" if data_stage == "retokenize" else "data"

        def iterations(dirs) -> int:
            tokens = _read_meta(os.path.join(dirs[budget_stage], budget + ".meta.json"))[key]
            steps = model.train_iters or _iterations(model.epochs, tokens, model.train.global_batch_size,
                                                     cfg.seq_length)
            return self.kd_iterations(model, steps, dirs) if kd is not None and kd.match == "flops" else steps

        def commands(out, dirs):
            train = self.train_config(model, out, dirs, os.path.join(dirs[data_stage], data_name), iterations(dirs), kd,
                                      seed, valid_stage, stage=name)
            return [[self.python, tool("pretrain_gpt.py"), *model_flags(model.model), *to_argv(train)]]

        def missing(out, dirs):
            marker = os.path.join(out, "ckpt", "latest_checkpointed_iteration.txt")
            got = open(marker).read().strip() if os.path.exists(marker) else None
            want = str(iterations(dirs))
            return None if got == want else f"checkpoint at iteration {got}, {want} wanted"

        budget_settings = {"train_iters": model.train_iters} if model.train_iters else {"epochs": model.epochs}
        settings = {"model": model.model, **budget_settings, "train": model.train.given(), "seq_length": cfg.seq_length,
                    "seed": cfg.seed if seed is None else seed, "bf16": self.bf16, "data": data_name, "layout": _layout(cfg)}
        deps = list(dict.fromkeys([data_stage, budget_stage, "data"]))
        if kd is not None:
            # the teacher's logits, and the rule its steps follow (stated: a changed default must
            # not leave a KD student of the other rule looking finished)
            settings.update(kd=kd.given(), match=kd.match, scores_version=SCORES_VERSION)
            deps.append("teacher")
        def progress(out, dirs):
            return training_progress(os.path.join(out, "metrics.jsonl"), iterations(dirs))

        self.stages.append(Stage(name, DISTRIBUTED, settings, deps=deps, commands=commands, missing=missing,
                                 progress=progress))

    def kd_iterations(self, model, plain_iterations: int, dirs: dict) -> int:
        """The Vanilla KD student's steps at the training FLOPs of ``plain_iterations`` steps of a
        plain student: the student's shape as the tool resolves it (a preset's own vocabulary,
        else the data's), the teacher's from its checkpoint."""
        from megatron_miniplm.dist_checkpoint import load_model_config

        vocab = _read_meta(os.path.join(dirs["data"], "train.meta.json"))["tokenizer"]["vocab_size"]
        student = model_from_spec(model.model, vocab_size=vocab)
        teacher = load_model_config(self.teacher_checkpoint(dirs))
        return flops_matched_kd_iterations(plain_iterations, student, teacher, self.cfg.seq_length,
                                           self.cfg.parallel.tensor_model_parallel_size)

    def _score(self, model: str) -> None:

        cfg, par = self.cfg, self.cfg.parallel
        ep = par.expert_model_parallel_size if model == "teacher" else 1  # the reference is dense

        def commands(out, dirs):
            load = self.teacher_checkpoint(dirs) if model == "teacher" else os.path.join(dirs["reference"], "ckpt")
            score = cfg.scoring.stage_config(
                data_path=os.path.join(dirs["split"], "rest"), load=load, output_prefix=os.path.join(out, "scores"),
                seed=cfg.seed, bf16=self.bf16, tensor_model_parallel_size=par.tensor_model_parallel_size,
                pipeline_model_parallel_size=par.pipeline_model_parallel_size, expert_model_parallel_size=ep,
                progress=False)
            return [[self.python, tool("score_docs.py"), *to_argv(score)]]

        def missing(out, dirs):
            return None if _score_files(os.path.join(out, "scores")) else "no score file yet"

        self.stages.append(Stage(f"score-{model}", DISTRIBUTED,
                                 {"scoring": cfg.scoring.given(), "bf16": self.bf16, "seed": cfg.seed,
                                  "layout": _layout(cfg, ep), "scores_version": SCORES_VERSION},
                                 deps=[model, "split"], commands=commands, missing=missing,
                                 progress=lambda out, dirs: scoring_progress(os.path.join(out, "scores"))))

    def _generate(self) -> None:
        """SeqKD's corpus: the teacher's continuations of prompts cut from the students' corpus
        (the split's rest, which the selections sample), as the official SeqKD generates from
        its pre-training corpus."""
        cfg, par = self.cfg, self.cfg.parallel

        def commands(out, dirs):
            generation = cfg.seqkd.stage_config(
                data_path=os.path.join(dirs["split"], "rest"), load=self.teacher_checkpoint(dirs),
                output_prefix=os.path.join(out, "seqkd"), tensor_model_parallel_size=par.tensor_model_parallel_size,
                bf16=self.bf16, seed=cfg.seed, progress=False)
            return [[self.python, tool("generate_corpus.py"), *to_argv(generation)]]

        def missing(out, dirs):
            return None if os.path.exists(os.path.join(out, "seqkd.meta.json")) else "no generated corpus yet"

        self.stages.append(Stage("generate-seqkd", DISTRIBUTED,
                                 {"seqkd": cfg.seqkd.given(), "bf16": self.bf16, "seed": cfg.seed, "layout": _layout(cfg),
                                  "generation_version": GENERATION_VERSION},
                                 deps=["teacher", "split"], commands=commands, missing=missing))

    def _select(self) -> None:
        from megatron_miniplm.selection.sample import SampleRequest

        cfg = self.cfg
        def commands(out, dirs):
            rest = os.path.join(dirs["split"], "rest")
            scores = dict(teacher_scores=_score_files(os.path.join(dirs["score-teacher"], "scores")),
                          reference_scores=_score_files(os.path.join(dirs["score-reference"], "scores")))
            main = SampleRequest(data_paths=[rest], output=os.path.join(out, "miniplm"),
                                 config=cfg.selection.stage_config(method="difference", seed=cfg.seed),
                                 report_dir=os.path.join(out, "report"), **scores)
            argv = [[self.python, tool("difference_sample.py"), *to_argv(main)]]
            for baseline in self.student_names[1:]:
                # Same token budget as MiniPLM's selection: known once it is written.
                argv.append(lambda baseline=baseline: [
                    self.python, tool("difference_sample.py"), *to_argv(SampleRequest(
                        data_paths=[rest], output=os.path.join(out, baseline),
                        config=SelectionConfig(method=baseline, seed=cfg.seed, order=cfg.selection.order,
                                               keep_tokens=_read_meta(os.path.join(out, "miniplm.meta.json"))["tokens_kept"]),
                        **scores))])
            return argv

        self.stages.append(Stage("select", SINGLE, {"selection": cfg.selection.given(), "seed": cfg.seed},
                                 deps=["split", "score-teacher", "score-reference"], commands=commands))

    def _evaluate(self) -> None:

        cfg, par = self.cfg, self.cfg.parallel
        students = self.students

        # With another student tokenizer only the students share a test set (and a unit of loss).
        same_tokenizer = not cfg.student_tokenizer
        test_stage = "data" if same_tokenizer else "retokenize"

        def commands(out, dirs):
            loads = [os.path.join(dirs[stage], "ckpt") for stage, _, _ in students]
            names = [label for _, label, _ in students]
            metrics = [os.path.join(dirs[stage], "metrics.jsonl") for stage, _, _ in students]
            if same_tokenizer:
                loads += [os.path.join(dirs["reference"], "ckpt"), self.teacher_checkpoint(dirs)]
                names += ["reference", f"teacher ({self.teacher_label()})"]
                metrics += ["-", "-"]
            evaluation = cfg.evaluation.stage_config(
                load=loads, name=names, data_path=os.path.join(dirs[test_stage], "test"),
                output_dir=os.path.join(out, "eval"), json=os.path.join(out, "results.json"),
                report_dir=os.path.join(out, "report"), metrics_file=metrics, bootstrap_seed=cfg.seed,
                tensor_model_parallel_size=par.tensor_model_parallel_size,
                pipeline_model_parallel_size=par.pipeline_model_parallel_size,
                expert_model_parallel_size=par.expert_model_parallel_size, bf16=self.bf16)
            argv = [self.python, tool("evaluate.py"), *to_argv(evaluation)]
            return [argv]

        def missing(out, dirs):
            return None if os.path.exists(os.path.join(out, "results.json")) else "no results yet"

        layout = _layout(cfg, par.expert_model_parallel_size)  # the teacher's test loss at its EP
        self.stages.append(Stage("evaluate", DISTRIBUTED, {"evaluation": cfg.evaluation.given(), "bf16": self.bf16, "seed": cfg.seed,
                                                           "teacher": self.teacher_label(), "layout": layout,
                                                           "scores_version": SCORES_VERSION},
                                 deps=[*(stage for stage, _, _ in students), "reference", "teacher", "data"]
                                 + ([] if same_tokenizer else ["retokenize"]),
                                 commands=commands, missing=missing))


def training_progress(metrics_file: str, total: int) -> Optional[str]:
    """'iteration 40/108 (37%), 2,100 tokens/s, ~2.3 min left' from a trainer's metrics file
    (its last iteration and its last throughput record); None before its first line. Reads
    the file's end only: a long run's file is large, and --status is run while it grows."""
    last, rate = None, None
    for record in _last_records(metrics_file):
        if rate is None and "tokens_per_s" in record:
            rate = record
        elif last is None and "loss" in record:
            last = record
        if last is not None and rate is not None:
            break
    if last is None:
        return None
    done = last["iteration"]
    text = f"iteration {done}/{total} ({100 * done / max(total, 1):.0f}%)"
    if rate and rate.get("ms_per_iter"):
        left = max(total - done, 0) * rate["ms_per_iter"] / 1000 / 60
        text += f", {rate['tokens_per_s']:,.0f} tokens/s, ~{left:.1f} min left"
    return text


def _last_records(path: str, block: int = 1 << 16):
    """A JSON-lines file's records, last first, read back from its end a block at a time (a
    line being written is skipped)."""
    try:
        f = open(path, "rb")
    except OSError:
        return
    with f:
        pos, carry = f.seek(0, os.SEEK_END), b""
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            lines = (f.read(pos - start) + carry).split(b"\n")
            pos = start
            carry = lines.pop(0) if start > 0 else b""  # may start mid-line: joined to the next block
            for line in reversed(lines):
                try:
                    yield json.loads(line)
                except ValueError:
                    continue


def scoring_progress(output_prefix: str) -> Optional[str]:
    """'instances 1,200/4,000 (30%), 9,800 tokens/s, ~2.3 min left' from the status a scorer
    keeps in its progress directory (rank 0's replica; throughput over all replicas)."""
    from megatron_miniplm.scoring import resume

    status = resume.read_status(resume.progress_dir(output_prefix))
    if status is None:
        return None
    done, total = status["instances_done"], status["instances"]
    text = f"instances {done:,}/{total:,} ({100 * done / max(total, 1):.0f}%)"
    if status["replicas"] > 1:
        text += f" of replica 1 of {status['replicas']}"
    if status.get("seconds_left") is not None:
        text += f", {status['tokens_per_s']:,.0f} tokens/s, ~{status['seconds_left'] / 60:.1f} min left"
    return text


def _layout(cfg: PipelineConfig, ep: int = 1) -> dict:
    """The parallel layout, which changes numbers (reduction order): part of a fingerprint;
    ``ep``: the stage's expert parallelism, named only above 1 (the stages that run dense keep
    the fingerprints they had)."""
    par = cfg.parallel
    return {"world": par.nnodes * par.nproc_per_node, "tp": par.tensor_model_parallel_size,
            "pp": par.pipeline_model_parallel_size, **({"ep": ep} if ep > 1 else {})}
