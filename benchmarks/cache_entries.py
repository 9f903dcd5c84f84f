"""Bytes per cached entry, the cache alone: ``python benchmarks/cache_entries.py 10000 100000 [--top N]``.

A ``SecretCache`` filled through ``get`` from a loader that builds each answer the way a networked store's does
(a new value string per fetch, names as a request decodes them) and serving each entry once (its encoded
answer), measured with tracemalloc: the traced growth divided by the number of entries, and separately what
the log-redaction registry keeps per value. Prints one JSON line; ``--top`` also prints the allocation sites.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.backends.base import Kind
from broker.cache import SecretCache
from broker.clock import SystemClock
from broker.config import CacheConfig, LeasesConfig
from broker.logging import SecretRegistry
from broker.metrics import Metrics
from broker.resolver import Resolved


async def fill(counts: list[int], top: int) -> dict[str, dict[str, int]]:
    ttl, max_stale = 3600.0, 3600.0

    async def loader(kind: Kind, name: str, team: str | None) -> Resolved:
        value = "value-%06d-0123456789abcdef" % int(name[1:])  # noqa: UP031 - a new string, as a store's answer
        return Resolved(value=value, backend="file", version=None, lease=None, ttl=ttl, max_stale=max_stale)

    cache = SecretCache(
        loader,
        clock=SystemClock(),
        config=CacheConfig(ttl=ttl, max_entries=max(counts) * 2),
        leases=LeasesConfig(),
        metrics=Metrics(),
    )
    out: dict[str, dict[str, int]] = {}
    done = 0
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    start = tracemalloc.get_traced_memory()[0]
    for count in counts:
        for i in range(done, count):
            name = "/".join(["v%d" % i])  # noqa: UP031 - built at run time, as a decoded request path is
            entry, _ = await cache.get(Kind.VARIABLE, name)
            entry.json_head()
        gc.collect()
        out[str(count)] = {"bytes_per_entry": round((tracemalloc.get_traced_memory()[0] - start) / count)}
        done = count
    if top:
        snap = tracemalloc.take_snapshot()
        for stat in snap.compare_to(base, "lineno")[:top]:
            frame = stat.traceback[0]
            print(
                f"{stat.size_diff / max(counts):8.1f} B/entry  {frame.filename[-60:]}:{frame.lineno}", file=sys.stderr
            )
    # The log-redaction registry: every value served is registered once (broker.state.remember_secret).
    registry = SecretRegistry(limit=max(counts) * 2)
    gc.collect()
    start = tracemalloc.get_traced_memory()[0]
    done = 0
    for count in counts:
        for i in range(done, count):
            registry.add("value-%06d-0123456789abcdef" % i)  # noqa: UP031
        gc.collect()
        out[str(count)]["registry_bytes_per_entry"] = round((tracemalloc.get_traced_memory()[0] - start) / count)
        done = count
    tracemalloc.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("counts", nargs="+", type=int)
    parser.add_argument("--top", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(fill(sorted(args.counts), args.top))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
