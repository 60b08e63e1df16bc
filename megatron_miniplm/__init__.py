"""megatron-miniplm: MiniPLM knowledge distillation as a step of Megatron-style pre-training.

The data path: preprocess -> score -> select -> train -> evaluate.
"""

__version__ = "0.1.0"

import warnings as _warnings

# apex and Transformer Engine are optional by design: megatron-core's notices of
# their absence are not news to our users.
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                 "full scope is deprecated"):
    _warnings.filterwarnings("ignore", message=_message)
