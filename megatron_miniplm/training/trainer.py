"""The pre-training loop: reference LM on D_ref, students on the sampled blend."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_miniplm import parallel, platform
from megatron_miniplm.data.samples import collate_instances
from megatron_miniplm.models.config import ModelConfig
from megatron_miniplm.training import engine
from megatron_miniplm.training.checkpoint import load_checkpoint, save_checkpoint
from megatron_miniplm.training.data import SampleStream
from megatron_miniplm.training.flops import device_peak_flops, training_flops_per_token


@dataclass
class TrainConfig:
    model: ModelConfig
    data_path: list
    seq_length: int = 1024
    micro_batch_size: int = 4
    global_batch_size: int = 32
    train_iters: int = 1000
    valid_data_path: Optional[list] = None
    eval_interval: int = 0
    eval_iters: int = 10
    optimizer: engine.OptimizerSettings = field(default_factory=engine.OptimizerSettings)
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    lr_decay_style: str = "cosine"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    bf16: bool = False
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: int = 0
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    metrics_file: Optional[str] = None
    seed: int = 1234
    shuffle: bool = True
    peak_tflops: Optional[float] = None


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        cfg.model.check_tensor_parallel(cfg.tensor_model_parallel_size)
        self.info = parallel.initialize(parallel.ParallelConfig(
            cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, seed=cfg.seed,
        ))
        self._check_batch_layout()
        self.train_data = SampleStream.from_data_path(
            cfg.data_path, cfg.seed, cfg.shuffle,
            num_samples=cfg.train_iters * cfg.global_batch_size, seq_length=cfg.seq_length,
        )
        self.valid_data = (
            SampleStream.from_data_path(
                cfg.valid_data_path, cfg.seed, shuffle=False,
                num_samples=cfg.eval_iters * cfg.global_batch_size, seq_length=cfg.seq_length,
            ) if cfg.valid_data_path else None
        )
        self._check_data(self.train_data, "--data-path")
        if self.valid_data is not None:
            self._check_data(self.valid_data, "--valid-data-path")

        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.model = engine.build_model_chunks(cfg.model, bf16=cfg.bf16)
        self.optimizer = engine.build_optimizer(self.model, cfg.optimizer)
        decay = cfg.lr_decay_iters or cfg.train_iters
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=cfg.optimizer.lr, min_lr=cfg.optimizer.min_lr,
            lr_warmup_steps=cfg.lr_warmup_iters, lr_decay_steps=max(decay, cfg.lr_warmup_iters + 1),
            lr_decay_style=cfg.lr_decay_style, start_wd=cfg.optimizer.weight_decay,
            end_wd=cfg.optimizer.weight_decay, wd_incr_steps=decay, wd_incr_style="constant",
        )
        self.iteration = 0
        self.consumed_samples = 0
        self.consumed_tokens = 0
        if cfg.load:
            state = load_checkpoint(cfg.load, self.model, self.optimizer, self.scheduler)
            if state is not None:
                self.iteration = state["iteration"]
                self.consumed_samples = state["consumed_samples"]
                self.consumed_tokens = state["consumed_tokens"]
                self._log(f"resumed from {cfg.load} at iteration {self.iteration}")
            elif cfg.load != cfg.save:
                raise FileNotFoundError(f"--load {cfg.load}: no checkpoint found")
        self.forward_step = engine.forward_step_for(cfg.bf16)
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.seq_length)
        self.peak_flops = device_peak_flops(cfg.peak_tflops)
        self.writer = self._tensorboard()

    # ---- validation of settings ----------------------------------------------------------
    def _check_batch_layout(self) -> None:
        cfg, dp = self.cfg, self.info.dp_size
        if cfg.global_batch_size % (cfg.micro_batch_size * dp) != 0:
            raise ValueError(
                f"--global-batch-size {cfg.global_batch_size} is not divisible by "
                f"--micro-batch-size {cfg.micro_batch_size} x data-parallel size {dp}"
            )
        if cfg.seq_length > cfg.model.max_position_embeddings:
            raise ValueError(f"--seq-length {cfg.seq_length} exceeds the model's "
                             f"{cfg.model.max_position_embeddings} positions")

    def _check_data(self, data: SampleStream, flag: str) -> None:
        for source in data.sources:
            if source.vocab_size > self.cfg.model.vocab_size:
                raise ValueError(
                    f"{flag} {source.prefix}: the data's vocabulary ({source.vocab_size}) exceeds "
                    f"the model's ({self.cfg.model.vocab_size})"
                )
            if source.instance_mode != "document" and source.seq_length > self.cfg.seq_length:
                raise ValueError(
                    f"{flag} {source.prefix}: instances of up to {source.seq_length + 1} tokens "
                    f"need --seq-length >= {source.seq_length}"
                )

    # ---- data ----------------------------------------------------------------------------
    @property
    def num_microbatches(self) -> int:
        return self.cfg.global_batch_size // (self.cfg.micro_batch_size * self.info.dp_size)

    def _microbatches(self, data: SampleStream, first_sample: int):
        """This DP rank's micro-batches of the global batch starting at ``first_sample``."""
        cfg, info = self.cfg, self.info
        per_rank = cfg.global_batch_size // info.dp_size
        start = first_sample + info.dp_rank * per_rank
        for m in range(self.num_microbatches):
            lo = start + m * cfg.micro_batch_size
            instances = [data[i] for i in range(lo, lo + cfg.micro_batch_size)]
            yield collate_instances(instances, data.pad_id, pad_to=cfg.seq_length)

    # ---- loop ----------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        last: dict = {}
        start_iteration = self.iteration
        window_start, window_tokens, window_iters = time.perf_counter(), 0, 0
        while self.iteration < cfg.train_iters:
            result = engine.train_step(
                self.model, self.optimizer,
                self._microbatches(self.train_data, self.consumed_samples),
                num_microbatches=self.num_microbatches,
                micro_batch_size=cfg.micro_batch_size, seq_length=cfg.seq_length,
                forward_step=self.forward_step,
            )
            self.scheduler.step(increment=1)
            self.iteration += 1
            self.consumed_samples += cfg.global_batch_size
            loss, tokens = self._from_last_stage(result.loss, result.tokens)
            self.consumed_tokens += int(tokens)
            window_tokens += cfg.global_batch_size * cfg.seq_length
            window_iters += 1
            last = {"iteration": self.iteration, "loss": loss,
                    "grad_norm": result.grad_norm, "lr": self.optimizer.param_groups[0]["lr"],
                    "consumed_tokens": self.consumed_tokens, "skipped": result.skipped}
            if self.iteration % cfg.log_interval == 0 or self.iteration == cfg.train_iters:
                elapsed = time.perf_counter() - window_start
                self._report(last, window_tokens / elapsed, elapsed / window_iters)
                window_start, window_tokens, window_iters = time.perf_counter(), 0, 0
            self._write_metrics(last)
            if cfg.eval_interval and self.valid_data and self.iteration % cfg.eval_interval == 0:
                self.evaluate()
            if cfg.save and cfg.save_interval and self.iteration % cfg.save_interval == 0:
                self.save()
        ran = self.iteration > start_iteration
        if cfg.save and (ran or start_iteration == 0) and (
            not cfg.save_interval or self.iteration % cfg.save_interval != 0
        ):
            self.save()
        if self.valid_data is not None:
            last["valid_loss"] = self.evaluate()
        return last

    def evaluate(self) -> float:
        """Mean NLL per counted token over the first --eval-iters global batches of the validation data."""
        for chunk in self.model:
            chunk.eval()
        device = platform.device()  # NCCL reduces device tensors only
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for i in range(self.cfg.eval_iters):
                batches = list(self._microbatches(self.valid_data, i * self.cfg.global_batch_size))
                losses = engine.forward_losses(
                    self.model, iter(batches), num_microbatches=self.num_microbatches,
                    micro_batch_size=self.cfg.micro_batch_size, seq_length=self.cfg.seq_length,
                )
                for loss, batch in zip(losses, batches):
                    mask = batch["loss_mask"].to(device)
                    totals[0] += (loss.float() * mask).sum().double()
                    totals[1] += mask.sum().double()
        for chunk in self.model:
            chunk.train()
        from megatron.core import parallel_state as ps

        dist.all_reduce(totals, group=ps.get_data_parallel_group())
        (loss,) = self._from_last_stage((totals[0] / totals[1].clamp(min=1)).item()
                                        if ps.is_pipeline_last_stage() else None)
        self._log(f" validation at iteration {self.iteration}: loss {loss:.4f} "
                  f"ppl {math.exp(min(loss, 50)):.2f}")
        self._write_metrics({"iteration": self.iteration, "valid_loss": loss})
        if self.writer:
            self.writer.add_scalar("valid/loss", loss, self.iteration)
        return loss

    def save(self) -> None:
        save_checkpoint(
            self.cfg.save, self.iteration, self.model, self.optimizer, self.scheduler,
            {"consumed_samples": self.consumed_samples, "consumed_tokens": self.consumed_tokens},
            self.cfg.model, tokenizer=self.train_data.sources[0].metas[0].get("tokenizer"),
        )
        self._log(f" saved checkpoint at iteration {self.iteration} to {self.cfg.save}")

    # ---- reporting -----------------------------------------------------------------------
    def _from_last_stage(self, *values) -> tuple:
        """Scalars known on the last pipeline stage, on every rank (one broadcast for all)."""
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return values
        t = torch.tensor([v if v is not None else 0.0 for v in values], dtype=torch.float64, device=platform.device())
        src = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(t, src=src, group=ps.get_pipeline_model_parallel_group())
        return tuple(t.tolist())

    def _report(self, m: dict, tokens_per_s: float, s_per_iter: float) -> None:
        tflops = tokens_per_s * self.flops_per_token / self.info.world_size / 1e12
        mfu = f" | MFU {100 * tflops * 1e12 / self.peak_flops:.1f}%" if self.peak_flops else ""
        self._log(
            f" iteration {m['iteration']:>7}/{self.cfg.train_iters} | consumed tokens "
            f"{m['consumed_tokens']:>12} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | grad norm "
            f"{m['grad_norm']:.3f} | {s_per_iter * 1000:.0f} ms/iter | {tokens_per_s:.0f} tokens/s "
            f"| {tflops:.3f} TFLOP/s/device{mfu}"
        )
        if self.writer:
            for key in ("loss", "lr", "grad_norm"):
                self.writer.add_scalar(f"train/{key}", m[key], m["iteration"])
            self.writer.add_scalar("train/tokens_per_s", tokens_per_s, m["iteration"])

    def _write_metrics(self, m: dict) -> None:
        if self.cfg.metrics_file and self.info.rank == 0:
            with open(self.cfg.metrics_file, "a") as f:
                f.write(json.dumps(m) + "\n")

    def _log(self, message: str) -> None:
        if self.info.rank == 0:
            print(message, flush=True)

    def _tensorboard(self):
        if not self.cfg.tensorboard_dir or self.info.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise RuntimeError("--tensorboard-dir needs the tensorboard package") from e
        return SummaryWriter(self.cfg.tensorboard_dir)

    def config_summary(self) -> dict:
        return {k: v for k, v in asdict(self.cfg).items() if k != "model"}
