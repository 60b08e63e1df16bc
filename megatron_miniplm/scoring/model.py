"""The scoring model: checkpoint identity, the tokenizer check, and the forward-only GPTModel."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_miniplm.models.config import ModelConfig
from megatron_miniplm.scoring.dataset import ScoringError

INFO_FILE = "checkpoint_info.json"


@dataclass(frozen=True)
class ModelSource:
    path: str  # the directory holding model_config.json (a trainer's latest iteration resolved)
    config: ModelConfig
    info: Optional[dict]  # checkpoint_info.json, when the checkpoint has one

    def identity(self) -> dict:
        """What names the model in a score file: scores of another model are refused."""
        return {"checkpoint": self.path, "config": self.config.to_dict(), "checkpoint_info": self.info}


def resolve_checkpoint(load: str) -> ModelSource:
    from megatron_miniplm.dist_checkpoint import load_model_config
    from megatron_miniplm.conversion.checkpoint_info import resolve_megatron_checkpoint
    from megatron_miniplm.conversion.errors import ConversionError

    try:
        path = os.path.realpath(resolve_megatron_checkpoint(load))
    except ConversionError as e:
        raise ScoringError(f"--load: {e}") from None
    info = None
    info_path = os.path.join(path, INFO_FILE)
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    return ModelSource(path=path, config=load_model_config(path), info=info)


def check_tokenizer(source: ModelSource, dataset_tokenizer: dict, data_path: str) -> None:
    """Refuse a model that was not trained with the dataset's tokenizer.

    The checkpoint's recorded tokenizer (hash and vocabulary size) must equal the
    dataset's. Without a record, the model's vocabulary must at least cover every
    token id of the dataset; a larger one is allowed (Qwen's 151,936-row embedding
    serves a 151,646-token tokenizer).
    """
    model_vocab = source.config.vocab_size
    data_vocab = int(dataset_tokenizer["vocab_size"])
    where = f"model {source.path} vs dataset {data_path}"
    if data_vocab > model_vocab:
        raise ScoringError(
            f"vocabulary mismatch ({where}): the dataset's tokenizer has {data_vocab} tokens, "
            f"the model only {model_vocab}"
        )
    recorded = (source.info or {}).get("tokenizer")
    if not recorded:
        return
    if recorded.get("sha256") and recorded["sha256"] != dataset_tokenizer.get("sha256"):
        raise ScoringError(
            f"tokenizer mismatch ({where}): the model was built with tokenizer sha256 "
            f"{recorded['sha256'][:16]}..., the dataset was tokenized with "
            f"{str(dataset_tokenizer.get('sha256'))[:16]}..."
        )
    if recorded.get("vocab_size") is not None and int(recorded["vocab_size"]) != data_vocab:
        raise ScoringError(
            f"vocabulary mismatch ({where}): the model's tokenizer has {recorded['vocab_size']} "
            f"tokens, the dataset's {data_vocab}"
        )
    for key in ("eod_id",):
        if recorded.get(key) is not None and int(recorded[key]) != int(dataset_tokenizer[key]):
            raise ScoringError(
                f"tokenizer mismatch ({where}): {key} {recorded[key]} in the model's tokenizer, "
                f"{dataset_tokenizer[key]} in the dataset's"
            )


def build_scoring_model(source: ModelSource, *, bf16: bool, impl=None):
    """This rank's slice of the model, weights loaded, in eval mode and in one dtype;
    ``impl``: a resolved ``models.gpt.Implementation`` (default: Megatron-LM's defaults here).

    The model is built directly in bf16 when asked (never an fp32 copy first);
    megatron leaves the RMSNorm weights in fp32, so they are cast too, which
    keeps torch's fused RMSNorm kernel. ``variable_seq_lengths`` lets the pipeline
    schedule send activations of batches of different lengths (the receiving stage
    is told each shape first).
    """
    from megatron_miniplm import platform
    from megatron_miniplm.dist_checkpoint import load_model
    from megatron_miniplm.models.gpt import build_model

    dtype = torch.bfloat16 if bf16 else torch.float32
    model = build_model(source.config, params_dtype=dtype, bf16=bf16,
                        impl=impl, initialize=False)
    load_model([model], source.path)
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.variable_seq_lengths = True
    if not platform.cuda_available():
        model.config.batch_p2p_comm = False  # gloo: plain isend/irecv (docs/megatron-core-on-cpu)
    return model


def output_weight(model) -> Optional[torch.Tensor]:
    """The output layer's weight slice [V/tp, h] on the last pipeline stage, None elsewhere.

    Untied, that is the output layer's own weight. megatron-core's
    ``shared_embedding_or_output_weight()`` is not: it returns the input embedding on any
    first stage, tied or not, so an untied model at PP=1 would be scored with its input
    embedding. Tied, the output layer has no weight of its own on a first stage, and a last
    stage that is not first holds the copy megatron keeps in sync with the embedding.
    """
    if not model.post_process:
        return None
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


@contextlib.contextmanager
def hidden_states_only(model):
    """Make GPTModel.forward return the final hidden states [s, b, h] (after the final
    RMSNorm, which lives in the decoder) instead of logits, as a non-last pipeline
    stage does: the output layer then runs in chunks inside ``vocab_parallel_nll``."""
    saved = model.post_process
    model.post_process = False
    try:
        yield model
    finally:
        model.post_process = saved
