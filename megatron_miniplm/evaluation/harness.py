"""Zero-shot tasks through lm-evaluation-harness, on a checkpoint exported to HF.

The student leaves megatron through tools/convert_checkpoint.py's export (the
same path users take to serve it), and lm-eval's own HF model evaluates it:
what we report is what anyone re-running lm-eval on the export gets with its
tokenizer.json loaded as it is (``exact_tokenizer``; the model card's usage).
Left to lm-eval's default (``AutoTokenizer``), a qwen2-shaped export with
another family's tokenizer is tokenized otherwise, and its numbers differ.
Local tasks (YAML + JSONL, ``--include-path``) need no hub download.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Sequence


def export_to_hf(checkpoint: str, directory: str) -> str:
    from megatron_miniplm.conversion.megatron_to_hf import convert_megatron_to_hf

    convert_megatron_to_hf(checkpoint, directory, dtype="fp32")
    return directory


# The paper's zero-shot suite and the metric it reports for each: acc_norm where the
# task has it, else acc. ``--tasks miniplm`` expands to it, with the average.
MINIPLM_TASKS = {"hellaswag": "acc_norm", "lambada_openai": "acc", "winogrande": "acc", "openbookqa": "acc_norm",
                 "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm", "social_iqa": "acc",
                 "storycloze_2018": "acc"}
SUITES = {"miniplm": MINIPLM_TASKS}


def expand_tasks(tasks: Sequence[str]) -> list[str]:
    """Task names with suites (``miniplm``) expanded, in order, without repeats."""
    out: list[str] = []
    for t in tasks:
        for name in SUITES.get(t, [t]):
            if name not in out:
                out.append(name)
    return out


def run_tasks(
    hf_dir: str,
    tasks: Sequence[str],
    *,
    include_path: Optional[str] = None,
    num_fewshot: int = 0,
    limit: Optional[int] = None,
    batch_size: int = 8,
) -> dict:
    """{task: {metric: value}} for an HF model directory, on this process's device (bf16 on a
    GPU, fp32 on a CPU); a task whose data cannot be loaded gets {"missing": reason}. When a
    suite is asked for, its row ``<suite> average`` is the mean of its tasks' reported metric
    over the tasks that ran (``tasks`` says how many of how many)."""
    from megatron_miniplm import platform

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise RuntimeError("zero-shot tasks need lm-evaluation-harness: pip install 'megatron-miniplm[eval]'") from e

    names = expand_tasks(tasks)
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}"
                         + ("" if include_path else " (local tasks need --include-path)"))
    model = HFLM(pretrained=hf_dir, tokenizer=exact_tokenizer(hf_dir), dtype=platform.hf_inference_dtype(),
                 batch_size=batch_size, device=str(platform.device()))
    results = {}
    for name in names:
        try:
            manager.load([name])  # builds the task and loads its data: where a missing dataset fails
        except Exception as e:  # any loader's error (offline hub, manual download, bad path): report it
            results[name] = {"missing": _first_line(e)}
            continue
        out = lm_eval.simple_evaluate(model=model, tasks=[name], num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager)
        for task, metrics in out["results"].items():
            results[task] = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for suite, metric_of in SUITES.items():
        if suite in tasks:
            ran = [results[t][m] for t, m in metric_of.items() if m in results.get(t, {})]
            results[f"{suite} average"] = {"average": sum(ran) / len(ran) if ran else float("nan"),
                                           "tasks": len(ran), "of": len(metric_of)}
    return results


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def exact_tokenizer(hf_dir: str):
    """The tokenizer.json pipeline exactly as trained with.

    transformers 5 maps some model types (qwen2 among them) to their own
    tokenizer class rebuilt from vocab and merges, which changes the
    pre-tokenization of any tokenizer that is not that family's own.
    """
    import json

    from transformers import PreTrainedTokenizerFast

    config_path = os.path.join(hf_dir, "tokenizer_config.json")
    eos = None
    if os.path.exists(config_path):
        with open(config_path) as f:
            eos = json.load(f).get("eos_token")
        if isinstance(eos, dict):  # a serialized AddedToken
            eos = eos.get("content")
    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(hf_dir, "tokenizer.json"), eos_token=eos)


def evaluate_checkpoint(checkpoint: str, tasks: Sequence[str], **kwargs) -> dict:
    """The tasks' results of a checkpoint, in this process alone: the export is a one-process
    conversion, and lm-eval evaluates on one device. In a process of a multi-rank job (its
    group destroyed) they run outside the job, or the export would refuse the job's world and
    lm-eval would wait for its other ranks."""
    from megatron_miniplm.conversion.session import outside_job

    with outside_job(), tempfile.TemporaryDirectory(prefix="miniplm-hf-") as tmp:
        hf_dir = export_to_hf(checkpoint, os.path.join(tmp, "hf"))
        return run_tasks(hf_dir, tasks, **kwargs)
