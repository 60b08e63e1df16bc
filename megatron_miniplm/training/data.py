"""Training samples from MiniPLM instance datasets, weighted blends and sampled blends.

Sample ``i`` of a run is a pure function of (sources, weights, seed, i), so the
data position is fully described by the number of consumed samples: a
resumed run reads exactly what the uninterrupted run would have read, and a
run at another DP size reads the same global batches.

- A dataset prefix (one or several shards): every instance, reshuffled each epoch.
- A weighted blend ``w1 p1 w2 p2`` (Megatron's ``--data-path`` form): each
  sample picks a source so that the running mix tracks the weights.
- A sampled blend from tools/difference_sample.py: its (shard, instance)
  pairs, read in place without rewriting the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron_miniplm.data.indexed_dataset import IndexedDatasetReader
from megatron_miniplm.data.meta import dataset_prefixes as shard_prefixes_of
from megatron_miniplm.data.meta import read_dataset_meta


class InstanceSource:
    """Instances of one dataset (all shards) or one sampled blend, by position."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.pairs: Optional[np.ndarray] = None  # (shard, instance) rows of a sampled blend
        if _is_blend(prefix):
            from megatron_miniplm.selection.blend import dataset_prefixes, load_blend

            pairs, blend_meta = load_blend(prefix, verify=True)  # datasets unchanged, rows in range
            self.pairs = np.asarray(pairs, dtype=np.int64)
            shard_prefixes = dataset_prefixes(prefix, blend_meta)
        else:
            shard_prefixes = shard_prefixes_of(prefix)
        self.metas = [read_dataset_meta(p) for p in shard_prefixes]
        self.shards = [IndexedDatasetReader(p) for p in shard_prefixes]
        if self.pairs is not None:
            self.size = len(self.pairs)
        else:
            self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
            self.size = int(self.offsets[-1])
        if self.size == 0:
            raise ValueError(f"{prefix}: no instances")
        self.instance_mode = self.metas[0].get("instance_mode", "miniplm")
        tok = self.metas[0].get("tokenizer", {})
        self.vocab_size = int(tok.get("vocab_size", 0))
        self.eod_id = tok.get("eod_id")
        pad = tok.get("pad_id")
        self.pad_id = int(pad if pad is not None else self.eod_id)
        self.seq_length = int(self.metas[0].get("seq_length", 0))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> np.ndarray:
        if self.pairs is not None:
            shard, inst = self.pairs[index]
        else:
            shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
            inst = index - self.offsets[shard]
        return self.shards[shard][int(inst)]


def _is_blend(prefix: str) -> bool:
    try:
        from megatron_miniplm.selection.blend import is_blend
    except ImportError:
        return False
    return is_blend(prefix)


def parse_data_path(items: Sequence[str]) -> tuple[list[str], list[float]]:
    """Megatron's ``--data-path``: ``P`` or ``W1 P1 W2 P2 ...``."""
    items = list(items)
    if len(items) == 1:
        return items, [1.0]
    if len(items) % 2:
        raise ValueError(f"--data-path: expected 'PREFIX' or 'WEIGHT PREFIX' pairs, got {items}")
    try:
        weights = [float(w) for w in items[0::2]]
    except ValueError:
        raise ValueError(f"--data-path: expected 'WEIGHT PREFIX' pairs, got {items}") from None
    if any(w <= 0 for w in weights):
        raise ValueError("--data-path: blend weights must be positive")
    total = sum(weights)
    return items[1::2], [w / total for w in weights]


@dataclass
class SampleStream:
    """Deterministic sample order over one or more sources."""

    sources: list
    weights: list
    seed: int
    shuffle: bool = True

    def __post_init__(self):
        self._blend_cache: tuple[int, np.ndarray, np.ndarray] = (0, np.empty(0), np.empty(0))
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def from_data_path(cls, items: Sequence[str], seed: int, shuffle: bool = True,
                       num_samples: int = 0, seq_length: int = 0, cache_path: Optional[str] = None):
        """The stream for a data path: instance datasets and sampled blends are read one
        instance per sample; document-mode datasets through megatron's GPTDataset, whose
        index cache goes to ``cache_path`` (default: beside the data)."""
        prefixes, weights = parse_data_path(items)
        sources = [InstanceSource(p) for p in prefixes]
        modes = {s.instance_mode == "document" for s in sources}
        if len(modes) > 1:
            raise ValueError(f"the data path mixes document-mode and instance-mode datasets: {prefixes}")
        if modes.pop():
            return DocumentStream(sources, weights, seed, num_samples, seq_length, cache_path)
        return cls(sources, weights, seed, shuffle)

    @property
    def vocab_size(self) -> int:
        return max(s.vocab_size for s in self.sources)

    @property
    def pad_id(self) -> int:
        return self.sources[0].pad_id

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        """This epoch's order of a source's instances (identity without shuffling)."""
        key = (source, epoch)
        if key not in self._permutations:
            n = len(self.sources[source])
            if len(self._permutations) >= 2 * len(self.sources):
                self._permutations.clear()
            if self.shuffle:
                perm = np.random.default_rng([self.seed, source, epoch]).permutation(n)
            else:
                perm = np.arange(n)
            self._permutations[key] = perm.astype(np.int64)
        return self._permutations[key]

    def _locate(self, index: int) -> tuple[int, int]:
        """Sample index -> (source, k-th sample drawn from that source)."""
        if len(self.sources) == 1:
            return 0, index
        if index >= self._blend_cache[0]:
            self._extend_blend(max(2 * index + 1, 1 << 16))
        return int(self._blend_cache[1][index]), int(self._blend_cache[2][index])

    def _extend_blend(self, size: int) -> None:
        from megatron.core.datasets import helpers

        source = np.zeros(size, dtype=np.int16)
        sample = np.zeros(size, dtype=np.int64)
        helpers.build_blending_indices(
            source, sample, np.asarray(self.weights, dtype=np.float64), len(self.sources), size, False
        )
        self._blend_cache = (size, source, sample)

    def __getitem__(self, index: int) -> np.ndarray:
        source, k = self._locate(index)
        n = len(self.sources[source])
        return self.sources[source][int(self._permutation(source, k // n)[k % n])]


class _EodTokenizer:
    """What megatron's GPTDataset needs of a tokenizer: the EOD id and the vocabulary size."""

    def __init__(self, eod: int, vocab_size: int):
        self.eod = eod
        self.vocab_size = vocab_size
        # Part of the key of megatron's on-disk index cache.
        self.unique_identifiers = {"class": "EodTokenizer", "eod": eod, "vocab_size": vocab_size}


class DocumentStream:
    """Document-mode datasets, sampled the standard Megatron way (megatron-core's GPTDataset).

    Documents are concatenated and cut into seq_length + 1 token windows that
    cross document boundaries, shuffled per epoch; blends by weight. Each window
    is returned as an instance, so the MiniPLM loss mask applies unchanged.
    megatron-core builds the window index on rank 0 and the other ranks read it
    from the cache (``cache_path``, or ``cache/`` beside the data as in Megatron-LM).
    """

    def __init__(self, sources: list, weights: list, seed: int, num_samples: int, seq_length: int,
                 cache_path: Optional[str] = None):
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        if num_samples <= 0 or seq_length <= 0:
            raise ValueError("document-mode data needs the number of samples and the sequence length")
        self.sources = sources
        self.pad_id = sources[0].pad_id
        self.vocab_size = max(s.vocab_size for s in sources)
        prefixes = []
        for source in sources:
            if len(source.shards) != 1:
                raise ValueError(f"{source.prefix}: sharded document-mode datasets: give the shards")
            prefixes.append(source.shards[0].prefix)  # megatron-core's GPTDataset opens it itself
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_length,
            blend=(prefixes, weights if len(prefixes) > 1 else None), split="1,0,0",
            tokenizer=_EodTokenizer(int(sources[0].eod_id), self.vocab_size),
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False, path_to_cache=cache_path,
        )
        self.dataset = BlendedMegatronDatasetBuilder(
            GPTDataset, [num_samples, 0, 0], lambda: True, config
        ).build()[0]

    def __getitem__(self, index: int) -> np.ndarray:
        sample = self.dataset[index]
        return np.concatenate([sample["tokens"].numpy(), sample["labels"][-1:].numpy()])
