"""Fuzz `mlx-kvshard serve` with schemathesis, the property-based fuzzer for OpenAPI
services, driven by the server's own /openapi.json (issue 23): every generated request,
valid or not, must get no 5xx (not_a_server_error), a schema-valid one must be accepted
(positive_data_acceptance), one the schema forbids must be a 4xx (negative_data_rejection).
Afterwards the server must still be healthy, its ranks in sync (it runs with --check-sync:
every rank's rows and KV are compared after each join and removal, and a difference stops
the engine) and a reference greedy request must give the same text as before.

    python scripts/fuzz_serve.py --minutes 30            # before a release
    python scripts/fuzz_serve.py --minutes 10 --seed 7 --doc docs/fuzz.md

It starts `serve --simulate 2 --model tiny` itself (or fuzzes --url), writes schemathesis'
JSON report beside the findings, and appends a dated section to --doc. tests/test_fuzz.py
runs `fuzz()` bounded by a fixed seed and a few examples per operation."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
HOOKS = "fuzz_hooks"  # tests/fuzz_hooks.py
CHECKS = "not_a_server_error,positive_data_acceptance,negative_data_rejection"
REFERENCE = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
# the fuzz server: its context holds any body it accepts (tiny's byte-level BPE: at most a
# token per byte), and generation is bounded by the hooks' max_tokens
MAX_BODY_BYTES = 2048
SERVE_FLAGS = ["--max-context", "4096", "--max-body-bytes", str(MAX_BODY_BYTES), "--peer-timeout", "10",
               "--check-sync", "--max-tokens", "4"]


@dataclass
class Outcome:
    seed: int
    seconds: float
    cases: int
    failures: list[dict] = field(default_factory=list)  # {code, title, count, operations, detail}
    healthy: bool = False
    reference_same: bool = False
    schemathesis_rc: int | None = None
    report: str = ""

    @property
    def ok(self) -> bool:
        return not self.failures and self.healthy and self.reference_same and self.schemathesis_rc == 0


def reference(url: str) -> str:
    r = httpx.post(url + "/v1/completions", json=REFERENCE, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def fuzz(url: str, seed: int, report_dir: Path, max_examples: int | None = None, max_time: int | None = None,
         phases: str | None = None) -> Outcome:
    """One schemathesis run against `url` (a server already up), then the after-checks."""
    report_dir.mkdir(parents=True, exist_ok=True)
    before = reference(url)
    report = report_dir / "schemathesis.json"
    argv = [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json", "--checks", CHECKS,
            "--seed", str(seed), "--workers", "1", "--no-color", "--request-timeout", "120",
            "--suppress-health-check", "all", "--generation-database", "none",
            "--report", "json", "--report-json-path", str(report), "--continue-on-failure",
            "--output-sanitize", "false"]
    if max_examples:
        argv += ["--max-examples", str(max_examples)]
    if max_time:
        argv += ["--max-time", str(max_time)]
    if phases:
        argv += ["--phases", phases]
    run_env = {**os.environ, "SCHEMATHESIS_HOOKS": HOOKS,
               "FUZZ_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
               "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    # its own cache (.schemathesis/) goes beside the report, not into the repository
    proc = subprocess.run(argv, capture_output=True, text=True, env=run_env, cwd=report_dir)
    (report_dir / "schemathesis.out").write_text(proc.stdout + proc.stderr)
    out = Outcome(seed, time.monotonic() - t0, 0, schemathesis_rc=proc.returncode, report=str(report))
    out.cases, out.failures = read_report(report, proc.stdout)
    health = httpx.get(url + "/health", timeout=60)
    out.healthy = health.status_code == 200
    out.reference_same = out.healthy and reference(url) == before
    return out


def read_report(path: Path, stdout: str) -> tuple[int, list[dict]]:
    """(test cases generated, failures) from schemathesis' JSON run report; each failure
    with the first response and reproduction schemathesis printed for its kind."""
    if not path.exists():
        return 0, [{"code": "-", "title": "schemathesis did not run", "detail": stdout[-2000:]}]
    data = json.loads(path.read_text())
    failures = []
    for f in data.get("failures", []):
        at = stdout.find(f"- {f.get('code')} ")
        failures.append({"code": f.get("code"), "title": f.get("title"), "count": f.get("count"),
                         "operations": f.get("operations"), "detail": stdout[at:at + 1500] if at >= 0 else ""})
    for e in data.get("errors", []) or []:
        failures.append({"code": "error", "title": str(e)[:500]})
    return int(data.get("test_cases", {}).get("generated", 0)), failures


# ---- the script: its own server, a run as long as asked, the findings into docs/ ------------

def start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    err = open(tmp / "serve.err", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlx_kvshard", "serve", "--simulate", "2", "--model", "tiny",
                             "--port", "0", *SERVE_FLAGS], stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited {proc.returncode}: {(tmp / 'serve.err').read_text()[-2000:]}")
        m = re.search(r"HTTP on (http://127\.0\.0\.1:\d+)", (tmp / "serve.err").read_text(errors="replace"))
        if m:
            try:
                if httpx.get(m.group(1) + "/health", timeout=5).status_code == 200:
                    return proc, m.group(1)
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise SystemExit("serve did not become healthy within 600 s")


def write_findings(doc: Path, out: Outcome, minutes: float) -> None:
    load = os.getloadavg()
    lines = [f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: seed {out.seed}, "
             f"{minutes:g} min asked\n",
             f"`serve --simulate 2 --model tiny {' '.join(SERVE_FLAGS)}`; {out.cases} test cases in "
             f"{out.seconds:.0f} s (load average {load[0]:.1f}, {os.cpu_count()} CPUs); schemathesis exit "
             f"{out.schemathesis_rc}; afterwards healthy: {out.healthy}, reference greedy text unchanged: "
             f"{out.reference_same}.\n"]
    if not out.failures:
        lines.append("No failures.\n")
    for f in out.failures:
        lines.append(f"- {f.get('code')} {f.get('title')} ({f.get('count')}x; {', '.join(f.get('operations') or [])})\n")
        if f.get("detail"):  # the response and the reproduction, each line cut short (bodies can be kilobytes)
            detail = "\n".join(line if len(line) <= 300 else line[:300] + " ..."
                               for line in f["detail"].strip().splitlines()[:14])
            lines.append("\n```\n" + detail + "\n```\n")
    if not doc.exists():
        doc.write_text("# Fuzzing the server\n\nFindings of `scripts/fuzz_serve.py` (schemathesis against "
                       "`/openapi.json`; checks: not_a_server_error, positive_data_acceptance, "
                       "negative_data_rejection), newest last.\n")
    with doc.open("a") as fh:
        fh.writelines(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10, help="time budget (schemathesis --max-time)")
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--url", help="fuzz this server instead of starting one (run it with the flags above)")
    p.add_argument("--doc", default=str(REPO / "docs" / "fuzz.md"), help="append the findings here")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-serve-"))
    proc, url = (None, args.url) if args.url else start_server(tmp)
    try:
        out = fuzz(url, args.seed, tmp, max_time=max(1, int(args.minutes * 60)))
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    write_findings(Path(args.doc), out, args.minutes)
    print(json.dumps({**out.__dict__, "ok": out.ok, "logs": str(tmp)}, indent=1, default=str)[:20000])
    return 0 if out.ok else 1


if __name__ == "__main__":
    sys.exit(main())
