#!/usr/bin/env python
# Kept at the path Megatron-LM users type; the code is megatron_miniplm.cli.pipeline.
from megatron_miniplm.cli.pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())
