"""The coordinator against fake ranks on real sockets: it names the rank that dies,
stalls, fails or holds a token up, sends every rank the one line, and stays quiet
when every rank finishes."""

from __future__ import annotations

import io
import json
import socket
import time

import pytest

from mlx_kvshard.liveness.coordinator import Coordinator


class FakeRank:
    def __init__(self, coord: Coordinator, rank: int):
        host, port = coord.address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.buf = b""
        self.send(t="hello", rank=rank, pid=1000 + rank, host=None, token=coord.token)

    def send(self, **msg) -> None:
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def recv(self, timeout: float = 5.0) -> dict:
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


@pytest.fixture
def cluster():
    made = []

    def make(world=3, **kw):
        coord = Coordinator(world, out=io.StringIO(), **kw).start()
        ranks = [FakeRank(coord, r) for r in range(world)]
        for rk in ranks:
            assert rk.recv() == {"t": "go"}  # every rank said hello: all may join the group
            rk.send(t="phase", phase="prefill", n=0)
        made.append((coord, ranks))
        return coord, ranks

    yield make
    for coord, ranks in made:
        for rk in ranks:
            rk.sock.close()
        coord.close()


def decode(ranks, n):
    for rk in ranks:
        rk.send(t="s", n=n)


def wait_until(done, timeout=30.0) -> bool:
    """Poll `done` until true, or give up after a timeout no loaded machine reaches."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(done())


def wait_failure(coord, timeout=30.0):
    wait_until(lambda: coord.failure is not None, timeout)
    return coord.failure


def test_dead_rank_is_named_at_once(cluster):
    # "At once": by its closed connection, long before the silence detector could fire.
    coord, ranks = cluster(peer_timeout=60)
    decode(ranks, 17)
    ranks[0].send(t="ckpt", path="/tmp/x.json", n=16)
    assert wait_until(lambda: coord.checkpoint == ("/tmp/x.json", 16))
    t0 = time.monotonic()
    ranks[2].sock.close()
    f = wait_failure(coord)
    assert f and f.rank == 2 and time.monotonic() - t0 < 30  # not the 60 s peer timeout
    want = ("mlx-kvshard: rank 2 (host 127.0.0.1) died at token 17 (its connection closed); stopping all ranks. "
            "Resume with --resume /tmp/x.json (16 tokens saved).")
    assert f.message == want
    for rk in ranks[:2]:
        assert rk.recv() == {"t": "stop", "message": want}
    assert coord.out.getvalue() == want + "\n"


def test_silent_rank_is_named_after_peer_timeout(cluster):
    t0 = time.monotonic()  # before rank 1's last message (its phase line in the fixture)
    coord, ranks = cluster(peer_timeout=2.0)  # 20x the beat below: a loaded machine beats in time
    deadline = time.monotonic() + 30
    while coord.failure is None and time.monotonic() < deadline:  # ranks 0, 2 keep beating; 1 is silent
        for rk in (ranks[0], ranks[2]):
            rk.send(t="s", n=5)
        time.sleep(0.1)
    f = coord.failure
    assert f and f.rank == 1 and "rank 1 (host 127.0.0.1) stopped responding at token 5" in f.message
    assert time.monotonic() - t0 >= 2.0  # never before the peer timeout


def test_a_rank_that_saw_a_peer_go_first_is_the_verdict(cluster):
    coord, ranks = cluster()
    decode(ranks, 3)
    why = "rank 0 (host 127.0.0.1) lost its connection to a peer at token 3 ([ring] lost); stopping."
    ranks[0].send(t="bye", code=75, why=why)
    f = wait_failure(coord)
    assert f and f.rank == 0
    assert f.message == ("mlx-kvshard: rank 0 (host 127.0.0.1) lost its connection to a peer at token 3 "
                         "([ring] lost); stopping all ranks.")
    assert ranks[1].recv()["t"] == "stop"


@pytest.mark.parametrize("code", [0, 2])
def test_ranks_ending_on_their_own_are_no_verdict(cluster, code):
    """Done (0), or a bad model file failing every rank at start-up (2): that code stands."""
    coord, ranks = cluster(peer_timeout=0.6)
    for rk in ranks:
        rk.send(t="bye", code=code)
        rk.sock.close()
    # the coordinator has read every goodbye and its closed connection (no public signal for code 2)
    assert wait_until(lambda: all(coord._ranks[r].conn is None for r in range(3)))
    time.sleep(1.0)  # past the peer timeout: a rank that said goodbye is never "silent"
    assert coord.failure is None and coord.finished == ({0, 1, 2} if code == 0 else set())


def test_step_deadline_names_the_rank_behind(cluster):
    coord, ranks = cluster(step_timeout=0.5)
    decode(ranks, 9)
    deadline = time.monotonic() + 30
    while coord.failure is None and time.monotonic() < deadline:  # all alive, rank 0 stuck on token 9
        ranks[0].send(t="hb", n=9)
        decode(ranks[1:], 10)
        time.sleep(0.05)
    f = coord.failure
    assert f and f.rank == 0 and "rank 0 (host 127.0.0.1) did not finish token 9 within 0.5 s" in f.message


def test_rank_that_never_starts(cluster):
    coord = Coordinator(2, out=io.StringIO(), join_timeout=0.5, hosts=["mini-1", "mini-2"]).start()
    try:
        only = FakeRank(coord, 0)
        f = wait_failure(coord)
        assert f and f.rank == 1 and "rank 1 (host mini-2) did not start within 0.5 s" in f.message
        assert only.recv()["t"] == "stop"
        only.sock.close()
    finally:
        coord.close()


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(4096) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


@pytest.mark.parametrize("first_line", [
    {"t": "hello", "rank": 0, "pid": 1},  # no token: before tokens, it took rank 0's slot
    {"t": "hello", "rank": 0, "pid": 1, "token": "wrong"},
    {"t": "hello", "rank": 0, "pid": 1, "token": 12345},
    {"t": "hello", "rank": [0], "pid": 1, "token": None},  # unhashable: must not reach a dict lookup
    {"t": "hb", "n": 1},  # anything but a hello first
    [1, 2, 3],
])
def test_a_stranger_is_dropped_and_counted_and_takes_no_slot(first_line):
    coord = Coordinator(1, out=io.StringIO()).start()
    try:
        host, port = coord.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(json.dumps(first_line).encode() + b"\n")
            assert closed_by_peer(s)
        assert wait_until(lambda: coord.strangers == 1)
        assert "(1 so far)" in coord.out.getvalue()
        real = FakeRank(coord, 0)  # the slot is still free for the rank with the token
        assert real.recv() == {"t": "go"}
        real.sock.close()
    finally:
        coord.close()
    assert "1 connection(s) to the coordinator were dropped" in coord.out.getvalue()


def test_a_line_without_end_is_cut_off_not_buffered(cluster):
    from mlx_kvshard.liveness.coordinator import MAX_HELLO, MAX_LINE

    coord, ranks = cluster()
    host, port = coord.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        with pytest.raises(OSError):  # reset once the coordinator has dropped it
            for _ in range(1000):  # 64 MB if nothing stopped it
                s.sendall(b"x" * 65536)
    assert wait_until(lambda: coord.strangers == 1)
    assert all(len(b) <= MAX_HELLO + 65536 for b in coord._bufs.values())
    # A joined rank that does the same is a broken rank: named, not buffered.
    ranks[1].sock.sendall(b"y" * (MAX_LINE + 65536))
    f = wait_failure(coord)
    assert f and f.rank == 1 and f"sent a line longer than {MAX_LINE} bytes" in f.message


def test_a_stop_on_request_is_no_failure(cluster):
    coord, ranks = cluster()
    decode(ranks, 4)
    coord.request_stop("SIGTERM", 143)
    for rk in ranks:
        assert rk.recv() == {"t": "shutdown", "message": "stopping on request (SIGTERM)", "code": 143}
    ranks[1].sock.close()  # stopped in order, or killed by the launcher after its grace: no verdict
    ranks[0].send(t="bye", code=75, why="rank 0 lost its connection to a peer")
    time.sleep(0.5)
    assert coord.failure is None
    assert "stopping on request (SIGTERM): telling every rank to stop" in coord.out.getvalue()
