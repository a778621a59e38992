"""Node ids: which node (engine and its keyd) an audit log belongs to. One log, one node:
the id is written into every segment header (docs/audit-format.md) and never changes within
a log. Light on purpose: the CLI's parsers import it to state and check ``--node-id``."""

from __future__ import annotations

import re
import socket

__all__ = ["FALLBACK_NODE_ID", "MAX_NODE_ID", "NODE_ID_CHARS", "default_node_id", "is_node_id"]

MAX_NODE_ID = 64
#: The characters a node id may hold, as a regex character class.
NODE_ID_CHARS = "A-Za-z0-9._-"
_NODE_ID = re.compile(f"[{NODE_ID_CHARS}]{{1,{MAX_NODE_ID}}}")
_OTHER_CHARS = re.compile(f"[^{NODE_ID_CHARS}]+")
#: The id of a machine whose host name has none of the allowed characters.
FALLBACK_NODE_ID = "node"


def is_node_id(value: object) -> bool:
    """*value* is a valid node id: a string of 1 to 64 characters from A-Z a-z 0-9 . _ -."""
    return isinstance(value, str) and _NODE_ID.fullmatch(value) is not None


def default_node_id() -> str:
    """This host's name (``socket.gethostname()``) as a node id: every run of other
    characters replaced by ``-``, cut to 64 characters, without a leading or trailing ``-``
    (``node`` if nothing is left)."""
    cleaned = _OTHER_CHARS.sub("-", socket.gethostname())[:MAX_NODE_ID].strip("-")
    return cleaned or FALLBACK_NODE_ID
