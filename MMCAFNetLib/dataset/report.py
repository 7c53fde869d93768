"""What an indexing run skipped and why: one warning line per item, counts by reason."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

logger = logging.getLogger("MMCAFNetLib.dataset")


@dataclass
class IndexReport:
    """Collects skipped items (warnings) and informational counts during indexing."""

    warnings: list[tuple[str, str]] = field(default_factory=list)  # (reason, message)
    counts: Counter = field(default_factory=Counter)  # informational: series kept, filtered, ...
    sink: Callable[[str], None] | None = None

    def warn(self, reason: str, message: str) -> None:
        """Record one skipped item: exactly one warning line."""
        self.warnings.append((reason, message))
        line = f"warning: {message}"
        if self.sink is not None:
            self.sink(line)
        else:
            logger.warning(message)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    @property
    def skipped(self) -> Counter:
        return Counter(reason for reason, _ in self.warnings)

    def messages(self, reason: str | None = None) -> list[str]:
        return [m for r, m in self.warnings if reason is None or r == reason]
