"""UserError: the common base of the exceptions that mean the user's input, arguments or
environment are wrong, not the code.

A tool reports one as a single line, `<tool>: error: <message>`, and exits 1 (see
megatron_miniplm.cli.runner), so its message must say what is wrong and where, without a
traceback to help. Each subclass also keeps the built-in base it had (ValueError for bad
values, RuntimeError for a bad launch environment), so that callers catching those still do.
"""


class UserError(Exception):
    """A refusal of the input, arguments or environment; the message says what and why."""
