"""KV memory of the server (issue 17 part 5, the parts that exist): in one run, on one machine.

1. TTFT for a ~2K and a ~8K token prompt, cold and RAM-warm (the same prefix sent again
   with a new question), `mlx-kvshard serve` beside `mlx_lm.server` (its in-memory prompt
   cache) on the same prompts at world 1; and disk-warm: `serve --prefix-cache-dir`,
   stopped (SIGTERM) and started again on the same directory, the prefix sent with a third
   question (its blocks are read back from disk).
2. A shared-system-prompt workload: 16 chats sharing a ~4K token system prompt; the
   prefix-cache bytes the server holds afterwards (its own gauge), this tree's block cache
   beside the whole-prompt entries of an older revision (`--baseline REV`, run from
   `git archive` of it, same flags).

    python scripts/bench_kv_server.py                      # tiny preset
    python scripts/bench_kv_server.py --baseline f93fcd6   # the revision before the block cache
    python scripts/bench_kv_server.py --only disk          # the disk-tier rows alone
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from bench_serve import Running, one_request, start_mlxlm  # noqa: E402

CONTEXT = 8704
CACHE_BYTES = 2 << 30  # room for every chat's whole prompt in the older design too


def start_ours(model_dir: Path, port: int, log: Path, tree: Path | None = None, *extra: str) -> Running:
    """This tree's server, or (`tree`) another revision's package: run from that directory,
    first on the path of every rank (`python -m` puts the working directory first)."""
    argv = [sys.executable, "-m", "mlx_kvshard", "serve", "--model", str(model_dir), "--simulate", "1",
            "--port", str(port), "--max-context", str(CONTEXT), "--max-batch", "4",
            "--prefix-cache-bytes", str(CACHE_BYTES), *extra]
    env = benchlib.rank_env(1)
    if tree:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")])
    return Running(argv, env, f"http://127.0.0.1:{port}", log, cwd=tree or benchlib.REPO)


def gauge(url: str, name: str) -> float | None:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(f"mlx_kvshard_{name} "):
            return float(line.split()[-1])
    return None


def ttft_rows(server: Running, model: str, texts: dict[int, str]) -> list[dict]:
    rows = []
    for n, text in texts.items():
        cold = one_request(httpx.Client(), server.url, model, text, 2)
        warm = one_request(httpx.Client(), server.url, model, text + " and one more question", 2)
        rows.append({"prompt_tokens": n, "cold_s": cold["ttft"], "warm_s": warm["ttft"],
                     "warm_cached": warm["cached_tokens"], "warm_prompt": warm["prompt_tokens"]})
    return rows


def disk_rows(model_dir: Path, model: str, texts: dict[int, str], logs: Path, timeout: float) -> list[dict]:
    """Cold and RAM-warm on a server with the disk tier, then disk-warm on a fresh server
    (same directory) after the first one stopped."""
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-kv-disk-") as cache:
        flags = ("--prefix-cache-dir", cache)
        server = start_ours(model_dir, benchlib.free_port_base(1), logs / "disk-1.log", None, *flags).wait(timeout)
        try:
            for n, text in texts.items():
                cold = one_request(httpx.Client(), server.url, model, text, 2)
                warm = one_request(httpx.Client(), server.url, model, text + " and one more question", 2)
                rows[n] = {"prompt_tokens": n, "cold_s": cold["ttft"], "warm_s": warm["ttft"],
                           "warm_cached": warm["cached_tokens"], "warm_prompt": warm["prompt_tokens"]}
        finally:
            server.stop()
        disk_bytes = sum(f.stat().st_size for f in Path(cache).rglob("*.kv"))
        server = start_ours(model_dir, benchlib.free_port_base(1), logs / "disk-2.log", None, *flags).wait(timeout)
        try:
            for n, text in texts.items():
                hot = one_request(httpx.Client(), server.url, model, text + " and a question after a restart", 2)
                rows[n].update(disk_s=hot["ttft"], disk_cached=hot["cached_tokens"], disk_prompt=hot["prompt_tokens"])
            rows["io"] = {"block_bytes_on_disk": disk_bytes,
                          "read_bytes": gauge(server.url, "prefix_cache_disk_read_bytes_total"),
                          "read_s": gauge(server.url, "prefix_cache_disk_read_seconds_total")}
        finally:
            server.stop()
    io = rows.pop("io")
    return [{**r, **io} for r in rows.values()]


def shared_prompt(server: Running, model: str, system: str, chats: int) -> dict:
    cached = prompt = 0
    for i in range(chats):
        r = one_request(httpx.Client(), server.url, model, f"{system} chat {i}: what is item {i * 7}?", 8)
        cached, prompt = cached + r["cached_tokens"], prompt + r["prompt_tokens"]
    return {"prefix_bytes": gauge(server.url, "prefix_cache_bytes"), "cached_tokens": cached,
            "prompt_tokens": prompt}


def baseline_tree(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", rev, "mlx_kvshard"], cwd=benchlib.REPO, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--chats", type=int, default=16)
    p.add_argument("--system-tokens", type=int, default=4096)
    p.add_argument("--baseline", default=None, metavar="REV", help="also run the shared-prompt workload on REV")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--only", choices=("disk",), default=None, help="run only these rows")
    a = p.parse_args()
    t0 = time.time()
    model_dir = benchlib.bench_model_dir(a.preset)
    model = str(model_dir)
    texts = {n: f"{tag} " + benchlib.prompt_text(model_dir, n) for tag, n in (("first", 2048), ("second", 8192))}
    system = "system " + benchlib.prompt_text(model_dir, a.system_tokens)
    logs = Path(tempfile.mkdtemp(prefix="bench_kv-"))
    report = {"machine": benchlib.machine(), "preset": a.preset, "load_before": benchlib.load_avg(), "ttft": {},
              "shared": {}}
    report["disk"] = disk_rows(model_dir, model, texts, logs, a.timeout)
    if a.only == "disk":
        report["load_after"] = benchlib.load_avg()
        report["wall_s"] = time.time() - t0
        print(text(report, a))
        return 0
    for name, start in (("mlx-kvshard", lambda port: start_ours(model_dir, port, logs / "ours.log")),
                        ("mlx_lm.server", lambda port: start_mlxlm(model_dir, port, logs / "mlxlm.log", 4, 1))):
        server = start(benchlib.free_port_base(1)).wait(a.timeout)
        try:
            report["ttft"][name] = ttft_rows(server, model, texts)
        finally:
            server.stop()
    with tempfile.TemporaryDirectory() as tree:
        for name, where in [("blocks (this tree)", None)] + ([(f"whole prompts ({a.baseline})", a.baseline)]
                                                             if a.baseline else []):
            server = start_ours(model_dir, benchlib.free_port_base(1), logs / f"shared-{where or 'ours'}.log",
                                baseline_tree(where, Path(tree)) if where else None).wait(a.timeout)
            try:
                report["shared"][name] = shared_prompt(server, model, system, a.chats)
            finally:
                server.stop()
    report["load_after"] = benchlib.load_avg()
    report["wall_s"] = time.time() - t0
    print(text(report, a))
    benchlib.write_json(Path(benchlib.REPO) / "docs" / "bench" / f"kv-server-{benchlib.machine_tag()}.json", report)
    return 0


def text(report: dict, a) -> str:
    m = report["machine"]
    out = [f"Machine: {m.get('cpu', m)}; load average {report['load_before']:.1f} before, "
           f"{report['load_after']:.1f} after; preset {a.preset}, world 1, float32.", "",
           "| server | prompt tokens | TTFT cold | TTFT RAM-warm | warm / cold | cached of the warm prompt |",
           "|---|--:|--:|--:|--:|--:|"]
    for name, rows in report["ttft"].items():
        for r in rows:
            out.append(f"| {name} | {r['prompt_tokens']} | {r['cold_s'] * 1e3:.0f} ms | {r['warm_s'] * 1e3:.0f} ms | "
                       f"{r['warm_s'] / r['cold_s']:.2f} | {r['warm_cached']} / {r['warm_prompt']} |")
    out += ["", "Disk tier (`--prefix-cache-dir`): cold and RAM-warm on one server, disk-warm on a second server "
            "started on the same directory after the first stopped:", "",
            "| prompt tokens | TTFT cold | RAM-warm | disk-warm | disk / cold | cached after the restart |",
            "|--:|--:|--:|--:|--:|--:|"]
    for r in report.get("disk", []):
        out.append(f"| {r['prompt_tokens']} | {r['cold_s'] * 1e3:.0f} ms | {r['warm_s'] * 1e3:.0f} ms | "
                   f"{r['disk_s'] * 1e3:.0f} ms | {r['disk_s'] / r['cold_s']:.2f} | "
                   f"{r['disk_cached']} / {r['disk_prompt']} |")
    if report.get("disk"):
        r = report["disk"][0]
        out += ["", f"Block files on disk after the first server: {benchlib.mib(r['block_bytes_on_disk'])}; the "
                f"restarted server read {benchlib.mib(r['read_bytes'])} back in {r['read_s']:.2f} s."]
    if a.only:
        return "\n".join(out)
    out += ["", f"{a.chats} chats sharing a {a.system_tokens}-token system prompt, one after the other, each on a "
            f"fresh server:", "",
            "| prefix cache | bytes held | cached / prompt tokens |", "|---|--:|--:|"]
    for name, r in report["shared"].items():
        out.append(f"| {name} | {benchlib.mib(r['prefix_bytes'])} | {r['cached_tokens']} / {r['prompt_tokens']} |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
