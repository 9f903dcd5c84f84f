"""The documented differences between the broker and the provider backends, machine-readable.

Each entry is one row of the parity table in docs/airflow.md (``## Parity with the provider backends``,
the row names the id in backticks) and a rule that recognises a case it explains. A difference the suite
finds that no rule explains fails tests/parity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Result = dict[str, Any]


@dataclass(frozen=True)
class Difference:
    id: str
    reason: str
    applies: Callable[[dict[str, Any], Result, Result], bool]


def _sides(result: Result) -> list[Result]:
    return [side for side in (result.get("server"), result.get("sdk")) if side is not None]


def _found_by_provider_only(provider: Result, broker: Result) -> bool:
    return any("value" in p for p in _sides(provider)) and all("value" not in b for b in _sides(broker))


DIFFERENCES: list[Difference] = []


def explain(case: dict[str, Any], provider: Result, broker: Result) -> str | None:
    """The id of the documented difference that explains this case, or None."""
    for difference in DIFFERENCES:
        if difference.applies(case, provider, broker):
            return difference.id
    return None
