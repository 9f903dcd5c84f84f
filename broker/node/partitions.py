"""Identity partitions: one set of logins and one cache per (namespace, service account) on the node.

A partition is built from the backend templates plus its identity's overrides and logs in with the
latest verified token of any pod of that identity, so every pod of the identity shares one login and one
cache, and no entry ever crosses to another identity (the caches are different objects). Partitions
unused for ``idle_timeout`` are closed: cache dropped, leases revoked, backends closed (Vault logs out).
At most ``max_identities`` exist; past that, a new identity closes the least recently used idle one or
is refused with 429. A backend's ``rate_limit`` is the node's, not each partition's: every partition's
backend of a name draws from one token bucket (``SharedBuckets``), the partitions taking turns.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from broker.backends.base import AccessDenied, BackendContext, BrokerError, Kind, Overloaded, Unauthorized
from broker.cache import SecretCache
from broker.node.config import identity_chain
from broker.node.verify import PodIdentity, TokenVerifier, bearer, node_name, token_claims
from broker.ratelimit import SharedBuckets
from broker.resolver import Resolved, Resolver

if TYPE_CHECKING:
    from broker.config import BrokerConfig
    from broker.state import BrokerState

log = logging.getLogger("broker.node")


class Partition:
    """The backends, resolver and cache of one workload identity."""

    def __init__(self, key: tuple[str, str], state: BrokerState, rate_limits: SharedBuckets) -> None:
        from broker.state import build_guards, remember_secret

        config = state.config
        assert config.node is not None
        identity = config.node.identity(*key)
        assert identity is not None
        self.key = key
        self._remember_secret = remember_secret
        self._token: str | None = None
        self._token_exp = 0.0
        self._wall = state.clock.wall
        self.ctx = BackendContext(
            executor=state.executor,
            clock=state.clock,
            metrics=state.metrics,
            workload_token=self.current_token,
            rate_limits=rate_limits,
        )
        self.guards = build_guards(identity_chain(identity, config.backends), self.ctx)
        cache = config.cache
        self.resolver = Resolver(
            self.guards, cache.ttl, cache.max_stale, cache.negative_ttl, multi_team=config.multi_team
        )
        self.cache = SecretCache(
            self._load,
            clock=state.clock,
            config=cache,
            leases=config.leases,
            metrics=state.metrics,
        )
        self.last_used = state.clock.now()
        self.active = 0  # requests being served now: a busy partition is never closed
        self._started: asyncio.Task[None] | None = None
        self._maintenance: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Partition({self.key[0]}/{self.key[1]}, entries={len(self.cache)})"

    def current_token(self) -> str | None:
        """The freshest verified token of a pod of this identity, while it is valid (any thread)."""
        return self._token if self._token_exp > self._wall() else None

    def offer(self, token: str, expires_at: float) -> None:
        """A pod of this identity just presented ``token`` (verified): keep the one that lives longest."""
        if expires_at >= self._token_exp:
            self._token, self._token_exp = token, expires_at

    async def _load(self, kind: Kind, name: str, team: str | None) -> Resolved:
        resolved = await self.resolver.resolve(kind, name, team)
        self._remember_secret(kind, resolved)
        return resolved

    async def ready(self) -> None:
        """Log in to every backend once (shared by concurrent first requests). Raises the login's error;
        the next request tries again."""
        if self._started is None or (self._started.done() and self._started.exception() is not None):
            self._started = asyncio.get_running_loop().create_task(self._start(), name=f"node-login-{self.key}")
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        for guard in self.guards:
            if not guard.started:
                await guard.start()
        if self._maintenance is None:
            self._maintenance = asyncio.get_running_loop().create_task(self.cache.maintain(), name="node-cache")

    async def aclose(self, *, revoke_leases: bool) -> None:
        for task in (self._started, self._maintenance):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, BrokerError):
                    await task
        await self.cache.aclose(revoke_leases=revoke_leases)
        await asyncio.gather(*(g.aclose() for g in self.guards), return_exceptions=True)
        self._token = None


class NodeService:
    """Verifies callers and hands each the partition of its identity."""

    def __init__(self, state: BrokerState) -> None:
        node = state.config.node
        assert node is not None
        self.state = state
        self.config = node
        self.verifier = TokenVerifier(node, state.ctx, node_name(node))
        self.rate_limits = SharedBuckets()
        self.partitions: collections.OrderedDict[tuple[str, str], Partition] = collections.OrderedDict()
        self._closing: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self.partitions)

    async def caller(self, authorization: str | None) -> tuple[PodIdentity, Partition]:
        """The verified caller and its partition, logged in.

        Raises Unauthorized (bad token), AccessDenied (unmapped service account), Overloaded (too many
        identities), BackendUnavailable (TokenReview down), or the partition's login error.
        """
        metrics = self.state.metrics
        try:
            identity = await self.verifier.verify(authorization)
            if self.config.identity(*identity.key) is None:
                raise AccessDenied(
                    f"service account {identity.namespace}/{identity.service_account} has no node.identities entry"
                )
            partition = self._partition(identity.key)
        except BrokerError as exc:
            outcome = {Unauthorized: "unauthorized", AccessDenied: "forbidden", Overloaded: "overloaded"}
            metrics.node_auth.labels(outcome.get(type(exc), "unavailable")).inc()
            raise
        metrics.node_auth.labels("ok").inc()
        token = bearer(authorization)
        partition.offer(token, float(token_claims(token)["exp"]))
        partition.last_used = self.state.clock.now()
        await partition.ready()
        return identity, partition

    def _partition(self, key: tuple[str, str]) -> Partition:
        partition = self.partitions.get(key)
        if partition is not None:
            self.partitions.move_to_end(key)
            return partition
        if len(self.partitions) >= self.config.max_identities:
            idle = next((p for p in self.partitions.values() if p.active == 0), None)  # least recently used
            if idle is None:
                raise Overloaded("every identity partition on this node is busy; retry shortly")
            self._close(idle)
        partition = Partition(key, self.state, self.rate_limits)
        self.partitions[key] = partition
        self.state.metrics.node_identities.set(len(self.partitions))
        log.info("identity partition opened", extra={"identities": len(self.partitions)})
        return partition

    def _close(self, partition: Partition) -> None:
        self.partitions.pop(partition.key, None)
        self.state.metrics.node_identities.set(len(self.partitions))
        self.state.metrics.node_released.inc()
        self._spawn(partition.aclose(revoke_leases=True))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name="node-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def reset(self, new: BrokerConfig) -> int:
        """A reload: adopt ``new`` and close every partition (each is rebuilt from the new mapping on its next
        request). Returns how many were closed."""
        assert new.node is not None
        self.state.config = new
        self.config = new.node
        old, self.verifier = self.verifier, TokenVerifier(new.node, self.state.ctx, node_name(new.node))
        self._spawn(old.aclose())
        # The new config's limits; the partitions being closed keep the old buckets for their last calls.
        self.rate_limits = SharedBuckets()
        partitions = list(self.partitions.values())
        for partition in partitions:
            self._close(partition)
        return len(partitions)

    def sweep(self) -> int:
        """Close partitions idle for ``idle_timeout`` and forget expired verdicts; returns partitions closed."""
        now = self.state.clock.now()
        idle = [p for p in self.partitions.values() if p.active == 0 and now - p.last_used >= self.config.idle_timeout]
        for partition in idle:
            self._close(partition)
        self.verifier.forget_expired()
        if idle:
            log.info("idle identity partitions closed", extra={"closed": len(idle), "identities": len(self)})
        return len(idle)

    async def maintain(self) -> None:
        interval = max(0.2, min(30.0, self.config.idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    async def drained(self) -> None:
        """Wait for partitions being closed to finish closing."""
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    async def aclose(self, *, revoke_leases: bool) -> None:
        partitions = list(self.partitions.values())
        self.partitions.clear()
        self.state.metrics.node_identities.set(0)
        await asyncio.gather(*(p.aclose(revoke_leases=revoke_leases) for p in partitions), return_exceptions=True)
        await self.drained()
        await self.verifier.aclose()
