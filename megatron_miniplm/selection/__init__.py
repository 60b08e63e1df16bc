"""Difference Sampling: from per-instance scores to a sampled blend.

    shards       dataset shards as selection sees them (meta, .idx lengths, domains)
    config       SelectionConfig (no numpy: the pipeline's config reads it)
    difference   scores and the C++-backed selection (+ baselines)
    blend        the BLEND.npy / BLEND.meta.json format: load_blend, is_blend, BlendReader
    materialize  --materialize: the selected instances as a new indexed dataset
    report       --report: per-domain table, score histograms, decoded examples
    sample       the pipeline behind tools/difference_sample.py
"""
