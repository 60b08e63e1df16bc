"""The dataset being scored: one or more shards read as one sequence of instances.

A sharded dataset (top-level meta with "shards") is scored in one run, with one
batch plan over all its instances, and gets one score file per shard (the
layout Difference Sampling reads). Global instance ids run through the shards
in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_miniplm.data.indexed_dataset import IndexedDatasetError, IndexedDatasetReader
from megatron_miniplm.data.meta import dataset_prefixes, read_dataset_meta, verify_fingerprint
from megatron_miniplm.errors import UserError


class ScoringError(UserError, ValueError):
    """A run that must not start (mismatched model, foreign output...); the message says why."""


@dataclass
class ScoringDataset:
    prefix: str
    meta: dict  # top-level meta
    shard_prefixes: list[str]
    shard_metas: list[dict]
    offsets: np.ndarray  # int64 [S + 1]: global id of each shard's first instance
    lengths: np.ndarray  # int64 [N]: tokens per instance
    _readers: list[IndexedDatasetReader] = field(default_factory=list, repr=False)

    @property
    def num_instances(self) -> int:
        return int(self.offsets[-1])

    @property
    def tokenizer(self) -> dict:
        return self.meta["tokenizer"]

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer["pad_id"])

    def identity(self) -> dict:
        return {
            "prefix": self.prefix,
            "fingerprint": self.meta["fingerprint"],
            "shards": [m["fingerprint"] for m in self.shard_metas],
            "num_instances": self.num_instances,
        }

    def instances(self, ids: np.ndarray) -> list[np.ndarray]:
        """Token arrays (int64) of global instance ids."""
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        return [self._readers[s][int(i - self.offsets[s])].astype(np.int64)
                for s, i in zip(shard, ids)]


def open_dataset(prefix: str, verify: bool = True) -> ScoringDataset:
    """Read the meta of ``prefix`` (and of its shards) and the instance lengths.

    ``verify`` re-hashes every .idx against its recorded fingerprint: the score
    file names the dataset by that fingerprint, so it must describe these bytes.
    """
    try:
        meta = read_dataset_meta(prefix)
        prefixes = dataset_prefixes(prefix)
        metas = [meta] if prefixes == [prefix] else [read_dataset_meta(p) for p in prefixes]
        if verify:
            verify_fingerprint(prefix)
    except (ValueError, FileNotFoundError) as e:
        raise ScoringError(f"--data-path: {e}") from None
    readers, lengths = [], []
    for p, m in zip(prefixes, metas):
        try:
            readers.append(IndexedDatasetReader(p))
        except (IndexedDatasetError, FileNotFoundError) as e:
            raise ScoringError(f"--data-path: {e}") from None
        lens = readers[-1].lengths.astype(np.int64)
        if len(lens) != m["num_instances"]:
            raise ScoringError(f"{p}.idx holds {len(lens)} instances, {p}.meta.json says {m['num_instances']}")
        lengths.append(lens)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lengths])]).astype(np.int64)
    if offsets[-1] != meta["num_instances"]:
        raise ScoringError(f"{prefix}.meta.json says {meta['num_instances']} instances, its shards hold {offsets[-1]}")
    return ScoringDataset(prefix=prefix, meta=meta, shard_prefixes=prefixes, shard_metas=metas,
                          offsets=offsets, lengths=np.concatenate(lengths) if lengths else np.zeros(0, np.int64),
                          _readers=readers)
