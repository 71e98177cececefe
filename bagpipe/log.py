"""One logger setup for every process of a job."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("bagpipe")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (pytest swaps it per test), not the one at set-up."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def init_logger(role: str = "", level: str | None = None) -> logging.Logger:
    """Configure the ``bagpipe`` logger once per process, tagging lines with the role."""
    level = level or os.environ.get("BAGPIPE_LOG", "INFO")
    root = logging.getLogger("bagpipe")
    if not root.handlers:
        handler = _StderrHandler()
        tag = f"[{role}] " if role else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level)
    return root
