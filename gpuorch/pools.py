"""Node pools: what a pool name is. Agents join one pool (--pool); a job runs only in the pool it asks for."""

from __future__ import annotations

import re

DEFAULT_POOL = "default"
"""The pool of an agent that names none, and of a job that asks for none."""
MAX_POOL_NAME = 63
_POOL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def pool_name_problem(name: str) -> str | None:
    """Why `name` is not a valid pool name, naming it; None if it is (the empty name means the default)."""
    if name == "":
        return None
    if len(name) > MAX_POOL_NAME or not _POOL_NAME.match(name):
        return (
            f"pool {name[:80]!r} is not a valid pool name (lower-case letters, digits, '-' and '_', "
            f"starting with a letter or digit; at most {MAX_POOL_NAME} characters)"
        )
    return None


def pool_or_default(name: str) -> str:
    return name or DEFAULT_POOL
