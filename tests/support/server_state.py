"""A broker state for the server tests in-process: one env backend, a loader that answers ``"{team}:{name}"`` and
records each load, and an audit trail that keeps what it would write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from broker.backends.base import Kind
from broker.config import validate_config
from broker.resolver import Resolved
from broker.state import BrokerState


class Recorder:
    """Stands in for the audit trail: keeps (kind, name, outcome, team) of each line it would write."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, str, str | None]] = []

    def record(self, rid: Any, kind: str, name: str, outcome: str, *, team: str | None = None, **_: Any) -> None:
        self.lines.append((kind, name, outcome, team))


def recording_state(tmp_path: Path, *, multi_team: bool, **listen: Any) -> Any:
    """The state, listening on a socket in ``tmp_path`` with ``listen``'s other settings; ``state.loads`` holds
    (name, team) of each load and ``state.audit`` is a ``Recorder``."""
    config = validate_config(
        {
            "multi_team": multi_team,
            "listen": {"socket": str(tmp_path / "s.sock"), **listen},
            "backends": [{"name": "env", "type": "env"}],
        }
    )
    st: Any = BrokerState(config)
    st.loads = []

    async def load(kind: Kind, name: str, team: str | None = None) -> Resolved:
        st.loads.append((name, team))
        return Resolved(f"{team}:{name}", "env", None, None, 300, 0)

    st.cache._loader = load
    st.audit = Recorder()
    return st
