"""The package's logger ("jax_rmsnorm"), and warnings said once."""

from __future__ import annotations

import logging

logger = logging.getLogger("jax_rmsnorm")
_warned: set[str] = set()


def warn_once(message: str) -> None:
  """A WARNING, the first time this process sees `message`."""
  if message not in _warned:
    _warned.add(message)
    logger.warning("%s", message)
