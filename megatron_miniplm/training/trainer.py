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
import gc
import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_miniplm import host_memory, parallel, platform
from megatron_miniplm.data.samples import collate_instances
from megatron_miniplm.settings import to_mapping
from megatron_miniplm.signals import SignalFlag, any_rank
from megatron_miniplm.training import engine, loggers
from megatron_miniplm.training.checkpoint import load_checkpoint, save_checkpoint
from megatron_miniplm.training.data import SampleStream
from megatron_miniplm.training.flops import device_peak_flops, kd_teacher_flops_per_token, training_flops_per_token
from megatron_miniplm.models.gpt import resolve_implementation
from megatron_miniplm.training.kd import Teacher, kd_forward_step
from megatron_miniplm.training.prefetch import Prefetcher
from megatron_miniplm.training.config import TrainConfig


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.start_time = time.time()
        self.cfg = cfg
        loggers.check(cfg)  # a missing logging package: refused before anything starts
        self._set_up_parallel_state()
        self._set_up_data()
        self._set_up_model_and_optimizer()
        self._set_up_teacher()
        self._set_up_scheduler()
        self._set_up_progress()
        self._set_up_accounting()
        self.prefetch = Prefetcher(lambda start: list(self._microbatches(self.train_data, start)),
                                   step=cfg.global_batch_size, end=cfg.iterations * cfg.global_batch_size,
                                   enabled=cfg.num_workers > 0)
        self._log_startup()

    # ---- set-up --------------------------------------------------------------------------
    def _set_up_parallel_state(self) -> None:
        """The process groups and seeds of the layout, once the model is known to split over TP
        and before anything depends on the data-parallel size."""
        cfg = self.cfg
        cfg.model.check_tensor_parallel(cfg.tensor_model_parallel_size)
        self.info = parallel.initialize(parallel.ParallelConfig(
            cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, seed=cfg.seed,
        ))
        self.host_memory = host_memory.apply(cfg.keep_freed_memory, self.info.device.type)
        self._check_batch_layout()

    def _set_up_data(self) -> None:
        """The training samples (and validation ones, if any), checked against the model."""
        cfg = self.cfg
        self.train_data = SampleStream.from_data_path(
            cfg.data_path, cfg.seed, cfg.data_order == "shuffled", num_samples=cfg.iterations * cfg.global_batch_size,
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

    def _set_up_model_and_optimizer(self) -> None:
        cfg = self.cfg
        self.impl = resolve_implementation(cfg.layers, cfg.fusions)
        self.model = engine.build_model_chunks(cfg.model, bf16=cfg.bf16, ddp=cfg.ddp, recompute=cfg.recompute,
                                               impl=self.impl, sequence_parallel=cfg.sequence_parallel)
        self.optimizer = engine.build_optimizer(self.model, cfg.optimizer, bf16=cfg.bf16)

    def _set_up_teacher(self) -> None:
        """Under KD, the frozen teacher and the forward step that distils from it; else the
        plain LM forward step."""
        cfg = self.cfg
        self.teacher, self.forward_step = None, engine.gpt_forward_step
        if cfg.kd.enabled:
            from functools import partial

            self.teacher = Teacher(cfg.kd, cfg.model, bf16=cfg.bf16, data_tokenizer=self._data_tokenizer(),
                                   data_path=cfg.data_path[-1],
                                   impl=resolve_implementation(cfg.layers, forward_only=True))
            self.teacher.config.check_attention_window(cfg.seq_length)
            self.forward_step = partial(kd_forward_step, self.teacher, cfg.kd)

    def _set_up_scheduler(self) -> None:
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.cfg
        decay, warmup = cfg.decay_iters, cfg.warmup_iters
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=cfg.optimizer.lr, min_lr=cfg.optimizer.final_lr,
            lr_warmup_steps=warmup, lr_decay_steps=max(decay, warmup + 1),
            lr_decay_style=cfg.lr_decay_style, start_wd=cfg.optimizer.weight_decay,
            end_wd=cfg.optimizer.weight_decay, wd_incr_steps=decay, wd_incr_style="constant",
        )

    def _set_up_progress(self) -> None:
        """The counters of a fresh run, then those of the checkpoint resumed from, if any."""
        self.iteration = 0
        self._pending: list = []  # steps whose logged values are still on the device
        self.consumed_samples = 0
        self.consumed_tokens = 0
        self.consumed_flops = 0.0
        self.wandb_run_id: Optional[str] = None  # kept with the checkpoints, so that a resume continues the run
        if self.cfg.load:
            self._resume()

    def _set_up_accounting(self) -> None:
        """FLOPs per token and the device's peak (for MFU), and the sinks of the records."""
        cfg = self.cfg
        # Training FLOPs per token, the teacher's forward pass included under KD (it is a
        # third of its training FLOPs): what MiniPLM is compared with at equal compute.
        tp = cfg.tensor_model_parallel_size
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.seq_length, tp)
        if self.teacher is not None:
            self.flops_per_token += kd_teacher_flops_per_token(self.teacher.config, cfg.seq_length, tp)
        self.peak_flops = device_peak_flops(cfg.peak_tflops)
        self.loggers = self._open_loggers()

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
        cfg.model.check_attention_window(cfg.seq_length)

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

    def _data_tokenizer(self) -> dict:
        return self.train_data.sources[0].metas[0].get("tokenizer") or {}

    def _resume(self) -> None:
        cfg = self.cfg
        state = load_checkpoint(cfg.load, self.model, self.optimizer, self.scheduler,
                                load_optim=not cfg.no_load_optim, load_rng=not cfg.no_load_rng)
        if state is None:
            if cfg.load != cfg.save:
                raise FileNotFoundError(f"load directory {cfg.load}: no checkpoint found")
            return
        recorded = state.get("kd_teacher")
        if self.teacher is not None and recorded is not None and recorded != self.teacher.identity():
            raise ValueError(f"{cfg.load} was trained with the KD teacher {recorded.get('checkpoint')}, "
                             f"not {self.teacher.source.path}: resume with the same teacher")
        self.iteration = state["iteration"]
        self.consumed_samples = state["consumed_samples"]
        self.consumed_tokens = state["consumed_tokens"]
        self.consumed_flops = state.get("consumed_flops", 0.0)
        if cfg.save and os.path.realpath(cfg.load) == os.path.realpath(cfg.save):
            # A resume of this run (not a start from another run's checkpoint): the same W&B run.
            self.wandb_run_id = state.get("wandb_run_id")
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
        """Run to the configured iterations (or an exit condition); returns the last iteration's metrics,
        with ``exit_reason`` when the run stopped early.

        A step's losses are read on the host only when they are needed: at the logging interval,
        before a validation, a save or an exit, and at the end (one synchronisation for all the
        steps since the last read), so the host queues the next step while the device works.
        The run's logging ends with it: its sinks are closed (W&B's run finished, as failed if
        it raised)."""
        with self.loggers:
            return self._train()

    def _train(self) -> dict:
        cfg = self.cfg
        last: dict = {}
        start_iteration = self.iteration
        saved_at = None
        window = _Window()
        signal_flag = SignalFlag() if cfg.exit_signal_handler else contextlib.nullcontext()
        with signal_flag, _manual_gc(cfg.manual_gc), contextlib.closing(self.prefetch):
            while self.iteration < cfg.iterations:
                self._train_step()
                if cfg.manual_gc and cfg.manual_gc_interval and self.iteration % cfg.manual_gc_interval == 0:
                    gc.collect()
                log_now = self.iteration % cfg.log_interval == 0 or self.iteration == cfg.iterations
                eval_now = bool(cfg.eval_interval and self.valid_data and self.iteration % cfg.eval_interval == 0)
                save_now = bool(cfg.save and cfg.save_interval and self.iteration % cfg.save_interval == 0)
                if log_now or eval_now or save_now:
                    last = self._read_pending_into(window) or last
                if log_now:
                    self._report(last, *window.take())
                if eval_now:
                    self.evaluate()
                if save_now:
                    self.save()
                    saved_at = self.iteration
                reason = self._exit_reason(signal_flag)  # after validation and saving, as in Megatron-LM
                if reason:
                    last = self._read_pending_into(window) or last
                    if cfg.save and saved_at != self.iteration:
                        self.save()
                    self._log(f" exiting at iteration {self.iteration}: {reason}"
                              + (f"; resume with --load {cfg.save}" if cfg.save else ""))
                    return dict(last, exit_reason=reason)
        self._finish(ran=self.iteration > start_iteration or start_iteration == 0, saved_at=saved_at)
        if self.valid_data is not None:
            last["valid_loss"] = self.evaluate()
        return last

    @property
    def loss_names(self) -> tuple:
        return ("lm loss", "kd loss", "total loss") if self.teacher is not None else ("lm loss",)

    def _train_step(self) -> None:
        """One optimizer step; its logged values stay on the device until ``_read_pending``."""
        cfg = self.cfg
        result = engine.train_step(
            self.model, self.optimizer, iter(self.prefetch.take(self.consumed_samples)),
            num_microbatches=self.num_microbatches, micro_batch_size=cfg.micro_batch_size,
            seq_length=cfg.seq_length, forward_step=self.forward_step, loss_names=self.loss_names,
        )
        self.scheduler.step(increment=1)
        self.iteration += 1
        self.consumed_samples += cfg.global_batch_size
        self.consumed_flops += cfg.global_batch_size * cfg.seq_length * self.flops_per_token
        self._pending.append((self._from_last_stage(result.values), {
            "iteration": self.iteration, "grad_norm": result.grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"], "consumed_flops": self.consumed_flops,
            "skipped": result.skipped}))

    def _read_pending_into(self, window: "_Window") -> Optional[dict]:
        """Reads the pending steps into the throughput window; the last one's metrics (None if none)."""
        last = None
        for last in self._read_pending():
            window.add(self.cfg.global_batch_size * self.cfg.seq_length, last["counted_tokens"])
        return last

    def _read_pending(self) -> list:
        """The metrics of the steps not yet read, in order (one device-to-host copy for all of
        them), each written to the metrics file."""
        if not self._pending:
            return []
        rows = torch.stack([values for values, _ in self._pending]).tolist()
        out = []
        for row, (_, known) in zip(rows, self._pending):
            *losses, tokens = row
            losses = dict(zip(self.loss_names, losses))
            self.consumed_tokens += int(tokens)
            m = {"iteration": known["iteration"], "loss": losses.get("total loss", losses["lm loss"]),
                 "grad_norm": known["grad_norm"], "lr": known["lr"], "consumed_tokens": self.consumed_tokens,
                 "counted_tokens": int(tokens), "consumed_flops": known["consumed_flops"],
                 "skipped": known["skipped"]}
            if self.teacher is not None:
                m.update(lm_loss=losses["lm loss"], kd_loss=losses["kd loss"])
            out.append(m)
        self._pending.clear()
        self._write_metrics(*out)
        return out

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
        if cfg.exit_interval and self.iteration % cfg.exit_interval == 0 and self.iteration < cfg.iterations:
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
        loss = self._from_last_stage((totals[:1] / totals[1:].clamp(min=1))).item()
        self._log(f" validation at iteration {self.iteration}: loss {loss:.4f} "
                  f"ppl {math.exp(min(loss, 50)):.2f}")
        self._write_metrics({"iteration": self.iteration, "valid_loss": loss})
        return loss

    def save(self) -> None:
        with engine.params_gathered(self.model):
            train_state = {"consumed_samples": self.consumed_samples, "consumed_tokens": self.consumed_tokens,
                           "consumed_flops": self.consumed_flops}
            if self.teacher is not None:
                train_state["kd_teacher"] = self.teacher.identity()
            if self.wandb_run_id is not None:
                train_state["wandb_run_id"] = self.wandb_run_id
            save_checkpoint(
                self.cfg.save, self.iteration, self.model, self.optimizer, self.scheduler, train_state,
                self.cfg.model, tokenizer=self._data_tokenizer() or None,
                dtype="bf16" if self.cfg.bf16 else "fp32", optimizer_format=self._optimizer_format(),
                run_config=to_mapping(self.cfg),
            )
        self._log(f" saved checkpoint at iteration {self.iteration} to {self.cfg.save}")
        self.loggers.checkpoint(self.iteration)

    def _optimizer_format(self) -> Optional[str]:
        if not self.cfg.ddp.use_distributed_optimizer:
            return None
        return "fully_reshardable" if self.cfg.dist_ckpt_optim_fully_reshardable else "dp_reshardable"

    # ---- reporting -----------------------------------------------------------------------
    def _from_last_stage(self, values: torch.Tensor) -> torch.Tensor:
        """A device tensor of values known on the last pipeline stage, on every rank (a broadcast,
        no host sync)."""
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return values
        src = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(values, src=src, group=ps.get_pipeline_model_parallel_group())
        return values

    def _log_startup(self) -> None:
        """What runs where: the layout, the device, precision and optimizer, the layers."""
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
            + (f"recompute {cfg.recompute.recompute_granularity} | " if cfg.recompute.recompute_granularity else "")
            + ("manual GC | " if cfg.manual_gc else "")
            + ("sequence parallel | " if cfg.sequence_parallel and info.tp_size > 1 else "")
            + f"{self.impl.describe()} | "
            + (f"Vanilla KD from {self.teacher.source.path} (ratio {cfg.kd.kd_ratio}, temperature "
               f"{cfg.kd.kd_temperature}) | " if self.teacher is not None else "")
            + f"seq {cfg.seq_length}, micro batch {cfg.micro_batch_size}, "
            f"global batch {cfg.global_batch_size} ({self.num_microbatches} micro-batches per DP rank) | "
            f"iterations {self.iteration} -> {cfg.iterations}"
            + (f" | host memory: {self.host_memory}" if self.host_memory else "")
        )

    def _report(self, m: dict, tokens_per_s: float, counted_per_s: float, s_per_iter: float,
                iterations: int) -> None:
        tflops = tokens_per_s * self.flops_per_token / self.info.world_size / 1e12
        mfu_value = 100 * tflops * 1e12 / self.peak_flops if self.peak_flops else None
        mfu = f" | MFU {mfu_value:.1f}%" if mfu_value is not None else ""
        grad_norm = f" | grad norm {m['grad_norm']:.3f}" if m["grad_norm"] is not None else ""
        kd = f" (lm {m['lm_loss']:.4f}, kd {m['kd_loss']:.4f})" if "kd_loss" in m else ""
        self._log(
            f" iteration {m['iteration']:>7}/{self.cfg.iterations} | consumed tokens "
            f"{m['consumed_tokens']:>12} | loss {m['loss']:.4f}{kd} | lr {m['lr']:.3e}{grad_norm} | "
            f"{s_per_iter * 1000:.0f} ms/iter | {tokens_per_s:.0f} tokens/s ({counted_per_s:.0f} non-pad) "
            f"| {tflops:.3f} TFLOP/s/device{mfu}"
        )
        self._write_metrics({"iteration": m["iteration"], "window_iterations": iterations,
                             "tokens_per_s": tokens_per_s, "counted_tokens_per_s": counted_per_s,
                             "ms_per_iter": s_per_iter * 1000, "tflops_per_device": tflops, "mfu": mfu_value})

    def _write_metrics(self, *records: dict) -> None:
        """Every record of the run goes here: to the metrics file, tensorboard and W&B (``loggers``)."""
        self.loggers.write(*records)

    def _log(self, message: str) -> None:
        if self.info.rank == 0:
            print(message, flush=True)

    def _open_loggers(self) -> "loggers.Loggers":
        """The sinks of the records (rank 0's). Under W&B, the run id is this run's from its
        checkpoint, else a new one, agreed by every rank since each saves it with the checkpoint.
        A sink that cannot open (W&B without an API key, an unwritable directory) stops every
        rank, not rank 0 alone with the others waiting for it in the first step."""
        if self.cfg.wandb_project and self.wandb_run_id is None:
            chosen = [loggers.new_wandb_run_id() if self.info.rank == 0 else None]
            dist.broadcast_object_list(chosen, src=0, device=platform.device())
            self.wandb_run_id = chosen[0]
        opened, error = loggers.Loggers(), None
        try:
            opened = loggers.open_loggers(self.cfg, rank=self.info.rank, wandb_run_id=self.wandb_run_id,
                                          config=to_mapping(self.cfg))
        except (loggers.LoggerUnavailable, OSError) as e:
            error = e
        # only the sinks that can fail to start need every rank's word (a collective at set-up)
        can_fail = bool(self.cfg.wandb_project or self.cfg.tensorboard_dir)
        if (any_rank([error is not None])[0] if can_fail else error is not None):
            raise error or loggers.LoggerUnavailable("rank 0 could not open the run's logging (its error says why)")
        return opened


@contextlib.contextmanager
def _manual_gc(enabled: bool):
    """Megatron-LM's --manual-gc: automatic collection off (one collection first), restored after."""
    if not enabled:
        yield
        return
    was = gc.isenabled()
    gc.disable()
    gc.collect()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Window:
    """Tokens (all, and those the loss counts: not padding) and time since the last report."""

    def __init__(self):
        self.start, self.tokens, self.counted, self.iters = time.perf_counter(), 0, 0, 0

    def add(self, tokens: int, counted: int) -> None:
        self.tokens += tokens
        self.counted += counted
        self.iters += 1

    def take(self) -> tuple[float, float, float, int]:
        """(tokens/s, counted tokens/s, s/iteration, iterations) over the window; starts a new one."""
        elapsed = time.perf_counter() - self.start
        rates = self.tokens / elapsed, self.counted / elapsed, elapsed / max(self.iters, 1), self.iters
        self.__init__()
        return rates
