"""The one error type of checkpoint conversion: a refusal, which the CLI prints as one line and
exits 1."""

from megatron_miniplm.errors import UserError


class ConversionError(UserError, ValueError):
    """A checkpoint that cannot be converted; the message says what and why."""
