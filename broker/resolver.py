"""From (kind, Airflow id) to a value: validate the id, walk the backend chain in config order, normalise.

A backend that errors is never skipped in favour of a lower one: the error propagates (the cache may then
answer from stale). Only an authoritative "not found" moves on to the next backend.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote

from broker.backends.base import BrokerError, Kind, Lease, SecretNotFound
from broker.backends.guard import Guard
from broker.normalize import normalise, provider_form

MAX_NAME = 250
# Airflow ids are [\w.-]; variable keys and config names in practice add a few path-safe marks, and
# nested ids (``team/db``) use '/' between segments, as the provider backends find them.
# '\\', '%', '?', '#', whitespace and control characters are refused, and so are '.', '..' and empty
# segments (so a leading or trailing '/' too), so that no id can reach outside its configured prefix or
# path in any store, whatever URL or path building a store does.
_SEGMENT = re.compile(r"^[\w.\-:@+=,~]+$")
# Airflow's team names (``airflow teams create``): the same rule, so a team can never carry a separator.
TEAM = re.compile(r"^[A-Za-z0-9_-]{3,50}$")


def _has_other(name: str) -> bool:
    """Whether ``name`` holds a control, format, surrogate, private-use or unassigned character (category C).
    Of the ASCII characters only the controls are, and they are exactly those ``isprintable`` refuses: an
    ASCII name is checked without reading the Unicode database."""
    if name.isascii():
        return not name.isprintable()
    return any(unicodedata.category(c)[0] == "C" for c in name)


def name_problem(name: str) -> str | None:
    """Why ``name`` is not an acceptable Airflow id, or None."""
    if not name:
        return "name is empty"
    if len(name) > MAX_NAME:
        return f"name is longer than {MAX_NAME} characters"
    if _has_other(name):
        return "name may contain only letters, digits and _ . - : @ + = , ~ (and / between segments)"
    for segment in name.split("/"):
        if not segment:
            return "name may not start or end with '/' or contain '//'"
        if segment in (".", ".."):
            return "name may not be or contain a '.' or '..' segment"
        if not _SEGMENT.match(segment):
            return "name may contain only letters, digits and _ . - : @ + = , ~ (and / between segments)"
    return None


def decode_name(raw: str) -> tuple[str | None, str | None]:
    """(name, None) for a still percent-encoded id taken from a request path, else (None, problem).

    Each '/'-separated segment is decoded on its own, so an encoded separator (``%2F``, ``%5C``) never
    becomes one: a nested id is sent with literal slashes.
    """
    parts = []
    for segment in raw.split("/"):
        try:
            part = unquote(segment, errors="strict")
        except UnicodeDecodeError:
            return None, "name is not valid UTF-8"
        if "/" in part or "\\" in part:
            return None, "name may not contain an encoded '/' or '\\' (send nested ids with literal '/')"
        parts.append(part)
    name = "/".join(parts)
    problem = name_problem(name)
    return (None, problem) if problem else (name, None)


def team_problem(team: str) -> str | None:
    """Why ``team`` is not an acceptable Airflow team name, or None."""
    if not TEAM.match(team):
        return "team must be 3 to 50 letters, digits, '_' or '-' (Airflow's team names)"
    return None


def held_by(guard: Guard, exc: BrokerError) -> None:
    """Name ``guard`` as the holder of the lease ``exc`` carries, if any: the cache gives that lease back."""
    if exc.lease is not None:
        exc.lease_holder = guard


@dataclass(slots=True)
class Resolved:
    """A value ready to serve, and where it came from. Repr never shows the value."""

    value: str
    backend: str
    version: str | None
    lease: Lease | None
    ttl: float
    max_stale: float
    source: Guard | None = field(default=None, compare=False)  # the guarded backend that answered (for leases)
    # The string the provider backend would hand Airflow, where it differs from ``value`` (a stored URI,
    # or JSON as the store holds it): served as ``provider_value`` for the Airflow client.
    provider_value: str | None = None

    def __repr__(self) -> str:
        return f"Resolved(<redacted>, backend={self.backend!r}, version={self.version!r}, lease={self.lease!r})"


class NotFoundAnywhere(SecretNotFound):
    """No backend in the chain has the key. ``negative_ttl``: how long to remember that (the shortest
    ``negative_ttl`` of the backends that were asked, each defaulting to the cache's)."""

    def __init__(self, message: str, negative_ttl: float) -> None:
        super().__init__(message)
        self.negative_ttl = negative_ttl


class Resolver:
    """Walks the guarded backends in order for one key, and each backend's candidate paths in order."""

    def __init__(
        self,
        guards: Sequence[Guard],
        default_ttl: float,
        default_max_stale: float,
        default_negative_ttl: float = 0.0,
        *,
        multi_team: bool = False,
    ) -> None:
        self.guards = list(guards)
        self.default_ttl = default_ttl
        self.default_max_stale = default_max_stale
        self.default_negative_ttl = default_negative_ttl
        self.multi_team = multi_team

    async def resolve(self, kind: Kind, name: str, team: str | None = None) -> Resolved:
        """The first value found. Raises NotFoundAnywhere when no backend has it, else the first error."""
        negative_ttl: float | None = None
        for guard in self.guards:
            paths = guard.backend.candidates(kind, name, team, multi_team=self.multi_team)
            if not paths:
                continue
            cfg = guard.backend.config
            own = cfg.negative_ttl if cfg.negative_ttl is not None else self.default_negative_ttl
            negative_ttl = own if negative_ttl is None else min(negative_ttl, own)
            for path in paths:
                try:
                    secret = await guard.fetch(kind, path)
                except SecretNotFound:
                    continue
                except BrokerError as exc:
                    held_by(guard, exc)
                    raise
                try:
                    value = normalise(kind, secret.value, f"{guard.name}:{path}")
                except BrokerError as exc:
                    exc.lease = secret.lease
                    held_by(guard, exc)
                    raise
                ttl = cfg.ttl if cfg.ttl is not None else self.default_ttl
                if secret.ttl_hint is not None:
                    ttl = max(0.0, min(ttl, secret.ttl_hint))
                provided = provider_form(kind, secret.value)
                return Resolved(
                    value=value,
                    backend=guard.name,
                    version=secret.version,
                    lease=secret.lease,
                    ttl=ttl,
                    max_stale=cfg.max_stale if cfg.max_stale is not None else self.default_max_stale,
                    source=guard,
                    provider_value=None if provided == value else provided,
                )
        raise NotFoundAnywhere(
            f"{kind} not found in any backend",
            self.default_negative_ttl if negative_ttl is None else negative_ttl,
        )
