"""Link and chip profiles for the capacity planner and the link emulation, read from the package's
`configs/{links,chips}/*.json` (or from a user's own JSON file, by path).

Every number in a profile is `{"value": ..., "source": "..."}`: the planner's predictions
are only as good as these numbers, so each carries where it came from (a URL, or
"estimate: ..."). Pure Python, no MLX.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..paths import CONFIGS_DIR

ALGORITHMS = ("ring", "mesh")


@dataclass(frozen=True)
class LinkProfile:
    name: str
    description: str
    backend: str  # MLX distributed backend that realises it: ring, jaccl, jaccl-ring
    algorithm: str  # "ring": 2(N-1) steps per all_sum; "mesh": one step for small payloads
    alpha_s: float  # latency of one collective step (one hop), seconds
    bandwidth_Bps: float  # effective bandwidth of one link, bytes per second
    mesh_max_bytes: int = 0  # mesh only: largest payload reduced in one step
    sources: dict[str, str] | None = None


@dataclass(frozen=True)
class ChipProfile:
    name: str
    description: str
    mem_bandwidth_Bps: float  # Apple's spec, bytes per second (decimal GB/s)
    thunderbolt: int
    memory_options_gb: tuple[float, ...]
    sources: dict[str, str] | None = None


def available(kind: str) -> list[str]:
    folder = CONFIGS_DIR / kind
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def _find(kind: str, name: str) -> Path:
    """A profile by name (configs/<kind>/<name>.json) or by path to a JSON file."""
    p = Path(name).expanduser()
    if name.endswith(".json") or os.sep in name:
        if not p.is_file():
            raise UserError(f"{kind[:-1]} profile file {name} not found")
        return p
    path = CONFIGS_DIR / kind / f"{name}.json"
    if not path.is_file():
        names = ", ".join(available(kind)) or f"none found in {CONFIGS_DIR / kind}"
        raise UserError(f"unknown {kind[:-1]} profile {name!r}; available: {names}")
    return path


def _read(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _sourced(d: dict, key: str, path: Path, sources: dict[str, str], positive: bool = True) -> Any:
    """The value of a `{"value": x, "source": "..."}` field; a number without a source is an error."""
    field = d.get(key)
    if not isinstance(field, dict) or "value" not in field:
        raise UserError(f'{path}: field {key!r} must be {{"value": <number>, "source": "<url or estimate>"}}, '
                        f"got {field!r}")
    src = field.get("source")
    if not isinstance(src, str) or not src.strip():
        raise UserError(f"{path}: field {key!r} has no source; write the URL or 'estimate: why' beside the number")
    v = field["value"]
    values = v if isinstance(v, list) else [v]
    if not values or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in values):
        raise UserError(f"{path}: field {key!r} value must be a number (or a list of numbers), got {v!r}")
    if positive and any(x <= 0 for x in values):
        raise UserError(f"{path}: field {key!r} value must be positive, got {v!r}")
    sources[key] = src
    return v


def _text(d: dict, key: str, path: Path, default: str | None = None) -> str:
    v = d.get(key, default)
    if not isinstance(v, str) or not v:
        raise UserError(f"{path}: field {key!r} must be a non-empty string, got {v!r}")
    return v


def load_link(name: str) -> LinkProfile:
    path = _find("links", name)
    d, src = _read(path), {}
    algorithm = _text(d, "algorithm", path, "ring")
    if algorithm not in ALGORITHMS:
        raise UserError(f"{path}: field 'algorithm' must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    mesh_max = int(_sourced(d, "mesh_max_bytes", path, src)) if algorithm == "mesh" else 0
    return LinkProfile(
        name=_text(d, "name", path, path.stem),
        description=_text(d, "description", path, path.stem),
        backend=_text(d, "backend", path),
        algorithm=algorithm,
        alpha_s=float(_sourced(d, "alpha_us", path, src)) * 1e-6,
        bandwidth_Bps=float(_sourced(d, "bandwidth_gbps", path, src)) * 1e9 / 8,
        mesh_max_bytes=mesh_max,
        sources=src,
    )


def load_chip(name: str) -> ChipProfile:
    path = _find("chips", name)
    d, src = _read(path), {}
    options = _sourced(d, "memory_options_gb", path, src)
    return ChipProfile(
        name=_text(d, "name", path, path.stem),
        description=_text(d, "description", path, path.stem),
        mem_bandwidth_Bps=float(_sourced(d, "mem_bandwidth_gbs", path, src)) * 1e9,
        thunderbolt=int(_sourced(d, "thunderbolt", path, src)),
        memory_options_gb=tuple(float(x) for x in (options if isinstance(options, list) else [options])),
        sources=src,
    )
