"""The selection's settings: tools/difference_sample.py's flags (a config module: no numpy)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

from megatron_miniplm.settings import setting
from megatron_miniplm.errors import UserError


METHODS = ("difference", "uniform", "teacher", "reference")
ORDERS = ("original", "shuffled")
class SelectionError(UserError, ValueError):
    """A selection that must not run; the message says why (and names the file)."""
@dataclass(frozen=True)
class SelectionConfig:
    """Which instances to keep; its settings are tools/difference_sample.py's flags."""

    method: str = setting("difference", group="selection", choices=METHODS,
                          help="difference (MiniPLM), or a baseline: uniform random, teacher (lowest "
                               "teacher NLL), reference (highest reference NLL)")
    alpha: Optional[float] = setting(None, group="selection", one_of="budget",
                                     help="fraction of instances to keep, in (0, 1]: round(alpha x N), ties by the "
                                          "lower index (the official script keeps int(alpha x N))")
    keep_tokens: Optional[int] = setting(None, group="selection", one_of="budget",
                                         help="or a token budget: the best instances whose total fits")
    order: str = setting("original", group="selection", flag="--data-order", choices=ORDERS,
                         help="order of the blend's instances")
    seed: int = setting(1234, group="selection", help="seed of the shuffled order and the uniform baseline")
    num_threads: int = setting(0, group="selection", fingerprinted=False, help="C++ worker threads (0: all cores)")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SelectionError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.order not in ORDERS:
            raise SelectionError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if (self.alpha is None) == (self.keep_tokens is None):
            raise SelectionError("give exactly one of alpha (a fraction of instances) or keep_tokens (a token budget)")
        if self.alpha is not None and not (math.isfinite(self.alpha) and 0.0 < self.alpha <= 1.0):
            raise SelectionError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.keep_tokens is not None and (not isinstance(self.keep_tokens, numbers.Integral) or self.keep_tokens < 1):
            raise SelectionError(f"keep_tokens must be a positive integer, got {self.keep_tokens!r}")
        if not isinstance(self.seed, numbers.Integral) or not 0 <= self.seed < 2**64:
            raise SelectionError(f"seed must be an integer in [0, 2^64), got {self.seed!r}")

    @property
    def models_needed(self) -> tuple[str, ...]:
        return {"difference": ("teacher", "reference"), "teacher": ("teacher",),
                "reference": ("reference",), "uniform": ()}[self.method]
