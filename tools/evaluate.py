#!/usr/bin/env python
# Kept at the path Megatron-LM users type; the code is megatron_miniplm.cli.evaluate.
from megatron_miniplm.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
