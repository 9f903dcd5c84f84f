"""The log redaction filter's cost per record with 1,000, 10,000 and 100,000 cached secrets.

Every value the broker serves is registered with the filter (``broker.state.remember_secret``), so the
cost of checking a record for them must not grow with the cache. This fills a fresh registry with N
values shaped like the cache's (random tokens, connection JSON with a password, URIs), then times the
filter on records the broker writes (a warning with extras, an info line, one with a traceback) and on a
record that does quote a registered value (which must come out scrubbed).

Run: ``.venv/bin/python benchmarks/log_redaction.py [--sizes 1000,10000,100000]``.
Prints a Markdown table (microseconds per record, median of 5 rounds of 0.2 s each).
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import broker.logging as blog


def values(n: int) -> list[str]:
    out = []
    for i in range(n):
        shape = i % 3
        if shape == 0:
            out.append(secrets.token_urlsafe(24))
        elif shape == 1:
            password = secrets.token_urlsafe(18)
            out.append(password)
            out.append(
                json.dumps(
                    {
                        "conn_type": "postgres",
                        "host": f"db{i}.internal",
                        "login": "airflow",
                        "password": password,
                        "port": 5432,
                        "schema": "airflow",
                    }
                )
            )
        else:
            out.append(f"https://user{i}:{secrets.token_hex(12)}@api{i}.example.internal/v1")
    return out[:n]


def records(leaked: str) -> list[logging.LogRecord]:
    def rec(msg: str, level: int = logging.WARNING, **extra: object) -> logging.LogRecord:
        r = logging.LogRecord("broker.server", level, __file__, 1, msg, None, None)
        for key, value in extra.items():
            setattr(r, key, value)
        return r

    try:
        raise RuntimeError("backend 'vault' failed fetch (ClientConnectorError)")
    except RuntimeError:
        exc = sys.exc_info()
    with_exc = rec("backend close failed", logging.ERROR, backend="vault")
    with_exc.exc_info = exc
    return [
        rec(
            "lookup failed",
            kind="variable",
            error="backend_unavailable",
            detail="backend 'vault' did not answer fetch within 5s",
        ),
        rec("configuration reloaded", logging.INFO, backends_kept=["vault"], backends_new=[], entries_dropped=3),
        with_exc,
        rec("unexpected answer", detail=f"store said: {leaked} (truncated)"),
    ]


def measure(n: int) -> tuple[float, float]:
    registry = blog.SecretRegistry(limit=max(n, 1))
    blog.SECRETS = registry  # redact() reads the module's registry at call time
    vals = values(n)
    for value in vals:
        registry.add(value)
    leaked = vals[len(vals) // 2]
    flt = blog.RedactingFilter()
    plain, leaking = [], []
    for _ in range(5):
        plain.append(per_record(flt, leaked, 0))
        leaking.append(per_record(flt, leaked, 3))
    return statistics.median(plain), statistics.median(leaking)


def per_record(flt: blog.RedactingFilter, leaked: str, which: int, budget: float = 0.2) -> float:
    """Microseconds per filtered record: as many fresh records as fit in ``budget`` seconds (at least 3)."""
    done, spent = 0, 0.0
    while spent < budget or done < 3:
        group = records(leaked)
        chosen = group[:3] if which == 0 else group[3:]
        began = time.perf_counter()
        for record in chosen:
            flt.filter(record)
        spent += time.perf_counter() - began
        done += len(chosen)
        if which == 3:
            assert leaked not in str(vars(chosen[0])["detail"]), "a registered value was not scrubbed"
    return spent / done * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    args = parser.parse_args()
    print("| cached secrets | us per record (no value in it) | us per record (quotes a value) |")
    print("|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        plain, leaking = measure(n)
        print(f"| {n:,} | {plain:.1f} | {leaking:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
