"""Settings read from YAML or JSON into dataclasses: a misspelt name is an error that names it, never ignored."""
from __future__ import annotations

from dataclasses import fields
from typing import Any


def known_settings(cls: type, d: dict | None, what: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """A copy of ``d`` (None: empty) after checking every name is a field of dataclass ``cls`` (or in ``extra``);
    ValueError names the unknown and the known ones, with ``what`` saying which settings they are."""
    d = dict(d or {})
    known = {f.name for f in fields(cls)} | set(extra)
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {what} settings {sorted(unknown)}; known: {sorted(known)}")
    return d
