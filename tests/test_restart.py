"""What a relaunch runs: the same command resuming from the last checkpoint, on the
hosts left after --exclude (the real relaunch is in test_liveness.py)."""

from __future__ import annotations

import pytest

from mlx_kvshard.launch.restart import Attempt, next_hosts, run_with_restarts, with_resume
from mlx_kvshard.errors import UserError
from mlx_kvshard.liveness.client import EXIT_PEER_LOST


def test_with_resume_replaces_an_earlier_resume():
    assert with_resume(["generate", "--resume", "a.json", "--temp", "0.5"], "b.json") == \
        ["generate", "--temp", "0.5", "--resume", "b.json"]
    assert with_resume(["generate", "--resume=a.json"], "b.json") == ["generate", "--resume", "b.json"]


def test_next_hosts():
    hosts = ["mini-1", "mini-2", "studio"]
    assert next_hosts(hosts, [], 1) == hosts
    assert next_hosts(hosts, ["failed"], 1) == ["mini-1", "studio"]
    assert next_hosts(hosts, ["studio"], 1) == ["mini-1", "mini-2"]
    assert next_hosts(["127.0.0.1"] * 3, ["failed"], 2) == ["127.0.0.1"] * 2  # simulation: by rank
    with pytest.raises(UserError, match="leaves no host"):
        next_hosts(["127.0.0.1"] * 2, ["127.0.0.1"], 0)


def test_run_with_restarts_stops_on_success_or_other_failures():
    calls, said = [], []

    def once(hosts, args):
        calls.append((list(hosts), list(args)))
        results = [Attempt(EXIT_PEER_LOST, 2, "/ck.json"), Attempt(EXIT_PEER_LOST, 0, None), Attempt(0, None, None)]
        return results[len(calls) - 1]

    code = run_with_restarts(once, ["a", "b", "c"], ["generate"], 5, ["failed"], said.append)
    assert code == 0 and len(calls) == 3
    assert calls[1] == (["a", "b"], ["generate", "--resume", "/ck.json"])
    assert calls[2] == (["b"], ["generate", "--resume", "/ck.json"])  # no newer checkpoint: the same one
    assert said[0] == "restart 1/5 on 2 rank(s) (a, b): resuming from /ck.json"
    assert run_with_restarts(lambda h, a: Attempt(2, None, None), ["a"], ["generate"], 3, [], said.append) == 2
