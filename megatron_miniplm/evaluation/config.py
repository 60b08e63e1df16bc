"""What an evaluation runs with: tools/evaluate.py's flags and the pipeline's ``evaluation``
section, declared once (``megatron_miniplm.settings``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from megatron_miniplm.settings import setting

LM_LOSS, TASKS = "LM loss", "zero-shot tasks (lm-evaluation-harness)"


@dataclass(frozen=True)
class EvalConfig:
    """Checkpoints to evaluate: held-out LM loss (``data_path``) and/or zero-shot tasks (``tasks``)."""

    load: list[str] = setting(metavar="CKPT", help="megatron checkpoint(s) or --save dirs")
    name: Optional[list[str]] = setting(
        None, metavar="LABEL",
        help="a label per checkpoint for the table (default: dir names); checkpoints with the same "
             "label are seeds of one model")
    json: Optional[str] = setting(None, help="also write the results (and this config) as JSON here")
    data_path: Optional[str] = setting(None, group=LM_LOSS, metavar="PREFIX",
                                       help="indexed test set (tools/preprocess_data.py)")
    output_dir: str = setting("eval_results", group=LM_LOSS, help="per-instance scores are kept here")
    tensor_model_parallel_size: int = setting(1, group=LM_LOSS, help="tensor-parallel ranks per model replica")
    pipeline_model_parallel_size: int = setting(1, group=LM_LOSS, help="pipeline stages per model replica")
    expert_model_parallel_size: int = setting(
        1, group=LM_LOSS,
        help="ranks the experts of a mixture-of-experts checkpoint (a teacher) are split over, as in Megatron-LM "
             "and tools/score_docs.py; unlike Megatron-LM's, it applies to the checkpoints with experts only: "
             "dense ones are scored at 1")
    micro_batch_size: int = setting(8, group=LM_LOSS, help="test instances per forward pass and replica")
    bf16: bool = setting(False, group=LM_LOSS, help="bf16 parameters and activations")
    bootstrap_samples: int = setting(10_000, group=LM_LOSS, help="resamples of the test instances")
    bootstrap_seed: int = setting(0, group=LM_LOSS, help="seed of the resampling")
    confidence: float = setting(0.95, group=LM_LOSS, help="level of the paired difference's interval")
    report_dir: Optional[str] = setting(
        None, group=LM_LOSS, help="write evaluation_report.md here (and curves.png with --metrics-file)")
    metrics_file: Optional[list[str]] = setting(
        None, group=LM_LOSS, metavar="FILE",
        help="the trainer's metrics file of each checkpoint, in --load order ('-' for none): "
             "validation loss against tokens and FLOPs in DIR/curves.png")
    saving_baseline: Optional[str] = setting(
        None, group=LM_LOSS, metavar="METHOD",
        help="the method the computation saving is measured against (FLOPs it needs to reach a method's "
             "loss, over the method's), from the validation curves (--metrics-file) and, with labels "
             "METHOD@SIZE of three sizes or more per method, from curves L(C) = l_inf + a * C^-alpha fitted "
             "to loss against training FLOPs, extrapolated to --extrapolate-flops, with bootstrap bands over "
             "test documents and, with two seeds or more, training seeds (DIR/scaling.png with "
             "--report-dir); default: the second method, where labels carry sizes")
    extrapolate_flops: Optional[float] = setting(
        None, group=LM_LOSS, metavar="FLOPS",
        help="the training compute the fitted curves are extrapolated to (default: 10x the sweep's largest)")
    tasks: Optional[str] = setting(
        None, group=TASKS,
        help="comma-separated lm-eval task names; 'miniplm': the paper's nine (acc_norm where the task "
             "has it, else acc) and their average")
    include_path: Optional[str] = setting(None, group=TASKS, help="directory of local lm-eval task YAMLs")
    num_fewshot: int = setting(0, group=TASKS, help="few-shot examples per task")
    limit: Optional[int] = setting(None, group=TASKS, help="at most this many examples per task")
    batch_size: int = setting(8, group=TASKS, help="lm-eval's batch size")

    def __post_init__(self):
        if not self.data_path and not self.tasks:
            raise ValueError("give data_path (--data-path: LM loss) and/or tasks (--tasks: zero-shot)")
        if self.name is not None and len(self.name) != len(self.load):
            raise ValueError(f"name (--name) needs one label per checkpoint of --load: "
                             f"{len(self.name)} for {len(self.load)}")
        if self.metrics_file is not None and len(self.metrics_file) != len(self.load):
            raise ValueError(f"metrics_file (--metrics-file) needs one file (or '-') per checkpoint of --load: "
                             f"{len(self.metrics_file)} for {len(self.load)}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence (--confidence) must be in (0, 1), got {self.confidence}")
        if self.bootstrap_samples < 1:
            raise ValueError(f"bootstrap_samples (--bootstrap-samples) must be >= 1, got {self.bootstrap_samples}")
        methods = list(dict.fromkeys(label.partition("@")[0] for label in self.labels))
        if self.saving_baseline is not None and self.saving_baseline not in methods:
            # refused before the scoring: an unknown baseline would leave the saving out unsaid
            raise ValueError(f"saving_baseline (--saving-baseline) {self.saving_baseline!r} is not the method of "
                             f"any checkpoint's label (METHOD or METHOD@SIZE): {', '.join(methods)}")

    @property
    def labels(self) -> list[str]:
        """The label of each checkpoint: ``name``, or the checkpoints' directory names."""
        return list(self.name) if self.name else [os.path.basename(os.path.normpath(c)) for c in self.load]

    @property
    def task_names(self) -> list[str]:
        return [t.strip() for t in (self.tasks or "").split(",") if t.strip()]
