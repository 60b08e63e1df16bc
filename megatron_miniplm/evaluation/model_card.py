"""The model card (README.md) of a student exported to Hugging Face format.

A card says how the model was made, and it states only what files record: the
checkpoint's ``model_config.json``, ``checkpoint_info.json`` (tokenizer),
``run_config.json`` (the TrainConfig) and train state (consumed tokens, FLOPs,
iteration, the KD teacher), the training data's metas (a sampled blend of
tools/difference_sample.py names the selection and the teacher's and reference's
score files), and tools/evaluate.py's results.json. What no file records is left
out or stated as unknown, never guessed.

The metadata header follows the Hugging Face Hub's model-card conventions. Its
``license`` is left for the publisher: the license under which the model may be
shared depends on the training data and the teacher, which no file here records.
``base_model`` and ``datasets`` take Hub ids, which are known only for files that
sit in the Hub cache layout (``models--ORG--NAME``, ``datasets--ORG--NAME``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from megatron_miniplm.conversion.errors import ConversionError
from megatron_miniplm.models.config import ModelConfig

CARD_FILE = "README.md"
TAGS = ("megatron-core",)
# Per-shard rows listed (datasets, score files) before the rest are only counted: a
# corpus of thousands of shards would otherwise bury the card in one table.
MAX_LISTED = 8
EVAL_RECORD = os.path.join("records", "evaluate.json")
RESULTS_FILE = "results.json"
# Why the card's usage loads tokenizer.json as it is (a qwen2-shaped student may carry SmolLM2's
# or Llama 3's tokenizer, which AutoTokenizer would replace by a rebuilt Qwen2Tokenizer).
USAGE_NOTE = ("Load the tokenizer as above, not with `AutoTokenizer`: for some model types (qwen2 among "
              "them) transformers rebuilds that family's tokenizer from the vocabulary and merges, which "
              "tokenizes text otherwise than the tokenizer.json this model was trained with unless it is "
              "the family's own. lm-evaluation-harness takes the tokenizer the same way "
              "(`HFLM(pretrained=path, tokenizer=tokenizer)`), as tools/evaluate.py's zero-shot tasks do.\n")
NO_EVALUATION = ("No held-out evaluation of this checkpoint was found. Pass the results.json of "
                 "tools/evaluate.py to tools/convert_checkpoint.py with `--results PATH` to include one.")


@dataclass
class DataSource:
    """One prefix of the run's --data-path: a sampled blend, a dataset, or unreadable here."""

    prefix: str
    weight: Optional[float]  # share of a Megatron-style weighted blend; None for a single prefix
    kind: Optional[str] = None  # "blend", "dataset", or None when its meta is not found here
    meta: Optional[dict] = None


@dataclass
class Evaluation:
    """The held-out results row of this checkpoint, or why there is none."""

    path: Optional[str] = None  # results.json read
    results: Optional[dict] = None
    model: Optional[str] = None  # the row's name in results["models"]
    run: Optional[dict] = None  # this checkpoint's entry of the row's "runs"
    note: str = NO_EVALUATION


@dataclass
class CardFacts:
    """Everything the card states, as read from the files."""

    checkpoint: str  # the resolved checkpoint directory
    config: ModelConfig
    params: object  # models.param_count.ParamCount
    info: Optional[dict]
    run_config: Optional[dict]
    train_state: Optional[dict]
    data: list = field(default_factory=list)
    evaluation: Evaluation = field(default_factory=Evaluation)
    base_model: Optional[str] = None
    hub_datasets: list = field(default_factory=list)


# ---- reading ------------------------------------------------------------------------------

def read_json(path: str, what: str) -> dict:
    """A JSON object from ``path``; a ConversionError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def hub_id(path: Optional[str], kind: str = "model") -> Optional[str]:
    """The Hub repository id of a file in the Hugging Face cache, which keeps repository
    ``ORG/NAME`` under ``models--ORG--NAME`` (``datasets--...`` for datasets); None for a
    path outside it: a plain local path names no Hub repository."""
    if not path:
        return None
    match = re.search(rf"(?:^|/){kind}s--([^/]+)", str(path))
    return match.group(1).replace("--", "/") if match else None


def read_train_state(directory: str) -> Optional[dict]:
    """The trainer's train_state in the dist checkpoint's common state; None for a checkpoint
    that holds none (a converted or saved model)."""
    from megatron.core import dist_checkpointing

    if not os.path.isfile(os.path.join(directory, "common.pt")):
        return None
    try:
        common = dist_checkpointing.load_common_state_dict(directory)
    except Exception as e:  # torch.load's errors vary with the damage; all mean one thing here
        raise ConversionError(f"{os.path.join(directory, 'common.pt')}: not readable ({e})") from None
    state = common.get("train_state") if isinstance(common, dict) else None
    return dict(state) if isinstance(state, dict) else None


def read_data_sources(run_config: dict, where: str) -> list:
    """The run's --data-path prefixes with their metas (a blend's meta, else the dataset's)."""
    from megatron_miniplm.training.data import parse_data_path

    try:
        prefixes, weights = parse_data_path(run_config.get("data_path") or [])
    except ValueError as e:
        raise ConversionError(f"{where}: data_path: {e}") from None
    single = len(prefixes) == 1
    return [_data_source(p, None if single else w) for p, w in zip(prefixes, weights)]


def _data_source(prefix: str, weight: Optional[float]) -> DataSource:
    from megatron_miniplm.data.meta import read_dataset_meta
    from megatron_miniplm.selection.blend import BlendError, is_blend, load_blend

    source = DataSource(prefix, weight)
    if is_blend(prefix):
        try:
            source.meta = load_blend(prefix)[1]
        except BlendError as e:
            raise ConversionError(f"the run's training data: {e}") from None
        source.kind = "blend"
    elif os.path.isfile(prefix + ".meta.json"):
        try:
            source.meta = read_dataset_meta(prefix)
        except ValueError as e:
            raise ConversionError(f"the run's training data: {e}") from None
        source.kind = "dataset"
    return source


def hub_datasets(sources: list) -> list:
    """Hub dataset ids of the training data's preprocessing inputs, where those sit in the Hub cache."""
    from megatron_miniplm.data.meta import read_dataset_meta
    from megatron_miniplm.selection.blend import dataset_prefixes

    metas = []
    for s in sources:
        if s.kind == "dataset":
            metas.append(s.meta)
        elif s.kind == "blend":
            for prefix in dataset_prefixes(s.prefix, s.meta):
                try:
                    metas.append(read_dataset_meta(prefix))
                except (OSError, ValueError):  # a shard moved away: its inputs are unknown here
                    continue
    ids = (hub_id(i.get("path"), "dataset") for m in metas for i in m.get("inputs") or [] if isinstance(i, dict))
    return sorted({i for i in ids if i})


def base_model_of(info: Optional[dict], run_config: Optional[dict]) -> Optional[str]:
    """The Hub model the weights come from: this checkpoint's import source, else the checkpoint
    the run started from (``load`` other than ``save``: not a resumption) when that was imported."""
    from megatron_miniplm.conversion.checkpoint_info import read_info, resolve_megatron_checkpoint

    if info and info.get("source_format") in ("hf", "gguf"):
        return hub_id(info.get("source"))
    load = (run_config or {}).get("load")
    if not load or load == run_config.get("save"):
        return None
    try:
        start = read_info(resolve_megatron_checkpoint(load))
    except ConversionError:  # the starting checkpoint is gone or not ours: its origin is unknown
        return None
    if start and start.get("source_format") in ("hf", "gguf"):
        return hub_id(start.get("source"))
    return None


def same_checkpoint(recorded: str, resolved: str) -> bool:
    """Whether a checkpoint path (a run's --save directory or an iteration) names ``resolved``."""
    from megatron_miniplm.conversion.checkpoint_info import resolve_megatron_checkpoint

    try:
        path = resolve_megatron_checkpoint(recorded)
    except ConversionError:
        path = recorded
    return os.path.realpath(path) == os.path.realpath(resolved)


def pipeline_results(paths: list) -> tuple[Optional[str], Optional[str]]:
    """(results.json, None) of the pipeline whose work directory holds the checkpoint
    (WORK_DIR/STAGE/FINGERPRINT/ckpt[/iter_N]) and has run its evaluation; else (None, why
    not), the reason None where no pipeline evaluation record is found."""
    for path in paths:
        directory = os.path.realpath(path)
        for candidate in (directory, os.path.dirname(directory)):  # ckpt itself, or one of its iterations
            if os.path.basename(candidate) != "ckpt":
                continue
            record = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(candidate))), EVAL_RECORD)
            if not os.path.isfile(record):
                continue
            output = read_json(record, "the pipeline's evaluation record").get("output")
            results = os.path.join(str(output), RESULTS_FILE)
            if output and os.path.isfile(results):
                return results, None
            return None, (f"The pipeline's evaluation record {record} names {output}, which holds no "
                          f"{RESULTS_FILE}: no held-out results are shown.")
    return None, None


def read_evaluation(results: Optional[str], load: str, resolved: str) -> Evaluation:
    """This checkpoint's row of tools/evaluate.py's results: from ``results`` when given (it must
    hold the checkpoint), else from the pipeline's evaluation when the checkpoint is a stage's."""
    explicit = results is not None
    if not explicit:
        results, why = pipeline_results([load, resolved])
        if results is None:
            return Evaluation(note=why or NO_EVALUATION)
    data = read_json(results, "results file of tools/evaluate.py")
    models = data.get("models")
    if not isinstance(models, dict):
        raise ConversionError(f"{results}: not a results file of tools/evaluate.py (no 'models' object)")
    for name, row in models.items():
        runs = row.get("runs") if isinstance(row, dict) else None
        for run in runs if isinstance(runs, list) else []:
            if isinstance(run, dict) and run.get("checkpoint") and same_checkpoint(run["checkpoint"], resolved):
                if not _is_number(run.get("lm_loss")):
                    raise ConversionError(f"{results}: model {name!r}: the run of {run['checkpoint']} has no lm_loss")
                return Evaluation(os.path.abspath(results), data, name, run)
    if explicit:
        raise ConversionError(f"{results}: no model's runs scored the checkpoint {resolved} "
                              f"(models: {', '.join(models) or 'none'})")
    return Evaluation(os.path.abspath(results), data, note=(
        f"The pipeline's evaluation ({os.path.abspath(results)}) did not score this checkpoint: "
        "no held-out results are shown."))


def read_card_facts(load: str, results: Optional[str] = None) -> CardFacts:
    """Everything the card of checkpoint ``load`` states, read (and checked) before any output."""
    from megatron_miniplm.conversion.checkpoint_info import read_info, resolve_megatron_checkpoint
    from megatron_miniplm.conversion.session import single_process
    from megatron_miniplm.dist_checkpoint import load_model_config
    from megatron_miniplm.models.param_count import count_parameters
    from megatron_miniplm.training.checkpoint import RUN_CONFIG_FILE

    resolved = resolve_megatron_checkpoint(load)
    try:
        config = load_model_config(resolved)
    except ValueError as e:
        raise ConversionError(f"{resolved}: bad model_config.json ({e})") from None
    with single_process():
        params = count_parameters(config)
    run_path = os.path.join(resolved, RUN_CONFIG_FILE)
    run_config = read_json(run_path, "run config") if os.path.isfile(run_path) else None
    info = read_info(resolved)
    facts = CardFacts(os.path.abspath(resolved), config, params, info, run_config, read_train_state(resolved))
    if run_config is not None:
        facts.data = read_data_sources(run_config, run_path)
        facts.hub_datasets = hub_datasets(facts.data)
    facts.base_model = base_model_of(info, run_config)
    facts.evaluation = read_evaluation(results, load, resolved)
    return facts


# ---- rendering ----------------------------------------------------------------------------

def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _loss(x) -> str:
    return f"{x:.4f}" if _is_number(x) else "unknown"


def _count(n) -> str:
    return f"{int(n):,}" if _is_number(n) else "unknown"


def _code(value) -> str:
    return f"`{value}`" if value not in (None, "") else "unknown"


def tags(facts: CardFacts) -> list:
    """Hub tags that the files bear out: ``miniplm`` for a model this toolkit trained, and
    ``knowledge-distillation`` when its teacher shaped the training, through MiniPLM's Difference
    Sampling (a blend selected by teacher and reference) or Vanilla KD."""
    if facts.run_config is None:
        return list(TAGS)
    distilled = bool((facts.run_config.get("kd") or {}).get("kd_teacher_load")) or any(
        s.kind == "blend" and s.meta.get("method") == "difference" for s in facts.data)
    return ["miniplm", *(["knowledge-distillation"] if distilled else []), *TAGS]


def metadata(facts: CardFacts) -> str:
    """The YAML header between ``---`` lines."""
    import yaml

    head = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags(facts)}
    if facts.base_model:
        head["base_model"] = facts.base_model
    if facts.hub_datasets:
        head["datasets"] = list(facts.hub_datasets)
    text = yaml.safe_dump(head, sort_keys=False, allow_unicode=True)
    # Left empty on purpose: only the publisher knows what the training data's and the
    # teacher's licenses allow.
    license_line = "license:  # fill in the license (an SPDX id such as apache-2.0) before publishing\n"
    return f"---\n{text}{license_line}---\n"


def _family_rows(c) -> list:
    """The rows of the features only some families have, where the model has them."""
    rows = []
    if c.kv_channels is not None:
        rows.append(("Head width", c.kv_channels))
    if c.qk_layernorm:
        rows.append(("QK-norm", "yes (RMSNorm per query and key head)"))
    if c.use_rope_scaling:
        rows.append(("RoPE scaling", f"llama3: factor {c.rope_scaling_factor:g}, low/high frequency factors "
                                     f"{c.rope_low_freq_factor:g}/{c.rope_high_freq_factor:g}, original context "
                                     f"{c.rope_original_max_position_embeddings:,}"))
    if c.sliding_window is not None:
        rows.append(("Attention window", f"{c.sliding_window:,} tokens"))
    if c.num_experts:
        rows.append(("Experts", f"{c.num_experts} of FFN {c.expert_ffn_hidden_size}, top {c.moe_router_topk}"))
    return rows


def model_section(facts: CardFacts, layout: str, dtype: str) -> str:
    from megatron_miniplm.conversion.hf_config import CLASS_OF_LAYOUT

    c, p = facts.config, facts.params
    padded = c.padded_vocab_size()
    vocab = f"{c.vocab_size:,}" + (f" (padded to {padded:,} in megatron)" if padded != c.vocab_size else "")
    rope = f"{c.rotary_base:,.0f}" if float(c.rotary_base).is_integer() else str(c.rotary_base)
    rows = [
        ("Architecture", f"{CLASS_OF_LAYOUT.get(layout, layout)} (decoder-only: RMSNorm, SwiGLU, RoPE)"),
        ("Layers", c.num_layers), ("Hidden size", c.hidden_size), ("FFN hidden size", c.ffn_hidden_size),
        ("Attention heads", c.num_attention_heads), ("Key/value heads", c.kv_heads), ("Vocabulary", vocab),
        ("Max positions", c.max_position_embeddings), ("RoPE base", rope),
        *_family_rows(c),
        ("QKV bias", "yes" if c.qkv_bias else "no"),
        ("Tied input/output embeddings", "yes" if c.tie_embeddings else "no"),
        ("Parameters", f"{p.total:,} ({p.total / 1e6:.2f}M)"),
        ("Embedding parameters", f"{p.embedding:,}"), ("Non-embedding parameters", f"{p.non_embedding:,}"),
        ("Weights dtype", dtype),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return ("## Model\n\n"
            f"Exported from the megatron checkpoint `{facts.checkpoint}` (model `{c.name}`).\n\n"
            f"| | |\n|---|---|\n{table}\n\n"
            "Parameters are counted as the project reports them: embeddings included, a tied "
            "input/output matrix once, the vocabulary unpadded.\n")


def tokenizer_section(facts: CardFacts, shipped_sha256: Optional[str]) -> str:
    record = (facts.info or {}).get("tokenizer")
    if not record:
        lines = ["The checkpoint records no tokenizer."]
    else:
        lines = [f"- Name: {_code(record.get('name'))}", f"- Path (as recorded): {_code(record.get('path'))}",
                 f"- Vocabulary size: {_count(record.get('vocab_size'))}",
                 f"- sha256 of tokenizer.json: {_code(record.get('sha256'))}"]
        if record.get("eod_id") is not None:
            eod = f" (`{record['eod_token']}`)" if record.get("eod_token") else ""
            lines.append(f"- End-of-document id: {record['eod_id']}{eod}")
    if shipped_sha256 is None:
        lines.append("\nThis directory holds no tokenizer.")
    elif record and record.get("sha256") and shipped_sha256 != record.get("sha256"):
        lines.append(f"\nThe tokenizer.json shipped here (sha256 `{shipped_sha256}`) is not the one the "
                     "checkpoint records.")
    return "## Tokenizer\n\n" + "\n".join(lines) + "\n"


def training_section(facts: CardFacts) -> str:
    rc, ts = facts.run_config, facts.train_state or {}
    if rc is None:
        source = (facts.info or {}).get("source")
        origin = f" It was converted from {_code(source)}." if source else ""
        return ("## Training\n\nThe checkpoint holds no run_config.json (it was not saved by "
                f"tools/pretrain_gpt.py): how it was trained is unknown here.{origin}\n")
    opt = rc.get("optimizer") or {}
    budget = rc.get("train_iters") if rc.get("train_iters") is not None else rc.get("train_tokens")
    lines = [
        f"- Iterations: {_count(ts.get('iteration'))} (planned: {_count(budget)} "
        f"{'iterations' if rc.get('train_iters') is not None else 'tokens'})",
        f"- Tokens seen: {_count(ts.get('consumed_tokens'))} (the predictions the loss counted: no padding)",
        f"- Sequences seen: {_count(ts.get('consumed_samples'))} of {_count(rc.get('seq_length'))} tokens",
        "- Training FLOPs: " + (f"{ts['consumed_flops']:.3e}" if _is_number(ts.get("consumed_flops")) else "unknown")
        + (" (the KD teacher's forward passes included)" if (rc.get("kd") or {}).get("kd_teacher_load") else ""),
        f"- Global batch: {_count(rc.get('global_batch_size'))} sequences; peak learning rate "
        f"{opt.get('lr', 'unknown')}, {rc.get('lr_decay_style', 'unknown')} decay; seed {rc.get('seed', 'unknown')}; "
        f"{'bf16' if rc.get('bf16') else 'fp32'} parameters",
    ]
    if facts.train_state is None:
        lines.insert(0, "- The checkpoint holds no train state: tokens, FLOPs and iterations are unknown.")
    return "## Training\n\n" + "\n".join(lines) + "\n" + kd_section(facts)


def describe_model(model: Optional[dict]) -> str:
    """A scoring or KD model as its identity records it: name, checkpoint, import source, shape."""
    model = model or {}
    config, info = model.get("config") or {}, model.get("checkpoint_info") or {}
    parts = [f"**{config.get('name') or model.get('name') or 'unnamed'}**"]
    if model.get("checkpoint"):
        parts.append(f"checkpoint `{model['checkpoint']}`")
    if info.get("source") and info.get("source_format") in ("hf", "gguf"):
        parts.append(f"converted from `{info['source']}` ({info['source_format']})")
    elif info.get("source"):
        parts.append(f"written by `{info['source']}`")
    if info.get("architecture"):
        parts.append(f"architecture {info['architecture']}")
    if config.get("num_layers") and config.get("hidden_size"):
        parts.append(f"{config['num_layers']} layers, hidden {config['hidden_size']}")
    return ", ".join(parts)


def kd_section(facts: CardFacts) -> str:
    kd = (facts.run_config or {}).get("kd") or {}
    if not kd.get("kd_teacher_load"):
        return ""
    recorded = (facts.train_state or {}).get("kd_teacher")
    teacher = describe_model(recorded) if recorded else f"`{kd['kd_teacher_load']}` (no identity recorded)"
    return ("\n### Vanilla knowledge distillation\n\n"
            f"- Teacher: {teacher}\n- Loaded from: `{kd['kd_teacher_load']}`\n"
            f"- KD ratio r: {kd.get('kd_ratio')} (loss = (1 - r) x LM loss + r x KD loss)\n"
            f"- Temperature T: {kd.get('kd_temperature')} (KD loss = T^2 x KL(teacher || student))\n")


def describe_source(s: DataSource) -> str:
    share = f" (weight {s.weight:.4g} of the blend)" if s.weight is not None else ""
    if s.kind == "blend":
        what = "a sampled blend of tools/difference_sample.py"
    elif s.kind == "dataset":
        what = (f"a dataset of {_count(s.meta.get('num_instances'))} instances, {_count(s.meta.get('num_tokens'))} "
                f"tokens (fingerprint {_code(s.meta.get('fingerprint'))})")
    else:
        what = "its meta file is not found here, so its content is unknown"
    return f"- `{s.prefix}`{share}: {what}"


def data_section(facts: CardFacts) -> str:
    if facts.run_config is None:
        return ""
    parts = ["## Training data\n", *(describe_source(s) for s in facts.data)]
    if not facts.data:
        parts.append("The run config records no training data.")
    text = "\n".join(parts) + "\n"
    for s in facts.data:
        if s.kind == "blend":
            text += "\n" + blend_section(s)
    return text


def blend_section(source: DataSource) -> str:
    m = source.meta
    budget = (f"alpha = {m['alpha']} (the fraction of instances kept)" if m.get("alpha") is not None
              else f"keep_tokens = {_count(m.get('keep_tokens'))} (a token budget)")
    lines = [f"### Selection (`{source.prefix}`)\n",
             f"- Method: **{m.get('method', 'unknown')}**, {budget}",
             f"- Order: {m.get('order', 'unknown')}, seed {m.get('seed', 'unknown')}",
             f"- Kept: {_count(m.get('num_selected'))} of {_count(m.get('num_instances_total'))} instances, "
             f"{_count(m.get('tokens_kept'))} of {_count(m.get('tokens_total'))} tokens"]
    for role in ("teacher", "reference"):
        entries = (m.get("scores") or {}).get(role) or []
        models = {json.dumps(e.get("model"), sort_keys=True): e.get("model") for e in entries}
        for model in models.values():
            lines.append(f"- {role.capitalize()}: {describe_model(model)}")
    text = "\n".join(lines) + "\n"
    text += ("\nFiles as the blend's meta records them (relative paths from the blend's directory), "
             "with their fingerprints:\n\n")
    datasets = [(d.get("prefix"), d.get("fingerprint")) for d in m.get("datasets") or []]
    text += listed(("Dataset shard", "Fingerprint"), datasets, source.prefix)
    for role in ("teacher", "reference"):
        entries = (m.get("scores") or {}).get(role) or []
        rows = [(e.get("prefix"), e.get("sha256"), e.get("dataset_fingerprint")) for e in entries]
        if rows:
            text += "\n" + listed((f"{role.capitalize()} score file", "sha256", "Of dataset"), rows, source.prefix)
    return text


def listed(header: tuple, rows: list, prefix: str) -> str:
    """A table of at most MAX_LISTED rows of code values, the rest counted."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_code(v) for v in row) + " |" for row in rows[:MAX_LISTED]]
    if len(rows) > MAX_LISTED:
        rest = [f"... {len(rows) - MAX_LISTED} more", f"(in `{prefix}.meta.json`)"] + [""] * (len(header) - 2)
        lines.append("| " + " | ".join(rest) + " |")
    return "\n".join(lines) + "\n"


def evaluation_section(ev: Evaluation) -> str:
    if ev.run is None:
        return f"## Evaluation\n\n{ev.note}\n"
    row, run = ev.results["models"][ev.model], ev.run
    test_set = (ev.results.get("config") or {}).get("data_path")
    lines = [f"Held-out results of tools/evaluate.py (`{ev.path}`), model **{ev.model}**"
             + (f", test set `{test_set}`" if test_set else "") + ":\n",
             "| Metric | Value |", "|---|---|",
             f"| LM loss (mean of per-instance losses) | {_loss(run['lm_loss'])} |"]
    for key, label in (("token_weighted_loss", "Token-weighted loss"), ("perplexity", "Perplexity")):
        if _is_number(run.get(key)):
            lines.append(f"| {label} | {_loss(run[key])} |")
    lines.append(f"| Test instances / tokens | {_count(run.get('instances'))} / {_count(run.get('tokens'))} |")
    seeds = row.get("seeds") if isinstance(row.get("seeds"), int) else 1
    if seeds > 1:
        std = f" ± {_loss(row['lm_loss_std'])}" if _is_number(row.get("lm_loss_std")) else ""
        lines.append(f"| LM loss over the model's {seeds} seeds | {_loss(row.get('lm_loss'))}{std} |")
    text = "\n".join(lines) + "\n"
    domains = row.get("domains") if isinstance(row.get("domains"), dict) else {}
    if domains:
        over = f" (mean over the model's {seeds} seeds)" if seeds > 1 else ""
        text += (f"\nLM loss per domain{over}:\n\n| Domain | LM loss | Instances |\n|---|---|---|\n"
                 + "\n".join(f"| {d} | {_loss((v or {}).get('lm_loss'))} | {_count((v or {}).get('instances'))} |"
                             for d, v in domains.items()) + "\n")
    return "## Evaluation\n\n" + text + comparison_text(ev)


def comparison_text(ev: Evaluation) -> str:
    """The paired difference against the model the evaluation compared this one with (the
    first model, or in a size sweep the first method at this model's size: the comparison's
    ``base``), that model's loss minus this one's over the test instances, where the results
    hold it; with what its interval covers, as the evaluation's verdict says it: an interval of
    a model with one training seed covers the test set only, not seed-to-seed variation."""
    comparison = (ev.results.get("comparisons") or {}).get(ev.model) or {}
    base = comparison.get("base") or ev.results.get("baseline_of_comparison")
    overall = comparison.get("overall") or {}
    if not base or base == ev.model or not all(_is_number(overall.get(k)) for k in ("mean", "low", "high")):
        return ""
    level = f"{overall['level']:.0%} " if _is_number(overall.get("level")) else ""
    text = (f"\nPaired difference in LM loss, {base} minus {ev.model}: {overall['mean']:+.4f} "
            f"({level}interval [{overall['low']:+.4f}, {overall['high']:+.4f}])")
    seeds = overall.get("seeds")
    if isinstance(overall.get("covers"), str):
        text += f"; the interval covers {overall['covers']}"
    if isinstance(seeds, list) and seeds and min(seeds) < 2:
        text += ": with one training seed it cannot tell a method effect from seed noise"
    return text + ".\n"


def render_card(facts: CardFacts, *, layout: str, dtype: str, name: Optional[str] = None,
                shipped_tokenizer: Optional[str] = None) -> str:
    """The card's text. ``shipped_tokenizer``: the exported tokenizer.json, None when none is shipped."""
    from megatron_miniplm.data.tokenizer import file_sha256

    title = facts.config.name if facts.config.name != "custom" else (name or "Student model")
    trained = facts.run_config is not None
    intro = ("A language model pre-trained with megatron-miniplm (MiniPLM: knowledge distillation for "
             "pre-training) and exported to Hugging Face format by tools/convert_checkpoint.py."
             if trained else "A model exported to Hugging Face format by tools/convert_checkpoint.py.")
    usage = ("## Usage\n\n```python\nfrom transformers import AutoModelForCausalLM, PreTrainedTokenizerFast\n\n"
             "path = \"PATH/TO/THIS/DIRECTORY\"\nmodel = AutoModelForCausalLM.from_pretrained(path)\n"
             "tokenizer = PreTrainedTokenizerFast.from_pretrained(path)\n```\n\n" + USAGE_NOTE)
    sha = file_sha256(shipped_tokenizer) if shipped_tokenizer else None
    sections = [metadata(facts), f"# {title}\n\n{intro}\n", model_section(facts, layout, dtype),
                tokenizer_section(facts, sha), training_section(facts), data_section(facts),
                evaluation_section(facts.evaluation), usage]
    return "\n".join(s for s in sections if s)


def build_model_card(load: str, results: Optional[str] = None, *, layout: str, dtype: str,
                     name: Optional[str] = None, shipped_tokenizer: Optional[str] = None) -> str:
    """The card of checkpoint ``load`` (and its held-out results, see ``read_evaluation``)."""
    return render_card(read_card_facts(load, results), layout=layout, dtype=dtype, name=name,
                       shipped_tokenizer=shipped_tokenizer)


def write_model_card(directory: str, facts: CardFacts, *, layout: str, dtype: str,
                     name: Optional[str] = None) -> str:
    """The card of ``facts`` as ``directory``/README.md, written whole or not at all; returns its
    path. ``directory`` is the export being written: its tokenizer.json is the one the card checks."""
    from megatron_miniplm.atomic_io import write_text_atomic

    shipped = os.path.join(directory, "tokenizer.json")
    text = render_card(facts, layout=layout, dtype=dtype, name=name,
                       shipped_tokenizer=shipped if os.path.isfile(shipped) else None)
    path = os.path.join(directory, CARD_FILE)
    write_text_atomic(path, text)
    return path
