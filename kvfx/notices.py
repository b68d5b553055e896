"""One-time warnings: a fallback taken at every decode step is reported once, not once per step."""

from __future__ import annotations

import warnings

_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)
