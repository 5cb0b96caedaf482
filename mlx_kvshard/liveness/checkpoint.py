"""Generation checkpoints: all a run needs to continue exactly where it stopped.

Rank 0 writes one every K tokens (JSON, written to a temp file and renamed over the
old one, so a crash leaves the previous checkpoint whole): model identity, prompt
token ids, sampling parameters and seed, dtype, context, tokens generated so far (their
count is the sampler step). Sampling is keyed by (seed, step), so `--resume FILE`
re-prefills prompt + generated tokens and produces exactly what the uninterrupted run
would have, on any number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from ..engine.generate import SamplingParams

FORMAT = "mlx-kvshard/generation-checkpoint"
VERSION = 1
DEFAULT_EVERY = 16
# Files that decide what token ids mean; a different one makes the saved ids other text.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
_EDGE = 1 << 16  # bytes hashed at each end of every safetensors file


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", metavar="FILE",
                   help="where rank 0 keeps the generation checkpoint (default: the --resume file, else a new "
                        "file under the cache's checkpoints/ folder, removed when generation completes)")
    p.add_argument("--checkpoint-every", type=int, default=DEFAULT_EVERY, metavar="K",
                   help=f"write the checkpoint every K tokens (0: never; default {DEFAULT_EVERY})")
    p.add_argument("--resume", metavar="FILE",
                   help="continue the generation saved in FILE (its model, prompt, sampling and seed)")


def check_arguments(args) -> None:
    if args.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every {args.checkpoint_every}: must be 0 (never) or a token count")


def model_identity(model_dir: Path) -> dict:
    """Hashes that tell another model, tokenizer or set of weights apart, cheaply: the
    weights by each safetensors file's size, header and first and last 64 KiB."""
    model_dir = Path(model_dir)

    def digest(paths, edges=False) -> str:
        h = hashlib.sha256()
        for p in paths:
            h.update(p.name.encode() + b"\0")
            with open(p, "rb") as f:
                if not edges:
                    h.update(f.read())
                    continue
                size = os.fstat(f.fileno()).st_size
                h.update(str(size).encode())
                h.update(f.read(_EDGE))
                f.seek(max(0, size - _EDGE))
                h.update(f.read(_EDGE))
        return h.hexdigest()

    return {
        "path": str(model_dir),
        "config_sha256": digest([model_dir / "config.json"]),
        "tokenizer_sha256": digest([model_dir / n for n in TOKENIZER_FILES if (model_dir / n).exists()]),
        "weights_sha256": digest(sorted(model_dir.glob("*.safetensors")), edges=True),
    }


@dataclass
class GenCheckpoint:
    model: dict  # model_identity()
    prompt: list[int]
    tokens: list[int]  # generated so far; len(tokens) is the next sampler step
    sampling: dict  # SamplingParams fields
    max_context: int
    dtype: str
    world: int  # of the run that wrote it (informational: resume on any world)
    finish_reason: str | None = None
    written_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def params(self) -> SamplingParams:
        return SamplingParams(**{**self.sampling, "stop": tuple(self.sampling.get("stop", ()))})

    def to_json(self) -> str:
        body = {"format": FORMAT, "version": VERSION, **asdict(self), "step": len(self.tokens)}
        return json.dumps({**body, "sha256": _checksum(body)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, where: str) -> "GenCheckpoint":
        def corrupt(why: str) -> UserError:
            return UserError(f"{where}: corrupt generation checkpoint ({why}); it cannot be resumed")

        try:
            body = json.loads(text)
        except ValueError as e:
            raise corrupt(f"not valid JSON: {e}") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise UserError(f"{where}: not an mlx-kvshard generation checkpoint")
        if body.get("version") != VERSION:
            raise UserError(f"{where}: checkpoint format version {body.get('version')}; "
                            f"this mlx-kvshard reads version {VERSION}")
        if body.pop("sha256", None) != _checksum(body):
            raise corrupt("its checksum does not match its contents")
        try:
            fields = {k: body[k] for k in cls.__dataclass_fields__ if k in body}
            ck = cls(**fields)
            ck.params().validate()
            ok = (body["step"] == len(ck.tokens) and all(isinstance(t, int) for t in ck.prompt + ck.tokens)
                  and ck.prompt and isinstance(ck.max_context, int))
        except (KeyError, TypeError, UserError) as e:
            raise corrupt(f"{type(e).__name__}: {e}") from None
        if not ok:
            raise corrupt("inconsistent fields")
        return ck


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read(path: str | Path) -> GenCheckpoint:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"--resume {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--resume {path}: cannot read it ({e})") from None
    return GenCheckpoint.from_json(text, str(path))


def write(path: str | Path, ck: GenCheckpoint) -> None:
    """Temp file in the same folder, fsync, rename: readers see the old or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(ck.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_model(ck: GenCheckpoint, model_dir: Path, where: str) -> None:
    """The checkpoint's token ids only mean something with its model and tokenizer."""
    have = model_identity(model_dir)
    want = ck.model
    was = f"(the checkpoint was written with {want.get('path')})"
    if have["tokenizer_sha256"] != want.get("tokenizer_sha256"):
        raise UserError(f"{where}: written with another tokenizer: the tokenizer files in {model_dir} differ "
                        f"{was}; its token ids would decode to other text")
    if have["config_sha256"] != want.get("config_sha256"):
        raise UserError(f"{where}: written for another model: {model_dir}/config.json differs {was}")
    if have["weights_sha256"] != want.get("weights_sha256"):
        raise UserError(f"{where}: written for other weights: the safetensors files in {model_dir} differ {was}")


# What --resume takes from the checkpoint: flag dest -> the checkpoint's value.
def _resumed_settings(ck: GenCheckpoint) -> dict:
    s = ck.sampling
    return {"temp": s["temp"], "top_p": s["top_p"], "top_k": s["top_k"], "min_p": s["min_p"],
            "repetition_penalty": s["repetition_penalty"], "repetition_context_size": s["repetition_context_size"],
            "seed": s["seed"], "stop": list(s.get("stop", [])), "max_context": ck.max_context, "dtype": ck.dtype}


def apply_checkpoint(ck: GenCheckpoint, args, parser) -> SamplingParams:
    """Make `args` describe the checkpointed run: its model (unless --model names one),
    sampling, seed, dtype and context. A flag set to another value is a mistake, except
    --max-tokens, which may extend or shorten the run."""
    default = parser.get_default
    for dest, value in _resumed_settings(ck).items():
        given = getattr(args, dest)
        if given != default(dest) and given != value and not (dest == "dtype" and given == "auto"):
            flag = "--" + dest.replace("_", "-")
            raise UserError(f"{flag} {given}: --resume continues a run that used {flag} {value}; "
                            f"drop {flag} to reproduce it")
        setattr(args, dest, value)
    if args.model == default("model"):
        args.model = ck.model["path"]
    if args.max_tokens == default("max_tokens"):
        args.max_tokens = ck.sampling["max_tokens"]
    return SamplingParams(**{**ck.sampling, "stop": tuple(ck.sampling.get("stop", ())),
                             "max_tokens": args.max_tokens})


def load_on_ranks(path: str, comm) -> GenCheckpoint:
    """Rank 0 reads the file (it lives on rank 0's host) and shares it: every rank agrees
    on a bad file before any can diverge (DESIGN invariant 1)."""
    import mlx.core as mx
    import numpy as np

    from ..engine.dist import agree, gather_json

    text, error = "", None
    if comm.rank == 0:
        try:
            text = read(path).to_json()
        except UserError as e:
            error = str(e)
    agree(comm, error)
    if comm.world > 1:
        n = gather_json(comm, len(text.encode()))[0]
        mine = np.frombuffer(text.encode(), dtype=np.uint8) if comm.rank == 0 else np.zeros(n, dtype=np.uint8)
        text = bytes(np.array(comm.all_sum(mx.array(mine)))).decode()  # zeros elsewhere: a broadcast
    return GenCheckpoint.from_json(text, path)


class Writer:
    """Rank 0's checkpoints during one generation; every other rank holds a no-op one."""

    def __init__(self, path: Path | None, every: int, base: GenCheckpoint | None, remove_at_end: bool,
                 on_write=None):
        self.path, self.every, self.base, self.remove_at_end = path, every, base, remove_at_end
        self.on_write = on_write
        self.written = False

    @classmethod
    def for_rank(cls, args, rank: int, model_dir: Path, prompt: list[int], params: SamplingParams,
                 max_context: int, dtype: str, world: int, on_write=None) -> "Writer":
        if rank != 0 or args.checkpoint_every == 0:
            return cls(None, 0, None, False)
        from ..models.tiny import cache_root

        path = args.checkpoint or args.resume
        remove = path is None
        if path is None:
            path = cache_root() / "checkpoints" / f"gen-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
        sampling = {**asdict(params), "stop": list(params.stop)}
        base = GenCheckpoint(model_identity(model_dir), list(prompt), [], sampling, max_context, dtype, world)
        return cls(Path(path).absolute(), args.checkpoint_every, base, remove, on_write)

    def step(self, tokens: list[int]) -> None:
        if self.every and len(tokens) % self.every == 0:
            self._write(tokens, None)

    def finish(self, tokens: list[int], finish_reason: str) -> None:
        if self.path is None or not self.every:
            return
        if self.remove_at_end:  # nobody asked for this file: no litter after a complete run
            if self.written:
                self.path.unlink(missing_ok=True)
        else:
            self._write(tokens, finish_reason)

    def _write(self, tokens: list[int], finish_reason: str | None) -> None:
        ck = GenCheckpoint(**{**asdict(self.base), "tokens": list(tokens), "finish_reason": finish_reason,
                              "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        try:
            write(self.path, ck)
        except OSError as e:  # a checkpoint is insurance: losing it must not stop the generation
            print(f"mlx-kvshard: warning: cannot write checkpoint {self.path} ({e}); "
                  f"continuing without checkpoints", file=sys.stderr, flush=True)
            self.every = 0
            return
        self.written = True
        if self.on_write:
            self.on_write(str(self.path), len(tokens))
