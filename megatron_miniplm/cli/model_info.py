"""Parameter-count report for model presets.

    python tools/model_info.py                        # every preset
    python tools/model_info.py --model-preset qwen-200M [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_miniplm.cli.runner import tool
from megatron_miniplm.models.config import PRESET_NOTES, PRESETS, get_preset
from megatron_miniplm.models.param_count import count_parameters


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-preset", action="append", help="preset name (repeatable); default: all")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


@tool
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        names = args.model_preset or list(PRESETS)
        configs = [get_preset(n) for n in names]
    except ValueError as e:
        parser.error(str(e))
    rows = []
    for cfg in configs:
        c = count_parameters(cfg)
        rows.append({
            "preset": cfg.name, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
            "ffn": cfg.ffn_hidden_size, "heads": cfg.num_attention_heads, "kv_heads": cfg.kv_heads,
            "vocab": cfg.vocab_size, "tied": cfg.tie_embeddings, "total": c.total,
            "embedding": c.embedding, "non_embedding": c.non_embedding,
            "published": cfg.published_params, "note": PRESET_NOTES.get(cfg.name, ""),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("Counts include embeddings (a tied embedding/output matrix once), unpadded vocabulary.")
    header = f"{'preset':<14}{'layers':>7}{'hidden':>7}{'ffn':>6}{'heads':>7}{'tied':>6}" \
             f"{'total':>11}{'non-emb':>11}{'published':>11}{'diff':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        pub = r["published"]
        diff = f"{100 * (r['total'] - pub) / pub:+.1f}%" if pub else "-"
        heads = f"{r['heads']}/{r['kv_heads']}" if r["kv_heads"] != r["heads"] else str(r["heads"])
        print(f"{r['preset']:<14}{r['layers']:>7}{r['hidden']:>7}{r['ffn']:>6}{heads:>7}"
              f"{'yes' if r['tied'] else 'no':>6}{_m(r['total']):>11}{_m(r['non_embedding']):>11}"
              f"{_m(pub) if pub else '-':>11}{diff:>8}  {r['note']}")
    return 0


def _m(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


if __name__ == "__main__":
    sys.exit(main())
