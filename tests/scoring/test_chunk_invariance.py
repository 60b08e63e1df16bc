"""Scores do not depend on the logits chunk size (nll.py's fixed-shape GEMM tiles): the same
bytes at any chunk size, in fp32 and bf16, for the NLL alone and end to end through
tools/score_docs.py's scorer (where the automatic sizing picks yet another chunk)."""

import json
import os

import numpy as np
import pytest
import torch

from distributed import run_distributed
from helpers import make_instances, save_checkpoint, write_dataset
from megatron_miniplm.scoring.nll import TILE_ROWS, vocab_parallel_nll

CHUNKS = [1, 7, 64, 300, TILE_ROWS, 3 * TILE_ROWS, 10_000]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_nll_bit_identical_at_any_chunk_size(dtype):
    g = torch.Generator().manual_seed(0)
    n, h, vocab = 1100, 576, 4096  # SmolLM2's hidden size; 1100 rows: a partial last tile
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(vocab + 96, h, generator=g) * 0.05).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    runs = [vocab_parallel_nll(hidden, weight, targets, vocab_size=vocab, chunk_tokens=c) for c in CHUNKS]
    for chunk, got in zip(CHUNKS[1:], runs[1:]):
        assert got.shape == (n,) and got.dtype == torch.float32
        differ = int((got != runs[0]).sum())
        assert differ == 0, f"chunk {chunk}: {differ} of {n} NLLs differ from chunk {CHUNKS[0]}"


# --- end to end ----------------------------------------------------------------------

RUNS = {"chunk0": 0, "chunk1": 1, "chunk1.5": 1.5, "chunk4": 4, "auto": None}  # --logits-chunk-mb


def _score_all(root: str) -> None:
    from megatron_miniplm.scoring.scorer import score
    from megatron_miniplm.scoring.config import ScoreConfig

    write_dataset(os.path.join(root, "data"), make_instances(160, seed=4, max_len=129))
    save_checkpoint(os.path.join(root, "ckpt"))
    for dtype in ("fp32", "bf16"):
        for name, mb in RUNS.items():
            # 16 instances of up to 128 predictions: up to 2048 rows per batch, so 256-row
            # chunks (0 and 0.5 MB of fp32 logits at the padded vocabulary of 512) make 8
            # chunks per batch, 1.5 MB makes 768-row chunks with a partial last one.
            score(ScoreConfig(data_path=os.path.join(root, "data"), load=os.path.join(root, "ckpt"),
                              output_prefix=os.path.join(root, f"{dtype}-{name}"), micro_batch_size=16,
                              logits_chunk_mb=mb, bf16=dtype == "bf16", progress=False, fsync=False))


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("chunks"))
    run_distributed(_score_all, 1, root)
    return root


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_score_files_bit_identical_at_any_chunk_size(scored, dtype):
    from megatron_miniplm.scoring.score_file import load_scores

    files = {name: load_scores(os.path.join(scored, f"{dtype}-{name}")) for name in RUNS}
    want = np.asarray(files["chunk0"][0]).tobytes()
    for name, (scores, meta) in files.items():
        assert np.asarray(scores).tobytes() == want, f"{dtype} scores at --logits-chunk-mb {RUNS[name]} differ"
        assert meta["sizing"]["request"]["logits_chunk_mb"] == RUNS[name]
        assert "logits chunk" in meta["sizing"]["why"]
    chunks = {name: meta["settings"]["logits_chunk_tokens"] for name, (_, meta) in files.items()}
    assert chunks["chunk0"] == chunks["chunk1"] // 2 == TILE_ROWS
    assert chunks["chunk1.5"] == 3 * TILE_ROWS and chunks["auto"] % TILE_ROWS == 0
    assert len(set(chunks.values())) >= 4, chunks
    assert json.dumps(files["auto"][1]["sizing"]["request"]["micro_batch_size"]) == "16"
