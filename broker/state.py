"""What a request handler needs (config, metrics, clock, guarded backends, resolver, cache) and how a reload
changes it. No listeners, no signals: ``broker.app`` owns those, ``broker.server`` reads this."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker.audit import AuditLog
from broker.backends import load_type
from broker.backends.base import BackendConfig, BackendContext, Kind
from broker.backends.guard import Guard
from broker.cache import Entry, SecretCache
from broker.cache.leases import LeaseHolder
from broker.clock import Clock, SystemClock
from broker.config import BrokerConfig
from broker.logging import SECRETS
from broker.metrics import Metrics
from broker.resolver import Resolved, Resolver

if TYPE_CHECKING:
    from broker.node.partitions import NodeService


def remember_secret(kind: Kind, resolved: Resolved) -> None:
    """Register a value just fetched (and a connection's password) with the log redaction filter."""
    SECRETS.add(resolved.value)
    if resolved.provider_value is not None:
        SECRETS.add(resolved.provider_value)
    if kind is Kind.CONNECTION:
        password = json.loads(resolved.value).get("password")
        if isinstance(password, str):
            SECRETS.add(password)


def build_guard(cfg: BackendConfig, ctx: BackendContext) -> Guard:
    return Guard(load_type(cfg.type)(cfg, ctx), ctx.metrics)


def build_guards(configs: list[BackendConfig], ctx: BackendContext) -> list[Guard]:
    """One guarded backend per config entry, in chain order."""
    return [build_guard(cfg, ctx) for cfg in configs]


@dataclass
class Reload:
    """What applying a new config changed."""

    kept: list[str]  # backends carried over as they were (same config), started or still starting
    fresh: list[Guard]  # backends built by this reload, to be started
    retired: list[Guard]  # backends no longer in the chain, to be closed once they hold no lease
    dropped: int  # cache entries that no longer follow from the chain
    restart_needed: list[str] = field(default_factory=list)  # sections read only at start-up
    # loads under way, begun on the old chain: they may still call a retired backend, which stays open for them
    reads: list[asyncio.Task[Any]] = field(default_factory=list)


def unchanged_prefix(old: list[BackendConfig], new: list[BackendConfig]) -> int:
    """How many backends at the head of the chain are the same in both configs."""
    same = 0
    for old_cfg, new_cfg in zip(old, new, strict=False):
        if old_cfg != new_cfg:
            break
        same += 1
    return same


class BrokerState:
    """Everything a request handler needs; replaced piecewise by a reload."""

    def __init__(self, config: BrokerConfig, *, metrics: Metrics | None = None, clock: Clock | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.clock = clock or SystemClock()
        self.executor = ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="broker-io")
        self.ctx = BackendContext(executor=self.executor, clock=self.clock, metrics=self.metrics)
        # Node mode: the backends are templates for the identity partitions; none logs in as the node.
        self.guards = build_guards(config.backends if config.node is None else [], self.ctx)
        self.retired: list[Guard] = []  # out of the chain but still holding leases
        self.resolver = self._resolver(config, self.guards)
        self.cache = SecretCache(
            self._load,
            clock=self.clock,
            config=config.cache,
            leases=config.leases,
            metrics=self.metrics,
        )
        self.inflight = 0
        self.prefetched = not self.prefetch_keys()
        self.audit = AuditLog(config.audit, self.metrics, self.clock) if config.audit.enabled else None
        self.node: NodeService | None = None
        if config.node is not None:
            from broker.node.partitions import NodeService

            self.node = NodeService(self)

    @staticmethod
    def _resolver(config: BrokerConfig, guards: list[Guard]) -> Resolver:
        cache = config.cache
        return Resolver(guards, cache.ttl, cache.max_stale, cache.negative_ttl, multi_team=config.multi_team)

    async def _load(self, kind: Kind, name: str, team: str | None) -> Resolved:
        resolved = await self.resolver.resolve(kind, name, team)
        remember_secret(kind, resolved)
        return resolved

    def prefetch_keys(self) -> list[tuple[Kind, str, str | None]]:
        """The prefetch list for every team a caller can be served as (a bound caller reads its team's
        values only), each key once."""
        p = self.config.prefetch
        names = (
            [(Kind.CONNECTION, n) for n in p.connections]
            + [(Kind.VARIABLE, n) for n in p.variables]
            + [(Kind.CONFIG, n) for n in p.config]
        )
        teams = self.config.listen.served_teams()
        return list(dict.fromkeys((kind, name, team) for team in teams for kind, name in names))

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        for guard in self.guards:
            reason = guard.not_ready_reason()
            if reason:
                reasons.append(f"backend {guard.name}: {reason}")
        if not self.prefetched:
            reasons.append("prefetch list not warm yet")
        if self.audit is not None:
            reason = self.audit.not_ready_reason()
            if reason:
                reasons.append(reason)
        return reasons

    def apply(self, new: BrokerConfig) -> Reload:
        """Switch to ``new``: keep the guards (and cached entries) of backends whose config and chain position
        did not change, build the others. Leases stay with the guard that granted them, wherever it went."""
        old = self.config
        restart = [s for s in ("listen", "metrics", "threads", "audit") if getattr(new, s) != getattr(old, s)]
        for bound in ("max_entries", "negative_max_entries"):
            if getattr(new.cache, bound) != getattr(old.cache, bound):
                restart.append(f"cache.{bound}")
        reusable = {g.name: g for g in self.guards if g.backend.config in new.backends}
        guards = []
        for cfg in new.backends:
            guard = reusable.get(cfg.name)
            guards.append(guard if guard is not None and guard.backend.config == cfg else build_guard(cfg, self.ctx))
        same = unchanged_prefix(old.backends, new.backends)
        valid_backends = {c.name for c in new.backends[:same]}
        whole_chain_same = same == len(old.backends) == len(new.backends)

        def keep(entry: Entry) -> bool:
            if entry.resolved is None:
                return whole_chain_same
            return entry.resolved.backend in valid_backends

        retired = [g for g in self.guards if g not in guards]
        self.config = new
        self.guards = guards
        self.resolver = self._resolver(new, guards)
        self.cache.config = new.cache
        self.cache.leases_config = new.leases
        dropped = self.cache.retain(keep)
        self.prefetched = False
        kept = [g for g in guards if g in reusable.values()]
        return Reload(
            kept=sorted(g.name for g in kept),
            # Only what this reload built: a kept backend still logging in already has its start loop.
            fresh=[g for g in guards if g not in kept],
            retired=retired,
            dropped=dropped,
            restart_needed=restart,
            reads=list(self.cache.loads()),
        )

    def retire(self, guards: list[Guard]) -> list[Guard]:
        """Take backends out of service: returns those to close now. One that granted a live lease stays open
        (in ``retired``) so the lease can still be renewed or revoked through it, until ``released``."""
        holders = self.cache.leases.holders()
        self.retired.extend(g for g in guards if g in holders and g not in self.retired)
        return [g for g in guards if g not in holders]

    def released(self, holder: LeaseHolder) -> Guard | None:
        """The retired backend to close now that its last lease went (revoked or expired), or None when
        ``holder`` is still in the chain."""
        for guard in self.retired:
            if guard is holder:
                self.retired.remove(guard)
                return guard
        return None
