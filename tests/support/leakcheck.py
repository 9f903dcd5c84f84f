"""One check over the whole test run: no secret value a test planted appears in any log line, audit line or
error body the broker produced. Fixtures ``plant`` their values; ``BrokerProcess`` records its log files and the error
bodies it received; the session's end scans them all (see ``tests/conftest.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote


@dataclass
class LeakCheck:
    planted: dict[str, str] = field(default_factory=dict)  # value -> label (labels, never values, are reported)
    originals: set[str] = field(default_factory=set)  # the values as planted (without the encoded forms)
    logs: set[Path] = field(default_factory=set)
    audits: set[Path] = field(default_factory=set)  # audit streams written to files
    error_bodies: list[tuple[str, bytes]] = field(default_factory=list)

    def plant(self, label: str, *values: str) -> None:
        for value in values:
            if len(value) >= 8:  # short values would match by accident
                self.originals.add(value)
                self.planted[value] = label
                self.planted.setdefault(quote(value, safe=""), label)  # as it appears inside a URI

    def record_log(self, path: Path) -> None:
        self.logs.add(Path(path))

    def record_audit(self, path: Path) -> None:
        self.audits.add(Path(path))

    def record_error(self, where: str, body: bytes) -> None:
        self.error_bodies.append((where, body))

    def scan(self) -> list[str]:
        """Where each planted value was found, as ``label in place`` (never the value itself)."""
        needles = [(value.encode(), label) for value, label in self.planted.items()]
        found: list[str] = []
        for what, paths in (("log", self.logs), ("audit stream", self.audits)):
            for path in sorted(paths):
                try:
                    text = path.read_bytes()
                except OSError:
                    continue
                found += [f"{label} in {what} {path}" for needle, label in needles if needle in text]
        for where, body in self.error_bodies:
            found += [f"{label} in the error body of {where}" for needle, label in needles if needle in body]
        return found


SESSION = LeakCheck()
plant = SESSION.plant
