"""Helpers the op modules share: whether the compiled library is loaded, and one-time fallback warnings."""

from __future__ import annotations

import warnings

from pydc import extension

HAS_OPS = extension.has_ops()
_warned: set[str] = set()


def warn_fallback(op_name: str) -> None:
    """Warn once per op that the pure-torch reference runs instead of the compiled kernel."""
    if op_name not in _warned:
        _warned.add(op_name)
        warnings.warn(
            f"pydc.ops.{op_name}: compiled ops unavailable ({extension.load_error()}); running the pure-torch "
            "reference instead, which is correct but slower",
            RuntimeWarning,
            stacklevel=3,
        )
