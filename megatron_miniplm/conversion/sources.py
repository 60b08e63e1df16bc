"""An HF source for import: a transformers model directory or a GGUF file.

Both are opened through transformers (``from_pretrained``; for GGUF with
``gguf_file=``, which dequantizes), so sharded safetensors, .bin files and
quantized GGUF all arrive as plain tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_miniplm.conversion import gguf
from megatron_miniplm.conversion.errors import ConversionError
from megatron_miniplm.conversion.tokenizer_files import copy_tokenizer_files, save_gguf_tokenizer

WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class HFSource:
    format: str  # "hf" or "gguf"
    directory: str
    gguf_file: Optional[str] = None

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.gguf_file) if self.gguf_file else self.directory

    @property
    def default_name(self) -> str:
        base = self.gguf_file[: -len(".gguf")] if self.gguf_file else os.path.basename(self.directory.rstrip("/"))
        return base or "converted"

    def _kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def load_config(self):
        """transformers' config of the model; for a GGUF file with the widths the file states
        (gguf.STATED_WIDTHS), after refusing what transformers would not read."""
        from transformers import AutoConfig

        if self.gguf_file:
            metadata, tensor_names = gguf.read_metadata(self.path)
            gguf.check_readable(self.path, metadata, tensor_names)
        try:
            config = AutoConfig.from_pretrained(self.directory, **self._kwargs())
        except (ValueError, KeyError, OSError) as e:
            # transformers names an unknown model_type / GGUF architecture here.
            raise ConversionError(f"{self.path}: cannot read the model config ({e})") from e
        if self.gguf_file:
            for attr, value in gguf.stated_widths(metadata).items():
                setattr(config, attr, value)
        return config

    def load_state_dict(self, dtype: torch.dtype, config=None) -> dict[str, torch.Tensor]:
        """All weights as a plain dict (the model object itself is dropped); ``config``: the one
        load_config gave. Weights transformers cannot place, or leaves to random initialisation,
        are refused."""
        from transformers import AutoModelForCausalLM

        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                self.directory, dtype=dtype, config=config or self.load_config(), output_loading_info=True,
                **self._kwargs())
        except (RuntimeError, NotImplementedError, ValueError) as e:
            # a tensor of another shape than the config's, an architecture gguf-py cannot name
            raise ConversionError(f"{self.path}: transformers cannot load its weights ({e})") from e
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            raise ConversionError(f"{self.path}: weights missing from the file (transformers would "
                                  f"initialise them at random): {', '.join(missing[:6])}")
        state = dict(model.state_dict())
        del model
        return state

    def export_tokenizer(self, dest_dir: str) -> bool:
        """Write the source's tokenizer into ``dest_dir``; False when the source has none."""
        if self.gguf_file:
            save_gguf_tokenizer(self.directory, self.gguf_file, dest_dir)
            return True
        return copy_tokenizer_files(self.directory, dest_dir)


def open_source(load: str, gguf_file: Optional[str] = None) -> HFSource:
    """Classify ``--load``: a .gguf file, a directory with ``--gguf-file`` or a single
    .gguf, or a transformers model directory (config.json + weights)."""
    if not os.path.exists(load):
        raise ConversionError(f"--load {load}: no such file or directory")
    load = os.path.abspath(load)
    if os.path.isfile(load):
        if not gguf.is_gguf(load):
            raise ConversionError(f"--load {load} is a file but not a .gguf; pass a HF model directory or a GGUF file")
        return HFSource("gguf", os.path.dirname(load), os.path.basename(load))
    if gguf_file:
        if not os.path.isfile(os.path.join(load, gguf_file)):
            raise ConversionError(f"--gguf-file {gguf_file}: not found in {load}")
        return HFSource("gguf", load, gguf_file)
    if os.path.isfile(os.path.join(load, "config.json")):
        if not any(os.path.isfile(os.path.join(load, f)) for f in WEIGHT_FILES):
            raise ConversionError(f"{load}: config.json but no weights ({', '.join(WEIGHT_FILES)})")
        return HFSource("hf", load)
    single = gguf.single_gguf_in(load)
    if single:
        return HFSource("gguf", load, single)
    raise ConversionError(f"{load}: neither a HF model directory (config.json) nor a GGUF file")
