"""The training run's settings: tools/pretrain_gpt.py's flags, one declaration each.

A config module: it imports no torch and no megatron, so that building or checking a
config (the pipeline's --dry-run, every tool's --help) costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_miniplm import host_memory
from megatron_miniplm.models.config import LayerImpl, ModelConfig, RecomputeSettings, TrainingFusions
from megatron_miniplm.settings import setting


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW with MiniPLM's recipe where it differs from Megatron-LM's defaults (each help says)."""

    lr: float = setting(6e-4, group="optimizer",
                        help="peak learning rate (MiniPLM's students; Megatron-LM has no default)")
    min_lr: Optional[float] = setting(
        None, group="optimizer",
        help="floor of the decay (default: lr / 10, MiniPLM's recipe; Megatron-LM's is 0)")
    weight_decay: float = setting(0.1, group="optimizer", help="MiniPLM's recipe (Megatron-LM: 0.01)")
    adam_beta1: float = setting(0.9, group="optimizer", help="Adam's beta1")
    adam_beta2: float = setting(0.98, group="optimizer", help="MiniPLM's recipe (Megatron-LM: 0.999)")
    adam_eps: float = setting(1e-8, group="optimizer", help="Adam's epsilon")
    clip_grad: float = setting(1.0, group="optimizer", help="gradient norm clipping; 0 turns it off")

    @property
    def final_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.lr / 10
@dataclass(frozen=True)
class DDPSettings:
    """megatron-core DDP and the distributed optimizer, with Megatron-LM's flags and defaults."""

    use_distributed_optimizer: bool = setting(
        False, group="distributed",
        help="shard the optimizer state and fp32 main parameters over data-parallel ranks")
    overlap_grad_reduce: bool = setting(
        False, group="distributed", help="overlap the gradient reduce-scatter/all-reduce with the backward pass")
    overlap_param_gather: bool = setting(
        False, group="distributed",
        help="overlap the parameter all-gather with the next forward pass "
             "(needs --use-distributed-optimizer and --overlap-grad-reduce)")
    ddp_bucket_size: Optional[int] = setting(
        None, group="distributed", help="elements per gradient bucket (default: megatron-core's, with overlap)")

    def __post_init__(self):
        if self.overlap_param_gather and not (self.use_distributed_optimizer and self.overlap_grad_reduce):
            raise ValueError("overlap_param_gather (--overlap-param-gather) needs use_distributed_optimizer "
                             "and overlap_grad_reduce, as in Megatron-LM")


KD = "knowledge distillation (Vanilla KD)"
@dataclass(frozen=True)
class KDSettings:
    kd_teacher_load: Optional[str] = setting(
        None, group=KD, metavar="CKPT",
        help="distil online from this teacher checkpoint (a converted HF/GGUF model works); "
             "pipeline parallelism is not supported with it")
    kd_ratio: float = setting(0.5, group=KD, help="r in (1 - r) * LM loss + r * KD loss, in [0, 1] (0.5: the "
                                                   "official MiniPLM code's Vanilla KD default)")
    kd_temperature: float = setting(1.0, group=KD, help="softmax temperature T of both models (> 0); the KD "
                                                        "loss is T^2 * KL, as in Hinton et al.")

    def __post_init__(self):
        if not (0.0 <= self.kd_ratio <= 1.0):
            raise ValueError(f"kd_ratio (--kd-ratio) must be in [0, 1], got {self.kd_ratio}")
        if not (self.kd_temperature > 0.0 and math.isfinite(self.kd_temperature)):
            raise ValueError(f"kd_temperature (--kd-temperature) must be > 0, got {self.kd_temperature}")

    @property
    def enabled(self) -> bool:
        return self.kd_teacher_load is not None


DATA_ORDERS = ("shuffled", "original")  # each epoch reshuffled, or the data's own order


def _sink(**kwargs):
    """A setting of where a run's numbers go (tensorboard, W&B): unset by default, and not part of
    what the run makes (left out of the pipeline's fingerprints)."""
    return setting(None, group=LOGGING, fingerprinted=False, **kwargs)


DATA, TRAINING, PARALLEL, CHECKPOINTING, LOGGING = "data", "training", "parallelism", "checkpointing", "logging"
@dataclass
class TrainConfig:
    """Everything a training run is made with; saved with every checkpoint (run_config.json).
    Its settings are tools/pretrain_gpt.py's flags (``megatron_miniplm.settings``)."""

    model: ModelConfig = setting(cli=False, help="the model (the tool builds it from a preset, "
                                                 "a model_config.json or shape flags)")
    data_path: list[str] = setting(
        group=DATA, metavar="PATH",
        help="a dataset prefix, Megatron-style 'W1 P1 W2 P2' blends, or a sampled blend of "
             "tools/difference_sample.py")
    valid_data_path: Optional[list[str]] = setting(None, group=DATA, metavar="PATH", help="validation data")
    data_cache_path: Optional[str] = setting(
        None, group=DATA,
        help="where megatron's GPTDataset keeps its index cache (document-mode data; default: a "
             "cache/ directory beside the data, which must then be writable). Built once by rank 0 "
             "and read by the others: a filesystem every node sees")
    data_order: str = setting("shuffled", group=DATA, choices=DATA_ORDERS,
                              help="order of the training instances within each epoch")
    seq_length: int = setting(1024, group=DATA, help="tokens per training sequence")
    micro_batch_size: int = setting(4, group=TRAINING, help="sequences per micro-batch and rank")
    global_batch_size: int = setting(32, group=TRAINING, help="sequences per optimizer step")
    train_iters: Optional[int] = setting(None, group=TRAINING, help="optimizer steps")
    num_workers: int = setting(2, group=DATA, help="0: build each global batch when it is needed; >= 1 (Megatron-LM's "
                                                   "default 2): build the next one in a background thread while "
                                                   "this one trains (pinned on a GPU)")
    train_tokens: Optional[int] = setting(
        None, group=TRAINING,
        help="alternative to --train-iters: a token budget (iterations = tokens / (global batch x seq length))")
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    lr_warmup_iters: int = setting(0, group="optimizer", one_of="warm-up", help="linear warm-up steps")
    lr_warmup_fraction: Optional[float] = setting(
        None, group="optimizer", one_of="warm-up",
        help="or: warm-up steps as a fraction of the decay steps (as in Megatron-LM)")
    lr_decay_iters: Optional[int] = setting(
        None, group="optimizer",
        help="decay steps (default: the training iterations). A warm-up as long as the decay or longer "
             "(Megatron-LM refuses it) runs to its end, then the rate is --min-lr")
    lr_decay_style: str = setting("cosine", group="optimizer", choices=("cosine", "linear", "constant"),
                                  help="learning-rate decay after the warm-up (MiniPLM's recipe; Megatron-LM's "
                                       "default is linear)")
    bf16: bool = setting(False, group=TRAINING,
                         help="bf16 parameters and activations, fp32 main parameters and gradient reduction")
    seed: int = setting(1234, group=TRAINING, help="Megatron-LM's seeding: + 100 x pipeline rank")
    tensor_model_parallel_size: int = setting(1, group=PARALLEL, help="tensor-parallel ranks per model replica")
    pipeline_model_parallel_size: int = setting(1, group=PARALLEL, help="pipeline stages per model replica")
    expert_model_parallel_size: int = setting(
        1, group=PARALLEL,
        help="Megatron-LM's expert parallelism; training here keeps every expert on each rank, and only 1 is "
             "accepted (tools/score_docs.py scores a mixture-of-experts teacher with it)")
    sequence_parallel: bool = setting(
        False, group=PARALLEL,
        help="Megatron-LM's sequence parallelism: norms and the embedding output split over the sequence across "
             "TP ranks (activation memory / TP; all-gather + reduce-scatter in place of all-reduces). Needs "
             "--seq-length divisible by TP; ignored at TP 1, as in Megatron-LM")
    layers: LayerImpl = field(default_factory=LayerImpl)
    fusions: TrainingFusions = field(default_factory=TrainingFusions)
    ddp: DDPSettings = field(default_factory=DDPSettings)
    recompute: RecomputeSettings = field(default_factory=RecomputeSettings)
    kd: KDSettings = field(default_factory=KDSettings)
    save: Optional[str] = setting(None, group=CHECKPOINTING, help="directory of the checkpoints")
    load: Optional[str] = setting(
        None, group=CHECKPOINTING,
        help="resume from this directory's latest checkpoint (give --save's to resume a run), or "
             "start from a model checkpoint's weights")
    no_load_optim: bool = setting(False, group=CHECKPOINTING,
                                  help="load the model weights only (the optimizer starts from them)")
    no_load_rng: bool = setting(False, group=CHECKPOINTING,
                                help="do not restore the RNG states saved with the checkpoint: they keep "
                                     "what --seed gave them (as Megatron-LM's --no-load-rng)")
    save_interval: int = setting(0, group=CHECKPOINTING, fingerprinted=False, help="save every this many iterations (and at the end)")
    dist_ckpt_optim_fully_reshardable: bool = setting(
        False, group=CHECKPOINTING,
        help="save the distributed optimizer's state so that it reloads at any TP/PP/DP (default: each "
             "rank writes its own shard, which reloads at another DP size only)")
    exit_signal_handler: bool = setting(False, group=CHECKPOINTING,
                                        help="on SIGTERM: finish the iteration, save a checkpoint, exit 0")
    exit_duration_in_mins: Optional[float] = setting(
        None, group=CHECKPOINTING, help="save and exit 0 once the run has used this many minutes")
    exit_interval: Optional[int] = setting(
        None, group=CHECKPOINTING, help="save and exit 0 when the iteration is a multiple of this")
    manual_gc: bool = setting(False, group=TRAINING,
                              help="Python's garbage collector off during training, run every --manual-gc-interval "
                                   "iterations instead (the same on every rank: no straggler from a collection)")
    manual_gc_interval: int = setting(0, group=TRAINING, help="iterations between collections with --manual-gc "
                                                              "(0: only at start)")
    keep_freed_memory: bool = host_memory.keep_freed_memory_setting(TRAINING)
    eval_interval: int = setting(0, group=LOGGING, help="validate every this many iterations (and at the end)")
    eval_iters: int = setting(10, group=LOGGING, help="validation global batches")
    log_interval: int = setting(10, group=LOGGING, fingerprinted=False, help="iterations per log line")
    tensorboard_dir: Optional[str] = _sink(help="write tensorboard events here")
    metrics_file: Optional[str] = setting(None, group=LOGGING, help="JSON lines, one per iteration (rank 0)")
    wandb_project: Optional[str] = _sink(
        help="log to Weights & Biases, in this project (W&B is on when it is given; needs the wandb extra: "
             "pip install megatron-miniplm[wandb]): the metrics file's numbers with step = iteration, the "
             "run's config and each checkpoint's iteration. Rank 0 logs, as it writes the metrics file and "
             "tensorboard (Megatron-LM logs from the last rank). A run resumed from its own --save continues "
             "the W&B run of its checkpoint")
    wandb_exp_name: Optional[str] = _sink(help="the W&B run's name (default: W&B's)")
    wandb_save_dir: Optional[str] = _sink(
        help="where W&B writes its local run files (default: a wandb/ directory under --save, as in "
             "Megatron-LM; without --save, W&B's default)")
    wandb_entity: Optional[str] = _sink(help="the W&B user or team of the project (default: W&B's)")
    wandb_group: Optional[str] = _sink(
        help="a W&B run group, e.g. the runs of one pipeline's stages (this project's flag; Megatron-LM has none)")
    wandb_mode: Optional[str] = _sink(
        choices=("online", "offline"),
        help="offline: W&B writes the run locally only, with no network (upload it later with `wandb sync`) "
             "(default: W&B's own, the WANDB_MODE environment variable, else online)")
    peak_tflops: Optional[float] = setting(None, group=LOGGING, help="device peak for MFU where it is not known")

    def __post_init__(self):
        if (self.train_iters is None) == (self.train_tokens is None):
            raise ValueError("give exactly one of train_iters (--train-iters) and train_tokens (--train-tokens)")
        if self.fusions.cross_entropy_loss_fusion and self.fusions.cross_entropy_fusion_impl == "native" \
                and not self.bf16:
            # megatron-core 0.16.1's fused_cross_entropy casts the logits' gradient to bf16 whatever
            # the logits' dtype: under bf16 that is what the unfused loss gives too (bit for bit),
            # with fp32 parameters it would silently lose precision.
            raise ValueError("cross_entropy_loss_fusion (--cross-entropy-loss-fusion) with the native implementation "
                             "needs --bf16: megatron-core's fused cross entropy rounds the logits' gradient to bf16")
        tp = self.tensor_model_parallel_size
        self._check_experts(tp)
        if self.sequence_parallel and tp > 1 and self.seq_length % tp:
            raise ValueError(f"sequence_parallel (--sequence-parallel) splits the sequence over the {tp} TP ranks: "
                             f"--seq-length {self.seq_length} is not divisible by {tp}")
        if self.lr_warmup_fraction is not None and self.lr_warmup_iters:
            raise ValueError("give lr_warmup_iters (--lr-warmup-iters) or lr_warmup_fraction "
                             "(--lr-warmup-fraction), not both")

    def _check_experts(self, tp: int) -> None:
        """Refuses the mixture-of-experts layouts the trainer cannot run."""
        if self.expert_model_parallel_size != 1:
            raise ValueError(
                f"expert_model_parallel_size (--expert-model-parallel-size) {self.expert_model_parallel_size}: "
                f"training keeps every expert on each rank (the expert-data-parallel gradient reduction is not "
                f"set up here); train at 1, and score a mixture-of-experts teacher with tools/score_docs.py "
                f"--expert-model-parallel-size")
        if self.model is not None and self.model.num_experts and tp > 1 and not self.sequence_parallel:
            raise ValueError(
                f"a mixture-of-experts model (--num-experts {self.model.num_experts}) at --tensor-model-parallel-size "
                f"{tp} needs --sequence-parallel: megatron-core's expert layers refuse tensor parallelism without "
                f"it in training")

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.iterations

    @property
    def warmup_iters(self) -> float:
        """Warm-up steps; with a fraction, a fraction of an iteration too (Megatron-LM counts
        them in samples, fraction x decay samples, so the rate reaches its peak between steps)."""
        if self.lr_warmup_fraction is not None:
            return self.lr_warmup_fraction * self.decay_iters
        return self.lr_warmup_iters

    @property
    def iterations(self) -> int:
        if self.train_iters is not None:
            return self.train_iters
        return max(1, self.train_tokens // (self.global_batch_size * self.seq_length))
