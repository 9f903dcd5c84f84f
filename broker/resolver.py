"""From (kind, Airflow id) to a value: validate the id, walk the backend chain in config order, normalise.

A backend that errors is never skipped in favour of a lower one: the error propagates (the cache may then
answer from stale). Only an authoritative "not found" moves on to the next backend.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from broker.backends.base import Kind, Lease, SecretNotFound
from broker.backends.guard import Guard
from broker.normalize import normalise

MAX_NAME = 250
# Airflow ids are [\w.-]; variable keys and config names in practice add a few path-safe marks.
# '/', '\\', '%', '?', '#', whitespace and control characters are refused so that no id can reach
# outside its configured prefix or path in any store, whatever URL or path building a store does.
_NAME = re.compile(r"^[\w.\-:@+=,~]+$")


def name_problem(name: str) -> str | None:
    """Why ``name`` is not an acceptable Airflow id, or None."""
    if not name:
        return "name is empty"
    if len(name) > MAX_NAME:
        return f"name is longer than {MAX_NAME} characters"
    if name in (".", ".."):
        return "name may not be '.' or '..'"
    if not _NAME.match(name) or any(unicodedata.category(c)[0] == "C" for c in name):
        return "name may contain only letters, digits and _ . - : @ + = , ~"
    return None


@dataclass(slots=True)
class Resolved:
    """A value ready to serve, and where it came from. Repr never shows the value."""

    value: str
    backend: str
    version: str | None
    lease: Lease | None
    ttl: float
    max_stale: float

    def __repr__(self) -> str:
        return f"Resolved(<redacted>, backend={self.backend!r}, version={self.version!r}, lease={self.lease!r})"


class Resolver:
    """Walks the guarded backends in order for one key."""

    def __init__(self, guards: Sequence[Guard], default_ttl: float, default_max_stale: float) -> None:
        self.guards = list(guards)
        self.default_ttl = default_ttl
        self.default_max_stale = default_max_stale

    def guard(self, name: str) -> Guard:
        return next(g for g in self.guards if g.name == name)

    async def resolve(self, kind: Kind, name: str) -> Resolved:
        """The first backend's value. Raises SecretNotFound when no backend has it, else the first error."""
        for guard in self.guards:
            path = guard.backend.locate(kind, name)
            if path is None:
                continue
            try:
                secret = await guard.fetch(kind, path)
            except SecretNotFound:
                continue
            cfg = guard.backend.config
            ttl = cfg.ttl if cfg.ttl is not None else self.default_ttl
            if secret.ttl_hint is not None:
                ttl = max(0.0, min(ttl, secret.ttl_hint))
            return Resolved(
                value=normalise(kind, secret.value, f"{guard.name}:{path}"),
                backend=guard.name,
                version=secret.version,
                lease=secret.lease,
                ttl=ttl,
                max_stale=cfg.max_stale if cfg.max_stale is not None else self.default_max_stale,
            )
        raise SecretNotFound(f"{kind} not found in any backend")
