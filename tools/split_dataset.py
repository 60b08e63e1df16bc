#!/usr/bin/env python
# Kept at the path Megatron-LM users type; the code is megatron_miniplm.cli.split_dataset.
from megatron_miniplm.cli.split_dataset import main

if __name__ == "__main__":
    raise SystemExit(main())
