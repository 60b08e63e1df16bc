"""TP=2 and PP=2 (2 processes, gloo) match TP=1/PP=1 with the same weights.

Per-token losses agree within 1e-5, and so do all parameters after one
optimizer step (AdamW, clipping): the step covers TP-replicated parameters
(RMSNorm weights, whose gradients must agree across TP ranks), the embedding
tied across pipeline stages, and the global grad norm.
"""

import os

import pytest
import torch

from distributed import run_distributed

PRESET = "tiny"  # tied embeddings: PP=2 must keep the two stages' copies in sync
SEQ, MICRO, MICROBATCHES = 32, 2, 2


def make_batches(vocab: int, eod: int = 0):
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(MICROBATCHES):
        tokens = torch.randint(1, vocab, (MICRO, SEQ + 1), generator=g)
        tokens[0, 10] = eod
        mask = torch.ones(MICRO, SEQ)
        mask[:, 10] = 0  # input is EOD: prediction not counted
        mask[1, 25:] = 0  # padding
        batches.append({
            "tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": mask, "position_ids": torch.arange(SEQ).expand(MICRO, SEQ).contiguous(),
        })
    return batches


def _run(root: str, name: str, tp: int, pp: int, save_init: bool):
    from megatron.core import parallel_state as ps

    from megatron_miniplm import parallel
    from megatron_miniplm.dist_checkpoint import load_model, save_model
    from presets import get_preset
    from megatron_miniplm.models.gpt import build_model
    from megatron_miniplm.training.engine import attach_schedule_hooks, build_optimizer, forward_losses, train_step, wrap_ddp
    from megatron_miniplm.training.config import OptimizerSettings

    parallel.initialize(parallel.ParallelConfig(tp, pp, seed=3))
    config = get_preset(PRESET)
    model = build_model(config)
    init_dir = os.path.join(root, "init")
    if save_init:
        os.makedirs(init_dir)
        save_model([model], init_dir, config)
    else:
        load_model([model], init_dir)
    ddp = wrap_ddp(model)
    attach_schedule_hooks([ddp])
    optimizer = build_optimizer([ddp], OptimizerSettings(lr=1e-3, clip_grad=0.5))
    batches = make_batches(config.vocab_size)
    kw = dict(num_microbatches=MICROBATCHES, micro_batch_size=MICRO, seq_length=SEQ)
    losses = forward_losses([ddp], iter(batches), **kw)
    step = train_step([ddp], optimizer, iter(batches), **kw)
    out = os.path.join(root, name)
    os.makedirs(out, exist_ok=True)
    save_model([ddp], out)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        torch.save({"losses": losses, "loss": step.values[0].item(), "grad_norm": step.grad_norm},
                   os.path.join(root, f"{name}.pt"))


def _load_tp1(root: str, names: list):
    from megatron_miniplm import parallel
    from megatron_miniplm.dist_checkpoint import load_model
    from presets import get_preset
    from megatron_miniplm.models.gpt import build_model

    parallel.initialize()
    for name in names:
        model = build_model(get_preset(PRESET))
        load_model([model], os.path.join(root, name))
        torch.save(model.state_dict(), os.path.join(root, f"{name}.params.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("parallel"))
    run_distributed(_run, 1, root, "tp1", 1, 1, True)
    run_distributed(_run, 2, root, "tp2", 2, 1, False)
    run_distributed(_run, 2, root, "pp2", 1, 2, False)
    run_distributed(_load_tp1, 1, root, ["tp1", "tp2", "pp2"])
    return root


def _result(root, name):
    return torch.load(os.path.join(root, f"{name}.pt"))


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_per_token_losses_match(runs, layout):
    ref, got = _result(runs, "tp1"), _result(runs, layout)
    assert len(ref["losses"]) == MICROBATCHES
    for a, b in zip(ref["losses"], got["losses"]):
        assert a.shape == (MICRO, SEQ)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert abs(got["loss"] - ref["loss"]) < 1e-5
    assert abs(got["grad_norm"] - ref["grad_norm"]) < 1e-5 * max(1.0, ref["grad_norm"])


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_parameters_match_after_one_step(runs, layout):
    ref = torch.load(os.path.join(runs, "tp1.params.pt"))
    got = torch.load(os.path.join(runs, f"{layout}.params.pt"))
    init_norms = [k for k in ref if "layernorm" in k or "final_layernorm" in k]
    assert init_norms, "the model has RMSNorm weights to check"
    for key, value in ref.items():
        if key.endswith("_extra_state") or not torch.is_tensor(value):
            continue
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=key)


def test_the_step_changed_the_parameters(runs):
    """Guards the comparison above from passing on parameters that never moved."""
    stepped = torch.load(os.path.join(runs, "tp1.params.pt"))
    norms = [k for k in stepped if k.endswith("layernorm.weight")]
    assert norms
    # RMSNorm weights start at exactly 1; one AdamW step with lr 1e-3 moves each by ~1e-3.
    for k in norms:
        assert (stepped[k] - 1).abs().min() > 1e-4, k
