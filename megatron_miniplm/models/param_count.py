"""Parameter counts of a preset, from the real module structure, without allocating weights.

The model is built on the ``meta`` device, so a 4B-parameter teacher costs no
memory. Counting convention (as in the MiniPLM paper): embeddings are counted,
a tied embedding/output matrix once; the vocabulary is counted unpadded, as
published.
"""

from __future__ import annotations

from dataclasses import dataclass


from megatron_miniplm.models.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    total: int
    embedding: int  # input embedding + untied output layer
    non_embedding: int
    padded_total: int  # as allocated, with the padded vocabulary

    @property
    def total_millions(self) -> float:
        return self.total / 1e6


def count_parameters(config: ModelConfig) -> ParamCount:
    """Count the parameters of a single-rank (TP=PP=1) build of ``config``."""
    from megatron_miniplm.models.gpt import build_model

    _ensure_single_rank_state()
    model = build_model(config, initialize=False, device="meta")
    padded_total = embedding = 0
    for name, param in model.named_parameters():  # tied weights are yielded once
        padded_total += param.numel()
        if "word_embeddings" in name or "output_layer" in name:
            embedding += param.numel()
    padding = config.padded_vocab_size() - config.vocab_size
    matrices = 1 if config.tie_embeddings else 2
    embedding_unpadded = embedding - matrices * padding * config.hidden_size
    non_embedding = padded_total - embedding
    return ParamCount(
        total=non_embedding + embedding_unpadded,
        embedding=embedding_unpadded,
        non_embedding=non_embedding,
        padded_total=padded_total,
    )


def _ensure_single_rank_state() -> None:
    """Counting needs megatron's parallel state; start a world of one if there is none."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        from megatron_miniplm import parallel

        parallel.initialize()
