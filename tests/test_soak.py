"""The short soak (issue 18): scripts/soak_serve.py's `soak()` under `serve --simulate 2
--restart` on `tiny` for ~45 s of mixed streaming / non-streaming load with client
disconnects and one rank SIGKILLed mid-load. Its report must hold the invariants: no
request failed, every completed greedy text equals the undisturbed one (nothing lost or
repeated), the KV back to 0 when idle, and no process left after shutdown."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import soak_serve  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads rank processes in /proc")


def test_short_soak_with_one_rank_killed(tmp_path):
    s = soak_serve.Settings(duration=45, world=2, restart=3, kill_every=25, clients=3, disconnect_p=0.15,
                            prompts=4, max_tokens=(8, 24), seed=18)
    r = soak_serve.soak(s, tmp_path)
    info = soak_serve.table(r) + "\n" + str(asdict(r)["failures"][:5])
    assert len(r.kills) == 1 and r.relaunches == 1, info  # the kill happened and the group came back once
    assert r.requests["total"] > 0 and r.requests.get("failed", 0) == 0, info
    assert r.requests["completed"] + r.requests.get("disconnected", 0) == r.requests["total"], info
    assert r.greedy_checked > 0 and r.greedy_mismatched == 0, info
    assert r.chars_lost == 0 and r.chars_duplicated == 0, info
    assert r.kv_used_idle == 0 and r.kv_reserved_idle == 0, info
    assert r.orphans == 0 and r.server_rc is not None, info
    assert all(len(samples) > 0 for samples in r.rss_mb.values()) and set(r.rss_mb) == {"0", "1"}, info
