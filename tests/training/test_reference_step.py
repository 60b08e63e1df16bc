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
steps and the logged rate is the next step's, as in Megatron-LM."""

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


def _flags(data):
    return [*model_flags("tiny"), "--data-path", data, "--data-order", "original", "--seq-length", str(SEQ),
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


def _reference(hf_dir, instances) -> list:
    """(loss, counted tokens, grad norm, logged lr) of each step of the hand-written loop."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                              attn_implementation="eager")
    model.train()
    params, state, out = list(model.named_parameters()), {}, []
    for it in range(ITERS):
        samples = [instances[(it * GLOBAL + i) % len(instances)] for i in range(GLOBAL)]
        batches = [_micro_batch(samples[m:m + MICRO]) for m in range(0, GLOBAL, MICRO)]
        counted = sum(mask.sum() for _, _, mask in batches)
        model.zero_grad()
        total = 0.0
        for inputs, labels, mask in batches:
            logits = model(input_ids=inputs).logits.float()
            nll = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
            loss = (nll * mask.reshape(-1)).sum() / counted
            loss.backward()
            total += loss.item()
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for _, p in params)).item()
        _adamw(params, state, it + 1, _lr(it), min(1.0, CLIP / (norm + 1e-6)))
        out.append((total, float(counted), norm, _lr(it + 1)))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The corpus, the step-0 checkpoint exported to transformers, and ten steps' metrics."""
    from megatron_miniplm.cli import convert_checkpoint

    root = tmp_path_factory.mktemp("reference-step")
    instances = _instances()
    data = write_dataset(str(root / "train"), instances, VOCAB, SEQ)
    run_distributed(train, 1, [*_flags(data), "--train-iters", "0", "--save", str(root / "init")])
    assert convert_checkpoint.main(["--direction", "megatron-to-hf", "--load", str(root / "init"),
                                    "--save", str(root / "hf"), "--dtype", "fp32", "--no-model-card"]) == 0
    m = root / "m.jsonl"
    run_distributed(train, 1, [*_flags(data), "--train-iters", str(ITERS), "--load", str(root / "init"),
                               "--metrics-file", str(m)])
    return instances, str(root / "hf"), metrics(m)


def test_steps_match_plain_pytorch(run):
    instances, hf_dir, got = run
    ref = _reference(hf_dir, instances)
    assert len(got) == ITERS
    for it, (loss, counted, norm, lr) in enumerate(ref, start=1):
        assert got[it]["counted_tokens"] == counted, it
        assert got[it]["loss"] == pytest.approx(loss, abs=2e-6), it
        assert got[it]["grad_norm"] == pytest.approx(norm, rel=5e-6), it
        assert got[it]["lr"] == pytest.approx(lr, rel=1e-9, abs=1e-15), it
    assert all(norm > CLIP for _, _, norm, _ in ref)  # clipping acted on every step
    assert ref[-1][0] < ref[0][0]


def test_help_names_the_loss_rules_that_differ_from_megatron_lm():
    """The two rules the reference implements that are not Megatron-LM's defaults are in --help,
    under Megatron-LM's names for them."""
    from megatron_miniplm.cli.pretrain_gpt import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "mean NLL per counted token of the global batch" in text
    assert "--calculate-per-token-loss, always on" in text
    assert "unless its input token is EOD" in text and "--eod-mask-loss, always on" in text
