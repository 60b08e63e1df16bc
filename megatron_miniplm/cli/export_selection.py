"""Export a sampled blend as text: the refined corpus for any trainer or tokenizer.

    python tools/export_selection.py --blend BLEND_PREFIX --output refined.jsonl.zst [--shard-size-mb 500]

One record per document piece of each selected instance (an instance holding several
documents, joined by EOD, gives several records), in blend order, decoded with the
dataset's own tokenizer, with its domain under meta.pile_set_name and its teacher NLL,
reference NLL and difference score. Formats: .jsonl, .jsonl.gz, .jsonl.zst, .parquet.
The output is input to tools/preprocess_data.py (--json-key text --domain-key
meta.pile_set_name): with another tokenizer, a student corpus of another model family.
A sharded export that is interrupted resumes after its last finished shard.
"""
from __future__ import annotations

import argparse
import sys

from megatron_miniplm.cli import runner
from megatron_miniplm.cli.runner import tool


def build_parser() -> argparse.ArgumentParser:
    from megatron_miniplm.selection.export import ExportConfig

    return runner.parser(__doc__, ExportConfig)


@tool
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_miniplm.selection.export import ExportConfig, export_selection
    from megatron_miniplm.settings import from_args

    from megatron_miniplm.locking import hold_output

    cfg = from_args(ExportConfig, args)
    hold_output(cfg.output, f"--output {cfg.output}")
    summary = export_selection(cfg)
    print(summary.describe())
    for path in summary.files:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
