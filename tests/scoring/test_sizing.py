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
