"""Provider ``backend_kwargs`` that are not broker keys: how each one is read when copied into ``broker.yaml``.

A user copies their provider backend's kwargs verbatim. Keys the broker has under the same name need nothing
here. Every other key the provider accepts is one of three things, declared per backend type in its config
model's ``provider_kwargs``:

- ``Moves``: the same setting under a broker key (``kubernetes_role`` is ``auth.role``); the value is carried
  over, and setting both is an error;
- ``Replaced``: a credential (or an identity the broker cannot take over) that workload identity replaces:
  an error naming the broker key to use instead, so no secret ever sits in ``broker.yaml``;
- ``Ignored``: deprecated, or without effect here: accepted, with one warning per load naming the key and
  what it means for the broker;
- ``Deprecated``: a broker key too, with its effect, that the provider deprecates: kept, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("broker.config")


@dataclass(frozen=True, slots=True)
class Moves:
    """The provider key is the broker key ``to`` (dotted for a nested one); ``values`` renames values."""

    to: str
    values: Mapping[Any, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Replaced:
    """A credential kwarg: refused, ``use`` says what the broker reads instead."""

    use: str


@dataclass(frozen=True, slots=True)
class Ignored:
    """Accepted with a warning; ``why`` says what the key means here."""

    why: str


@dataclass(frozen=True, slots=True)
class Deprecated:
    """Kept and in effect, with a warning; ``why`` says what to use instead."""

    why: str


ProviderKwarg = Moves | Replaced | Ignored | Deprecated
IGNORED = "provider kwarg has no effect here"
DEPRECATED = "deprecated provider kwarg"


def warning(rule: ProviderKwarg) -> str | None:
    """The warning a key of this rule gets at each load (None: no warning)."""
    if isinstance(rule, Ignored):
        return IGNORED
    if isinstance(rule, Deprecated):
        return DEPRECATED
    return None


def notice(where: str, key: str, rule: Ignored | Deprecated) -> str:
    """The load-time warning as one line (``broker migrate`` prints it): never the value."""
    return f"{where}.{key}: {warning(rule)}: {rule.why}"


def translate(
    raw: dict[str, Any],
    table: Mapping[str, ProviderKwarg],
    where: str,
    errors: list[str],
    notices: list[str] | None = None,
) -> dict[str, Any]:
    """``raw`` with the provider's keys of ``table`` read as declared. Appends ``where.key: problem`` to
    ``errors`` for every refused key (all of them, not the first) and logs one warning per ignored or
    deprecated key (appends it to ``notices`` instead, when given)."""
    out = {k: v for k, v in raw.items() if k not in table or isinstance(table[k], Deprecated)}
    for key, value in raw.items():
        rule = table.get(key)
        if rule is None:
            continue
        if isinstance(rule, Replaced):
            errors.append(f"{where}.{key}: not read by the broker: {rule.use}")
        elif isinstance(rule, Ignored | Deprecated):
            if notices is not None:
                notices.append(notice(where, key, rule))
            else:
                # Not the value: a key the broker does not use may still hold something sensitive.
                log.warning(warning(rule), extra={"key": f"{where}.{key}", "meaning": rule.why})
        else:
            moved = rule.values[value] if isinstance(value, str | int | bool) and value in rule.values else value
            head, _, tail = rule.to.partition(".")
            if tail:
                section = out.get(head, {})
                if not isinstance(section, dict):
                    continue  # the section's own validation reports it
                section = out[head] = dict(section)  # never change the caller's document
                target, holder = tail, section
            else:
                target, holder = head, out
            if target in holder:
                errors.append(f"{where}.{key}: the provider's name for {rule.to}; set one of them, not both")
                continue
            holder[target] = moved
    return out
