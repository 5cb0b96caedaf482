"""What the doctor finds: one probe run per host, and PASS / WARN / FAIL checks with a fix.
Shared by doctor.py (runs the probes) and judge.py (turns their results into checks)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..table import columns
from .spec import RankLaunch


@dataclass
class Check:
    host: str
    name: str
    status: str  # PASS, WARN, FAIL or SKIP
    detail: str
    fix: str | None = None


@dataclass
class Report:
    checks: list[Check]
    header: str = ""

    @property
    def ok(self) -> bool:
        return not any(c.status == "FAIL" for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "FAIL"]

    def format(self) -> str:
        rows = []
        for c in self.checks:
            rows.append((c.status, c.host, c.name, c.detail))
            if c.fix and c.status in ("FAIL", "WARN"):
                rows.append(("", "", "fix:", c.fix))
        lines = ([self.header] if self.header else []) + columns(rows, "llll")
        fails = len(self.failures())
        warns = sum(c.status == "WARN" for c in self.checks)
        lines.append(f"doctor: {fails} FAIL, {warns} WARN" +
                     (" - fix the FAILs above and run `mlx-kvshard launch --check` again" if fails else " - ready"))
        return "\n".join(lines)


@dataclass
class Probe:
    """One probe run: every rank sharing a host, Python and cwd shares it."""

    ranks: list[RankLaunch]
    job: dict = field(default_factory=dict)
    result: dict | None = None
    failure: Check | None = None
    seconds: float = 0.0

    @property
    def first(self) -> RankLaunch:
        return self.ranks[0]

    @property
    def label(self) -> str:
        return self.first.host.label
