"""Figures the tests measure (load, faults, fuzzing), printed in pytest's terminal summary of every run."""

from __future__ import annotations

FIGURES: list[tuple[str, str]] = []


def report(section: str, text: str) -> None:
    FIGURES.append((section, text))
