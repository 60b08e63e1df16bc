"""The pre-training loop: reference LM on D_ref, students on the sampled blend.

Set-up (``Trainer.__init__``: validation, parallel state, data, model, optimizer,
resume), the loop (``train``: one ``engine.train_step`` per iteration, then
logging, evaluation, saving and the exit checks) and finalisation (the last
save and validation) are separate steps. A run stops early and cleanly, saving a
checkpoint first, on Megatron-LM's exit conditions: a signal (``exit_signal_handler``),
a wall-clock budget (``exit_duration_in_mins``) or an iteration multiple
(``exit_interval``); rerunning the same command resumes it exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_miniplm import parallel, platform
from megatron_miniplm.data.samples import collate_instances
from megatron_miniplm.models.config import ModelConfig
from megatron_miniplm.signals import SignalFlag, any_rank
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
    data_cache_path: Optional[str] = None  # megatron GPTDataset index cache (document mode)
    eval_interval: int = 0
    eval_iters: int = 10
    optimizer: engine.OptimizerSettings = field(default_factory=engine.OptimizerSettings)
    ddp: engine.DDPSettings = field(default_factory=engine.DDPSettings)
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    lr_decay_style: str = "cosine"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    bf16: bool = False
    save: Optional[str] = None
    load: Optional[str] = None
    no_load_optim: bool = False
    save_interval: int = 0
    dist_ckpt_optim_fully_reshardable: bool = False
    exit_signal_handler: bool = False
    exit_duration_in_mins: Optional[float] = None
    exit_interval: Optional[int] = None
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    metrics_file: Optional[str] = None
    seed: int = 1234
    shuffle: bool = True
    peak_tflops: Optional[float] = None


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.start_time = time.time()
        self.cfg = cfg
        cfg.model.check_tensor_parallel(cfg.tensor_model_parallel_size)
        self.info = parallel.initialize(parallel.ParallelConfig(
            cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, seed=cfg.seed,
        ))
        self._check_batch_layout()
        self.train_data = SampleStream.from_data_path(
            cfg.data_path, cfg.seed, cfg.shuffle, num_samples=cfg.train_iters * cfg.global_batch_size,
            seq_length=cfg.seq_length, cache_path=cfg.data_cache_path,
        )
        self.valid_data = (
            SampleStream.from_data_path(
                cfg.valid_data_path, cfg.seed, shuffle=False,
                num_samples=cfg.eval_iters * cfg.global_batch_size, seq_length=cfg.seq_length,
                cache_path=cfg.data_cache_path,
            ) if cfg.valid_data_path else None
        )
        self._check_data(self.train_data, "training data")
        if self.valid_data is not None:
            self._check_data(self.valid_data, "validation data")

        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.model = engine.build_model_chunks(cfg.model, bf16=cfg.bf16, ddp=cfg.ddp)
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
            self._resume()
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.seq_length)
        self.peak_flops = device_peak_flops(cfg.peak_tflops)
        self.writer = self._tensorboard()
        self._log_startup()

    # ---- validation of settings ----------------------------------------------------------
    def _check_batch_layout(self) -> None:
        cfg, dp = self.cfg, self.info.dp_size
        if cfg.global_batch_size % (cfg.micro_batch_size * dp) != 0:
            raise ValueError(
                f"global batch size {cfg.global_batch_size} is not divisible by "
                f"micro batch size {cfg.micro_batch_size} x data-parallel size {dp}"
            )
        if cfg.seq_length > cfg.model.max_position_embeddings:
            raise ValueError(f"sequence length {cfg.seq_length} exceeds the model's "
                             f"{cfg.model.max_position_embeddings} positions")

    def _check_data(self, data: SampleStream, what: str) -> None:
        for source in data.sources:
            if source.vocab_size > self.cfg.model.vocab_size:
                raise ValueError(
                    f"{what} {source.prefix}: the data's vocabulary ({source.vocab_size}) exceeds "
                    f"the model's ({self.cfg.model.vocab_size})"
                )
            if source.instance_mode != "document" and source.seq_length > self.cfg.seq_length:
                raise ValueError(
                    f"{what} {source.prefix}: instances of up to {source.seq_length + 1} tokens "
                    f"need a sequence length >= {source.seq_length}"
                )

    def _resume(self) -> None:
        cfg = self.cfg
        state = load_checkpoint(cfg.load, self.model, self.optimizer, self.scheduler,
                                load_optim=not cfg.no_load_optim)
        if state is None:
            if cfg.load != cfg.save:
                raise FileNotFoundError(f"load directory {cfg.load}: no checkpoint found")
            return
        self.iteration = state["iteration"]
        self.consumed_samples = state["consumed_samples"]
        self.consumed_tokens = state["consumed_tokens"]
        self._log(f"resumed from {cfg.load} at iteration {self.iteration}"
                  + ("" if state["optimizer_loaded"] else
                     " (model weights only: optimizer state initialised from them)"))

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
        """Run to ``train_iters`` (or an exit condition); returns the last iteration's metrics,
        with ``exit_reason`` when the run stopped early."""
        cfg = self.cfg
        last: dict = {}
        start_iteration = self.iteration
        saved_at = None
        window = _Window()
        signal_flag = SignalFlag() if cfg.exit_signal_handler else contextlib.nullcontext()
        with signal_flag:
            while self.iteration < cfg.train_iters:
                last = self._train_step()
                window.add(cfg.global_batch_size * cfg.seq_length)
                if self.iteration % cfg.log_interval == 0 or self.iteration == cfg.train_iters:
                    self._report(last, *window.take())
                self._write_metrics(last)
                if cfg.eval_interval and self.valid_data and self.iteration % cfg.eval_interval == 0:
                    self.evaluate()
                if cfg.save and cfg.save_interval and self.iteration % cfg.save_interval == 0:
                    self.save()
                    saved_at = self.iteration
                reason = self._exit_reason(signal_flag)
                if reason:
                    if cfg.save and saved_at != self.iteration:
                        self.save()
                    self._log(f" exiting at iteration {self.iteration}: {reason}"
                              + (f"; resume with --load {cfg.save}" if cfg.save else ""))
                    return dict(last, exit_reason=reason)
        self._finish(ran=self.iteration > start_iteration or start_iteration == 0, saved_at=saved_at)
        if self.valid_data is not None:
            last["valid_loss"] = self.evaluate()
        return last

    def _train_step(self) -> dict:
        cfg = self.cfg
        result = engine.train_step(
            self.model, self.optimizer, self._microbatches(self.train_data, self.consumed_samples),
            num_microbatches=self.num_microbatches, micro_batch_size=cfg.micro_batch_size,
            seq_length=cfg.seq_length, forward_step=engine.gpt_forward_step,
        )
        self.scheduler.step(increment=1)
        self.iteration += 1
        self.consumed_samples += cfg.global_batch_size
        loss, tokens = self._from_last_stage(result.loss, result.tokens)
        self.consumed_tokens += int(tokens)
        return {"iteration": self.iteration, "loss": loss, "grad_norm": result.grad_norm,
                "lr": self.optimizer.param_groups[0]["lr"], "consumed_tokens": self.consumed_tokens,
                "skipped": result.skipped}

    def _exit_reason(self, signal_flag) -> Optional[str]:
        """Megatron-LM's exit conditions, agreed by every rank (one all-reduce when a signal
        handler or a time budget is set)."""
        cfg = self.cfg
        checks = []
        if cfg.exit_signal_handler:
            checks.append((signal_flag.received, f"{signal_flag.name} received"))
        if cfg.exit_duration_in_mins:
            minutes = (time.time() - self.start_time) / 60
            checks.append((minutes > cfg.exit_duration_in_mins,
                           f"{cfg.exit_duration_in_mins:g} minutes of wall-clock time used"))
        if checks:
            for agreed, (_, reason) in zip(any_rank([flag for flag, _ in checks]), checks):
                if agreed:
                    return reason
        if cfg.exit_interval and self.iteration % cfg.exit_interval == 0 and self.iteration < cfg.train_iters:
            return f"iteration is a multiple of the exit interval {cfg.exit_interval}"
        return None

    def _finish(self, *, ran: bool, saved_at: Optional[int]) -> None:
        """The final save (unless this iteration was just saved, or nothing ran on a resume)."""
        if self.cfg.save and ran and saved_at != self.iteration:
            self.save()

    def evaluate(self) -> float:
        """Mean NLL per counted token over the first ``eval_iters`` global batches of the validation data."""
        for chunk in self.model:
            chunk.eval()
        device = platform.device()  # NCCL reduces device tensors only
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        with engine.params_gathered(self.model), torch.no_grad():
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
        with engine.params_gathered(self.model):
            save_checkpoint(
                self.cfg.save, self.iteration, self.model, self.optimizer, self.scheduler,
                {"consumed_samples": self.consumed_samples, "consumed_tokens": self.consumed_tokens},
                self.cfg.model, tokenizer=self.train_data.sources[0].metas[0].get("tokenizer"),
                dtype="bf16" if self.cfg.bf16 else "fp32", optimizer_format=self._optimizer_format(),
            )
        self._log(f" saved checkpoint at iteration {self.iteration} to {self.cfg.save}")

    def _optimizer_format(self) -> Optional[str]:
        if not self.cfg.ddp.use_distributed_optimizer:
            return None
        return "fully_reshardable" if self.cfg.dist_ckpt_optim_fully_reshardable else "dp_reshardable"

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

    def _log_startup(self) -> None:
        """What runs where: the layout, the device, precision and optimizer, the layers."""
        from megatron_miniplm.models.gpt import describe_backend

        cfg, info, ddp = self.cfg, self.info, self.cfg.ddp
        precision = ("bf16 parameters, fp32 main parameters and gradient reduction" if cfg.bf16
                     else "fp32 parameters")
        optimizer = "distributed optimizer (sharded over DP)" if ddp.use_distributed_optimizer else "optimizer"
        overlap = [name for name, on in (("grad reduce", ddp.overlap_grad_reduce),
                                         ("param gather", ddp.overlap_param_gather)) if on]
        self._log(
            f"world {info.world_size} ({info.backend}, {info.device.type}) | TP {info.tp_size} "
            f"PP {info.pp_size} DP {info.dp_size} | model '{cfg.model.name}': {cfg.model.num_layers} "
            f"layers, hidden {cfg.model.hidden_size} | {precision}, Adam {optimizer}"
            f"{', overlapped ' + ' and '.join(overlap) if overlap else ''} | "
            f"{describe_backend('auto')} | seq {cfg.seq_length}, micro batch {cfg.micro_batch_size}, "
            f"global batch {cfg.global_batch_size} ({self.num_microbatches} micro-batches per DP rank) | "
            f"iterations {self.iteration} -> {cfg.train_iters}"
        )

    def _report(self, m: dict, tokens_per_s: float, s_per_iter: float) -> None:
        tflops = tokens_per_s * self.flops_per_token / self.info.world_size / 1e12
        mfu = f" | MFU {100 * tflops * 1e12 / self.peak_flops:.1f}%" if self.peak_flops else ""
        grad_norm = f" | grad norm {m['grad_norm']:.3f}" if m["grad_norm"] is not None else ""
        self._log(
            f" iteration {m['iteration']:>7}/{self.cfg.train_iters} | consumed tokens "
            f"{m['consumed_tokens']:>12} | loss {m['loss']:.4f} | lr {m['lr']:.3e}{grad_norm} | "
            f"{s_per_iter * 1000:.0f} ms/iter | {tokens_per_s:.0f} tokens/s "
            f"| {tflops:.3f} TFLOP/s/device{mfu}"
        )
        if self.writer:
            for key in ("loss", "lr", "grad_norm"):
                if m[key] is not None:
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
            raise RuntimeError("a tensorboard directory needs the tensorboard package") from e
        return SummaryWriter(self.cfg.tensorboard_dir)


class _Window:
    """Tokens and time since the last report."""

    def __init__(self):
        self.start, self.tokens, self.iters = time.perf_counter(), 0, 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.iters += 1

    def take(self) -> tuple[float, float]:
        """(tokens/s, s/iteration) over the window; starts a new one."""
        elapsed = time.perf_counter() - self.start
        rate, per_iter = self.tokens / elapsed, elapsed / max(self.iters, 1)
        self.__init__()
        return rate, per_iter
