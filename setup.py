"""Builds megatron_miniplm and its C++ (pybind11) extension, megatron_miniplm._cpp."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "megatron_miniplm._cpp",
        sorted(["csrc/bindings.cpp", "csrc/bpe.cpp", "csrc/bpe_bindings.cpp", "csrc/difference.cpp", "csrc/gather.cpp",
                "csrc/rank_keys.cpp", "csrc/select.cpp", "csrc/simd.cpp"]),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

# One console script per tool: miniplm-<tool> (underscores as hyphens) runs
# megatron_miniplm.cli.<tool>:main, the code behind tools/<tool>.py; tests/test_packaging.py
# checks that every tools/*.py has one and every one a tools/*.py.
TOOLS = sorted(["build_demo_corpus", "convert_checkpoint", "difference_sample", "evaluate", "export_selection",
                "model_info", "pipeline", "preprocess_data", "pretrain_gpt", "score_docs", "split_dataset", "generate_corpus"])
CONSOLE_SCRIPTS = [f"miniplm-{tool.replace('_', '-')} = megatron_miniplm.cli.{tool}:main" for tool in TOOLS]

setup(
    name="megatron-miniplm",
    version="0.1.0",
    description="Megatron-style pre-training with MiniPLM knowledge distillation (Difference Sampling)",
    packages=find_packages(include=["megatron_miniplm", "megatron_miniplm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "transformers",
        "psutil",  # dist_checkpointing.save hangs without it
        "pyarrow",  # Parquet and datasets (Arrow) inputs of tools/preprocess_data.py
        "pyyaml",  # the pipeline config
        "tqdm",
        "zstandard",
    ],
    extras_require={
        # Transformer Engine with its PyTorch part (the bare name installs only the core
        # library), in the range megatron-core 0.16.1 declares. The PyTorch part builds from
        # source (nvcc, cuDNN headers). NVIDIA apex is not on PyPI (the "apex" there is
        # another project): megatron-core runs without it.
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12"],
        "hf": ["gguf", "accelerate", "safetensors"],
        "report": ["matplotlib"],
        "eval": ["lm_eval==0.4.13"],
        "wandb": ["wandb>=0.17"],  # Weights & Biases logging (--wandb-project)
        "tensorboard": ["tensorboard"],  # --tensorboard-dir
        "dev": ["pytest", "gguf", "accelerate", "safetensors", "matplotlib", "lm_eval==0.4.13", "wandb>=0.17",
                "tensorboard"],
    },
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
