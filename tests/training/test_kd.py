"""Vanilla KD: the vocabulary-parallel KL against plain PyTorch (values and gradients, TP=1
and TP=2, padding rows, temperatures), the mixed loss of real models against full logits
(padding and EOD masked), ratio 0 = no KD, the frozen teacher, exact resume, refusals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from trainer_helpers import TOOL, args, metrics, refuses, train

V, REAL, H, N = 48, 45, 16, 13  # vocabulary rows (3 of them padding), hidden size, rows


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, V, generator=g, dtype=torch.float64).float() * 3, torch.randn(N, H, generator=g),
            torch.randn(V, H, generator=g))


def _reference(logits, hidden, weight, T):
    """T^2 KL(softmax(t/T) || softmax(s/T)) over the real vocabulary, with autograd."""
    s = logits[:, :REAL] / T
    t = (hidden @ weight.t())[:, :REAL] / T
    log_pt = F.log_softmax(t, dim=1)
    return (log_pt.exp() * (log_pt - F.log_softmax(s, dim=1))).sum(dim=1) * T * T


def _kl_on_ranks(out_dir, T):
    from megatron_miniplm import parallel
    from megatron_miniplm.training.kd import vocab_parallel_kl
    from megatron.core import parallel_state as ps

    info = parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=2))
    logits, hidden, weight = _inputs()
    local = V // 2
    lo = info.tp_rank * local
    mine = logits[:, lo:lo + local].clone().requires_grad_(True)
    kl = vocab_parallel_kl(mine, hidden, weight[lo:lo + local], real=max(0, min(local, REAL - lo)),
                           temperature=T, chunk_tokens=4, group=ps.get_tensor_model_parallel_group())
    g = torch.linspace(0.5, 1.5, N)
    (kl * g).sum().backward()
    torch.save({"kl": kl.detach(), "grad": mine.grad}, os.path.join(out_dir, f"rank{info.tp_rank}.pt"))


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_vocab_parallel_kl_equals_pytorch(tmp_path, T):
    from megatron_miniplm.training.kd import vocab_parallel_kl

    logits, hidden, weight = _inputs()
    g = torch.linspace(0.5, 1.5, N)
    ref_logits = logits.clone().requires_grad_(True)
    want = _reference(ref_logits, hidden, weight, T)
    (want * g).sum().backward()

    one = logits.clone().requires_grad_(True)
    got = vocab_parallel_kl(one, hidden, weight, real=REAL, temperature=T, chunk_tokens=4)
    (got * g).sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(one.grad, ref_logits.grad, rtol=0, atol=1e-5)
    assert (one.grad[:, REAL:] == 0).all()

    run_distributed(_kl_on_ranks, 2, str(tmp_path), T)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for part in parts:
        torch.testing.assert_close(part["kl"], want.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts], dim=1), ref_logits.grad, rtol=0, atol=1e-5)


# ---- the mixed loss of real models ---------------------------------------------------------

SEQ, MICRO = 16, 3
TOKENIZER = {"vocab_size": 500, "eod_id": 0, "pad_id": 0, "sha256": None}


def _save_models(root):
    """A student (tiny) and a teacher (tiny-gqa: GQA, no QKV bias) at TP=1, vocabulary 500."""
    from megatron_miniplm import parallel
    from megatron_miniplm.dist_checkpoint import save_model
    from megatron_miniplm.models.gpt import build_model
    from presets import get_preset

    parallel.initialize(parallel.ParallelConfig(seed=11))
    for name, preset in (("student", "tiny"), ("teacher", "tiny-gqa")):
        config = get_preset(preset).replace(vocab_size=500)
        os.makedirs(os.path.join(root, name))
        save_model([build_model(config)], os.path.join(root, name), config)


def _batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 500, (MICRO, SEQ + 1), generator=g)
    tokens[0, 5] = 0  # EOD: the prediction from it does not count
    mask = torch.ones(MICRO, SEQ)
    mask[0, 5] = 0
    mask[2, 11:] = 0  # padding
    tokens[2, 12:] = 0
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": mask,
            "position_ids": torch.arange(SEQ).expand(MICRO, SEQ).contiguous()}


def _kd_loss(root, tp, temperatures, out):
    from megatron_miniplm import parallel
    from megatron_miniplm.dist_checkpoint import load_model, load_model_config
    from megatron_miniplm.models.gpt import build_model
    from megatron_miniplm.training.kd import Teacher, kd_forward_step
    from megatron_miniplm.training.config import KDSettings

    info = parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=tp, seed=11))
    config = load_model_config(os.path.join(root, "student"))
    student = build_model(config)
    load_model([student], os.path.join(root, "student"))
    results = {}
    for T in temperatures:
        settings = KDSettings(kd_teacher_load=os.path.join(root, "teacher"), kd_ratio=0.3, kd_temperature=T)
        teacher = Teacher(settings, config, bf16=False, data_tokenizer=TOKENIZER, data_path="test")
        logits, loss_func = kd_forward_step(teacher, settings, iter([_batch()]), student)
        total, count, reports = loss_func(logits)
        total.backward()
        results[T] = {k: v.detach() for k, v in reports.items()} | {"total": total.detach(), "count": count}
    if info.rank == 0:
        torch.save(results, out)


def _full_reference(root, temperatures, out):
    """Plain PyTorch from full logits (TP=1): megatron's CE over the padded vocabulary, the
    KL over the real one, masked."""
    from megatron_miniplm import parallel
    from megatron_miniplm.dist_checkpoint import load_model, load_model_config
    from megatron_miniplm.models.gpt import build_model

    parallel.initialize(parallel.ParallelConfig(seed=11))
    models = {}
    for name in ("student", "teacher"):
        models[name] = build_model(load_model_config(os.path.join(root, name)))
        load_model([models[name]], os.path.join(root, name))
    b = _batch()
    with torch.no_grad():
        s = models["student"](b["tokens"], b["position_ids"], None).float()  # [b, s, V_padded]
        t = models["teacher"](b["tokens"], b["position_ids"], None).float()
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), b["labels"].reshape(-1), reduction="none")
    mask = b["loss_mask"].reshape(-1)
    results = {}
    for T in temperatures:
        log_pt = F.log_softmax(t[..., :500] / T, dim=-1)
        kl = (log_pt.exp() * (log_pt - F.log_softmax(s[..., :500] / T, dim=-1))).sum(-1).reshape(-1) * T * T
        results[T] = {"lm": (ce * mask).sum(), "kd": (kl * mask).sum(), "count": mask.sum()}
    torch.save(results, out)


@pytest.fixture(scope="module")
def kd_models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("kd-models"))
    run_distributed(_save_models, 1, root)
    return root


def test_kd_loss_equals_full_logit_reference(kd_models, tmp_path):
    temperatures = (1.0, 2.0)
    run_distributed(_full_reference, 1, kd_models, temperatures, str(tmp_path / "ref.pt"))
    refs = torch.load(tmp_path / "ref.pt")
    for tp in (1, 2):
        run_distributed(_kd_loss, tp, kd_models, tp, temperatures, str(tmp_path / f"tp{tp}.pt"))
        results = torch.load(tmp_path / f"tp{tp}.pt")
        for T in temperatures:
            got, ref = results[T], refs[T]
            n = float(ref["count"])
            assert float(got["count"]) == n == 3 * SEQ - 1 - 5
            assert float(got["lm loss"][0]) / n == pytest.approx(float(ref["lm"]) / n, abs=1e-5), (tp, T)
            assert float(got["kd loss"][0]) / n == pytest.approx(float(ref["kd"]) / n, abs=1e-5), (tp, T)
            mixed = 0.7 * float(ref["lm"]) + 0.3 * float(ref["kd"])
            assert float(got["total"]) / n == pytest.approx(mixed / n, abs=1e-5), (tp, T)
            assert float(ref["kd"]) > 0
    assert float(refs[1.0]["kd"]) != pytest.approx(float(refs[2.0]["kd"]))  # the temperature matters


def _kd_step_on_meta():
    """A KD micro-batch whose device is ``meta`` (shapes, no values) and whose batch is on the
    host, as the data loader gives it: any size that depends on the values on the device (a
    boolean mask, ``nonzero``) raises there, where on a GPU it would make the host wait."""
    from types import SimpleNamespace

    from megatron_miniplm import parallel, platform
    from megatron_miniplm.training.config import KDSettings
    from megatron_miniplm.training.kd import kd_forward_step

    parallel.initialize(parallel.ParallelConfig(seed=11))
    meta = platform.NO_CUDA_DEVICE = torch.device("meta")
    seen = []

    def hidden_states(tokens, position_ids):
        seen.append(tokens.device)
        return torch.empty(SEQ, MICRO, H, device=meta)

    teacher = SimpleNamespace(weight=torch.empty(V, H, device=meta), real=REAL, chunk_tokens=4, group=None,
                              hidden_states=hidden_states)
    student_logits = torch.empty(MICRO, SEQ, V, device=meta, requires_grad=True)

    def student(tokens, position_ids, attention_mask):
        seen.append(tokens.device)
        return student_logits * 1.0

    settings = KDSettings(kd_ratio=0.3, kd_temperature=2.0)
    logits, loss_func = kd_forward_step(teacher, settings, iter([_batch()]), student)
    total, count, reports = loss_func(logits)
    total.backward()
    assert seen == [meta, meta]
    assert total.is_meta and total.shape == () and count.is_meta and count.dtype == torch.int
    assert all(v.is_meta and v.shape == (2,) for v in reports.values()), reports
    assert student_logits.grad.shape == student_logits.shape


def test_kd_loss_selects_the_counted_tokens_without_waiting_for_the_device():
    run_distributed(_kd_step_on_meta, 1)


# ---- training with a teacher ---------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_checkpoint(corpus, tmp_path_factory):
    """A teacher of this corpus's tokenizer: a tiny-gqa model trained a few steps (its
    checkpoint records the data's tokenizer, which KD checks)."""
    from presets import model_flags

    root = str(tmp_path_factory.mktemp("teacher"))
    run_distributed(train, 1, args(corpus, *model_flags("tiny-gqa"), "--save", root, iters=4))
    return root


def _kd(teacher, ratio="0.5"):
    return ["--kd-teacher-load", teacher, "--kd-ratio", ratio]


def test_ratio_0_trains_exactly_as_without_kd(corpus, initial_checkpoint, teacher_checkpoint, tmp_path):
    plain, kd = tmp_path / "plain.jsonl", tmp_path / "kd.jsonl"
    run_distributed(train, 1, args(corpus, "--load", initial_checkpoint, "--metrics-file", str(plain)))
    run_distributed(train, 1, args(corpus, "--load", initial_checkpoint, "--metrics-file", str(kd),
                                   *_kd(teacher_checkpoint, "0")))
    want, got = metrics(plain), metrics(kd)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for it in want:
        assert got[it]["lm_loss"] == pytest.approx(want[it]["loss"], abs=1e-7), it
        assert got[it]["loss"] == pytest.approx(want[it]["loss"], abs=1e-7), it
        assert got[it]["grad_norm"] == pytest.approx(want[it]["grad_norm"], rel=1e-6), it
        assert got[it]["kd_loss"] > 0  # computed, weighted by 0
        assert got[it]["consumed_flops"] > want[it]["consumed_flops"]  # the teacher's forward counts


def _train_and_check_teacher(argv, out):
    from megatron_miniplm.settings import from_args
    from megatron_miniplm.training.trainer import Trainer
    from megatron_miniplm.training.config import TrainConfig

    from megatron_miniplm.cli import pretrain_gpt

    parsed = pretrain_gpt.build_parser().parse_args(argv)
    cfg = from_args(TrainConfig, parsed, model=pretrain_gpt.model_config_from_args(parsed, 512))
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.teacher.model.state_dict().items() if torch.is_tensor(v)}
    last = trainer.train()
    after = trainer.teacher.model.state_dict()
    torch.save({"changed": [k for k in before if not torch.equal(before[k], after[k])],
                "grads": [n for n, p in trainer.teacher.model.named_parameters() if p.grad is not None],
                "requires_grad": [n for n, p in trainer.teacher.model.named_parameters() if p.requires_grad],
                "training": trainer.teacher.model.training, "last": last}, out)


def test_the_teacher_stays_frozen(corpus, teacher_checkpoint, tmp_path):
    out = tmp_path / "teacher.pt"
    run_distributed(_train_and_check_teacher, 1, args(corpus, *_kd(teacher_checkpoint), iters=4), str(out))
    got = torch.load(out, weights_only=False)
    assert got["changed"] == [] and got["grads"] == [] and got["requires_grad"] == []
    assert got["training"] is False
    assert got["last"]["kd_loss"] > 0 and got["last"]["lm_loss"] > 0


def test_sigkill_then_resume_with_kd_matches_uninterrupted(corpus, teacher_checkpoint, tmp_path):
    iters = 20
    base = args(corpus, *_kd(teacher_checkpoint), "--save-interval", "3", iters=iters)
    full = tmp_path / "full.jsonl"
    subprocess.run([sys.executable, TOOL, *base, "--save", str(tmp_path / "a"), "--metrics-file", str(full)],
                   check=True, capture_output=True)
    killed, save = tmp_path / "killed.jsonl", str(tmp_path / "b")
    cmd = [sys.executable, TOOL, *base, "--save", save, "--load", save, "--metrics-file", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (killed.exists() and len(metrics(killed)) >= 7):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 7 <= len(metrics(killed)) < iters, "the kill must land mid-run"
    subprocess.run(cmd, check=True, capture_output=True)
    want, got = metrics(full), metrics(killed)
    assert sorted(got) == list(range(1, iters + 1))
    for it in want:
        for key in ("loss", "lm_loss", "kd_loss"):
            assert got[it][key] == pytest.approx(want[it][key], abs=1e-6), (it, key)
    info = json.load(open(os.path.join(save, "iter_0000020", "run_config.json")))
    assert info["kd"]["kd_teacher_load"] == teacher_checkpoint


@pytest.mark.parametrize("extra,message,code", [
    (["--kd-ratio", "1.5"], "kd_ratio (--kd-ratio) must be in [0, 1]", 2),
    (["--kd-temperature", "0"], "kd_temperature (--kd-temperature) must be > 0", 2),
    (["--pipeline-model-parallel-size", "2"], "does not support pipeline parallelism", 1),
    (["--vocab-size", "600"], "is smaller than the student's", 1),
    ("other tokenizer", "tokenizer mismatch", 1),
])
def test_refusals(corpus, teacher_checkpoint, tmp_path, extra, message, code):
    teacher = teacher_checkpoint
    if extra == "other tokenizer":
        import shutil

        teacher = str(tmp_path / "teacher")
        shutil.copytree(teacher_checkpoint, teacher)
        latest = open(os.path.join(teacher, "latest_checkpointed_iteration.txt")).read().strip()
        info_path = os.path.join(teacher, f"iter_{int(latest):07d}", "checkpoint_info.json")
        info = json.load(open(info_path))
        info["tokenizer"]["sha256"] = "f" * 64
        json.dump(info, open(info_path, "w"))
        extra = []
    ranks = 2 if "--pipeline-model-parallel-size" in extra else 1
    run_distributed(refuses, ranks, args(corpus, *_kd(teacher), *extra, iters=1), message, code)
