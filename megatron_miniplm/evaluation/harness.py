"""Zero-shot tasks through lm-evaluation-harness, on a checkpoint exported to HF.

The student leaves megatron through tools/convert_checkpoint.py's export (the
same path users take to serve it), and lm-eval's own HF model evaluates it:
what we report is what anyone re-running lm-eval on the export would get.
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


def run_tasks(
    hf_dir: str,
    tasks: Sequence[str],
    *,
    include_path: Optional[str] = None,
    num_fewshot: int = 0,
    limit: Optional[int] = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> dict:
    """{task: {metric: value}} for an HF model directory."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise RuntimeError("zero-shot tasks need lm-evaluation-harness: pip install 'megatron-miniplm[eval]'") from e

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}"
                         + ("" if include_path else " (local tasks need --include-path)"))
    model = HFLM(pretrained=hf_dir, tokenizer=exact_tokenizer(hf_dir), dtype="float32",
                 batch_size=batch_size, device=device)
    out = lm_eval.simple_evaluate(
        model=model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
    )
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}


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
    with tempfile.TemporaryDirectory(prefix="miniplm-hf-") as tmp:
        hf_dir = export_to_hf(checkpoint, os.path.join(tmp, "hf"))
        return run_tasks(hf_dir, tasks, **kwargs)
