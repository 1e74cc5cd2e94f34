"""Placeholder: filled in by the rnn converters work."""

from __future__ import annotations

from typing import Any

CONVERTERS: dict[tuple[str, str], Any] = {}
