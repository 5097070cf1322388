# SPDX-License-Identifier: Apache-2.0
"""Loggers of the ``nixl`` hierarchy, as NIXL's ``nixl.logging``.

``get_logger(__name__)`` gives ``nixl.<name>``; the ``nixl`` logger prints to stdout at INFO,
or at the level ``NIXL_LOG_LEVEL`` names (TRACE, DEBUG, INFO, WARN, ERROR, FATAL). The Rust
side logs to stderr when ``NIXL_LOG`` is set (e.g. ``NIXL_LOG=debug``).
"""

import logging
import os
import sys

_LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "FATAL": logging.CRITICAL,
}

_configured = False


def setup_logging() -> None:
    """Configures the ``nixl`` logger once (a stdout handler; level from NIXL_LOG_LEVEL)."""
    global _configured
    if _configured:
        return
    _configured = True
    root = logging.getLogger("nixl")
    if not root.handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(
            logging.Formatter(
                "%(asctime)s NIXL %(levelname)-7s %(filename)s:%(lineno)d %(message)s",
                "%Y-%m-%d %H:%M:%S",
            )
        )
        root.addHandler(h)
        root.propagate = False
    root.setLevel(logging.INFO)
    want = os.environ.get("NIXL_LOG_LEVEL")
    if want:
        level = _LEVELS.get(want.upper())
        if level is None:
            root.warning("Invalid NIXL_LOG_LEVEL value %r: keeping INFO", want)
        else:
            root.setLevel(level)


def get_logger(name: str) -> logging.Logger:
    """The logger ``nixl.<name>`` (leading underscores dropped)."""
    setup_logging()
    return logging.getLogger("nixl." + name.lstrip("_"))
