"""fastkd's messages go through Python's `logging`, logger "fastkd": progress and information
(INFO) to standard output, warnings and errors to standard error, bare messages, from rank 0
only under torchrun (a filter; every rank's errors still surface as its exit).

Quiet it, redirect it or change its format as with any logger, for example
`logging.getLogger("fastkd").setLevel(logging.WARNING)`, or `fastkd --log-level warning ...`.
Results a command prints (tables, summaries) and progress bars are not log messages.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("fastkd")


class RankZeroOnly(logging.Filter):
    """Drops records below ERROR on every torchrun rank but 0 (RANK from the environment)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or int(os.environ.get("RANK", "0")) == 0


class _CurrentStream(logging.StreamHandler):
    """Writes to sys.stdout or sys.stderr as they are when a record is emitted (not as they were
    when the handler was made: a redirected or captured stream is followed)."""

    def __init__(self, name: str, *, below_warning: bool):
        super().__init__()
        self._name = name
        self.addFilter(lambda record: (record.levelno < logging.WARNING) == below_warning)

    @property
    def stream(self):
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it
        pass


def _install() -> None:
    if getattr(log, "_fastkd_handlers", False):
        return
    for name, below in (("stdout", True), ("stderr", False)):
        handler = _CurrentStream(name, below_warning=below)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(RankZeroOnly())
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # not twice through a root handler an application configured
    log._fastkd_handlers = True  # type: ignore[attr-defined]


_install()
