"""The generation run's settings: tools/generate_corpus.py's flags (a config module: no torch).

The sampling defaults are the official MiniPLM code's (github.com/thu-coai/MiniPLM): its
SeqKD corpus comes from ``pretrain/inferer.py`` (PretrainGenInferer) with the defaults of
``arguments.py``: ``--temperature 1``, ``--top-p`` unset (no nucleus cut), ``--top-k`` unset,
``--max-prompt-length 512`` (the prompt is the first 512 tokens of an instance) and
generation up to ``--max-length`` tokens in all (its training length). The repository ships
no generation script. Its ``--do-sample`` is off by default, and transformers' ``generate``
then decodes greedily and ignores the temperature. This tool samples by default (temperature
1, the official default under ``--do-sample``); ``--temperature 0`` is the official
default's greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_miniplm import host_memory
from megatron_miniplm.models.config import LayerImpl
from megatron_miniplm.settings import setting

OFFICIAL_SOURCE = "thu-coai/MiniPLM arguments.py and pretrain/inferer.py (PretrainGenInferer)"


@dataclass(frozen=True)
class GenerateConfig:
    """A generation run; its settings are tools/generate_corpus.py's flags."""

    data_path: str = setting(group="data and model", metavar="PREFIX",
                             help="dataset whose instances give the prompts (tools/preprocess_data.py's output)")
    load: str = setting(group="data and model", metavar="CKPT",
                        help="the teacher: a megatron checkpoint directory (converted, or a trainer's save dir)")
    output_prefix: str = setting(group="data and model", metavar="PREFIX", flag="--output-prefix",
                                 help="prefix of the generated dataset (PREFIX.bin/.idx/.domains.npy/.meta.json)")
    prompt_length: int = setting(
        512, group="sampling",
        help="prompt: the first this many tokens of each instance (all of a shorter one); the default is "
             f"the official --max-prompt-length ({OFFICIAL_SOURCE})")
    max_length: Optional[int] = setting(
        None, group="sampling",
        help="tokens per generated sequence, prompt included, unless EOD ends it first; default: the "
             "dataset's instance length (seq_length + 1), as the official --max-length is its training length")
    temperature: float = setting(
        1.0, group="sampling",
        help=f"softmax temperature; 0 is greedy decoding; the default is the official --temperature ({OFFICIAL_SOURCE}), "
             "which applies under its --do-sample: without that flag the official code decodes greedily")
    top_p: float = setting(
        1.0, group="sampling",
        help="nucleus sampling: sample among the most likely tokens whose probabilities sum to top-p; "
             "the default, 1.0, keeps the whole vocabulary, as the official --top-p, which is unset")
    seed: int = setting(1234, group="sampling",
                        help="each instance's random numbers are a function of (seed, instance) alone; its tokens "
                             "also of the teacher's logits, which on a GPU another --micro-batch-size or "
                             "--tensor-model-parallel-size can change in their last bits (and so, rarely, a token)")
    max_instances: Optional[int] = setting(
        None, group="sampling", help="prompt only the first this many instances (default: all)")
    micro_batch_size: int = setting(8, group="parallelism and batching",
                                    help="sequences decoded together (prompts of equal length share a batch)")
    tensor_model_parallel_size: int = setting(1, group="parallelism and batching", help="tensor-parallel ranks")
    bf16: bool = setting(False, group="numerics and speed", help="bf16 weights and activations")
    layers: LayerImpl = field(default_factory=LayerImpl)  # --transformer-impl, --attention-backend, ...
    fsync: bool = setting(True, group="run", flag="--no-fsync", help="do not fsync progress records")
    progress: bool = setting(True, group="run", flag="--no-progress", help="no tqdm progress bar")
    keep_freed_memory: bool = host_memory.keep_freed_memory_setting("run")

    @property
    def dtype_name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def __post_init__(self):
        if self.prompt_length < 1:
            raise ValueError(f"--prompt-length must be >= 1, got {self.prompt_length}")
        if self.max_length is not None and self.max_length <= self.prompt_length:
            raise ValueError(f"--max-length {self.max_length} leaves nothing to generate after "
                             f"--prompt-length {self.prompt_length}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if self.max_instances is not None and self.max_instances < 1:
            raise ValueError(f"--max-instances must be >= 1, got {self.max_instances}")
