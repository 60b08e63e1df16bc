"""Difference Sampling: from per-instance scores to a sampled blend.

    shards       dataset shards as selection sees them (meta, .idx lengths, domains)
    difference   SelectionConfig, scores and the C++-backed selection (+ baselines)
    blend        the BLEND.npy / BLEND.meta.json format: load_blend, is_blend, BlendReader
    materialize  --materialize: the selected instances as a new indexed dataset
    report       --report: per-domain table, score histograms, decoded examples
    sample       the pipeline behind tools/difference_sample.py
"""
from megatron_miniplm.selection.blend import BlendReader, is_blend, load_blend

__all__ = ["BlendReader", "is_blend", "load_blend"]
