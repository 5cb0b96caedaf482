"""Soak `mlx-kvshard serve --simulate N --restart K` (issue 18): mixed load for a set time,
concurrent streaming and non-streaming requests with random prompt lengths and max_tokens,
random client disconnects, and (with --kill-every S) a random rank SIGKILLed every S
seconds. Afterwards: requests completed / failed, tokens lost or duplicated (every completed
greedy request's text against the same request run undisturbed at the start), p50/p95 TTFT
and TPOT, RSS per rank over time (from /proc), KV used back to 0 when idle (from /metrics),
and processes left after shutdown (must be 0).

    python scripts/soak_serve.py                                   # 30 min, world 3, no kills
    python scripts/soak_serve.py --duration 300 --kill-every 90 --json soak.json

Loopback only; every loop is bounded by --duration; it starts and stops its own server.
tests/test_soak.py runs `soak()` for a short time with one kill and checks the invariants."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
TAG = "MLX_KVSHARD_SOAK_TAG"  # set on the server; inherited by every rank, so all can be found and reaped
REFUSED_TRIES = 300  # a recovery on a busy machine takes seconds to a minute; the client waits 1 s between tries
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


@dataclass
class Settings:
    duration: float = 1800.0
    world: int = 3
    model: str = "tiny"
    restart: int = 1000  # relaunches the server may do (a kill every few minutes for hours)
    kill_every: float = 0.0  # 0: no kills
    clients: int = 4
    disconnect_p: float = 0.1  # a streaming client leaves after a few chunks
    prompts: int = 6  # the fixed greedy prompt set (lengths 2..~40 words)
    max_tokens: tuple[int, ...] = (8, 24, 48)
    seed: int = 0
    max_context: int = 512
    peer_timeout: float = 10.0
    rss_every: float = 2.0
    prefix_cache_bytes: int | None = None  # serve's own default (256 MiB a rank) when None


@dataclass
class Outcome:
    kind: str  # greedy-stream, greedy-full, sampled-stream, sampled-full
    key: tuple | None  # (prompt index, max_tokens) for greedy: its reference
    status: str = "failed"  # completed, failed, disconnected
    text: str = ""
    tokens: int = 0
    error: str = ""
    ttft: float | None = None
    tpot: float | None = None
    refused: int = 0  # 503s (a new request while the group restarts) before it was taken


@dataclass
class Report:
    settings: dict
    seconds: float = 0.0
    requests: dict = field(default_factory=dict)
    greedy_checked: int = 0
    greedy_mismatched: int = 0
    chars_lost: int = 0
    chars_duplicated: int = 0
    failures: list = field(default_factory=list)
    ttft_s: dict = field(default_factory=dict)
    tpot_s: dict = field(default_factory=dict)
    kills: list = field(default_factory=list)
    rss_mb: dict = field(default_factory=dict)  # rank -> [[t, pid, MiB], ...]
    prefix_mb: list = field(default_factory=list)  # [[t, MiB]]: the prefix cache on the largest rank (/metrics)
    kv_used_idle: float | None = None
    kv_reserved_idle: float | None = None
    migrated: int = 0  # requests the front moved to a relaunched group (its own log lines)
    relaunches: int = 0
    orphans: int = -1
    server_rc: int | None = None
    loadavg: list = field(default_factory=list)


def prompt_set(n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(2 + i * 38 // max(1, n - 1))) for i in range(n)]


def tagged(tag: str) -> dict[int, int | None]:
    """pid -> MLX rank (None: not a rank, e.g. the launcher and its front) of every live process carrying `tag`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if f"{TAG}={tag}".encode() in env and state not in ("Z", "X"):
            rank = next((int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"MLX_RANK=")), None)
            # a rank is `python -m mlx_kvshard` with MLX_RANK; its helpers inherit the variable but are not ranks
            found[int(entry)] = rank if argv[1:3] == [b"-m", b"mlx_kvshard"] else None
    return found


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Server:
    def __init__(self, s: Settings, tmp: Path, tag: str):
        self.tag, self.err = tag, tmp / "serve.err"
        argv = [sys.executable, "-m", "mlx_kvshard", "serve", "--simulate", str(s.world), "--restart", str(s.restart),
                "--model", s.model, "--port", "0", "--max-context", str(s.max_context),
                "--peer-timeout", str(s.peer_timeout)]
        if s.prefix_cache_bytes is not None:
            argv += ["--prefix-cache-bytes", str(s.prefix_cache_bytes)]
        env = {**os.environ, TAG: tag, "TMPDIR": str(tmp),
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(argv, stdout=open(tmp / "serve.out", "wb"), stderr=open(self.err, "wb"),
                                     stdin=subprocess.DEVNULL, env=env, cwd=REPO, start_new_session=True)
        self.url: str | None = None

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}:\n{self.stderr()[-3000:]}")
            if self.url is None:
                m = re.search(r"HTTP on (http://127\.0\.0\.1:\d+)", self.stderr())
                self.url = m.group(1) if m else None
            if self.url is not None and self.healthy():
                return
            time.sleep(0.2)
        raise RuntimeError(f"serve not healthy within {timeout}s:\n{self.stderr()[-3000:]}")

    def ranks(self) -> dict[int, int]:
        return {r: p for p, r in tagged(self.tag).items() if r is not None}

    def stop(self) -> tuple[int | None, int]:
        """SIGTERM the launcher (it stops every rank in order); what is left after is an orphan (then killed)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        time.sleep(1.0)  # let the ranks' own exits land
        left = tagged(self.tag)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.proc.returncode, len(left)


def run_one(url: str, body: dict, stream: bool, leave_after: int | None, out: Outcome) -> None:
    """One request, sent again (after a second) while the server refuses new work with a 503
    during a recovery, as a client should; fills `out`."""
    for _ in range(REFUSED_TRIES):
        attempt(url, body, stream, leave_after, out)
        if not out.error.startswith("HTTP 503"):
            return
        out.refused += 1
        time.sleep(1.0)


def attempt(url: str, body: dict, stream: bool, leave_after: int | None, out: Outcome) -> None:
    """One try; fills `out`. `leave_after`: close the stream after that many chunks."""
    out.error = ""
    t0 = time.monotonic()
    try:
        if not stream:
            r = httpx.post(url + "/v1/completions", json=body, timeout=600)
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {r.text[:300]}"
                return
            j = r.json()
            out.text, out.tokens, out.status = j["choices"][0]["text"], j["usage"]["completion_tokens"], "completed"
            return
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        times, parts, finished = [], [], False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {r.read()[:300]!r}"
                return
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    finished = True
                    break
                e = json.loads(line[6:])
                if "error" in e:
                    out.error = str(e["error"].get("message"))[:300]
                    return
                if e.get("usage"):
                    out.tokens = e["usage"]["completion_tokens"]
                if e.get("choices"):
                    parts.append(e["choices"][0]["text"])
                    times.append(time.monotonic())
                    if leave_after is not None and len(times) >= leave_after:
                        out.status = "disconnected"
                        return
        out.text = "".join(parts)
        if not finished:
            out.error = "stream ended without [DONE]"
            return
        out.status = "completed"
        if times:
            out.ttft = times[0] - t0
            if len(times) > 1:
                out.tpot = (times[-1] - times[0]) / (len(times) - 1)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        out.error = f"{type(e).__name__}: {e}"[:300]


def quantiles(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"n": len(xs), "p50": round(q(0.50), 4), "p95": round(q(0.95), 4), "mean": round(statistics.mean(xs), 4)}


def prefix_mib(url: str) -> float | None:
    """The prefix cache's bytes on its largest rank, from /metrics (RSS grows with it, by design)."""
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "mlx_kvshard_prefix_cache_bytes":
                return smp.value / (1 << 20)
    return None


def kv_idle(url: str, timeout: float = 60) -> tuple[float | None, float | None]:
    """The largest kv_tokens_used over ranks and kv_tokens_reserved, once both are 0 (or at the timeout)."""
    deadline, used, reserved = time.monotonic() + timeout, None, None
    while time.monotonic() < deadline:
        try:
            text = httpx.get(url + "/metrics", timeout=30).text
        except httpx.HTTPError:
            time.sleep(1)
            continue
        values: dict[str, list[float]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                values.setdefault(s.name, []).append(s.value)
        used = max(values.get("mlx_kvshard_kv_tokens_used", [0.0]))
        reserved = max(values.get("mlx_kvshard_kv_tokens_reserved", [0.0]))
        if used == 0 and reserved == 0:
            break
        time.sleep(1)
    return used, reserved


def soak(s: Settings, workdir: Path | None = None, log=print) -> Report:
    rng = random.Random(s.seed)
    report = Report(settings=asdict(s))
    tmp = Path(workdir or tempfile.mkdtemp(prefix="soak-"))
    tmp.mkdir(parents=True, exist_ok=True)
    server = Server(s, tmp, f"soak-{uuid.uuid4().hex[:12]}")
    try:
        server.wait_healthy(600)
        url = server.url
        prompts = prompt_set(s.prompts, rng)
        reference: dict[tuple, str] = {}
        for i, p in enumerate(prompts):  # undisturbed, one at a time
            for m in s.max_tokens:
                r = httpx.post(url + "/v1/completions", json={"prompt": p, "max_tokens": m, "temperature": 0},
                               timeout=600)
                r.raise_for_status()
                reference[(i, m)] = r.json()["choices"][0]["text"]
        log(f"soak: {len(reference)} reference texts from {url}; load for {s.duration:.0f}s with {s.clients} clients")

        start = time.monotonic()
        deadline = start + s.duration
        outcomes: list[Outcome] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client(cid: int) -> None:
            crng = random.Random(s.seed * 1000 + cid)
            while time.monotonic() < deadline:
                i, m = crng.randrange(len(prompts)), crng.choice(s.max_tokens)
                greedy, stream = crng.random() < 0.7, crng.random() < 0.6
                body = {"prompt": prompts[i], "max_tokens": m, "temperature": 0} if greedy else \
                    {"prompt": prompts[i], "max_tokens": m, "temperature": 0.8, "seed": crng.randrange(1 << 16)}
                leave = crng.randint(1, max(1, m // 2)) if stream and crng.random() < s.disconnect_p else None
                out = Outcome(("greedy" if greedy else "sampled") + ("-stream" if stream else "-full"),
                              (i, m) if greedy else None)
                run_one(url, body, stream, leave, out)
                with lock:
                    outcomes.append(out)

        def sampler() -> None:
            while not stop.is_set():
                t = round(time.monotonic() - start, 1)
                for rank, pid in server.ranks().items():
                    mib = rss_mib(pid)
                    if mib is not None:
                        report.rss_mb.setdefault(str(rank), []).append([t, pid, round(mib, 1)])
                pc = prefix_mib(url)
                if pc is not None:
                    report.prefix_mb.append([t, round(pc, 1)])
                stop.wait(s.rss_every)

        def killer() -> None:
            k = 1
            while s.kill_every > 0 and not stop.is_set():
                at = start + k * s.kill_every
                if at >= deadline or stop.wait(max(0.0, at - time.monotonic())):
                    return
                pids = server.ranks()
                if len(pids) == s.world and server.healthy():  # the group is up: not in a recovery
                    victim = rng.randrange(s.world)
                    os.kill(pids[victim], signal.SIGKILL)
                    report.kills.append({"t": round(time.monotonic() - start, 1), "rank": victim,
                                         "pid": pids[victim]})
                    log(f"soak: SIGKILL rank {victim} (pid {pids[victim]}) at {report.kills[-1]['t']}s")
                k += 1

        threads = [threading.Thread(target=client, args=(c,)) for c in range(s.clients)]
        aux = [threading.Thread(target=sampler), threading.Thread(target=killer)]
        for t in threads + aux:
            t.start()
        for t in threads:
            t.join()  # each finishes its last request after the deadline (bounded by the 600 s request timeout)
        stop.set()
        for t in aux:
            t.join()
        report.seconds = round(time.monotonic() - start, 1)

        server.wait_healthy(300)
        report.kv_used_idle, report.kv_reserved_idle = kv_idle(url)
        by_status: dict[str, int] = {}
        for o in outcomes:
            by_status[o.status] = by_status.get(o.status, 0) + 1
            if o.status == "failed":
                report.failures.append({"kind": o.kind, "error": o.error})
            if o.status == "completed" and o.key is not None:
                ref = reference[o.key]
                report.greedy_checked += 1
                if o.text != ref:
                    report.greedy_mismatched += 1
                    # characters past the common prefix: what is missing and what is extra
                    n = len(os.path.commonprefix([o.text, ref]))
                    report.chars_lost += len(ref) - n
                    report.chars_duplicated += len(o.text) - n
        report.requests = {"total": len(outcomes), **by_status, "refused_503": sum(o.refused for o in outcomes),
                           "by_kind": {k: sum(o.kind == k for o in outcomes) for k in sorted({o.kind for o in outcomes})}}
        report.ttft_s = quantiles([o.ttft for o in outcomes if o.ttft is not None])
        report.tpot_s = quantiles([o.tpot for o in outcomes if o.tpot is not None])
    finally:
        report.server_rc, report.orphans = server.stop()
        err = server.stderr()
        report.migrated = sum(int(m) for m in re.findall(r"moved (\d+) request\(s\) in flight to the relaunched", err))
        report.relaunches = len(re.findall(r"restart \d+/\d+ on \d+ rank", err))
        report.loadavg = list(os.getloadavg())
    return report


def table(r: Report) -> str:
    rq = r.requests
    rows = [("seconds of load", r.seconds), ("requests", rq.get("total", 0)),
            ("completed", rq.get("completed", 0)), ("failed", rq.get("failed", 0)),
            ("client disconnects", rq.get("disconnected", 0)),
            ("503s during recovery (retried)", rq.get("refused_503", 0)), ("rank kills", len(r.kills)),
            ("relaunches / requests moved", f"{r.relaunches} / {r.migrated}"),
            ("greedy texts checked", r.greedy_checked), ("greedy texts differing", r.greedy_mismatched),
            ("chars lost / duplicated", f"{r.chars_lost} / {r.chars_duplicated}"),
            ("TTFT p50 / p95 s", f"{r.ttft_s.get('p50')} / {r.ttft_s.get('p95')}"),
            ("TPOT p50 / p95 s", f"{r.tpot_s.get('p50')} / {r.tpot_s.get('p95')}"),
            ("KV used / reserved when idle", f"{r.kv_used_idle} / {r.kv_reserved_idle}"),
            ("orphans after shutdown", r.orphans), ("load average", " ".join(f"{x:.2f}" for x in r.loadavg))]
    for rank, samples in sorted(r.rss_mb.items()):
        lives: dict[int, list[float]] = {}  # a relaunch gives the rank a new process
        for _, pid, mib in samples:
            lives.setdefault(pid, []).append(mib)
        rows.append((f"rank {rank} RSS MiB (first-last per process)",
                     ", ".join(f"{m[0]}-{m[-1]}" for m in lives.values())))
    if r.prefix_mb:
        rows.append(("prefix cache MiB (first-last, largest rank)", f"{r.prefix_mb[0][1]}-{r.prefix_mb[-1][1]}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main() -> int:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of load (default 30 min)")
    p.add_argument("--world", type=int, default=d.world, help="ranks (serve --simulate N)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--restart", type=int, default=d.restart, help="serve --restart K")
    p.add_argument("--kill-every", type=float, default=d.kill_every, help="SIGKILL a random rank every S seconds")
    p.add_argument("--clients", type=int, default=d.clients, help="concurrent clients")
    p.add_argument("--disconnect", type=float, default=d.disconnect_p, help="share of streams the client leaves")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--prefix-cache-bytes", type=int, default=None,
                   help="serve's --prefix-cache-bytes (default: serve's own, 256 MiB a rank); RSS grows with it")
    p.add_argument("--json", type=Path, help="write the report here")
    a = p.parse_args()
    if a.duration <= 0 or a.world < 1 or a.clients < 1 or a.kill_every < 0 or not 0 <= a.disconnect <= 1:
        p.error(f"need --duration > 0, --world >= 1, --clients >= 1, --kill-every >= 0, 0 <= --disconnect <= 1 "
                f"(got {a.duration}, {a.world}, {a.clients}, {a.kill_every}, {a.disconnect})")
    s = Settings(duration=a.duration, world=a.world, model=a.model, restart=a.restart, kill_every=a.kill_every,
                 clients=a.clients, disconnect_p=a.disconnect, seed=a.seed, prefix_cache_bytes=a.prefix_cache_bytes)
    r = soak(s)
    if a.json:
        a.json.write_text(json.dumps(asdict(r), indent=1))
    print(table(r))
    ok = (r.requests.get("failed", 0) == 0 and r.greedy_mismatched == 0 and r.orphans == 0
          and r.kv_used_idle == 0 and r.kv_reserved_idle == 0)
    print("soak: OK" if ok else "soak: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
