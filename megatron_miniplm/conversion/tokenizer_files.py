"""Tokenizers beside converted checkpoints.

A megatron checkpoint keeps its tokenizer in ``tokenizer/`` (a HF
``tokenizer.json`` and its config files), and ``checkpoint_info.json`` records
the tokenizer's sha256, vocabulary size and end-of-document id computed by the
same code that preprocessing uses, so the scorer can check that a teacher and a
dataset share one tokenization.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from megatron_miniplm.conversion.errors import ConversionError

TOKENIZER_DIR = "tokenizer"
TOKENIZER_JSON = "tokenizer.json"
# Files that make up a HF tokenizer; copied byte for byte so the sha256 of
# tokenizer.json stays what preprocessing recorded from the same source.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
)


def copy_tokenizer_files(src_dir: str, dest_dir: str) -> bool:
    """Copy a HF tokenizer's files; a tokenizer without tokenizer.json (sentencepiece
    only) is converted to one by transformers. False when ``src_dir`` holds no tokenizer."""
    present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, f))]
    if not present:
        return False
    os.makedirs(dest_dir, exist_ok=True)
    if TOKENIZER_JSON not in present:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src_dir)
        tok.save_pretrained(dest_dir)
        if not os.path.isfile(os.path.join(dest_dir, TOKENIZER_JSON)):
            raise ConversionError(f"{src_dir}: tokenizer could not be converted to a tokenizer.json")
        return True
    for name in present:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dest_dir, name))
    return True


def copy_tokenizer(src: str, dest_dir: str) -> None:
    """Copy a tokenizer given as a directory or a tokenizer.json file."""
    if not os.path.exists(src):
        raise ConversionError(f"tokenizer not found: {src}")
    if os.path.isdir(src):
        if not copy_tokenizer_files(src, dest_dir):
            raise ConversionError(f"{src}: directory holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    else:
        if os.path.basename(src) != TOKENIZER_JSON:
            raise ConversionError(f"{src}: expected a tokenizer.json or a directory holding one")
        os.makedirs(dest_dir, exist_ok=True)
        shutil.copyfile(src, os.path.join(dest_dir, TOKENIZER_JSON))


def ensure_tokenizer_config(directory: str, *, eod_token: str, model_max_length: int) -> None:
    """Give a lone tokenizer.json the tokenizer_config.json that ``AutoTokenizer`` needs:
    the generic tokenizers backend, EOD as eos."""
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(path):
        return
    import transformers

    generic = "TokenizersBackend" if hasattr(transformers, "TokenizersBackend") else "PreTrainedTokenizerFast"
    config = {"tokenizer_class": generic, "eos_token": eod_token, "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False}
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def save_gguf_tokenizer(directory: str, gguf_file: str, dest_dir: str) -> None:
    """The tokenizer embedded in a GGUF file, written as tokenizer.json (+ config)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    tok.save_pretrained(dest_dir)
    if not os.path.isfile(os.path.join(dest_dir, TOKENIZER_JSON)):
        raise ConversionError(f"{gguf_file}: its tokenizer did not produce a tokenizer.json")


def tokenizer_record(tokenizer_json: str, eod_token: Optional[str] = None) -> dict:
    """The ``tokenizer`` block of checkpoint_info.json (path relative to the checkpoint).

    sha256, vocabulary size and EOD come from the loader preprocessing uses
    (``megatron_miniplm.data.tokenizer``), so they equal what a dataset's meta
    records for the same tokenizer.json.
    """
    from megatron_miniplm.data.tokenizer import TokenizerError, load_tokenizer

    try:
        tok = load_tokenizer(tokenizer_json, eod_token)
    except TokenizerError as e:  # no EOD, unreadable file
        raise ConversionError(str(e)) from e
    return {
        "path": f"{TOKENIZER_DIR}/{TOKENIZER_JSON}",
        "sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
        "eod_token": tok.eod_token,
    }
