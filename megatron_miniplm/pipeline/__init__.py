"""The MiniPLM pipeline as one config and one command (examples/pretrain_miniplm.sh).

    config.py      the pipeline config: stage configs composed, defaults, YAML, overrides
    stages.py      the stages, their fingerprints and the tools' command lines
    invariants.py  what MiniPLM's comparison needs, checked before anything runs
    runner.py      completion records, skip / rerun decisions, several nodes
"""
