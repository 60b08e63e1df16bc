#!/usr/bin/env python
# Kept at the path Megatron-LM users type; the code is megatron_miniplm.cli.generate_corpus.
from megatron_miniplm.cli.generate_corpus import main

if __name__ == "__main__":
    raise SystemExit(main())
