#!/usr/bin/env python
"""Training-step throughput: megatron-miniplm's engine against a plain PyTorch GPT.

Same shape, dtype, batch and optimizer (AdamW, clipping 1.0), one process,
measured in the same run with the two interleaved (A B A B ...) so that machine
noise hits both alike. Prints tokens/s of each and the ratio (target >= 0.9).
With a GPU it also prints TFLOP/s and MFU.

    python benchmarks/bench_train.py [--preset NAME] [--seq-length 256] [--micro-batch-size 8] [--bf16]
    python benchmarks/bench_train.py --kd-teacher-load CKPT [--bf16]   # Vanilla KD step vs plain step

With --kd-teacher-load (e.g. SmolLM2-135M converted by tools/convert_checkpoint.py; without
a path the packaged GGUF is converted into a temporary directory) it measures instead the
cost of a Vanilla KD training step against a plain step of the same student (vocabulary
the teacher's), interleaved likewise, and the FLOPs each counts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from megatron_miniplm import parallel, platform
from megatron_miniplm.models.config import ModelConfig, get_preset
from megatron_miniplm.training import engine
from megatron_miniplm.training.flops import device_peak_flops, training_flops_per_token
from plain_gpt import PlainGPT  # benchmarks/plain_gpt.py: a script's own directory is on the path

BENCH_MODEL = ModelConfig(  # ~9M parameters: a CPU-sized member of the paper's family
    name="bench-9M", num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
    vocab_size=16384, max_position_embeddings=2048,
)


def make_batches(config, micro, seq, count, device):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        tokens = torch.randint(1, config.vocab_size, (micro, seq + 1), generator=g)
        out.append({"tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device),
                    "loss_mask": torch.ones(micro, seq, device=device),
                    "position_ids": torch.arange(seq, device=device).expand(micro, seq)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", help="model preset (default: a 9M-parameter member of the family)")
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--kd-teacher-load", nargs="?", const="smollm2", default=None,
                    help="measure a Vanilla KD step against a plain one (no path: the packaged SmolLM2-135M)")
    args = ap.parse_args()
    if args.kd_teacher_load:
        return kd_main(args)

    config = get_preset(args.preset) if args.preset else BENCH_MODEL
    parallel.initialize(parallel.ParallelConfig(seed=1))
    device = platform.device()
    on_gpu = device.type == "cuda"
    seq, micro = args.seq_length, args.micro_batch_size
    batches = make_batches(config, micro, seq, args.steps, device)

    chunks = engine.build_model_chunks(config, bf16=args.bf16)
    optimizer = engine.build_optimizer(chunks, engine.OptimizerSettings(lr=1e-4), bf16=args.bf16)

    def ours_step():
        engine.train_step(chunks, optimizer, iter(batches[:1]), num_microbatches=1,
                          micro_batch_size=micro, seq_length=seq)

    plain = PlainGPT(config, seq).to(device)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.1)

    def plain_step():
        b = batches[0]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = plain(b["tokens"], b["labels"], b["loss_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def timed(step):
        step()  # warm-up of this round
        if on_gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        if on_gpu:
            torch.cuda.synchronize()
        return micro * seq * args.steps / (time.perf_counter() - t)

    ours_tps, plain_tps = [], []
    for _ in range(args.rounds):
        ours_tps.append(timed(ours_step))
        if not args.skip_baseline:
            plain_tps.append(timed(plain_step))
    ours_best = statistics.median(ours_tps)
    dtype = "bf16" if args.bf16 else "fp32"
    print(f"model {config.name}: {config.num_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}; batch {micro} x {seq}; {dtype}; device {device}; "
          f"threads {torch.get_num_threads()}")
    flops = training_flops_per_token(config, seq)
    peak = device_peak_flops()
    line = f"megatron-miniplm: {ours_best:10.0f} tokens/s  ({ours_best * flops / 1e12:.3f} TFLOP/s"
    print(line + (f", MFU {100 * ours_best * flops / peak:.1f}%)" if peak else ")"))
    if plain_tps:
        plain_best = statistics.median(plain_tps)
        print(f"plain PyTorch:    {plain_best:10.0f} tokens/s  ({plain_best * flops / 1e12:.3f} TFLOP/s)")
        print(f"ratio (ours / plain): {ours_best / plain_best:.2f}x   (target >= 0.9x)")
    parallel.destroy()
    return 0


def _packaged_teacher(directory: str) -> str:
    import subprocess

    from megatron_miniplm.conversion.gguf import find_packaged_gguf

    out = os.path.join(directory, "teacher")
    subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools",
                    "convert_checkpoint.py"), "--direction", "hf-to-megatron", "--load", find_packaged_gguf(),
                    "--save", out], check=True, stdout=subprocess.DEVNULL)
    return out


def kd_main(args) -> int:
    import tempfile
    from functools import partial

    from megatron_miniplm.dist_checkpoint import load_model_config
    from megatron_miniplm.scoring.model import resolve_checkpoint
    from megatron_miniplm.training.kd import Teacher, kd_forward_step
    from megatron_miniplm.training.config import KDSettings

    with tempfile.TemporaryDirectory() as tmp:
        load = _packaged_teacher(tmp) if args.kd_teacher_load == "smollm2" else args.kd_teacher_load
        teacher_config = load_model_config(load)
        parallel.initialize(parallel.ParallelConfig(seed=1))
        config = (get_preset(args.preset) if args.preset else BENCH_MODEL).replace(vocab_size=teacher_config.vocab_size)
        seq, micro = args.seq_length, args.micro_batch_size
        batches = make_batches(config, micro, seq, 1, platform.device())
        chunks = engine.build_model_chunks(config, bf16=args.bf16)
        optimizer = engine.build_optimizer(chunks, engine.OptimizerSettings(lr=1e-4), bf16=args.bf16)
        settings = KDSettings(kd_teacher_load=load)
        tokenizer = (resolve_checkpoint(load).info or {}).get("tokenizer") or {"vocab_size": config.vocab_size}
        teacher = Teacher(settings, config, bf16=args.bf16, data_path="synthetic (the teacher's tokenizer)",
                          data_tokenizer=tokenizer)
        kd_step = partial(kd_forward_step, teacher, settings)

        def step(forward):
            engine.train_step(chunks, optimizer, iter(batches), num_microbatches=1, micro_batch_size=micro,
                              seq_length=seq, forward_step=forward)

        def timed(forward):
            step(forward)
            t = time.perf_counter()
            for _ in range(args.steps):
                step(forward)
            return args.steps / (time.perf_counter() - t)

        plain, kd = [], []
        for _ in range(args.rounds):
            plain.append(timed(engine.gpt_forward_step))
            kd.append(timed(kd_step))
        p, k = statistics.median(plain), statistics.median(kd)
        student_flops = training_flops_per_token(config, seq)
        teacher_flops = training_flops_per_token(teacher_config, seq) / 3
        print(f"student {config.num_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}; "
              f"teacher {teacher_config.name} ({teacher_config.num_layers} layers, hidden {teacher_config.hidden_size}); "
              f"batch {micro} x {seq}; {'bf16' if args.bf16 else 'fp32'}; device {platform.device()}; "
              f"threads {torch.get_num_threads()}")
        print(f"plain step:      {1000 / p:8.0f} ms  ({micro * seq * p:8.0f} tokens/s)")
        print(f"Vanilla KD step: {1000 / k:8.0f} ms  ({micro * seq * k:8.0f} tokens/s)")
        print(f"KD step / plain step: {p / k:.2f}x the time; FLOPs per token {student_flops / 1e9:.3f} G "
              f"+ teacher forward {teacher_flops / 1e9:.3f} G = {(student_flops + teacher_flops) / student_flops:.2f}x")
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
