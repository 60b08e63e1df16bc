"""The training step against plain PyTorch: ten steps of tools/pretrain_gpt.py and a hand-written
loop over the same instances from the same weights (a transformers model of the exported
step-0 checkpoint) give the same loss, gradient norm and learning rate at every step.

The reference implements the documented rules and nothing of the project's training code:
the loss is the mean NLL per counted token of the global batch (not per micro-batch); a
prediction counts unless its input token is EOD (padding is EOD); AdamW with beta 0.9/0.98,
eps 1e-8 and decoupled weight decay 0.1 on every matrix but not on biases and norms (as
Megatron-LM); the gradient clipped by its global norm; Megatron-LM's linear warm-up from 0
(with --lr-warmup-fraction, a fraction of an iteration too) then cosine decay to lr / 10.
The scheduler steps after the optimizer, so step k trains at the rate of k - 1 completed
steps and the logged rate is the next step's, as in Megatron-LM. Under Vanilla KD each counted
token's loss is (1 - r) LM + r T^2 KL(teacher || student) over the full vocabulary at
temperature T, with the teacher's logits from its own transformers model."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from corpus import EOD, write_dataset
from distributed import run_distributed
from presets import model_flags
from trainer_helpers import metrics, train

SEQ, VOCAB, MICRO, GLOBAL, ITERS = 32, 512, 2, 8, 10
LR, DECAY, WARMUP_FRACTION, CLIP = 3e-3, 8, 0.3125, 0.5  # warm-up: 2.5 iterations
KD_RATIO, KD_T = 0.5, 2.0


def _instances(n=50, seed=7) -> list:
    """Random tokens of 3 to SEQ + 1 tokens, some with EODs inside (document boundaries)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.integers(1, VOCAB, size=int(rng.integers(3, SEQ + 2)))
        x[rng.integers(0, len(x), size=int(rng.integers(0, 3)))] = EOD
        if rng.random() < 0.7:
            x[-1] = EOD
        out.append(x.astype(np.int64))
    return out


def _flags(data, model="tiny"):
    return [*model_flags(model), "--data-path", data, "--data-order", "original", "--seq-length", str(SEQ),
            "--micro-batch-size", str(MICRO), "--global-batch-size", str(GLOBAL), "--lr", str(LR),
            "--lr-warmup-fraction", str(WARMUP_FRACTION), "--lr-decay-iters", str(DECAY),
            "--clip-grad", str(CLIP), "--seed", "5", "--log-interval", "1"]


def _lr(steps: int) -> float:
    """Megatron-LM's rate after ``steps`` completed steps: warm-up, cosine decay, floor."""
    warmup, floor = WARMUP_FRACTION * DECAY, LR / 10
    if steps <= warmup:
        return LR * steps / warmup
    if steps > DECAY:
        return floor
    return floor + 0.5 * (math.cos(math.pi * (steps - warmup) / (DECAY - warmup)) + 1) * (LR - floor)


def _micro_batch(instances):
    """(inputs, labels, mask) padded with EOD to SEQ; a prediction counts unless its input is EOD."""
    tokens = torch.full((len(instances), SEQ + 1), EOD)
    mask = torch.zeros(len(instances), SEQ)
    for row, x in enumerate(instances):
        tokens[row, :len(x)] = torch.from_numpy(x)
        mask[row, :len(x) - 1] = torch.from_numpy(x[:-1] != EOD).float()
    return tokens[:, :-1], tokens[:, 1:], mask


def _adamw(params, state, step, lr, coeff):
    """One AdamW step on gradients times ``coeff``; no decay on biases and norms (1-D tensors)."""
    b1, b2, eps, wd = 0.9, 0.98, 1e-8, 0.1
    with torch.no_grad():
        for name, p in params:
            g = p.grad * coeff
            m, v = state.setdefault(name, (torch.zeros_like(p), torch.zeros_like(p)))
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            if p.ndim > 1:
                p.mul_(1 - lr * wd)
            p.sub_(lr * (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + eps))


def _micro_batch_losses(model, teacher, inputs, labels, mask, counted):
    """The micro-batch's share of the global batch's mean loss per counted token: the LM loss and,
    with a teacher, T^2 KL(teacher || student) at temperature T over the full vocabulary, mixed
    (1 - r) LM + r KD. Returns (mixed, LM, KD)."""
    logits = model(input_ids=inputs).logits.float()
    nll = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
    lm = (nll * mask.reshape(-1)).sum() / counted
    if teacher is None:
        return lm, lm, torch.zeros(())
    with torch.no_grad():
        log_pt = F.log_softmax(teacher(input_ids=inputs).logits.float() / KD_T, dim=-1)
    kl = (log_pt.exp() * (log_pt - F.log_softmax(logits / KD_T, dim=-1))).sum(-1) * KD_T ** 2
    kd = (kl * mask).sum() / counted
    return (1 - KD_RATIO) * lm + KD_RATIO * kd, lm, kd


def _load_hf(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


def _reference(hf_dir, instances, teacher_dir=None) -> list:
    """{loss, lm, kd, counted, grad_norm, lr (the logged one)} of each step of the hand-written loop."""
    model = _load_hf(hf_dir).train()
    teacher = _load_hf(teacher_dir).eval() if teacher_dir else None
    params, state, out = list(model.named_parameters()), {}, []
    for it in range(ITERS):
        samples = [instances[(it * GLOBAL + i) % len(instances)] for i in range(GLOBAL)]
        batches = [_micro_batch(samples[m:m + MICRO]) for m in range(0, GLOBAL, MICRO)]
        counted = sum(mask.sum() for _, _, mask in batches)
        model.zero_grad()
        totals = torch.zeros(3, dtype=torch.float64)
        for inputs, labels, mask in batches:
            losses = _micro_batch_losses(model, teacher, inputs, labels, mask, counted)
            losses[0].backward()
            totals += torch.stack(losses).detach().double()
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for _, p in params)).item()
        _adamw(params, state, it + 1, _lr(it), min(1.0, CLIP / (norm + 1e-6)))
        loss, lm, kd = totals.tolist()
        out.append({"loss": loss, "lm": lm, "kd": kd, "counted": float(counted), "grad_norm": norm,
                    "lr": _lr(it + 1)})
    return out


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """The corpus, its instances, and the step-0 checkpoint, also exported to transformers."""
    root = tmp_path_factory.mktemp("reference-step")
    instances = _instances()
    data = write_dataset(str(root / "train"), instances, VOCAB, SEQ)
    run_distributed(train, 1, [*_flags(data), "--train-iters", "0", "--save", str(root / "init")])
    _export(root / "init", root / "hf")
    return root, data, instances


def _export(load, save):
    from megatron_miniplm.cli import convert_checkpoint

    assert convert_checkpoint.main(["--direction", "megatron-to-hf", "--load", str(load), "--save", str(save),
                                    "--dtype", "fp32", "--no-model-card"]) == 0


def _check(got: dict, ref: list, *losses) -> None:
    assert len(got) == ITERS
    for it, want in enumerate(ref, start=1):
        assert got[it]["counted_tokens"] == want["counted"], it
        for name, key in losses:
            assert got[it][name] == pytest.approx(want[key], abs=2e-6), (name, it)
        assert got[it]["grad_norm"] == pytest.approx(want["grad_norm"], rel=5e-6), it
        assert got[it]["lr"] == pytest.approx(want["lr"], rel=1e-9, abs=1e-15), it
    assert all(r["grad_norm"] > CLIP for r in ref)  # clipping acted on every step


def test_steps_match_plain_pytorch(start, tmp_path):
    root, data, instances = start
    m = tmp_path / "m.jsonl"
    run_distributed(train, 1, [*_flags(data), "--train-iters", str(ITERS), "--load", str(root / "init"),
                               "--metrics-file", str(m)])
    ref = _reference(str(root / "hf"), instances)
    _check(metrics(m), ref, ("loss", "loss"))
    assert ref[-1]["loss"] < ref[0]["loss"]


def test_vanilla_kd_steps_match_plain_pytorch(start, tmp_path):
    """Vanilla KD from a teacher of another shape (GQA, no QKV bias) at ratio 0.5, temperature 2."""
    root, data, instances = start
    teacher = tmp_path / "teacher"
    run_distributed(train, 1, [*_flags(data, "tiny-gqa"), "--seed", "9", "--train-iters", "0",
                               "--save", str(teacher)])
    _export(teacher, tmp_path / "hf-teacher")
    m = tmp_path / "m.jsonl"
    run_distributed(train, 1, [*_flags(data), "--train-iters", str(ITERS), "--load", str(root / "init"),
                               "--metrics-file", str(m), "--kd-teacher-load", str(teacher),
                               "--kd-ratio", str(KD_RATIO), "--kd-temperature", str(KD_T)])
    ref = _reference(str(root / "hf"), instances, str(tmp_path / "hf-teacher"))
    _check(metrics(m), ref, ("loss", "loss"), ("lm_loss", "lm"), ("kd_loss", "kd"))
    assert all(r["kd"] > 0 for r in ref)


def test_help_names_the_loss_rules_that_differ_from_megatron_lm():
    """The loss rules the reference implements that are not Megatron-LM's defaults are in --help,
    under Megatron-LM's names for them, and so are the schedule's."""
    from megatron_miniplm.cli.pretrain_gpt import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "mean NLL per counted token of the global batch" in text
    assert "--calculate-per-token-loss, always on" in text
    assert "unless its input token is EOD" in text and "--eod-mask-loss, always on" in text
    assert "A warm-up as long as the decay or longer (Megatron-LM refuses it)" in text
    assert "decay after the warm-up (MiniPLM's recipe; Megatron-LM's default is linear)" in text
