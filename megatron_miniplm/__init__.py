"""megatron-miniplm: MiniPLM knowledge distillation as a step of Megatron-style pre-training.

The data path: preprocess -> score -> select -> train -> evaluate.
"""

__version__ = "0.1.0"

import sys as _sys
import warnings as _warnings

# Notices that megatron-core and torch print about themselves, not news to our users:
# apex and Transformer Engine are optional by design, and the deprecations are internal
# to those libraries (gloo's reduce_scatter_tensor / all_gather_into_tensor included,
# which megatron-core's distributed optimizer calls).
# (message regex, category); tests/conftest.py applies the same list under pytest.
THIRD_PARTY_NOTICES = (
    ("Transformer Engine and Apex are not installed", UserWarning),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning),
    ("full scope is deprecated", UserWarning),
    (".*tp_group is None, using default tp group", DeprecationWarning),
    ("MLP requires ffn_hidden_size, but it was not provided", DeprecationWarning),
    ("The following imports from `dynamic_context.py` will be removed", DeprecationWarning),
    ("The 'megatron.core.transformer.custom_layers.transformer_engine'", DeprecationWarning),
    ("`torch.jit.script_method` is deprecated", DeprecationWarning),
    ("Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
    ("`load_state_dict` is deprecated and will be removed", FutureWarning),
    ("`torch.distributed.reduce_scatter_tensor` is deprecated", FutureWarning),
    ("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning),
)
for _message, _category in THIRD_PARTY_NOTICES:
    _warnings.filterwarnings("ignore", message=_message, category=_category)


class _ProbeTransformerEngineFirst:
    """A meta-path finder that runs the Transformer Engine probe (``platform.transformer_engine``)
    just before megatron-core is first imported, wherever that import comes from (a data
    module, a tool's first step), and then steps aside. megatron-core imports TE guarded
    against ImportError only, so a TE whose PyTorch part fails otherwise must be hidden before
    that; this module itself imports no torch, so the hook costs nothing until then. It also
    has megatron-core's fused functions compiled at their first call rather than wrapped at
    import (``megatron_compat.compile_fusions_at_first_call``)."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname == "megatron" or fullname.startswith("megatron."):
            _sys.meta_path.remove(cls)
            from megatron_miniplm import megatron_compat, platform

            platform.transformer_engine()
            megatron_compat.compile_fusions_at_first_call()
        return None  # the import itself is left to the other finders


if "megatron.core" not in _sys.modules:
    _sys.meta_path.insert(0, _ProbeTransformerEngineFirst)
