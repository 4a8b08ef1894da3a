"""Visible fallbacks: every slower or non-flash_quant path is counted per reason and
logged once per reason (through `logging`).

Under torch.compile the counters still count (dynamo replays the dict update on every
call of the compiled graph) but the log line is written only from eager calls: a logging
call inside a graph would be a graph break.
"""
from __future__ import annotations

import logging
from typing import Dict

import torch

__all__ = ["FallbackCounter"]


class FallbackCounter:
    """Per-reason counts of one kind of fallback, with a log line the first time each
    reason occurs."""

    def __init__(self, logger: logging.Logger, what: str, read_with: str):
        self._logger = logger
        self._what = what
        self._read_with = read_with
        self._counts: Dict[str, int] = {}
        self._logged: set = set()

    def hit(self, reason: str, detail: str = "") -> None:
        self._counts[reason] = self._counts.get(reason, 0) + 1
        if not torch.compiler.is_compiling() and reason not in self._logged:
            self._logged.add(reason)
            self._logger.warning(
                "%s [%s]%s (logged once per reason; counts: %s)",
                self._what, reason, f": {detail}" if detail else "", self._read_with,
            )

    def counts(self) -> Dict[str, int]:
        """A copy of the per-reason counts."""
        return dict(self._counts)

    def reset(self) -> None:
        """Zero the counts and log each reason again the next time it occurs."""
        self._counts.clear()
        self._logged.clear()
