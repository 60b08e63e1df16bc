"""One tokenizer interface over HF `tokenizers` (tokenizer.json) and sentencepiece (.model).

Every stage loads its tokenizer through `load_tokenizer`, so the EOD id, vocabulary size
and hash recorded in a dataset's meta file are computed one way and can be checked later.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from megatron_miniplm.errors import UserError

# Document-end tokens, most specific first. "<|endoftext|>" (GPT-2, Qwen, SmolLM) and
# "<|end_of_text|>" (Llama 3) mark the end of a *document*; chat end tokens such as
# "<|im_end|>" (often the configured eos of instruct tokenizers) do not, so they are
# only used when nothing better exists and the config names them.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")

_FAST_BPE_LOCK = threading.Lock()  # HFTokenizer builds its fast encoder once, on first use


class TokenizerError(UserError, ValueError):
    """A tokenizer file that cannot be used: the message names the file and the reason."""


def file_sha256(path: str, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class Tokenizer(ABC):
    """What the pipeline needs from a tokenizer. No BOS/EOS is added by `encode_batch`:
    the EOD is appended once per document by `encode_batch_flat(texts, append_id=eod_id)`
    (the preprocessing worker's call)."""

    kind: str
    path: str  # absolute path of the file that defines the tokenization
    name: str
    sha256: str
    vocab_size: int  # max token id + 1 (added tokens included)
    eod_id: int
    eod_token: str

    @property
    def pad_id(self) -> int:
        # MiniPLM masks predictions made *from* pad tokens and sets pad = EOD.
        return self.eod_id

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        ...

    @abstractmethod
    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        ...

    def encode_batch_flat(self, texts: Sequence[str], append_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated (int32), and each text's length; `append_id` is
        appended after every text (and counted in its length). The fast path for
        preprocessing: one numpy conversion per batch instead of one per document."""
        flat: list[int] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        extra = 0 if append_id is None else 1
        for i, ids in enumerate(self._ids_iter(texts)):
            flat.extend(ids)
            if append_id is not None:
                flat.append(append_id)
            lengths[i] = len(ids) + extra
        return np.array(flat, dtype=np.int32), lengths

    def _ids_iter(self, texts: Sequence[str]):
        return self.encode_batch(texts)

    def token_surfaces(self) -> list[str]:
        """The text each token id contributes when it follows other text ("" for special
        tokens). Decoding a token after a plain reference token keeps the leading space
        that decoders strip at the start of a text (sentencepiece's "▁", Metaspace)."""
        ref = self.encode_batch(["a"])[0]
        ids = range(self.vocab_size)
        if len(ref) != 1:
            return self.decode_batch([[i] for i in ids])
        prefix = self.decode(ref)
        paired = self.decode_batch([[ref[0], i] for i in ids])
        alone = None
        out = []
        for i, text in zip(ids, paired):
            if prefix and text.startswith(prefix):
                out.append(text[len(prefix):])
            else:
                if alone is None:
                    alone = self.decode_batch([[j] for j in ids])
                out.append(alone[i])
        return out

    def info(self) -> dict:
        """The tokenizer block of a dataset's meta.json."""
        return {
            "path": self.path,
            "name": self.name,
            "type": self.kind,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "eod_token": self.eod_token,
            "pad_id": self.pad_id,
        }


class HFTokenizer(Tokenizer):
    """A HF `tokenizers` tokenizer.json (Qwen, Llama 3, SmolLM, GPT-2...)."""

    kind = "hf"

    def __init__(self, path: str, eod_token: str | None = None):
        from tokenizers import Tokenizer as RustTokenizer

        path = os.path.abspath(path)
        if os.path.isdir(path):
            config_dir = path
            file = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(file):
                raise TokenizerError(f"{path}: directory has no tokenizer.json")
            self.name = os.path.basename(path.rstrip("/"))
        else:
            config_dir = os.path.dirname(path)
            file = path
            stem = os.path.basename(path)
            self.name = os.path.basename(config_dir) if stem == "tokenizer.json" else stem.rsplit(".", 1)[0]
        try:
            self._tok = RustTokenizer.from_file(file)
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise TokenizerError(f"{file}: not a valid HF tokenizer.json ({e})") from e
        # A literal "<|endoftext|>" inside a document is text, not a document end.
        if hasattr(self._tok, "encode_special_tokens"):
            self._tok.encode_special_tokens = True
        self._fast = hasattr(self._tok, "encode_batch_fast")  # tokenizers >= 0.21: no offsets
        self.path = file
        self.sha256 = file_sha256(file)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.eod_token, self.eod_id = self._find_eod(vocab, eod_token, config_dir)
        self._fast_bpe = None
        self._fast_bpe_ready = False

    def _fast_encoder(self):
        """The native byte-level BPE encoder (data/fast_bpe.py) when this tokenizer is one
        it reproduces exactly, else None; decided and self-checked on first use."""
        if not self._fast_bpe_ready:
            with _FAST_BPE_LOCK:
                if not self._fast_bpe_ready:
                    # Special-token text must be plain text, as the fast encoder treats it.
                    if getattr(self._tok, "encode_special_tokens", False) is True:
                        from megatron_miniplm.data.fast_bpe import load_fast_bpe

                        self._fast_bpe = load_fast_bpe(self.path, self._reference_ids)
                    self._fast_bpe_ready = True
        return self._fast_bpe

    def _reference_ids(self, texts: list[str]) -> list[list[int]]:
        return list(self._ids_iter(texts))

    def _find_eod(self, vocab: dict[str, int], eod_token: str | None, config_dir: str) -> tuple[str, int]:
        if eod_token is not None:
            if eod_token not in vocab:
                raise TokenizerError(f"{self.path}: --eod-token {eod_token!r} is not in the vocabulary")
            return eod_token, vocab[eod_token]
        for cand in EOD_CANDIDATES:
            if cand in vocab:
                return cand, vocab[cand]
        cfg = os.path.join(config_dir, "tokenizer_config.json")
        if os.path.isfile(cfg):
            with open(cfg, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and eos in vocab:
                return eos, vocab[eos]
        raise TokenizerError(
            f"{self.path}: no end-of-document token found (tried {', '.join(EOD_CANDIDATES)} "
            "and tokenizer_config.json's eos_token); name the EOD token (eod_token, --eod-token)"
        )

    def _ids_iter(self, texts):
        encode = self._tok.encode_batch_fast if self._fast else self._tok.encode_batch
        return (e.ids for e in encode(list(texts), add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        fast = self._fast_encoder()
        if fast is None:
            return list(self._ids_iter(texts))
        tokens, lengths = fast.encode_flat(texts)
        flat, out, start = tokens.tolist(), [], 0
        for n in lengths.tolist():
            out.append(flat[start:start + n])
            start += n
        return out

    def encode_batch_flat(self, texts: Sequence[str], append_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        fast = self._fast_encoder()
        if fast is None:
            return super().encode_batch_flat(texts, append_id)
        return fast.encode_flat(texts, append_id)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(_ints(ids), skip_special_tokens=True)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return self._tok.decode_batch([_ints(ids) for ids in batch], skip_special_tokens=True)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece .model (Llama 2, T5, Gemma...). EOD defaults to the model's eos."""

    kind = "sentencepiece"

    def __init__(self, path: str, eod_token: str | None = None, num_threads: int = 1):
        import sentencepiece as spm

        self.path = os.path.abspath(path)
        self.name = os.path.basename(self.path).rsplit(".", 1)[0]
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except Exception as e:
            raise TokenizerError(f"{self.path}: not a valid sentencepiece model ({e})") from e
        self._threads = num_threads
        self.sha256 = file_sha256(self.path)
        self.vocab_size = self._sp.get_piece_size()
        self.eod_token, self.eod_id = self._find_eod(eod_token)

    def _piece_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        return i if (i != self._sp.unk_id() or piece == self._sp.id_to_piece(i)) else None

    def _find_eod(self, eod_token: str | None) -> tuple[str, int]:
        if eod_token is not None:
            i = self._piece_id(eod_token)
            if i is None:
                raise TokenizerError(f"{self.path}: --eod-token {eod_token!r} is not a piece of the model")
            return eod_token, i
        if self._sp.eos_id() >= 0:
            return self._sp.id_to_piece(self._sp.eos_id()), self._sp.eos_id()
        for cand in EOD_CANDIDATES:
            if (i := self._piece_id(cand)) is not None:
                return cand, i
        raise TokenizerError(f"{self.path}: the model has no eos piece; name the EOD token (eod_token, --eod-token)")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=self._threads)

    def token_surfaces(self) -> list[str]:
        """As for any tokenizer, but "" for the unknown piece: it decodes as " ⁇ ", which
        stands for characters the model lacks, not for a space and a question mark."""
        out = super().token_surfaces()
        for i in range(self.vocab_size):
            if self._sp.is_unknown(i) or self._sp.is_control(i):
                out[i] = ""
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(_ints(ids))

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return self._sp.decode([_ints(ids) for ids in batch], num_threads=self._threads)


def _ints(ids: Sequence[int]) -> list[int]:
    """Python ints for the decoders (numpy arrays convert in one call)."""
    return ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]


def load_tokenizer(path: str, eod_token: str | None = None) -> Tokenizer:
    """A tokenizer from a HF tokenizer.json (or a directory holding one) or a
    sentencepiece .model file. `eod_token` overrides the end-of-document token."""
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: tokenizer not found")
    if os.path.isdir(path) or path.endswith(".json"):
        return HFTokenizer(path, eod_token)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path, eod_token)
    raise TokenizerError(f"{path}: unknown tokenizer format (expected tokenizer.json, a directory holding one, or a sentencepiece .model)")
