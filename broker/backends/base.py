"""The backend interface, the value types it returns and the one error tree every store maps onto.

A backend plug-in only builds requests and parses answers: it makes exactly one attempt per call and
raises one of the errors below. Retries, backoff, timeouts, circuit breaking, metrics, caching and lease
lifecycles are owned by the core (``broker.backends.guard`` and ``broker.cache``).

Plug-in modules must not import cloud SDKs at module level: ``broker.backends.load_type`` imports a
module to validate its config, and SDKs are imported only for backends that are really configured.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ssl
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import Field, field_validator

from broker.clock import Clock
from broker.configtypes import Duration, StrictModel
from broker.providerkw import ProviderKwarg

if TYPE_CHECKING:
    from broker.cache.leases import LeaseHolder
    from broker.metrics import Metrics
    from broker.ratelimit import SharedBuckets

T = TypeVar("T")


class Kind(enum.StrEnum):
    """What Airflow asks for."""

    CONNECTION = "connection"
    VARIABLE = "variable"
    CONFIG = "config"


_LAYOUT_PREFIX = {Kind.CONNECTION: "connections", Kind.VARIABLE: "variables", Kind.CONFIG: "config"}


# Separates the team from the id in a team-scoped secret name (Secrets Manager, SSM, GCP, Azure providers).
TEAM_SEP = "--"


def layout_key(config: object, kind: Kind, suffix: str) -> Any:
    """A per-kind layout setting by Airflow's naming, e.g. ``connections_prefix`` for (CONNECTION, "prefix")."""
    return getattr(config, _layout_name(kind, suffix))


@functools.cache
def _layout_name(kind: Kind, suffix: str) -> str:
    # One string per setting: the interpreter's attribute cache keeps a reference to each name string it is
    # asked for, so a name built per call left thousands of copies alive there.
    return f"{_LAYOUT_PREFIX[kind]}_{suffix}"


# ---------------------------------------------------------------------------------------------- errors


class BrokerError(Exception):
    """Root of the error tree. ``status`` and ``code`` are what the HTTP API answers.

    Messages must never contain a secret value: they may name a backend, a status and a secret path.
    """

    status: ClassVar[int] = 502
    code: ClassVar[str] = "backend_error"
    transient: ClassVar[bool] = False

    # A lease the store granted for an answer that could then not be used (a dynamic secret that does not
    # fit its connection template, a value that is not a connection): set where that is found, with the
    # guarded backend that holds it, so the cache gives the lease back instead of leaving it to expire.
    lease: Lease | None = None
    lease_holder: LeaseHolder | None = None

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class SecretNotFound(BrokerError):
    """The store answered, authoritatively, that the secret does not exist."""

    status = 404
    code = "not_found"


class AccessDenied(BrokerError):
    """The store refused the pod's identity for this secret (never turned into "not found")."""

    status = 403
    code = "forbidden"


class Unauthorized(BrokerError):
    """The caller's own credential (node mode: its pod's token) was missing or refused. Never retried."""

    status = 401
    code = "unauthorized"


class BackendError(BrokerError):
    """The store answered something we cannot use (malformed payload, CRC mismatch, KMS failure)."""

    status = 502
    code = "backend_error"


class BackendUnavailable(BrokerError):
    """The store could not be reached or answered 5xx. Transient: retried, then stale or 503."""

    status = 503
    code = "backend_unavailable"
    transient = True


class RateLimited(BackendUnavailable):
    """The store throttled us (``retry_after`` in seconds when the store said)."""


class BackendTimeout(BackendUnavailable):
    """The store did not answer within the configured timeout. Answered as 504."""

    status = 504
    code = "backend_timeout"


class Overloaded(BrokerError):
    """The broker refuses new work for now: a store's rate limit was reached and this call could not wait
    for its turn, or (node mode) every identity partition is busy.

    Answered as 429 ``overloaded``, never as "not found"; the cache serves a stale value when it has one.
    Transient: a refused refresh or renewal is tried again later.
    """

    status = 429
    code = "overloaded"
    transient = True


class ConfigurationError(Exception):
    """A config file or a reload is invalid. ``errors`` holds every problem as ``key.path: message``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  {e}" for e in errors))
        self.errors = errors


def is_transient(exc: BaseException) -> bool:
    """The one place that says which failures are worth retrying."""
    if isinstance(exc, BrokerError):
        return exc.transient
    return isinstance(exc, TimeoutError | ConnectionError | OSError)


# ---------------------------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease on a dynamic secret. ``issued_at`` and ``expires_at`` are on the broker's monotonic clock."""

    lease_id: str = field(repr=False)
    duration: float
    renewable: bool
    issued_at: float

    @property
    def expires_at(self) -> float:
        return self.issued_at + self.duration

    def __repr__(self) -> str:
        # Lease ids carry the secret path before the last segment; the last segment is the handle.
        head = self.lease_id.rsplit("/", 1)[0] if "/" in self.lease_id else "?"
        return f"Lease({head}/…, duration={self.duration:.0f}s, renewable={self.renewable})"


class SecretValue:
    """One secret as a backend returned it.

    ``value`` is a string, or for connections a mapping of Airflow connection fields (the resolver
    normalises both to the JSON string Airflow accepts). ``ttl_hint`` bounds the cache entry's freshness.
    """

    __slots__ = ("lease", "ttl_hint", "value", "version")

    def __init__(
        self,
        value: str | Mapping[str, Any],
        *,
        version: str | None = None,
        lease: Lease | None = None,
        ttl_hint: float | None = None,
    ) -> None:
        self.value = value
        self.version = version
        self.lease = lease
        self.ttl_hint = ttl_hint

    def __repr__(self) -> str:
        return f"SecretValue(<redacted>, version={self.version!r}, lease={self.lease!r}, ttl_hint={self.ttl_hint!r})"

    __str__ = __repr__


# ---------------------------------------------------------------------------------------------- config


class CircuitConfig(StrictModel):
    """Open after ``threshold`` consecutive transient failures; probe after ``cooldown`` (doubling up to
    ``max_cooldown`` while probes fail)."""

    threshold: int = Field(default=5, ge=1, le=1000)
    cooldown: Duration = Field(default=5.0, gt=0, le=3600)
    max_cooldown: Duration = Field(default=60.0, gt=0, le=86_400)


class RateLimitConfig(StrictModel):
    """A token bucket over every call to one store: ``per_second`` on average, ``burst`` at once.

    A cold miss waits at most ``max_wait`` for its turn (else 429 ``overloaded``); refreshes of entries
    in use, lease renewals, revocations and logins go first and wait up to the backend's ``timeout``.
    """

    per_second: float = Field(gt=0, le=100_000)
    burst: int = Field(default=1, ge=1, le=100_000)
    max_wait: Duration = Field(default=1.0, ge=0, le=60)


class BackendConfig(StrictModel):
    """Keys every backend accepts; plug-ins subclass this with their own (``extra="forbid"``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    type: str
    ttl: Duration | None = None
    max_stale: Duration | None = None
    negative_ttl: Duration | None = None
    ca_cert: Path | None = None
    timeout: Duration = Field(default=5.0, gt=0, le=120)
    retries: int = Field(default=3, ge=0, le=10)
    circuit_breaker: CircuitConfig = CircuitConfig()
    # Off unless set; store types with a documented request quota set their own default (docs/rate-limits.md).
    rate_limit: RateLimitConfig | None = None
    # The provider backend's kwargs that are not keys of ours, and how each is read (broker.providerkw).
    provider_kwargs: ClassVar[Mapping[str, ProviderKwarg]] = {}
    # Store types that open no network connection (file, env) set this False: ``ca_cert`` would do nothing.
    uses_tls: ClassVar[bool] = True

    @field_validator("ca_cert")
    @classmethod
    def _ca_cert_needs_tls(cls, value: Path | None) -> Path | None:
        if value is not None and not cls.uses_tls:
            raise ValueError("this backend type makes no network connection: ca_cert has no effect; remove it")
        return value


# ---------------------------------------------------------------------------------------------- context


@dataclass
class BackendContext:
    """What the core hands every backend: the shared thread pool, clock and metrics.

    ``workload_token`` is set in node mode only: the latest verified projected token of a pod of the
    identity this backend serves (None when none is valid). Backends that log in with the pod's token use
    it instead of a token file; it may be called from worker threads. ``rate_limits``, also node mode only,
    are the node's token buckets, shared by every partition's backend of a name.
    """

    executor: ThreadPoolExecutor
    clock: Clock
    metrics: Metrics
    workload_token: Callable[[], str | None] | None = None
    rate_limits: SharedBuckets | None = None

    def pod_token(self) -> str:
        """The caller's token in node mode. Raises AccessDenied when no pod of the identity holds a valid one."""
        assert self.workload_token is not None
        token = self.workload_token()
        if token is None:
            raise AccessDenied("node: no valid token of this identity's pods to log in with")
        return token

    async def run_blocking(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a blocking SDK call in the bounded pool, never on the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))


def ssl_context(ca_cert: Path | None) -> ssl.SSLContext:
    """A verifying TLS context, trusting ``ca_cert`` instead of the system store when given."""
    ctx = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# ---------------------------------------------------------------------------------------------- backend


class Backend(ABC):
    """A secret store. Subclasses set ``config_model`` and implement ``locate`` or ``candidates``, and ``fetch``."""

    config_model: ClassVar[type[BackendConfig]] = BackendConfig

    def __init__(self, config: BackendConfig, ctx: BackendContext) -> None:
        cls = type(self)
        if cls.locate is Backend.locate and cls.candidates is Backend.candidates:
            raise TypeError(f"{cls.__name__} must define locate or candidates (each defaults to the other)")
        self.config = config
        self.ctx = ctx

    @property
    def name(self) -> str:
        return self.config.name

    def locate(self, kind: Kind, name: str) -> str | None:
        """The store's secret path for an Airflow id, or None when this backend does not serve it
        (kind disabled by a null prefix, id outside a lookup pattern). Pure: no I/O.

        This default is the first of ``candidates`` for no team: a store writes one of the two.
        """
        paths = self.candidates(kind, name)
        return paths[0] if paths else None

    def candidates(self, kind: Kind, name: str, team: str | None = None, *, multi_team: bool = False) -> list[str]:
        """The store paths to try for an Airflow id, in order (the first one found answers); empty when this
        backend does not serve it. ``team`` is the caller's Airflow team, ``multi_team`` Airflow's
        ``[core] multi_team``. Pure: no I/O.

        This default serves the one path of ``locate`` and ignores the team: stores whose provider backend
        reads team-scoped secrets override it with the provider's rules.
        """
        path = self.locate(kind, name)
        return [] if path is None else [path]

    @abstractmethod
    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        """One attempt at reading ``path``.

        Raises SecretNotFound, AccessDenied, RateLimited, BackendUnavailable, BackendTimeout, BackendError.
        """

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Log in / warm identity. Called once at start-up before the backend serves; may raise."""

    async def check(self) -> str:
        """Prove the identity works without reading a secret; return a one-line description of it."""
        await self.start()
        return "usable"

    def check_warnings(self) -> list[str]:
        """Problems that leave the backend usable but are likely mistakes (e.g. it can serve nothing).

        Called after a successful ``check``; ``broker check --strict`` fails on any of them.
        """
        return []

    async def renew(self, lease: Lease, increment: float | None = None) -> Lease:
        """Extend a lease; returns the lease as the store now grants it. Raises like ``fetch``."""
        raise BackendError(f"backend {self.name!r} has no leases to renew")

    async def revoke(self, lease: Lease) -> None:  # noqa: B027 - optional hook
        """Give a lease back early (on shutdown, or when its value is dropped)."""

    def not_ready_reason(self) -> str | None:
        """Why this backend cannot serve right now (e.g. no valid token), or None."""
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release sessions and background tasks."""
