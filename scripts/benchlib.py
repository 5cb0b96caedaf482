"""Shared pieces of the benchmark scripts: synthetic checkpoints of realistic shape,
rank processes started the way a simulation starts them, machine facts, and output.

Scripts run from a checkout (`python scripts/bench_decode.py`); nothing here is part of
the installed package.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
for _p in (REPO, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from ranks import OPENBLAS, free_port_base  # noqa: E402  (the tests' rank helpers)
BENCH_VERSION = 1  # bump when a preset's recipe changes, so cached checkpoints are rebuilt

# Llama proportions (GQA 4, MLP ~2.75x hidden, 32k vocab), scaled to the machine.
PRESETS: dict[str, dict] = {
    # smoke runs and the context sweep: seconds per run on 2 cores
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=704, vocab_size=4096),
    # ~155M parameters, 0.6 GB fp32: what a 2-core box decodes at a few tokens a second
    "small": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=2816, vocab_size=32000),
    # ~0.85B parameters (TinyLlama-1.1B's layout at 16 layers), 3.4 GB fp32: the 16-core machine
    "device": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                   intermediate_size=5632, vocab_size=32000),
}


class BenchError(RuntimeError):
    pass


# ---- checkpoints ------------------------------------------------------------------------
def preset_config(preset: str, **overrides) -> dict:
    from mlx_kvshard.models.synth import llama_config

    if preset not in PRESETS:
        raise BenchError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return llama_config(**{**PRESETS[preset], "max_position_embeddings": 8192, **overrides})


def bench_model_dir(preset: str, **overrides) -> Path:
    """The preset's checkpoint, built once into the cache (MLX_KVSHARD_CACHE/bench)."""
    from mlx_kvshard.models.synth import write_atomically
    from mlx_kvshard.paths import cache_root

    cfg = preset_config(preset, **overrides)
    tag = "-".join(f"{k}{v}" for k, v in sorted(overrides.items()))
    final = cache_root() / "bench" / f"{preset}{'-' + tag if tag else ''}-v{BENCH_VERSION}"
    return write_atomically(final, lambda tmp: _build_checkpoint(tmp, cfg))


def _build_checkpoint(path: Path, cfg: dict) -> None:
    """Random weights, then lm_head rows zeroed for EOS and for ids the 512-token tokenizer
    lacks: greedy decoding then never stops early and every token detokenizes, so every
    run generates exactly --max-tokens tokens. The compute is unchanged."""
    import mlx.core as mx

    from mlx_kvshard.models.synth import write_checkpoint

    write_checkpoint(path, cfg, seed=0)
    n_tokens = len(json.loads((path / "tokenizer.json").read_text())["model"]["vocab"])
    f = path / "model.safetensors"
    weights = mx.load(str(f))
    if "lm_head.weight" not in weights:  # tied embeddings: the embedding is the head; left as is
        return
    head = weights["lm_head.weight"]
    keep = (mx.arange(head.shape[0]) < n_tokens) & (mx.arange(head.shape[0]) != cfg["eos_token_id"])
    weights["lm_head.weight"] = head * keep[:, None].astype(head.dtype)
    mx.save_safetensors(str(f), weights, metadata={"format": "mlx"})


def param_count(cfg: dict) -> int:
    h, L, i, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    attn = h * hd * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
    per_layer = attn + 3 * h * i + 2 * h
    return L * per_layer + v * h * (1 if cfg.get("tie_word_embeddings") else 2) + h


def prompt_text(model_dir: Path, n_tokens: int) -> str:
    """Text that encodes (no chat template) to about `n_tokens` tokens."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlx_kvshard.models.synth import _CORPUS

    tok = load_tokenizer(model_dir)
    text = " ".join(_CORPUS.split())
    while len(tok.encode(text)) < n_tokens + 8:
        text = text + " " + text
    ids = tok.encode(text)[:n_tokens]
    return tok.decode(ids)


# ---- machine ----------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        return out.stdout.strip() or platform.processor()
    return platform.processor() or platform.machine()


def ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True)
        return int(out.stdout.strip() or 0) or None
    return None


def machine() -> dict:
    import mlx.core as mx
    import mlx_lm

    ram = ram_bytes()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(ram / 2**30, 1) if ram else None,
        "system": f"{platform.system()} {platform.machine()}",
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "blas": "system OpenBLAS (LD_PRELOAD)" if _use_openblas() else "MLX's bundled",
        "load_avg_at_start": os.getloadavg(),
    }


def machine_tag() -> str:
    """A file-name tag for this machine, e.g. linux-x86_64-2core."""
    return f"{platform.system().lower()}-{platform.machine()}-{os.cpu_count()}core"


def load_avg() -> float:
    return os.getloadavg()[0]


QUIET_WAIT_S = 0.0  # set from --quiet-wait: how long launch() waits for an idle machine
NICE = 0  # set from --nice: priority increment for every rank process (negative: root only)
WAITS: list[float] = []  # seconds each launch waited (the JSON reports them)


def procs_running() -> int:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("procs_running"):
                return int(line.split()[1])
    return 1


def wait_quiet(max_wait: float) -> float:
    """Wait (at most `max_wait` s) until no other process is running: 4 samples in a row
    with only this one runnable. The machine is shared; this keeps runs off others' bursts."""
    if max_wait <= 0 or not os.path.exists("/proc/stat"):
        return 0.0
    t0, calm = time.monotonic(), 0
    while time.monotonic() - t0 < max_wait and calm < 4:
        calm = calm + 1 if procs_running() <= 1 else 0
        time.sleep(0.25)
    return time.monotonic() - t0


# ---- rank processes -----------------------------------------------------------------------
def _use_openblas() -> bool:
    return sys.platform.startswith("linux") and os.path.exists(OPENBLAS)


def rank_env(world: int, threads: int | None = None) -> dict[str, str]:
    """As `generate --simulate` sets up ranks: OpenBLAS preloaded, cores split among ranks."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    n = str(threads or max(1, (os.cpu_count() or 1) // world))
    env["OPENBLAS_NUM_THREADS"] = n
    env["OMP_NUM_THREADS"] = n
    if _use_openblas():
        env["LD_PRELOAD"] = OPENBLAS
    return env


def launch(world: int, argv: list[str], timeout: float, threads: int | None = None, pin: bool = False) -> str:
    """Run `python argv...` on `world` local ranks (MLX's ring launcher; world 1 is a
    plain process) and return stdout; raise BenchError with the output if it fails.
    `pin`: each rank on its own cores; with --nice, at that priority (scripts/rank_setup.py)."""
    launcher = "from mlx._distributed_utils.launch import main; main()"
    WAITS.append(wait_quiet(QUIET_WAIT_S))
    if pin or NICE:
        argv = [str(SCRIPTS / "rank_setup.py"), str(world), str(int(pin)), str(NICE), *argv]
    cmd = [sys.executable, *argv]
    if world > 1:
        cmd = [sys.executable, "-c", launcher, "-n", str(world), "--backend", "ring",
               "--starting-port", str(free_port_base(world)), "--", sys.executable, *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=rank_env(world, threads), cwd=REPO)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"world {world}: timed out after {timeout:.0f} s: {' '.join(argv[:3])} ...\n"
                         f"{(e.stderr or b'')[-2000:]!r}") from None
    # mlx.launch exits 0 even when a rank failed: look at the output too
    if proc.returncode != 0 or "Traceback" in proc.stderr:
        raise BenchError(f"world {world} failed (exit {proc.returncode}): {' '.join(argv[:3])} ...\n"
                         f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise BenchError(f"no JSON object in the output:\n{stdout[-2000:]}")


def run_ours(model_dir: Path, world: int, prompt: str, max_tokens: int, timeout: float,
             extra: list[str] = (), threads: int | None = None, pin: bool = False) -> dict:
    """One `mlx-kvshard generate --json` run on `world` ranks; rank 0's report."""
    argv = [str(SCRIPTS / "generate_entry.py"), "--model", str(model_dir), "--prompt", prompt,
            "--max-tokens", str(max_tokens), "--no-chat-template", "--dtype", "float32", "--json", *extra]
    return last_json(launch(world, argv, timeout, threads, pin))


def run_mlxlm(model_dir: Path, world: int, prompt: str, max_tokens: int, timeout: float,
              shard: bool, out_dir: Path, pin: bool = False, extra: list[str] = ()) -> dict:
    """mlx-lm's own generation (world 1) or its Model.shard() tensor parallelism; `extra`:
    more mlxlm_rank.py options (--kv-bits B)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in out_dir.glob("rank*.json"):
        f.unlink()
    argv = [str(SCRIPTS / "mlxlm_rank.py"), "--model", str(model_dir), "--prompt", prompt,
            "--max-tokens", str(max_tokens), "--out", str(out_dir)] + (["--shard"] if shard and "--pipeline" not in extra
                                                                      else []) + list(extra)
    launch(world, argv, timeout, pin=pin)
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    report = dict(ranks[0])
    report["ranks"] = [{"rank": r["rank"], "peak_memory_bytes": r["peak_memory_bytes"],
                        "weight_bytes": r["weight_bytes"], "kv_bytes": r["kv_bytes"]} for r in ranks]
    return report


def median_run(runs: list[dict]) -> dict:
    """The run with the median decode speed (a real run, so its numbers belong together)."""
    runs = sorted(runs, key=lambda r: r["timings"]["decode_tok_s"] or 0)
    return runs[len(runs) // 2]


def summary(runs: list[dict], key: str) -> dict:
    vals = [r["timings"][key] for r in runs if r["timings"].get(key) is not None]
    if not vals:
        return {}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def add_common_args(p, *, preset: str, worlds: str, max_tokens: int, runs: int | None = 3,
                    prompt_tokens: int | None = 64) -> None:
    """The options every benchmark script takes."""
    p.add_argument("--preset", default=preset, choices=sorted(PRESETS))
    p.add_argument("--worlds", default=worlds, help="comma-separated world sizes")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens generated per run")
    if runs is not None:
        p.add_argument("--runs", type=int, default=runs, help="runs per measured point (median reported)")
    if prompt_tokens is not None:
        p.add_argument("--prompt-tokens", type=int, default=prompt_tokens)
    p.add_argument("--timeout", type=float, default=300, help="seconds per run")
    p.add_argument("--pin", action="store_true", help="pin each rank to its own cores (scripts/rank_setup.py)")
    p.add_argument("--nice", type=int, default=0,
                   help="priority increment for every rank of every system, e.g. -10 (root) to keep other "
                        "work on a shared machine from preempting ranks mid-step")
    p.add_argument("--out", default=str(REPO / "docs" / "bench"), help="folder for the JSON results")
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"), help="markdown to update ('' = none)")
    p.add_argument("--machine-tag", default=machine_tag(), help="tag for file and section names")
    p.add_argument("--quiet-wait", type=float, default=20,
                   help="before each run, wait up to this many seconds for no other process to be running "
                        "(a shared machine); 0 = don't wait")


def apply_common_args(a) -> list[int]:
    """Apply the common options; return the world sizes."""
    global QUIET_WAIT_S, NICE
    QUIET_WAIT_S, NICE = a.quiet_wait, a.nice
    if a.machine_tag == machine_tag():  # other settings, another table: don't overwrite the plain one
        a.machine_tag += ("-pinned" if a.pin else "") + (f"-nice{a.nice}" if a.nice else "")
    return [int(w) for w in a.worlds.split(",")]


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def publish(a, kind: str, report: dict, text: str, t0: float) -> Path:
    """Write docs/bench/<kind>-<machine>.json, print the table, update the doc's section."""
    report["wall_s"] = time.time() - t0
    report["nice"] = NICE
    report["quiet_wait"] = {"max_s": QUIET_WAIT_S, "launches": len(WAITS), "waited_s": round(sum(WAITS), 1),
                            "gave_up": sum(w >= QUIET_WAIT_S > 0 for w in WAITS)}
    path = Path(a.out) / f"{kind}-{a.machine_tag}.json"
    write_json(path, report)
    print(text)
    print(f"wrote {path} ({report['wall_s']:.0f} s)")
    if a.doc:
        replace_section(Path(a.doc), f"{kind}-{a.machine_tag}", text)
    return path


def replace_section(doc: Path, marker: str, body: str) -> None:
    """Replace the text between `<!-- marker:begin -->` and `<!-- marker:end -->` in `doc`
    (appending the section if it is missing), so reruns update the tables in place."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def fmt(v, spec: str = ".1f", none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def mib(n) -> str:
    if n is None:
        return "n/a"
    m = n / 2**20
    return f"{m:.0f} MiB" if m >= 10 else f"{m:.2f} MiB"


def markdown_table(header: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A markdown table: `align` has one letter per column, "l" or "r"."""
    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    return [line(header), "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"] + [line(r) for r in rows]
