"""Automatic batch and logits-chunk sizes: from free memory and the tokens-per-batch target,
explicit flags winning, clear refusals, and the recorded sizes a rerun reuses."""

import json
import os
from dataclasses import replace

import pytest

from megatron_miniplm.models.config import ModelConfig
from megatron_miniplm.scoring.dataset import ScoringError
from megatron_miniplm.scoring.identity import recorded_sizes
from megatron_miniplm.scoring.nll import TILE_ROWS
from megatron_miniplm.scoring.resume import write_run
from megatron_miniplm.scoring.config import ScoreConfig
from megatron_miniplm.scoring.sizing import Sizes, check_request, choose_sizes, request_of

GiB = 1 << 30
SMOLLM2 = ModelConfig(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
                      num_query_groups=3, vocab_size=49152)
QWEN_1_8B = ModelConfig(num_layers=24, hidden_size=2048, ffn_hidden_size=5504, num_attention_heads=16,
                        vocab_size=151936)
CFG = ScoreConfig(data_path="d", load="c", output_prefix="o", bf16=True)


def sizes(cfg=CFG, config=SMOLLM2, free=70 * GiB, tp=1, longest=1024, scores=False):
    return choose_sizes(cfg, config, tp=tp, longest=longest, attention_scores=scores, free_bytes=free,
                        free_why="test")


def test_gpu_sized_batch_and_chunk():
    got = sizes()  # a 135M teacher with 70 GiB free: the target decides the batch
    assert got.micro_batch_size == CFG.target_tokens_per_batch // 1024 == 64
    assert got.logits_chunk_tokens == (2**31 - 1) // 49152 // TILE_ROWS * TILE_ROWS  # 2 chunks per batch
    assert "micro-batch 64" in got.why and "2 per batch" in got.why and "2^31 logits" in got.why
    assert sizes(replace(CFG, target_tokens_per_batch=16384)).logits_chunk_tokens == 16384  # the whole batch
    big = sizes(config=QWEN_1_8B)  # 152K vocabulary: memory decides the chunk, in whole tiles
    assert big.micro_batch_size == 64
    assert big.logits_chunk_tokens % TILE_ROWS == 0 and 4096 <= big.logits_chunk_tokens < 64 * 1024
    assert sizes(config=QWEN_1_8B, tp=2).logits_chunk_tokens > big.logits_chunk_tokens  # half the vocabulary


def test_little_memory_shrinks_both_to_their_floor():
    got = sizes(free=GiB // 4, config=QWEN_1_8B)
    assert got.micro_batch_size < 64 and got.logits_chunk_tokens == TILE_ROWS
    tiny = sizes(free=1, config=QWEN_1_8B, scores=True)
    assert (tiny.micro_batch_size, tiny.logits_chunk_tokens) == (1, TILE_ROWS)
    assert "more than usable" in tiny.why


def test_explicit_settings_win():
    cfg = replace(CFG, micro_batch_size=8, logits_chunk_mb=128)
    got = sizes(cfg)
    assert got.micro_batch_size == 8
    assert got.logits_chunk_tokens == (128 << 20) // (4 * 49152) // TILE_ROWS * TILE_ROWS == 512
    assert "--micro-batch-size" in got.why and "--logits-chunk-mb 128" in got.why
    assert sizes(replace(CFG, logits_chunk_mb=32)).logits_chunk_tokens == TILE_ROWS  # 170 rows: one tile
    assert sizes(replace(CFG, logits_chunk_mb=0)).logits_chunk_tokens == TILE_ROWS
    assert sizes(replace(CFG, target_tokens_per_batch=8192)).micro_batch_size == 8


@pytest.mark.parametrize("field, value, flag", [("micro_batch_size", 0, "--micro-batch-size"),
                                                ("target_tokens_per_batch", 0, "--target-tokens-per-batch"),
                                                ("max_tokens_per_batch", 0, "--max-tokens-per-batch"),
                                                ("logits_chunk_mb", -1, "--logits-chunk-mb")])
def test_refusals_name_the_setting(field, value, flag):
    with pytest.raises(ScoringError, match=f"{flag} must be >="):
        check_request(replace(CFG, **{field: value}))


def test_a_rerun_reuses_the_sizes_recorded_for_the_same_request(tmp_path):
    prefix = str(tmp_path / "scores")
    request = request_of(CFG)
    assert recorded_sizes([prefix], prefix + ".progress", request) is None
    write_run(prefix + ".progress", {"sizing": Sizes(24, 2048, "auto then").record(request)})
    got = recorded_sizes([prefix], prefix + ".progress", request)
    assert (got.micro_batch_size, got.logits_chunk_tokens) == (24, 2048) and "auto then" in got.why
    assert recorded_sizes([prefix], prefix + ".progress", request_of(replace(CFG, micro_batch_size=4))) is None
    # a finished run's score file (no progress left) serves the same way
    os.rename(prefix + ".progress/run.json", str(tmp_path / "moved.json"))
    with open(prefix + ".meta.json", "w") as f:
        json.dump({"sizing": Sizes(12, 512, "x").record(request)}, f)
    assert recorded_sizes([prefix], prefix + ".progress", request).micro_batch_size == 12


MIXTRAL = ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                      num_query_groups=8, vocab_size=32000, num_experts=8, moe_router_topk=2)


def test_a_mixture_of_experts_counts_its_routed_rows_per_rank():
    """Mixtral-8x7B in bf16, by hand: h 4096, K/V 8 x 128 = 1024, experts of inner size 14336,
    top 2 of 8. Per token: 4h + (2h + 2kv) / TP of the layer around the MLP; the MoE's gathered
    input and combined output (2 TP h), the router's fp32 logits, probabilities and gathered
    probabilities (4 bytes x 8 x (2 + TP)), and per routed row 2h + 3 x 14336 / TP, for
    TP x EP x min(2, 8 / EP) rows; doubled (SLACK)."""
    from megatron_miniplm.scoring.sizing import activation_bytes_per_token

    around = 2 * (4 * 4096 + 2 * 4096 + 2 * 1024)  # TP 1
    moe = 2 * 2 * 4096 + 4 * 8 * 3 + 2 * (2 * 4096 + 3 * 14336) * 2  # 2 rows: the top 2, all experts here
    assert activation_bytes_per_token(MIXTRAL, 1, 2, 4096, False) == 2 * (around + moe) == 549_056
    # the dense count of the same width (3 x 14336 once) holds half of it: the top 2 rows each
    dense = MIXTRAL.replace(num_experts=None)
    assert activation_bytes_per_token(dense, 1, 2, 4096, False) == 2 * (around + 2 * 3 * 14336) == 278_528
    # TP 2 and EP 2 (4 experts a rank): the TP ranks' tokens gathered (2 copies), and of both EP
    # ranks' tokens up to min(2, 4) rows each reach this rank's experts: 8 rows, fc1 halved by TP
    around = 2 * (4 * 4096 + (2 * 4096 + 2 * 1024) // 2)
    moe = 2 * 2 * 2 * 4096 + 4 * 8 * 4 + 8 * (2 * 4096 + 3 * 14336 // 2) * 2
    assert activation_bytes_per_token(MIXTRAL, 2, 2, 4096, False, ep=2) == 2 * (around + moe) == 1_102_080
    # at EP 8 each rank holds one expert: a token sends it at most one row
    from megatron_miniplm.scoring.sizing import routed_copies_per_token

    assert [routed_copies_per_token(MIXTRAL, 1, ep) for ep in (1, 2, 4, 8)] == [2, 4, 8, 8]


def test_choose_sizes_sizes_an_expert_parallel_batch_by_the_rank_s_rows():
    """With memory the limit (80 GiB free, 80% usable, half of it for activations), the batch
    of 4096-token rows is what the per-token bound allows: at EP 2 (TP 1) 4 routed rows per
    token, 2 * (26624 + 2 * 4096 + 96 + 4 * 51200) = 958,656 bytes, against EP 1's 549,056."""
    cfg = replace(CFG, target_tokens_per_batch=1 << 20)
    half = int(80 * GiB * 0.8) // 2
    for ep, per_token in ((1, 549_056), (2, 958_656)):
        got = choose_sizes(cfg, MIXTRAL, tp=1, ep=ep, longest=4096, attention_scores=False, free_bytes=80 * GiB,
                           free_why="test")
        assert got.micro_batch_size == half // (per_token * 4096) == (15 if ep == 1 else 8)
        assert f"activations (~{per_token} B/token)" in got.why
