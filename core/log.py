"""Logging helpers. Fallbacks and optional-dependency choices are said once, never silently."""

from __future__ import annotations

import logging

log = logging.getLogger("stripes")
_said: set[str] = set()


def note_once(message: str) -> None:
    """Log `message` at INFO the first time it is seen in this process."""
    if message not in _said:
        _said.add(message)
        log.info(message)
