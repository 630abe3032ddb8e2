"""What every doctor check gives: a verdict with detail and advice, the exit status they add up to, and the text
report."""
from __future__ import annotations

from dataclasses import dataclass

OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"
EXIT = {OK: 0, INFO: 0, WARN: 1, FAIL: 3}
DOCS = "docs/ros.md, 'Losing clouds'"
MIB = 1 << 20


@dataclass
class Check:
    name: str
    verdict: str  # ok | info | warn | fail
    detail: str
    advice: str = ""


def exit_code(checks: list[Check]) -> int:
    return max((EXIT[c.verdict] for c in checks), default=0)


def render(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"[{c.verdict.upper():4}] {c.name}: {c.detail}")
        if c.advice and c.verdict in (WARN, FAIL):
            lines.append(f"       -> {c.advice}")
    counts = {v: sum(c.verdict == v for c in checks) for v in (FAIL, WARN)}
    lines.append(f"{counts[FAIL]} failure(s), {counts[WARN]} warning(s); the measured figures behind each advice: "
                 f"{DOCS}")
    return "\n".join(lines)

