"""Small typed building blocks shared by the config models of the core and of every backend."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    """Seconds as a number, or a string like ``90``, ``500ms``, ``5m``, ``1h``, ``2d``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration (seconds, or a string like 5m / 1h), got a boolean")  # noqa: TRY004
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"invalid duration {value!r}: use seconds or a string like 30s, 5m, 1h")
        return float(match.group(1)) * _UNITS[match.group(2)]
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]


def rooted(path: Path, base: Path) -> Path:
    """The one rule for a path written in a config file: a relative one is taken from ``base``, the file's
    directory; an absolute one (every built-in default is) stays as it is."""
    return path if path.is_absolute() else base / path


class StrictModel(BaseModel):
    """Unknown keys are errors; models are immutable so a reload can compare them by value."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
