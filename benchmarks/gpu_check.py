#!/usr/bin/env python
"""One command that checks the GPU path on one GPU, through the project's own tools.

On the device machine (one H200; its image has torch 2.11 + CUDA 13 but neither
megatron-core nor Transformer Engine), after `bash benchmarks/gpu_wheels.sh` has filled
the gitignored `.whl/` here, make exactly these two calls of the device tool, the second
while the machine is still warm:

    run(command="bash benchmarks/gpu_check.sh --part correctness", carry=[".whl"], timeout_s=300)
    run(command="bash benchmarks/gpu_check.sh --part performance", carry=[".whl"], timeout_s=300)

gpu_check.sh installs the wheels into the image's python3, builds the C++ extension in
place and runs this script with --out $OUT; the table comes back in the output's tail and
as $OUT/gpu_check.txt, the figures as $OUT/gpu_check.json, the tools' logs as
$OUT/gpu_check_logs.txt. Each part keeps to its own budget (210 s: a step is cut at the
budget's end, and one that would start past it is reported as not run, a FAIL), so that
with the install and the build it ends inside 5 minutes. The correctness part writes no
1.8B checkpoint. To rerun only some checks: `bash benchmarks/gpu_check.sh --only
flash,perf-train` (names below).

Checks (each prints PASS/FAIL and why; exit status 1 if any fails):

  nccl        torch.distributed through megatron_miniplm.parallel under torchrun, one rank:
              the backend is NCCL, a collective on a device tensor works and one on a CPU
              tensor raises (so a clean run of the other checks means that our code gave
              NCCL device tensors everywhere).
  resume      tools/pretrain_gpt.py under torchrun, --bf16 --use-distributed-optimizer
              --overlap-grad-reduce --overlap-param-gather, a small model on a corpus built
              by tools/build_demo_corpus.py + a BPE tokenizer trained here (no download) +
              tools/preprocess_data.py: run A trains 20 steps; run B is the same command
              with --exit-interval 10 (saves at 10 and exits); run C resumes B to 20.
              C's losses and grad norms at 11..20 must equal A's. Tolerance: B's steps
              1..10 repeat A's, so they measure the run-to-run noise of the GPU kernels for
              free. If they are bit-identical, the kernels are deterministic and C must be
              bit-identical too (any difference is the resume's). If they are not (flash
              attention's backward accumulates dQ with atomics in a varying order), C's
              losses may differ from A's by RESUME_LOSS_TOL (2e-3 nats) at most: last-bit
              gradient differences, which through bf16 parameters should move a loss of
              ~6 nats by well under 1e-3 over ten steps (an expectation: the CPU runs are
              deterministic). What a broken resume gives is far larger: a wrong
              data position changes step 11's batch (loss differences of 0.1 and more);
              a lost optimizer state (measured on the smoke model, resuming with
              --no-load-optim) moves the losses of steps 12..20 by up to 0.035.
  plain       tools/pretrain_gpt.py --bf16 without the distributed optimizer (megatron-core's
              mixed-precision optimizer over the model's own parameters: a module left on the
              host fails here), 10 steps beside run A's (same seed and data).
  score       tools/score_docs.py on run A's checkpoint over the corpus: first on the CPU
              (CUDA_VISIBLE_DEVICES= : the CPU path, fp32), then on the GPU in fp32 and in
              bf16. Max abs difference of the per-instance mean NLL (nats/token) against
              the CPU's: fp32 within SCORE_TOL["fp32"] = 1e-3 (PyTorch leaves TF32 off
              for matmuls, so only summation order differs; TF32 would show as ~1e-2),
              bf16 within SCORE_TOL["bf16"] = 5e-2 (bf16 keeps 8 significant bits,
              relative rounding 2^-9 ~ 2e-3 per operation, accumulated through the layers
              into logits of size ~10: an instance's mean NLL moves by 1e-3..1e-2; the
              smoke run's CPU bf16 against CPU fp32 differs by 1.1e-3 at most over 1,499
              instances. 5e-2 is under 1% of this model's NLL (~5.5), and leaves room for
              GPU kernels' other summation orders, while a wrong model, mask or token
              shift moves it by tenths of a nat).
  flash       The project's SDPAttention (megatron_miniplm/models/attention.py) with the
              attention shapes of qwen-200M, smollm2-135M (GQA) and qwen1.5-1.8B, bf16,
              causal: runs under sdpa_kernel(FLASH_ATTENTION) (flash can take it), and the
              default dispatch's kernels in torch.profiler are flash kernels; a qwen-200M
              built by models/gpt.build_model has SDPAttention in every layer and its
              forward + backward runs flash kernels. (cuDNN's fused attention, which
              PyTorch may prefer on Hopper, counts as a pass, named as such.)
  perf-train  tools/pretrain_gpt.py, qwen-200M, seq 1024, bf16, distributed optimizer with
              overlap, random tokens: tokens/s and MFU from the throughput records of the
              trainer's metrics file (first logging window, with start-up and compilation,
              left out); target MFU >= 45%.
  perf-score  tools/score_docs.py --bf16, its batch sizing left at its defaults, on
              random-weight smollm2-135M and qwen1.5-1.8B checkpoints (the library's
              presets) over random tokens of seq 1024: a first session on 64 instances
              fills torch.compile's on-disk caches for the batch shape, then the timed
              session's tokens/s comes from its score file's meta; MFU with
              training/flops.py (forward = 1/3 of the training FLOPs) against its peak
              table; target MFU >= 55% for the 1.8B. A missed target is reported, not a FAIL.

`--smoke` runs the same flow on the CPU: tiny shapes (tests/presets.py), few steps, gloo
instead of NCCL, no CPU-tensor NCCL check, the flash check's flow without its assertions
(INFO: a CPU has no flash kernel), no MFU targets.

    python benchmarks/gpu_check.py --smoke [--work DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
PY = sys.executable
RESULT_TAG = "GPU_CHECK_RESULT "

RESUME_LOSS_TOL = 2e-3
SCORE_TOL = {"fp32": 1e-3, "bf16": 5e-2}
TARGETS = {"perf-train": 45.0, "perf-score qwen1.5-1.8B": 55.0}  # MFU, percent
CHECKS = ("nccl", "resume", "plain", "score", "flash", "perf-train", "perf-score")
# The two device calls: each fits 5 minutes with the install and the build.
PARTS = {"correctness": ("nccl", "resume", "plain", "score", "flash"), "performance": ("perf-train", "perf-score")}
PART_BUDGET_S = 210
MARK = {True: "PASS", False: "FAIL", None: "INFO"}  # None: a figure or an observation, not a check


# ---- settings of the two modes ----------------------------------------------------------

@dataclass(frozen=True)
class Mode:
    smoke: bool
    model: str  # the model of resume/score: a tests/presets.py name or SMALL below
    seq: int  # sequence length of resume/score
    micro: int
    global_batch: int
    corpus_chars: int  # per domain, tools/build_demo_corpus.py
    perf_train: str  # preset of perf-train
    perf_seq: int
    perf_micro: int
    perf_global: int
    perf_iters: int
    perf_log_interval: int
    perf_score: tuple  # (label, preset, instances of perf_seq + 1 tokens)
    perf_score_warmup: int  # instances of the warm-up session
    budget_s: float
    flash_presets: tuple = ("qwen-200M", "smollm2-135M", "qwen1.5-1.8B")  # attention shapes of the flash check
    flash_model: str = "qwen-200M"  # the whole model of the flash check
    flash_seq: int = 1024


GPU_MODE = Mode(
    smoke=False, model="small", seq=256, micro=4, global_batch=8, corpus_chars=100_000,
    perf_train="qwen-200M", perf_seq=1024, perf_micro=8, perf_global=64, perf_iters=15,
    perf_log_interval=5,
    perf_score=(("smollm2-135M", "smollm2-135M", 3072), ("qwen1.5-1.8B", "qwen1.5-1.8B", 768)),
    perf_score_warmup=64, budget_s=400,
)
SMOKE_MODE = Mode(
    smoke=True, model="tiny", seq=64, micro=2, global_batch=4, corpus_chars=30_000,
    perf_train="tiny", perf_seq=64, perf_micro=2, perf_global=4, perf_iters=6, perf_log_interval=2,
    perf_score=(("tiny-gqa", "tiny-gqa", 64), ("tiny-untied", "tiny-untied", 64)),
    perf_score_warmup=8, budget_s=1500, flash_presets=("tiny", "tiny-gqa"), flash_model="tiny", flash_seq=64,
)


def model_config(name: str):
    """A ModelConfig by name: SMALL (resume/score on a GPU: head dim 64, as the real models),
    a tests/presets.py model, else the library's preset."""
    from megatron_miniplm.models.config import ModelConfig

    if name == "small":
        return ModelConfig(name="small", num_layers=4, hidden_size=256, ffn_hidden_size=704,
                           num_attention_heads=4, vocab_size=1024, max_position_embeddings=2048)
    return _test_presets().get_preset(name)


@functools.lru_cache(maxsize=None)
def _test_presets():
    """tests/presets.py (the tiny models of --smoke), loaded from its file: it imports only
    the package, so it needs the test directory on no path."""
    spec = importlib.util.spec_from_file_location("presets", os.path.join(REPO, "tests", "presets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_flags(name: str) -> list[str]:
    """tools/pretrain_gpt.py's model flags: --model-preset for the library's presets, shape
    flags for the others."""
    from megatron_miniplm.models.config import PRESETS
    from megatron_miniplm.settings import to_argv

    return ["--model-preset", name] if name in PRESETS else to_argv(model_config(name))


# ---- running the tools ------------------------------------------------------------------

@dataclass
class Result:
    name: str
    ok: Optional[bool]  # None: a figure, not a pass/fail check
    reason: str
    figures: dict = field(default_factory=dict)


class Runner:
    """Subprocesses with a timeout each, under one overall budget, their output logged."""

    def __init__(self, work: str, budget_s: float, log_path: str):
        self.work = work
        self.deadline = time.monotonic() + budget_s
        self.log_path = log_path
        self.startup_lines: dict = {}  # the tools' own lines saying which layers/attention run -> run
        open(log_path, "w").close()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], *, timeout: float, env: Optional[dict] = None, label: str = "") -> tuple[int, str]:
        """(exit status, stdout + stderr); 124 when it ran past its time (or the budget)."""
        timeout = min(timeout, self.left())
        if timeout < 5:
            return 124, "not started: the time budget is spent"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        start = time.monotonic()
        # A session of its own: on a timeout the whole group goes (torchrun and its worker, which
        # would otherwise hold the GPU on).
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            rc = 124
            out = (out or "") + f"\n[killed after {timeout:.0f} s]"
        said = [re.sub(r" \| iterations \d+ -> \d+$", "", line.strip())
                for line in out.splitlines() if "layers:" in line]
        if said:
            self.startup_lines.setdefault(said[0], label)  # each distinct line once, with its first run
        with open(self.log_path, "a") as f:
            f.write(f"\n===== {label or cmd[-1]} | rc {rc} | {time.monotonic() - start:.1f} s\n$ "
                    + " ".join(cmd) + "\n" + _tail(out, 150) + "\n")
        return rc, out

    def torchrun(self, script: str, args: list[str], **kw) -> tuple[int, str]:
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", script, *args]
        return self.run(cmd, **kw)

    def worker(self, name: str, payload: dict, *, timeout: float, smoke: bool) -> tuple[Optional[dict], str]:
        """This script's --worker NAME under torchrun (world of one): its result dict, or None."""
        args = ["--worker", name, "--payload", json.dumps(payload)] + (["--smoke"] if smoke else [])
        rc, out = self.torchrun(os.path.abspath(__file__), args, timeout=timeout, label=f"worker {name}")
        found = [json.loads(line[len(RESULT_TAG):]) for line in out.splitlines() if line.startswith(RESULT_TAG)]
        if rc != 0 or not found:
            return None, f"worker {name} exited {rc}: {_last_error(out)}"
        return found[-1], ""


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this script started, SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _last_error(out: str) -> str:
    """The most telling line of a failed tool's output (not torchrun's own report)."""
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    telling = re.compile(r"(\w+Error\b|\w+Exception\b|error:|killed after|not started)")
    for line in reversed(lines):
        if telling.search(line) and "ChildFailedError" not in line and "elastic" not in line:
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


# ---- the environment --------------------------------------------------------------------

def environment() -> dict:
    """Versions, the GPU, and whether Transformer Engine imports (the project's own probe).
    Which layers and attention run is the trainer's start-up line, reported with the table."""
    import importlib.metadata as md

    import torch

    from megatron_miniplm import platform

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        nccl = torch.cuda.nccl.version()
        env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    try:
        env["megatron_core"] = md.version("megatron-core")
    except md.PackageNotFoundError:
        env["megatron_core"] = None
    te_usable, te_why = platform.transformer_engine()
    env["transformer_engine"] = f"{'usable' if te_usable else 'not used'}: {te_why}"
    try:
        import megatron_miniplm._cpp  # noqa: F401

        env["cpp_extension"] = "built"
    except ImportError as e:
        env["cpp_extension"] = f"missing: {e}"
    return env


# ---- inputs -----------------------------------------------------------------------------

def build_corpus(r: Runner, mode: Mode) -> tuple[Optional[str], str]:
    """A real-text corpus (tools/build_demo_corpus.py), a byte-level BPE trained on it here,
    tokenized into MiniPLM instances by tools/preprocess_data.py: the dataset prefix."""
    prefix = os.path.join(r.work, "corpus", "train")
    if os.path.exists(prefix + ".meta.json"):
        return prefix, ""
    corpus_dir = os.path.join(r.work, "corpus")
    rc, out = r.run([PY, os.path.join(TOOLS, "build_demo_corpus.py"), "--output-dir", corpus_dir,
                     "--chars-per-domain", str(mode.corpus_chars)], timeout=120, label="build_demo_corpus")
    if rc != 0:
        return None, f"build_demo_corpus.py exited {rc}: {_last_error(out)}"
    tokenizer_dir = train_tokenizer(os.path.join(corpus_dir, "train.jsonl"), os.path.join(r.work, "tokenizer"),
                                    model_config(mode.model).vocab_size)
    rc, out = r.run([PY, os.path.join(TOOLS, "preprocess_data.py"), "--input", os.path.join(corpus_dir, "train.jsonl"),
                     "--output-prefix", prefix, "--tokenizer", tokenizer_dir, "--seq-length", str(mode.seq),
                     "--workers", "4", "--no-progress"], timeout=120, label="preprocess_data")
    if rc != 0:
        return None, f"preprocess_data.py exited {rc}: {_last_error(out)}"
    return prefix, ""


def train_tokenizer(jsonl: str, out_dir: str, vocab_size: int) -> str:
    """A GPT-2-style byte-level BPE with <|endoftext|> (the project's tokenizer loader finds
    it as the EOD), trained on the corpus: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with open(jsonl, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    return out_dir


def random_dataset(prefix: str, vocab_size: int, seq_length: int, instances: int, seed: int = 0) -> str:
    """Full-length instances (seq_length + 1 tokens) of uniform random tokens, no EOD (id 0)
    inside, written by the project's DatasetWriter with the meta contract of preprocess_data."""
    import numpy as np

    from megatron_miniplm.data.dataset_writer import DatasetWriter
    from megatron_miniplm.data.instances import Instances
    from megatron_miniplm.data.meta import FORMAT_VERSION

    if os.path.exists(prefix + ".meta.json"):
        return prefix
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    rng = np.random.default_rng(seed)
    length = seq_length + 1
    with DatasetWriter(prefix, vocab_size, eod_id=0) as writer:
        tokens = rng.integers(1, vocab_size, size=instances * length).astype(writer.dtype)
        writer.add(Instances(tokens, np.full(instances, length, np.int64), np.zeros(instances, np.int32)))
        writer.commit({
            "format_version": FORMAT_VERSION, "instance_mode": "miniplm", "seq_length": seq_length,
            "dtype": np.dtype(writer.dtype).name,
            "tokenizer": {"path": "", "name": f"random-{vocab_size}", "type": "none", "sha256": "0" * 64,
                          "vocab_size": vocab_size, "eod_id": 0, "eod_token": "", "pad_id": 0},
            "inputs": [], "skipped": {},
        }, ["random"])
    return prefix


# ---- check 1: NCCL ----------------------------------------------------------------------

def check_nccl(r: Runner, mode: Mode) -> Result:
    got, why = r.worker("nccl", {}, timeout=120, smoke=mode.smoke)
    if got is None:
        return Result("nccl", False, why)
    want = "gloo" if mode.smoke else "nccl"
    problems = []
    if got["backend"] != want:
        problems.append(f"backend {got['backend']}, expected {want}")
    if not got["device_collective_ok"]:
        problems.append(f"all_reduce on a {got['device']} tensor gave {got['device_collective_value']}")
    if not mode.smoke and not got["cpu_collective_raised"]:
        problems.append("all_reduce on a CPU tensor did not raise under NCCL")
    detail = (f"backend {got['backend']} on {got['device']}, world {got['world_size']}; device-tensor "
              f"all_reduce ok" + ("" if mode.smoke else f"; CPU-tensor all_reduce raised: {got['cpu_error']}"))
    return Result("nccl", not problems, "; ".join(problems) or detail, got)


def worker_nccl(payload: dict, smoke: bool) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_miniplm import parallel, platform

    info = parallel.initialize(parallel.ParallelConfig())
    device = platform.device()
    t = torch.full((4,), 3.0, device=device)
    dist.all_reduce(t)  # default group
    dist.all_reduce(t, group=ps.get_data_parallel_group())  # a megatron group
    value = float(t.sum().item())
    out = {"backend": dist.get_backend(), "device": str(device), "world_size": dist.get_world_size(),
           "device_collective_ok": value == 12.0 * info.world_size ** 2, "device_collective_value": value,
           "cpu_collective_raised": None, "cpu_error": None}
    if not smoke:
        try:
            dist.all_reduce(torch.ones(1))
            out["cpu_collective_raised"] = False
        except Exception as e:  # NCCL has no CPU backend: "No backend type associated with device type cpu"
            out["cpu_collective_raised"] = True
            out["cpu_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    parallel.destroy()
    return out


# ---- check 2: bf16 + distributed optimizer, save at 10, resume to 20 ----------------------

DISTRIBUTED_OPTIMIZER = ("--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather")


def train_args(mode: Mode, data: str, metrics: str, *extra: str, optimizer=DISTRIBUTED_OPTIMIZER) -> list[str]:
    return [*model_flags(mode.model), "--data-path", data, "--seq-length", str(mode.seq),
            "--micro-batch-size", str(mode.micro), "--global-batch-size", str(mode.global_batch),
            "--train-iters", "20", "--lr", "2e-3", "--lr-warmup-iters", "3", "--log-interval", "1",
            "--seed", "5", "--bf16", *optimizer, "--metrics-file", metrics, *extra]


def read_metrics(path: str) -> dict:
    """The last training record of each iteration; {} where the run wrote none."""
    from megatron_miniplm.training import metrics

    return metrics.read(path).train if os.path.exists(path) else {}


def train_uninterrupted(r: Runner, mode: Mode, data: str) -> tuple[Optional[str], str]:
    """Run A: 20 steps, saved at the end (score uses it too). Its save directory."""
    save = os.path.join(r.work, "run_a")
    if os.path.exists(os.path.join(save, "latest_checkpointed_iteration.txt")):
        return save, ""
    shutil.rmtree(save, ignore_errors=True)
    metrics = os.path.join(r.work, "run_a.jsonl")
    rc, out = r.torchrun(os.path.join(TOOLS, "pretrain_gpt.py"),
                         train_args(mode, data, metrics, "--save", save), timeout=180, label="train A (20 steps)")
    if rc != 0:
        return None, f"run A exited {rc}: {_last_error(out)}"
    return save, ""


def check_resume(r: Runner, mode: Mode, data: str) -> Result:
    save_a, why = train_uninterrupted(r, mode, data)
    if save_a is None:
        return Result("resume", False, why)
    save_b = os.path.join(r.work, "run_b")
    shutil.rmtree(save_b, ignore_errors=True)
    tool = os.path.join(TOOLS, "pretrain_gpt.py")
    mb, mc = os.path.join(r.work, "run_b.jsonl"), os.path.join(r.work, "run_c.jsonl")
    for path in (mb, mc):
        if os.path.exists(path):
            os.remove(path)
    rc, out = r.torchrun(tool, train_args(mode, data, mb, "--save", save_b, "--exit-interval", "10"),
                         timeout=180, label="train B (save at 10, exit)")
    if rc != 0:
        return Result("resume", False, f"run B exited {rc}: {_last_error(out)}")
    rc, out = r.torchrun(tool, train_args(mode, data, mc, "--save", save_b, "--load", save_b),
                         timeout=180, label="train C (resume 10 -> 20)")
    if rc != 0:
        return Result("resume", False, f"run C exited {rc}: {_last_error(out)}")
    if "resumed from" not in out:
        return Result("resume", False, "run C did not say 'resumed from ...'")
    return compare_resume(read_metrics(os.path.join(r.work, "run_a.jsonl")), read_metrics(mb), read_metrics(mc))


def compare_resume(a: dict, b: dict, c: dict) -> Result:
    if sorted(a) != list(range(1, 21)) or sorted(b) != list(range(1, 11)) or sorted(c) != list(range(11, 21)):
        return Result("resume", False, f"iterations logged: A {sorted(a)}, B {sorted(b)}, C {sorted(c)}")

    def diffs(x, y, its, key):
        return [abs(x[i][key] - y[i][key]) for i in its]

    first, resumed = range(1, 11), range(11, 21)
    floor = max(diffs(a, b, first, "loss") + diffs(a, b, first, "grad_norm"))
    loss_d, gn_d = diffs(a, c, resumed, "loss"), diffs(a, c, resumed, "grad_norm")
    figures = {"loss_A": [a[i]["loss"] for i in range(1, 21)], "loss_C": [c[i]["loss"] for i in resumed],
               "max_abs_loss_diff_11_20": max(loss_d), "max_abs_grad_norm_diff_11_20": max(gn_d),
               "run_to_run_max_diff_1_10": floor, "exact_11_20": sum(d == 0 for d in loss_d)}
    if not a[20]["loss"] < a[1]["loss"]:
        return Result("resume", False, f"loss did not fall: {a[1]['loss']:.4f} -> {a[20]['loss']:.4f}", figures)
    if floor == 0:
        ok = max(loss_d) == 0 and max(gn_d) == 0
        how = ("bit-identical" if ok else f"differs by {max(loss_d):.3g} (loss), {max(gn_d):.3g} (grad norm)")
        reason = (f"losses 11..20 {how} (steps 1..10 of two runs are bit-identical: deterministic "
                  f"kernels, so exact equality is required)")
    else:
        ok = max(loss_d) <= RESUME_LOSS_TOL
        reason = (f"losses 11..20 within {max(loss_d):.3g} of the uninterrupted run's (tolerance "
                  f"{RESUME_LOSS_TOL:g}; {figures['exact_11_20']}/10 exact; two identical runs already "
                  f"differ by {floor:.3g} over steps 1..10: nondeterministic kernels)")
    reason += f"; loss {a[1]['loss']:.4f} -> {a[20]['loss']:.4f}"
    return Result("resume", ok, reason, figures)


# ---- check 2b: bf16 with megatron-core's plain mixed-precision optimizer --------------------

def check_plain(r: Runner, mode: Mode, data: str) -> Result:
    """The demo's optimizer on the GPU: --bf16 without the distributed optimizer (its
    parameters are not copied into a device buffer by DDP, so a module left on the host
    shows here). Its first 10 steps (of run A's 20: the same learning-rate schedule) beside run
    A's, which starts from the same seed and data: the same math with another optimizer
    implementation, so the losses track closely (reported, not a pass condition: the two
    reduce in different orders)."""
    save_a, why = train_uninterrupted(r, mode, data)
    if save_a is None:
        return Result("plain", False, why)
    metrics = os.path.join(r.work, "run_plain.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    rc, out = r.torchrun(os.path.join(TOOLS, "pretrain_gpt.py"),
                         train_args(mode, data, metrics, "--exit-interval", "10", optimizer=()), timeout=150,
                         label="train bf16, plain optimizer (10 steps)")
    if rc != 0:
        return Result("plain", False, f"pretrain_gpt.py --bf16 (plain optimizer) exited {rc}: {_last_error(out)}")
    a, p = read_metrics(os.path.join(r.work, "run_a.jsonl")), read_metrics(metrics)
    if sorted(p) != list(range(1, 11)) or not all(abs(p[i]["loss"]) < 1e3 for i in p):
        return Result("plain", False, f"iterations logged {sorted(p)}, losses {[p[i]['loss'] for i in sorted(p)]}")
    diff = max(abs(p[i]["loss"] - a[i]["loss"]) for i in range(1, 11))
    return Result("plain", True, f"10 steps, loss {p[1]['loss']:.4f} -> {p[10]['loss']:.4f}; within {diff:.3g} "
                                 f"of the distributed optimizer's run", {"max_abs_loss_diff_vs_A": diff})


# ---- check 3: scoring on the GPU against CPU fp32 ----------------------------------------

def score(r: Runner, data: str, ckpt: str, prefix: str, *, cpu: bool, bf16: bool, extra=(), timeout=150,
          label="") -> tuple[int, str]:
    if os.path.exists(prefix + ".npy"):
        os.remove(prefix + ".npy")
    args = ["--data-path", data, "--load", ckpt, "--output-prefix", prefix, "--no-progress",
            *(["--bf16"] if bf16 else []), *extra]
    env = {"CUDA_VISIBLE_DEVICES": ""} if cpu else None
    return r.torchrun(os.path.join(TOOLS, "score_docs.py"), args, env=env, timeout=timeout, label=label)


def mean_nll(prefix: str):
    import numpy as np

    s = np.load(prefix + ".npy")
    counted = s[:, 1] > 0
    return s[counted, 0] / s[counted, 1], s[counted, 0]


def check_score(r: Runner, mode: Mode, data: str) -> Result:
    import numpy as np

    ckpt, why = train_uninterrupted(r, mode, data)
    if ckpt is None:
        return Result("score", False, why)
    runs = {"cpu-fp32": (True, False), "device-fp32": (False, False), "device-bf16": (False, True)}
    for name, (cpu, bf16) in runs.items():
        rc, out = score(r, data, ckpt, os.path.join(r.work, f"scores_{name}"), cpu=cpu, bf16=bf16,
                        label=f"score_docs {name}")
        if rc != 0:
            return Result("score", False, f"score_docs {name} exited {rc}: {_last_error(out)}")
        with open(os.path.join(r.work, f"scores_{name}.meta.json")) as f:
            backend = json.load(f)["parallel"]["backend"]
        if name == "cpu-fp32" and backend != "gloo":
            return Result("score", False, f"the CPU scoring run used {backend}, not the CPU's gloo")
    ref, ref_sum = mean_nll(os.path.join(r.work, "scores_cpu-fp32"))
    figures, problems, parts = {"instances": int(len(ref)), "cpu_fp32_mean_nll": float(ref.mean())}, [], []
    for name, dtype in (("device-fp32", "fp32"), ("device-bf16", "bf16")):
        got, got_sum = mean_nll(os.path.join(r.work, f"scores_{name}"))
        if got.shape != ref.shape:
            problems.append(f"{name}: {len(got)} counted instances, CPU {len(ref)}")
            continue
        d = float(np.abs(got - ref).max())
        figures[name] = {"max_abs_diff_mean_nll": d, "max_abs_diff_nll_sum": float(np.abs(got_sum - ref_sum).max()),
                         "mean_nll": float(got.mean()), "tolerance": SCORE_TOL[dtype]}
        parts.append(f"{name} vs cpu-fp32: max |d mean NLL| {d:.2e} (tol {SCORE_TOL[dtype]:g})")
        if not d <= SCORE_TOL[dtype]:
            problems.append(f"{name}: {d:.3g} > {SCORE_TOL[dtype]:g}")
    summary = f"{len(ref)} instances, CPU fp32 mean NLL {ref.mean():.4f}; " + "; ".join(parts)
    return Result("score", not problems, ("; ".join(problems) + " | " if problems else "") + summary, figures)


# ---- check 4: SDPA on the flash kernel ---------------------------------------------------

def check_flash(r: Runner, mode: Mode) -> Result:
    """On a GPU, a check; with --smoke (CPU: no flash kernel) only its flow, reported as INFO."""
    payload = {"presets": list(mode.flash_presets), "model": mode.flash_model, "seq": mode.flash_seq}
    got, why = r.worker("flash", payload, timeout=180, smoke=mode.smoke)
    if got is None:
        return Result("flash", False, why)
    if mode.smoke:
        ran = "; ".join(f"{c['name']}: {c['default_backend']}" for c in got["cases"])
        return Result("flash", None, f"flow only, nothing asserted on a CPU: {ran}; model {mode.flash_model}: "
                      f"{got['model']['sdpa_layers']}/{got['model']['layers']} SDPAttention layers", got)
    problems, parts = [], []
    for case in got["cases"]:
        name = case["name"]
        if case.get("forced_flash_error"):
            problems.append(f"{name}: under sdpa_kernel(FLASH_ATTENTION): {case['forced_flash_error']}")
        if case["default_backend"] not in ("flash", "cudnn"):
            kernels = ", ".join(case["attention_kernels"][:3])
            problems.append(f"{name}: default dispatch ran {case['default_backend']} ({kernels})")
        parts.append(f"{name}: {case['default_backend']}")
    model = got["model"]
    if model["sdpa_layers"] != model["layers"]:
        problems.append(f"build_model: SDPAttention in {model['sdpa_layers']} of {model['layers']} layers")
    if model["default_backend"] not in ("flash", "cudnn"):
        problems.append(f"build_model {mode.flash_model} forward+backward ran {model['default_backend']}")
    parts.append(f"model {mode.flash_model} ({model['sdpa_layers']}/{model['layers']} SDPAttention): "
                 f"{model['default_backend']}")
    return Result("flash", not problems, "; ".join(problems) or "; ".join(parts), got)


def attention_backend_of(kernel_names: list[str]) -> tuple[str, list[str]]:
    """Which SDPA implementation ran, from the CUDA kernel names: (backend, its kernels)."""
    # cuDNN first: its SDPA kernels are named like "cudnn_generated_..._sdpa_..._flash_fprop_...".
    kinds = (("cudnn", ("cudnn",)), ("flash", ("flash",)),
             ("mem-efficient", ("fmha", "efficient_attention", "cutlassf", "cutlassb")))
    for backend, keys in kinds:
        hits = [k for k in kernel_names if any(key in k.lower() for key in keys)]
        if hits:
            return backend, hits
    return "math (no fused attention kernel)", [k for k in kernel_names if "softmax" in k.lower()][:5]


def profiled_kernels(fn) -> list[str]:
    """Names of the CUDA kernels (on a CPU: the operators) that ``fn`` runs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    return sorted({e.key for e in prof.key_averages()})


def worker_flash(payload: dict, smoke: bool) -> dict:
    """The project's SDPAttention at each preset's attention shape, then a whole model built by
    build_model: which SDPA kernels run (and whether flash can take the shapes at all)."""
    import torch
    from megatron.core.transformer.enums import AttnMaskType
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_miniplm import parallel, platform
    from megatron_miniplm.models.attention import SDPAttention
    from megatron_miniplm.models.gpt import build_model, transformer_config

    parallel.initialize(parallel.ParallelConfig())
    device, bf16, s, b = platform.device(), torch.bfloat16, payload["seq"], 4
    cases = []
    for name in payload["presets"]:
        cfg = model_config(name)
        tcfg = transformer_config(cfg, params_dtype=bf16, bf16=True)
        attn = SDPAttention(tcfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")

        def fwd_bwd():
            q = torch.randn(s, b, cfg.num_attention_heads, cfg.head_dim, device=device, dtype=bf16, requires_grad=True)
            k, v = (torch.randn(s, b, cfg.kv_heads, cfg.head_dim, device=device, dtype=bf16, requires_grad=True)
                    for _ in range(2))
            attn(q, k, v, None).float().sum().backward()

        case = {"name": name, "heads": cfg.num_attention_heads, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim}
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                fwd_bwd()
        except RuntimeError as e:
            case["forced_flash_error"] = str(e).strip().splitlines()[0][:200]
        fwd_bwd()  # warm-up of the default dispatch
        case["default_backend"], case["attention_kernels"] = attention_backend_of(profiled_kernels(fwd_bwd))
        cases.append(case)
    cfg = model_config(payload["model"])
    model = build_model(cfg, params_dtype=bf16, bf16=True)
    tokens = torch.randint(1, cfg.vocab_size, (2, s), device=device)
    positions = torch.arange(s, device=device).expand(2, s)

    def step():
        model(tokens, positions, None, labels=tokens).float().mean().backward()

    step()
    backend, kernels = attention_backend_of(profiled_kernels(step))
    layers = [m for m in model.modules() if type(m).__name__ == "TransformerLayer"]
    sdpa = [m for m in model.modules() if isinstance(m, SDPAttention)]
    parallel.destroy()
    return {"cases": cases, "model": {"name": cfg.name, "layers": len(layers), "sdpa_layers": len(sdpa),
                                      "default_backend": backend, "attention_kernels": kernels[:6]}}


# ---- check 5: throughput and MFU ---------------------------------------------------------


def perf_train(r: Runner, mode: Mode) -> Result:
    cfg = model_config(mode.perf_train)
    instances = mode.perf_global * (mode.perf_iters + 1)
    data = random_dataset(os.path.join(r.work, "random", f"train_{cfg.name}"), cfg.vocab_size, mode.perf_seq, instances)
    args = [*model_flags(mode.perf_train), "--data-path", data, "--seq-length", str(mode.perf_seq),
            "--micro-batch-size", str(mode.perf_micro), "--global-batch-size", str(mode.perf_global),
            "--train-iters", str(mode.perf_iters), "--log-interval", str(mode.perf_log_interval),
            "--lr-warmup-iters", "2", "--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce",
            "--overlap-param-gather", "--metrics-file", os.path.join(r.work, "perf_train.jsonl")]
    metrics_file = os.path.join(r.work, "perf_train.jsonl")
    if os.path.exists(metrics_file):
        os.remove(metrics_file)
    rc, out = r.torchrun(os.path.join(TOOLS, "pretrain_gpt.py"), args, timeout=240, label=f"perf train {cfg.name}")
    label = f"train {cfg.name} seq {mode.perf_seq}"
    if rc != 0:
        return Result("perf-train", False, f"pretrain_gpt.py exited {rc}: {_last_error(out)}")
    from megatron_miniplm.training import metrics

    # the trainer's throughput records, one per logging window; the first holds start-up
    windows = [w for _, w in sorted(metrics.read(metrics_file).throughput.items())][1:]
    if not windows:
        return Result("perf-train", False, f"{metrics_file}: no throughput records after the first window")
    tps = sum(w["tokens_per_s"] for w in windows) / len(windows)
    mfus = [w["mfu"] for w in windows if w["mfu"] is not None]
    figures = {"label": label, "tokens_per_s": tps,
               "tflops": sum(w["tflops_per_device"] for w in windows) / len(windows),
               "mfu": sum(mfus) / len(mfus) if mfus else None, "ms_per_iter": [round(w["ms_per_iter"]) for w in windows],
               "batch": f"micro {mode.perf_micro}, global {mode.perf_global}",
               "target": None if mode.smoke else TARGETS["perf-train"]}
    first = windows[0]["iteration"] - windows[0]["window_iterations"] + 1
    return Result("perf-train", None, f"{tps:,.0f} tokens/s over iterations {first}..{windows[-1]['iteration']}",
                  figures)


def perf_score(r: Runner, mode: Mode) -> list[Result]:
    import torch

    from megatron_miniplm.training.flops import peak_flops_of, training_flops_per_token

    peak = peak_flops_of(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    ckpts = {preset: os.path.join(r.work, "random", f"ckpt_{preset}") for _, preset, _ in mode.perf_score}
    todo = [{"preset": p, "dir": d} for p, d in ckpts.items()
            if not os.path.exists(os.path.join(d, "model_config.json"))]
    if todo:
        got, why = r.worker("random-checkpoints", {"models": todo}, timeout=240, smoke=mode.smoke)
        if got is None:
            return [Result(f"perf-score {label}", False, why) for label, *_ in mode.perf_score]
    results = []
    for label, preset, instances in mode.perf_score:
        cfg = model_config(preset)
        name = f"perf-score {label}"
        # A first session on a few instances of the same length: the scorer picks the same batch
        # shape, so torch.compile's on-disk caches hold the fused kernels for the timed session.
        warm = random_dataset(os.path.join(r.work, "random", f"warm_{preset}"), cfg.vocab_size, mode.perf_seq,
                              mode.perf_score_warmup, seed=2)
        rc, out = score(r, warm, ckpts[preset], os.path.join(r.work, "random", f"scores_warm_{preset}"),
                        cpu=False, bf16=True, timeout=150, label=f"perf score {label} (warm-up)")
        if rc != 0:
            results.append(Result(name, False, f"score_docs.py (warm-up) exited {rc}: {_last_error(out)}"))
            continue
        data = random_dataset(os.path.join(r.work, "random", f"score_{preset}"), cfg.vocab_size, mode.perf_seq,
                              instances, seed=1)
        prefix = os.path.join(r.work, "random", f"scores_{preset}")
        rc, out = score(r, data, ckpts[preset], prefix, cpu=False, bf16=True, timeout=180, label=f"perf score {label}")
        summary = scorer_summary(out, prefix)
        if rc != 0 or summary is None:
            results.append(Result(name, False, f"score_docs.py exited {rc}: {_last_error(out)}"))
            continue
        tokens, seconds, tps = summary
        flops = training_flops_per_token(cfg, mode.perf_seq) / 3  # forward only
        sizes = re.search(r"sizes: (.*)", out)
        figures = {"label": f"score {label} seq {mode.perf_seq}", "tokens_per_s": tps, "tflops": tps * flops / 1e12,
                   "mfu": 100 * tps * flops / peak if peak else None, "tokens": tokens, "seconds": seconds,
                   "batch": _scorer_batch(sizes.group(1) if sizes else ""),
                   "sizes": sizes.group(1).strip() if sizes else None,
                   "target": None if mode.smoke else TARGETS.get(f"perf-score {preset}")}
        results.append(Result(name, None, f"{tps:,.0f} tokens/s over {tokens:,} tokens in {seconds:.1f} s", figures))
    return results


def _scorer_batch(sizes: str) -> str:
    """The batch the scorer chose by itself, from its 'sizes:' line."""
    m = re.search(r"micro-batch (\d+)", sizes)
    return f"defaults: micro-batch {m.group(1)}" if m else "scorer defaults"


def scorer_summary(out: str, prefix: str) -> Optional[tuple]:
    """(tokens, seconds, tokens/s) of the session, from the score file's meta."""
    if os.path.exists(prefix + ".meta.json"):
        with open(prefix + ".meta.json") as f:
            meta = json.load(f)
        if meta.get("tokens_per_s"):
            return int(meta["tokens_this_session"]), float(meta["elapsed_s"]), float(meta["tokens_per_s"])
    return None


def worker_random_checkpoints(payload: dict, smoke: bool) -> dict:
    """Random-weight bf16 checkpoints of the given presets (the scorer reads them as any other)."""
    import torch

    from megatron_miniplm import parallel
    from megatron_miniplm.dist_checkpoint import save_model
    from megatron_miniplm.models.gpt import build_model

    parallel.initialize(parallel.ParallelConfig(seed=7))
    made = []
    for m in payload["models"]:
        cfg = model_config(m["preset"])
        model = build_model(cfg, params_dtype=torch.bfloat16, bf16=True)
        shutil.rmtree(m["dir"], ignore_errors=True)
        os.makedirs(m["dir"])
        save_model([model], m["dir"], cfg)
        made.append(m["dir"])
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    parallel.destroy()
    return {"made": made}


# ---- report -----------------------------------------------------------------------------

def report(env: dict, results: list[Result], mode: Mode, elapsed: float, startup: dict) -> tuple[str, dict]:
    lines = ["", "what runs where, as the tools' start-up lines say:"]
    lines += [f"  [{label}] {line}" for line, label in startup.items()] or ["  (no start-up line seen)"]
    lines += ["", "GPU check" + (" (smoke, CPU)" if mode.smoke else ""), ""]
    checks = [x for x in results if x.ok is not None]
    perf = [x for x in results if x.ok is None and "tokens_per_s" in x.figures]
    for x in results:
        if x not in perf:
            lines.append(f"{MARK[x.ok]}  {x.name:<28} {x.reason}")
    if perf:
        lines += ["", f"{'throughput':<52} {'tokens/s':>12} {'TFLOP/s':>9} {'MFU':>7} {'target':>7}  result"]
        for x in perf:
            f = x.figures
            target = f.get("target")
            mfu = f"{f['mfu']:.1f}%" if f.get("mfu") is not None else "n/a"
            verdict = "-" if target is None or f.get("mfu") is None else ("met" if f["mfu"] >= target else "MISSED")
            tgt = f">={target:g}%" if target is not None else "-"
            lines.append(f"{f['label'] + ' (' + f['batch'] + ')':<52} {f['tokens_per_s']:>12,.0f} "
                         f"{f['tflops']:>9.2f} {mfu:>7} {tgt:>7}  {verdict}")
    failed = [x.name for x in checks if not x.ok]
    lines += ["", f"{len(checks) - len(failed)}/{len(checks)} checks passed in {elapsed:.0f} s"
              + (f"; failed: {', '.join(failed)}" if failed else "")]
    data = {"environment": env, "startup_lines": startup, "mode": dataclasses.asdict(mode), "elapsed_s": elapsed,
            "results": [dataclasses.asdict(x) for x in results], "failed": failed}
    return "\n".join(lines), data


def print_environment(env: dict) -> None:
    for key in ("gpu", "capability", "python", "torch", "cuda", "nccl", "megatron_core", "transformer_engine",
                "cpp_extension"):
        if key in env:
            print(f"{key:<20} {env[key]}", flush=True)


# ---- main -------------------------------------------------------------------------------

def run_checks(r: Runner, mode: Mode, only: set) -> list[Result]:
    results: list[Result] = []

    def done(x: Result):
        results.append(x)
        print(f"{MARK[x.ok]}  {x.name:<28} {x.reason}   [{r.left():.0f} s of budget left]", flush=True)

    if "nccl" in only:
        done(check_nccl(r, mode))
    if only & {"resume", "plain", "score"}:
        data, why = build_corpus(r, mode)
        for name, check in (("resume", check_resume), ("plain", check_plain), ("score", check_score)):
            if name in only:
                done(check(r, mode, data) if data else Result(name, False, why))
    if "flash" in only:
        done(check_flash(r, mode))
    if "perf-train" in only:
        done(perf_train(r, mode))
    if "perf-score" in only:
        for x in perf_score(r, mode):
            done(x)
    return results


def run_worker(name: str, payload: dict, smoke: bool) -> int:
    fn = {"nccl": worker_nccl, "flash": worker_flash, "random-checkpoints": worker_random_checkpoints}[name]
    print(RESULT_TAG + json.dumps(fn(payload, smoke)), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the whole flow on the CPU, tiny shapes")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "runs", "gpu_check"),
                    help="where the table, the JSON and the logs go (default: $OUT)")
    ap.add_argument("--work", default=None, help="scratch directory (default: /tmp/gpu_check[_smoke])")
    ap.add_argument("--part", choices=sorted(PARTS), default=None,
                    help="one of the two device calls: " + "; ".join(f"{k}: {','.join(v)}" for k, v in PARTS.items())
                         + f" (budget {PART_BUDGET_S} s each on a GPU)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(CHECKS)}")
    ap.add_argument("--budget-s", type=float, default=None, help="overall time budget in seconds (GPU 400, smoke 1500)")
    ap.add_argument("--keep", action="store_true", help="reuse the scratch directory's corpus and checkpoints")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--payload", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return run_worker(args.worker, json.loads(args.payload), args.smoke)

    start = time.monotonic()
    mode = SMOKE_MODE if args.smoke else GPU_MODE
    if args.part and not args.smoke:
        mode = dataclasses.replace(mode, budget_s=PART_BUDGET_S)
    if args.budget_s:
        mode = dataclasses.replace(mode, budget_s=args.budget_s)
    if args.part and args.only:
        ap.error("--part and --only: give one of them")
    chosen = PARTS[args.part] if args.part else (args.only.split(",") if args.only else CHECKS)
    only = {c.strip() for c in chosen if c.strip()}
    unknown = only - set(CHECKS)
    if unknown:
        ap.error(f"unknown checks {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    work = args.work or ("/tmp/gpu_check_smoke" if args.smoke else "/tmp/gpu_check")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)

    env = environment()
    print_environment(env)
    if not args.smoke and not env["cuda_available"]:
        print("FAIL  no CUDA device: run with --smoke on a machine without one", flush=True)
        return 1
    r = Runner(work, mode.budget_s, os.path.join(args.out, "gpu_check_logs.txt"))
    results = run_checks(r, mode, only)
    text, data = report(env, results, mode, time.monotonic() - start, r.startup_lines)
    print(text, flush=True)
    with open(os.path.join(args.out, "gpu_check.txt"), "w") as f:
        f.write("\n".join(f"{k:<20} {env[k]}" for k in env) + "\n" + text + "\n")
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(data, f, indent=2)
    return 1 if data["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
