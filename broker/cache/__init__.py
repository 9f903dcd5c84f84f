"""The shared in-memory secret cache: TTLs, single-flight, refresh-ahead, stale-if-error, negative
entries, an LRU bound, and the lifecycle of leased (dynamic) secrets.

Rules, per entry (times on the monotonic clock):
- fresh until ``fetched + min(ttl, ttl hint)``; a leased value is fresh until shortly before its lease
  expires and is kept alive by renewal while it is being used;
- refreshed in the background at ``refresh_ahead`` of its TTL (with jitter) when it was read since its
  last fetch, or is pinned by the prefetch list;
- served stale after a failed refresh until ``max_stale`` past its TTL, never past a lease's expiry;
- "not found in any backend" is remembered for ``negative_ttl``, in an LRU of its own bounded by
  ``negative_max_entries``, so a flood of unknown names cannot push entries in use out; errors are never
  cached as "not found";
- loads of keys nobody is served from yet (cold misses) queue behind refreshes of entries in use at a
  store's rate limit (``broker.ratelimit``);
- concurrent misses for one key share one load; clients that go away do not cancel it;
- a load under way when its key is invalidated (or the config reloaded) answers its waiting callers but is not
  stored; when no caller waits for it, the lease it brought is revoked at once.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import heapq
import itertools
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from broker.backends.base import AccessDenied, BrokerError, Kind, Lease, SecretNotFound, is_transient
from broker.backoff import Backoff
from broker.cache.leases import LeaseHolder, LeaseKeeper
from broker.clock import Clock
from broker.config import CacheConfig, LeasesConfig
from broker.metrics import Metrics
from broker.ratelimit import Priority, priority
from broker.resolver import NotFoundAnywhere, Resolved

log = logging.getLogger("broker.cache")

# (kind, id, Airflow team or None): a team's answer can differ from the team-agnostic one, so the team is part
# of every key (entries, negative entries, single-flight) and two teams never share a value.
Key = tuple[Kind, str, str | None]
# An entry is filed under one string that spells its key: a kind code, the id, and "\x1f" and the team when
# there is one (ids and team names never hold control characters). One string per entry instead of a tuple
# and the id: 63 fewer bytes per entry.
_CODE = {kind: chr(ord("0") + i) for i, kind in enumerate(Kind)}
_KIND = {code: kind for kind, code in _CODE.items()}
_TEAM = "\x1f"


def spelled(key: Key) -> str:
    kind, name, team = key
    return _CODE[kind] + name if team is None else f"{_CODE[kind]}{name}{_TEAM}{team}"


def unspelled(text: str) -> Key:
    name, sep, team = text[1:].partition(_TEAM)
    return _KIND[text[0]], name, team if sep else None


Terms = tuple[float, float, str | None]  # an entry's ttl, stale and backend
Loader = Callable[[Kind, str, str | None], Awaitable[Resolved]]
INF = float("inf")
READ = INF  # the last access of an entry without a lease once it was read (``Entry.last_access``)
BUCKET = 1.0  # seconds per scheduler bucket (entries are looked at again until they are due)
MAX_SHARED_TERMS = 256
JITTER_STEPS = 1024  # refresh-ahead jitter in this many steps: one float per step, shared by the entries
MAX_SPAN_SETS = 16  # TTLs (with the config's refresh settings) whose spans are kept: 40 KiB each at most
RETRY_BASE, RETRY_CAP, RETRY_FLOOR = 1.0, 30.0, 0.5  # seconds between failed refreshes or renewals


class Status(enum.StrEnum):
    HIT = "hit"
    MISS = "miss"
    STALE = "stale"
    REFRESHED = "refreshed"


def encode_head(resolved: Resolved) -> bytes:
    """The JSON answer's value and metadata, without its closing per-request fields (both servers send the
    same bytes)."""
    head = b'{"value":%s,"backend":%s,"version":%s' % (
        json.dumps(resolved.value).encode(),
        json.dumps(resolved.backend).encode(),
        json.dumps(resolved.version).encode(),
    )
    if resolved.provider_value is not None:
        head += b',"provider_value":' + json.dumps(resolved.provider_value).encode()
    return head


@dataclass(slots=True, kw_only=True, eq=False, repr=False)
class _Rare:
    """An entry's fields that only leased entries and failing refreshes set, kept apart: an entry without them
    holds one slot for them instead of four (32 bytes)."""

    source: LeaseHolder | None = None
    failures: int = 0
    retry_at: float = 0.0
    lease_capped: bool = False


@dataclass(slots=True, kw_only=True, eq=False, repr=False)
class Entry:
    """One cached answer, paid up to ``max_entries`` times: slotted, no dict, lock or task per entry. The value
    is kept once, as the encoded answer (``head``); the resolver's record is not kept. Times are kept as
    spans from ``fetched_at`` whose floats are shared: with the config (``ttl``, ``stale``), and for the
    refresh-ahead time with every entry that drew the same jitter (``refresh_in``), so a fresh entry holds one
    float of its own (``fetched_at``)."""

    spelled: str  # its key as one string (``spelled``)
    head: bytes | None  # the served JSON up to its per-request fields; None: remembered as not found
    # (ttl, stale, backend): fresh until fetched_at + ttl, then servable for ``stale`` while refreshes fail;
    # the backend that answered (the guard's own name object). One tuple shared by the entries with the same
    # three (``SecretCache._shared``), where three slots would cost each entry 16 bytes more.
    terms: Terms
    fetched_at: float
    refresh_in: float  # refreshed (or its lease renewed) from fetched_at + refresh_in
    # When it was last read. Only a leased entry needs the time (its idle timeout); any other needs to know
    # whether it was read since its fetch, and holds READ once it was, a float shared by every entry, instead
    # of a float of its own per read (32 bytes).
    last_access: float
    lease: Lease | None = None
    rare: _Rare | None = None  # what few entries have: set on first use

    @property
    def source(self) -> LeaseHolder | None:
        """The guarded backend that granted ``lease``."""
        return self.rare.source if self.rare is not None else None

    @property
    def failures(self) -> int:
        """Failed refreshes or renewals in a row."""
        return self.rare.failures if self.rare is not None else 0

    @failures.setter
    def failures(self, count: int) -> None:
        self._rare().failures = count

    @property
    def retry_at(self) -> float:
        """Until when a failed refresh is not tried again by a read (0: no failure)."""
        return self.rare.retry_at if self.rare is not None else 0.0

    @retry_at.setter
    def retry_at(self, at: float) -> None:
        self._rare().retry_at = at

    @property
    def lease_capped(self) -> bool:
        """The lease cannot be renewed for its full duration: a new one is fetched instead."""
        return self.rare.lease_capped if self.rare is not None else False

    @lease_capped.setter
    def lease_capped(self, capped: bool) -> None:
        self._rare().lease_capped = capped

    def _rare(self) -> _Rare:
        if self.rare is None:
            self.rare = _Rare()
        return self.rare

    @property
    def key(self) -> Key:
        return unspelled(self.spelled)

    @property
    def ttl(self) -> float:
        return self.terms[0]

    @ttl.setter
    def ttl(self, ttl: float) -> None:
        self.terms = (ttl, *self.terms[1:])

    @property
    def stale(self) -> float:
        return self.terms[1]

    @stale.setter
    def stale(self, stale: float) -> None:
        self.terms = (self.terms[0], stale, self.terms[2])

    @property
    def backend(self) -> str | None:
        return self.terms[2]

    @property
    def refresh_at(self) -> float:
        return self.fetched_at + self.refresh_in

    @refresh_at.setter
    def refresh_at(self, at: float) -> None:
        self.refresh_in = at - self.fetched_at

    @property
    def usable_until(self) -> float:
        return self.fetched_at + self.ttl + self.stale

    @property
    def resolved(self) -> Entry | None:
        """The found answer (this entry: ``value``, ``backend``, ``version``, ``lease``), or None when the entry
        remembers "not found"."""
        return self if self.head is not None else None

    @property
    def lease_holder(self) -> LeaseHolder | None:
        return self.source if self.lease is not None else None

    def _answer(self) -> dict[str, Any]:
        assert self.head is not None
        answer: dict[str, Any] = json.loads(self.head + b"}")
        return answer

    @property
    def value(self) -> str:
        """The value served (decoded from the answer: not for the hot path)."""
        value: str = self._answer()["value"]
        return value

    @property
    def version(self) -> str | None:
        version: str | None = self._answer()["version"]
        return version

    @property
    def provider_value(self) -> str | None:
        provided: str | None = self._answer().get("provider_value")
        return provided

    def json_head(self) -> bytes:
        """The JSON answer's value and metadata, without its closing per-request fields. Only for a found
        entry (``resolved`` is set)."""
        head = self.head
        assert head is not None
        return head

    def __repr__(self) -> str:
        found = "found" if self.head is not None else "not found"
        return f"Entry({self.key[0]}, <redacted>, {found}, backend={self.backend!r}, lease={self.lease!r})"


class _LRU:
    """A bounded map in least-recently-used order, ``on_evict`` told of each entry pushed out by the bound.

    Two plain dicts under the entries' spelled keys instead of an OrderedDict (no list node and no node table
    per entry: 53 fewer bytes per entry at 100,000), each in use order, oldest first (a dict keeps insertion
    order; a used entry is taken out and put back last in ``_recent``): ``_older`` holds entries not used
    since they were moved there, every one used before every entry of ``_recent``. When an entry must go and
    ``_older`` is empty, ``_recent`` becomes it, with a list of its keys in order (one pointer per entry,
    13 ms for a million): evictions walk that list, skipping the keys used since, where taking a dict's first
    item would step over every slot freed before it (30 us per eviction at 100,000 entries).
    """

    __slots__ = ("_maxsize", "_next", "_older", "_on_evict", "_queue", "_recent")

    def __init__(self, maxsize: int, on_evict: Callable[[Entry], None]) -> None:
        self._recent: dict[str, Entry] = {}
        self._older: dict[str, Entry] = {}
        self._queue: list[str | None] = []  # the keys of _older in order, as it was made (None: walked past)
        self._next = 0  # where the walk through _queue is
        self._maxsize = maxsize
        self._on_evict = on_evict

    def __len__(self) -> int:
        return len(self._recent) + len(self._older)

    def get(self, key: Key) -> Entry | None:
        """The entry, marked as just used."""
        text = spelled(key)
        recent = self._recent
        entry = recent.pop(text, None)
        if entry is None and self._older:
            entry = self._older.pop(text, None)
        if entry is not None:
            recent[entry.spelled] = entry  # its own key string: the one just spelled is let go
        return entry

    def peek(self, key: Key) -> Entry | None:
        """Look without touching the LRU order."""
        return self.peek_spelled(spelled(key))

    def peek_spelled(self, text: str) -> Entry | None:
        entry = self._recent.get(text)
        if entry is None and self._older:
            return self._older.get(text)
        return entry

    def put(self, entry: Entry) -> None:
        text = entry.spelled
        recent = self._recent
        if recent.pop(text, None) is None and self._older:
            self._older.pop(text, None)
        recent[text] = entry
        while len(recent) + len(self._older) > self._maxsize:
            self._on_evict(self._oldest())
            recent = self._recent

    def _oldest(self) -> Entry:
        """Take the least recently used entry out."""
        if not self._older:
            self._older, self._recent = self._recent, {}
            self._queue, self._next = list(self._older), 0
        queue, older = self._queue, self._older
        while True:
            text = queue[self._next]
            queue[self._next] = None  # an evicted entry's key string is not kept alive by the list
            self._next += 1
            entry = older.pop(text, None) if text is not None else None
            if entry is not None:
                return entry

    def pop(self, key: Key, default: None = None) -> Entry | None:
        text = spelled(key)
        entry = self._recent.pop(text, None)
        if entry is None and self._older:
            entry = self._older.pop(text, None)
        return entry if entry is not None else default

    def items(self) -> Iterator[tuple[Key, Entry]]:
        """Every entry, least recently used first."""
        ordered = itertools.chain(self._older.items(), self._recent.items())
        return ((unspelled(text), entry) for text, entry in ordered)

    def keys(self) -> Iterator[Key]:
        return (key for key, _ in self.items())


class SecretCache:
    """One cache for every Airflow process in the pod."""

    def __init__(
        self,
        loader: Loader,
        *,
        clock: Clock,
        config: CacheConfig,
        leases: LeasesConfig,
        metrics: Metrics,
        rng: random.Random | None = None,
    ) -> None:
        self._loader = loader
        self._clock = clock
        self.config = config
        self.leases_config = leases
        self._metrics = metrics
        self.leases = LeaseKeeper(clock, metrics)
        self._rng = rng or random.Random()  # noqa: S311 - jitter only
        self.backoff = Backoff(RETRY_BASE, RETRY_CAP, floor=RETRY_FLOOR, rng=self._rng)
        self._entries = _LRU(config.max_entries, self._evicted)
        self._negatives = _LRU(config.negative_max_entries, self._negative_evicted)
        self._inflight: dict[Key, asyncio.Task[Entry]] = {}
        self._loads: set[asyncio.Task[Entry]] = set()  # every load under way, disowned ones too
        self._waiters: Counter[asyncio.Task[Entry]] = Counter()  # callers waiting for each load now
        self._tasks: set[asyncio.Task[Any]] = set()
        # Refreshes and renewals due, by second: bucket -> the spelled keys of the entries due in it (a list
        # slot per entry, the key string being the entry's own; an entry evicted meanwhile is not kept alive);
        # the bucket numbers in a heap, each once. Every change of an entry's refresh_at schedules it again:
        # only the item in the bucket of its current refresh_at is live.
        self._due: dict[int, list[str]] = {}
        self._buckets: list[int] = []
        self._pinned: set[Key] = set()
        # (ttl, refresh_ahead, refresh_jitter) -> the refresh-ahead spans drawn so far, by jitter step
        self._spans: dict[tuple[float, float, float], list[float | None]] = {}
        self._terms: dict[Terms, Terms] = {}

    # ------------------------------------------------------------------------------------------ reads

    def __len__(self) -> int:
        return len(self._entries) + len(self._negatives)

    def peek(self, kind: Kind, name: str, team: str | None = None) -> Entry | None:
        key = (kind, name, team)
        return self._entries.peek(key) or self._negatives.peek(key)

    def hit(self, kind: Kind, name: str, team: str | None = None) -> Entry | None:
        """The entry when it is a plain fresh hit needing nothing else (no refresh due), else None.

        Synchronous, for the server's fast path; touches the LRU order and counts the hit like ``get``.
        """
        entry = self._entries.get((kind, name, team))
        if entry is None or entry.head is None:
            return None
        now = self._clock.now()
        fetched_at = entry.fetched_at
        if now >= fetched_at + entry.terms[0] or (now >= fetched_at + entry.refresh_in and entry.lease is None):
            return None
        entry.last_access = READ if entry.lease is None else now
        self._metrics.cache_hits.count += 1
        return entry

    async def get(self, kind: Kind, name: str, team: str | None = None) -> tuple[Entry, Status]:
        """The entry to serve and how it was obtained.

        Raises SecretNotFound (possibly from a negative entry), or the backend's error when nothing
        servable is cached.
        """
        key = (kind, name, team)
        now = self._clock.now()
        entry = self._entries.get(key) or self._negatives.get(key)
        if entry is not None:
            entry.last_access = READ if entry.lease is None else now
            if now < entry.fetched_at + entry.ttl:
                if entry.head is None:
                    self._metrics.cache_events.labels("negative_hit").inc()
                    raise SecretNotFound(f"{kind} not found in any backend")
                self._metrics.cache_hits.count += 1
                if now >= entry.refresh_at and entry.lease is None and key not in self._inflight:
                    self._spawn_load(key)
                return entry, Status.HIT
            if entry.head is not None and now < entry.usable_until and now < entry.retry_at:
                # A refresh failed moments ago: answer from stale at once instead of making every
                # client wait out the same outage; the scheduler keeps retrying in the background.
                return self._stale(entry)
        self._metrics.cache_events.labels("miss").inc()
        in_use = entry is not None and entry.head is not None
        try:
            with priority(Priority.REFRESH if in_use else Priority.MISS):
                load = self._load(key)
            self._waiters[load] += 1
            try:
                fresh = await asyncio.shield(load)
            finally:
                self._waiters[load] -= 1
                if not self._waiters[load]:
                    del self._waiters[load]
        except SecretNotFound:
            raise
        except AccessDenied:
            raise
        except BrokerError:
            current = self._entries.peek(key)
            if current is not None and current.head is not None and self._clock.now() < current.usable_until:
                return self._stale(current)
            raise
        return fresh, Status.REFRESHED if in_use else Status.MISS

    def _stale(self, entry: Entry) -> tuple[Entry, Status]:
        self._metrics.cache_events.labels("stale").inc()
        return entry, Status.STALE

    # ------------------------------------------------------------------------------------------ loads

    def _load(self, key: Key) -> asyncio.Task[Entry]:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch_and_store(key), name=f"load-{key[0]}")
            self._inflight[key] = task
            self._loads.add(task)
            self._track(task)
            task.add_done_callback(self._loads.discard)
            task.add_done_callback(functools.partial(self._forget_inflight, key))
        return task

    def loads(self) -> list[asyncio.Task[Entry]]:
        """Every load under way, disowned ones too: after a reload these may still call the backends it
        retired, through the chain they began on."""
        return list(self._loads)

    def _forget_inflight(self, key: Key, task: asyncio.Task[Entry]) -> None:
        if self._inflight.get(key) is task:  # not a load started after this one was disowned
            del self._inflight[key]

    def _owns(self, key: Key) -> bool:
        """Whether the running load is still the one for ``key``: only then is its answer stored."""
        return self._inflight.get(key) is asyncio.current_task()

    def _disown(self, match: Callable[[Key], bool]) -> None:
        """Loads under way for the matching keys still answer the callers waiting for them, but their answers
        are not stored and the next read starts a load of its own: they began before what was just forgotten."""
        for key in [k for k in self._inflight if match(k)]:
            del self._inflight[key]

    def _spawn_load(self, key: Key) -> None:
        """Start a background refresh (single-flight with client loads); failures are recorded, not raised."""
        self._metrics.cache_events.labels("refresh").inc()
        with priority(Priority.REFRESH):
            self._load(key)

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled():
                t.exception()  # retrieved here: background failures are logged where they happen

        task.add_done_callback(done)

    async def _fetch_and_store(self, key: Key) -> Entry:
        kind, name, team = key
        try:
            resolved = await self._loader(kind, name, team)
        except BrokerError as exc:
            if exc.lease is not None and exc.lease_holder is not None:
                self.leases.revoke_soon(exc.lease_holder, exc.lease)  # granted for an answer nobody can use
            if self._owns(key):
                self._store_failure(key, exc)
            raise
        entry = self._entry_for(key, resolved)  # a lease it carries is tracked either way: the caller gets it
        if self._owns(key):
            self._put(entry)
        elif entry.lease is not None and not self._waited():
            # Disowned (see below) and nobody waits for it: a background refresh or rotation, or a load whose
            # callers all left. No one gets the credential: its lease is given back now, not left to expire.
            self._retire_lease(entry, revoke=True)
        # else disowned meanwhile (an invalidation or a reload): served to the callers waiting for it, and
        # neither this answer nor a failure touches what the cache holds now
        return entry

    def _waited(self) -> bool:
        """Whether a caller is waiting for the running load."""
        task = asyncio.current_task()
        return task is not None and self._waiters[task] > 0

    def _store_failure(self, key: Key, exc: BrokerError) -> None:
        if isinstance(exc, SecretNotFound):
            self._drop(key)
            negative_ttl = exc.negative_ttl if isinstance(exc, NotFoundAnywhere) else self.config.negative_ttl
            if negative_ttl > 0:
                now = self._clock.now()
                self._negatives.put(
                    Entry(
                        spelled=spelled(key),
                        head=None,
                        terms=self._shared(negative_ttl, 0.0, None),
                        fetched_at=now,
                        refresh_in=INF,
                        last_access=now,
                    )
                )
                self._count()
        elif isinstance(exc, AccessDenied):
            # Authoritative: the identity lost access. Serving the old value would hide that.
            self._drop(key)
        else:
            self._record_failure(key, exc)

    def _record_failure(self, key: Key, exc: BrokerError) -> None:
        entry = self._entries.peek(key)
        if entry is None or entry.head is None:
            return
        now = self._clock.now()
        entry.failures += 1
        delay = self.backoff.delay(entry.failures - 1, exc.retry_after)
        entry.retry_at = now + delay
        self._metrics.cache_events.labels("refresh_failed").inc()
        if entry.lease is None or entry.lease_capped:
            entry.refresh_at = now + delay
            self._schedule(entry)
        log.warning(
            "refresh failed; serving cached value while it lasts",
            extra={
                "kind": key[0].value,
                "error": exc.code,
                "retry_in": round(delay, 2),
                "stale_for": round(max(0.0, entry.usable_until - now), 1),
            },
        )

    def _entry_for(self, key: Key, resolved: Resolved) -> Entry:
        now = self._clock.now()
        lease = resolved.lease
        head = encode_head(resolved)
        if lease is not None:
            entry = Entry(
                spelled=spelled(key),
                head=head,
                terms=(self._lease_hard_expiry(lease) - now, 0.0, resolved.backend),
                fetched_at=now,
                refresh_in=self._renew_time(lease, now) - now,
                last_access=now,
                lease=lease,
                rare=_Rare(source=resolved.source, lease_capped=not lease.renewable),
            )
            if resolved.source is not None:
                self.leases.track(resolved.source, lease)
            return entry
        refresh_in = self._refresh_span(resolved.ttl) if self.config.refresh_ahead > 0 else INF
        return Entry(
            spelled=spelled(key),
            head=head,
            terms=self._shared(resolved.ttl, resolved.max_stale, resolved.backend),
            fetched_at=now,
            refresh_in=refresh_in,
            last_access=now,
        )

    def _shared(self, ttl: float, stale: float, backend: str | None) -> Terms:
        """The entry's (ttl, stale, backend), as the tuple other entries with the same three hold: the first
        MAX_SHARED_TERMS combinations are kept (the backends' TTLs and the TTL hints stores give); an entry with
        another gets a tuple of its own."""
        terms = (ttl, stale, backend)
        shared = self._terms.get(terms)
        if shared is None:
            if len(self._terms) < MAX_SHARED_TERMS:
                self._terms[terms] = terms
            return terms
        return shared

    def _refresh_span(self, ttl: float) -> float:
        """When to refresh an entry fresh for ``ttl``, from its fetch: ``refresh_ahead`` of it, less a jitter
        drawn from JITTER_STEPS steps up to ``refresh_jitter``; each span's float is made once and shared."""
        ahead, jitter = self.config.refresh_ahead, self.config.refresh_jitter
        spans = self._spans.get((ttl, ahead, jitter))
        if spans is None:
            if len(self._spans) >= MAX_SPAN_SETS:
                self._spans.clear()
            spans = self._spans[(ttl, ahead, jitter)] = [None] * JITTER_STEPS
        step = self._rng.randrange(JITTER_STEPS)
        span = spans[step]
        if span is None:
            span = spans[step] = ttl * ahead * (1 - jitter * step / JITTER_STEPS)
        return span

    @staticmethod
    def _lease_hard_expiry(lease: Lease) -> float:
        # Hand out a leased credential only while it has some life left for the caller to use it.
        return lease.expires_at - min(5.0, lease.duration * 0.1)

    def _renew_time(self, lease: Lease, now: float) -> float:
        fraction = self.leases_config.renew_at * (1 - self._rng.uniform(0, 0.05))
        return max(now, lease.issued_at + lease.duration * fraction)

    # ------------------------------------------------------------------------------------------ storage

    def _put(self, entry: Entry) -> None:
        old = self._entries.peek(entry.key)
        if old is not None and old.lease is not None and (entry.lease is None or entry.lease != old.lease):
            self._retire_lease(old)
        self._entries.put(entry)
        self._negatives.pop(entry.key, None)
        self._count()
        if entry.refresh_at != INF:
            self._schedule(entry)

    def _drop(self, key: Key) -> Entry | None:
        entry = self._entries.pop(key, None) or self._negatives.pop(key, None)
        if entry is not None:
            self._count()
        return entry

    def _count(self) -> None:
        # Node mode: every partition's cache reports its own counts; the series read their sum.
        self._metrics.cache_entries.set(self, None, len(self._entries) + len(self._negatives))
        self._metrics.cache_negative_entries.set(self, None, len(self._negatives))

    def _evicted(self, entry: Entry) -> None:
        self._metrics.cache_events.labels("eviction").inc()

    def _negative_evicted(self, entry: Entry) -> None:
        self._metrics.cache_events.labels("negative_eviction").inc()

    def _schedule(self, entry: Entry) -> None:
        if not math.isfinite(entry.refresh_at):
            return
        bucket = math.floor(entry.refresh_at / BUCKET)
        due = self._due.get(bucket)
        if due is None:
            self._due[bucket] = [entry.spelled]
            heapq.heappush(self._buckets, bucket)
        else:
            due.append(entry.spelled)

    def pin(self, keys: Iterable[Key]) -> None:
        """Keep exactly these (kind, id, team) warm even when nobody reads them (the prefetch list)."""
        self._pinned = set(keys)

    def invalidate(self, kind: Kind | None = None, name: str | None = None) -> int:
        """Forget one id (for every team), every key of a kind, or everything, and disown the loads of those
        keys under way (their answers may predate the change being announced). Held leases stay valid until
        they expire."""

        def match(key: Key) -> bool:
            return (kind is None or key[0] == kind) and (name is None or key[1] == name)

        self._disown(match)
        keys = [k for k in [*self._entries.keys(), *self._negatives.keys()] if match(k)]
        for key in keys:
            self._drop(key)
        return len(keys)

    def retain(self, keep: Callable[[Entry], bool]) -> int:
        """Drop every entry for which ``keep`` is false (used by a config reload); returns how many. Loads under
        way are disowned: they were read through the old chain."""
        self._disown(lambda _key: True)
        dropped = [k for k, e in [*self._entries.items(), *self._negatives.items()] if not keep(e)]
        for key in dropped:
            self._drop(key)
        return len(dropped)

    # ------------------------------------------------------------------------------------------ background

    async def run_due(self) -> None:
        """Do every scheduled refresh, renewal and rotation that is due now. Called by ``maintain``."""
        now = self._clock.now()
        current = math.floor(now / BUCKET)
        while self._buckets and self._buckets[0] <= current:
            bucket = self._buckets[0]
            start, end = bucket * BUCKET, (bucket + 1) * BUCKET
            later: list[str] = []
            seen: set[str] = set()
            for text in self._due[bucket]:
                if text in seen:
                    continue  # scheduled twice within one bucket
                seen.add(text)
                entry = self._entries.peek_spelled(text)
                if entry is None or entry.head is None:
                    continue  # dropped or evicted since it was scheduled
                if not start <= entry.refresh_at < end:
                    continue  # rescheduled: the item in the bucket of its refresh_at is the live one
                if entry.refresh_at > now:
                    later.append(text)  # due later within the current bucket
                    continue
                key = entry.key
                if key in self._inflight:
                    continue
                if entry.lease is not None:
                    self._maintain_lease(entry, now)
                elif key in self._pinned or entry.last_access > entry.fetched_at or entry.failures:
                    self._spawn_load(key)
            if later:  # only the current bucket can hold entries due later
                self._due[bucket] = later
                break
            heapq.heappop(self._buckets)
            del self._due[bucket]
        self.leases.prune(now)

    async def maintain(self, interval: float = 0.25) -> None:
        """The background loop: runs ``run_due`` until cancelled."""
        while True:
            try:
                await self.run_due()
            except Exception:
                log.exception("cache maintenance failed")
            await asyncio.sleep(interval)

    def _maintain_lease(self, entry: Entry, now: float) -> None:
        idle = self.leases_config.idle_timeout
        idle_limit = idle if idle is not None else max(self.config.ttl, 1.0)
        if entry.key not in self._pinned and now - entry.last_access > idle_limit:
            # Nobody uses this credential any more: let it go instead of renewing it forever.
            self._drop(entry.key)
            self._retire_lease(entry, revoke=True)
            return
        if entry.lease_capped:
            self._metrics.lease_renewals.labels(entry.backend or "", "rotated").inc()
            self._spawn_load(entry.key)
            return
        task = asyncio.get_running_loop().create_task(self._renew(entry), name="lease-renew")
        self._track(task)

    async def _renew(self, entry: Entry) -> None:
        holder = entry.lease_holder
        assert entry.lease is not None and holder is not None
        backend, lease = holder.name, entry.lease
        try:
            renewed = await self.leases.renew(holder, lease, lease.duration)
        except BrokerError as exc:
            now = self._clock.now()
            if is_transient(exc) and now < entry.usable_until:
                self._metrics.lease_renewals.labels(backend, "failed").inc()
                # Backed off, but always with a few tries left before the lease runs out.
                entry.failures += 1
                wait = self.backoff.delay(entry.failures - 1, exc.retry_after)
                entry.refresh_at = now + min(wait, max(1.0, (entry.usable_until - now) / 4))
                self._schedule(entry)
                log.warning("lease renewal failed; will retry", extra={"backend": backend, "error": exc.code})
                return
            # The lease is gone or cannot be renewed: fetch a new credential.
            self._metrics.lease_renewals.labels(backend, "failed").inc()
            entry.lease_capped = True
            self._spawn_load(entry.key)
            return
        if self._entries.peek(entry.key) is not entry:
            return  # replaced while we renewed
        capped = (not renewed.renewable) or renewed.duration < lease.duration * 0.9
        self._metrics.lease_renewals.labels(backend, "capped" if capped else "ok").inc()
        entry.lease = renewed
        entry.terms = (self._lease_hard_expiry(renewed) - entry.fetched_at, 0.0, entry.backend)
        entry.lease_capped = capped
        entry.failures = 0
        entry.refresh_at = self._renew_time(renewed, self._clock.now())
        self._schedule(entry)

    def _retire_lease(self, entry: Entry, *, revoke: bool = False) -> None:
        """An entry no longer serves its lease. Revoke it now, or keep it until it expires (callers may
        still hold the credential) and revoke it at shutdown."""
        holder, lease = entry.lease_holder, entry.lease
        if revoke and holder is not None and lease is not None:
            self.leases.revoke_soon(holder, lease)

    async def aclose(self, *, revoke_leases: bool, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Stop background work; revoke every held lease first when asked."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        self._metrics.cache_entries.withdraw(self, None)
        self._metrics.cache_negative_entries.withdraw(self, None)
        await self.leases.aclose(revoke=revoke_leases, timeout=timeout)
