"""Time comes from broker.clock only, so every deadline and expiry can be driven by a fake clock."""

from __future__ import annotations

import re
from pathlib import Path

import broker

PACKAGE = Path(broker.__file__).resolve().parent
# time.monotonic(), time.time(), and the same names imported on their own
READS_TIME = re.compile(r"\btime\.(monotonic|time)(_ns)?\s*\(|\bfrom\s+time\s+import\b[^\n]*\b(monotonic|time)\b")


def test_no_module_reads_the_time_but_the_clock() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "clock.py" or path.parent != PACKAGE
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if READS_TIME.search(line)
    ]
    assert offenders == [], "read the time through broker.clock (Clock.now/wall):\n" + "\n".join(offenders)


def test_the_check_sees_what_it_forbids() -> None:
    for line in ("t = time.monotonic()", "x = time.time() - y", "from time import monotonic", "time.time_ns ()"):
        assert READS_TIME.search(line), line
    for line in ("time.perf_counter()", "loop.time()", "time.strftime('%Y')", "clock.wall()"):
        assert not READS_TIME.search(line), line
