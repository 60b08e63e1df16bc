"""The one error type of checkpoint conversion: the CLI prints its message and exits 2."""


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says what and why."""
