"""Generation checkpoints: all a run needs to continue exactly where it stopped.

One file, append-only: a header line written once (model identity, prompt token ids,
sampling parameters and seed, dtype, context; with its checksum), then one line per
write holding the tokens generated since the last one, the running count (the sampler
step) and a checksum. Rank 0 appends a few bytes every K tokens instead of rewriting
the prompt. A crash mid-append leaves a last line without its newline: the reader drops
it and resumes from the last whole line. Sampling is keyed by (seed, step), so
`--resume FILE` re-prefills prompt + generated tokens and produces exactly what the
uninterrupted run would have, on any number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import UserError
from ..engine.generate import SamplingParams
from ..settings import CheckpointSettings, RankSettings

FORMAT = "mlx-kvshard/generation-checkpoint"
VERSION = 2  # 1: one JSON document rewritten whole; 2: header line + appended token lines
# Files that decide what token ids mean; a different one makes the saved ids other text.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
_EDGE = 1 << 16  # bytes hashed at each end of every safetensors file
_HEADER_FIELDS = ("model", "prompt", "sampling", "max_context", "dtype", "world", "written_at")


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

    def header_line(self) -> str:
        body = {"format": FORMAT, "version": VERSION, **{k: getattr(self, k) for k in _HEADER_FIELDS}}
        return _dumps({**body, "sha256": _checksum(body)}) + "\n"

    def to_text(self) -> str:
        """The whole file: the header and one line with every token so far."""
        header = self.header_line()
        return header + token_line(header, len(self.tokens), self.tokens, self.finish_reason)

    @classmethod
    def from_text(cls, text: str, where: str) -> "GenCheckpoint":
        def corrupt(why: str) -> UserError:
            return UserError(f"{where}: corrupt generation checkpoint ({why}); it cannot be resumed")

        header, _, rest = text.partition("\n")
        ck = cls._from_header(header, where, corrupt)
        lines = rest.split("\n")
        # A last line without its newline is an append cut short by a crash: the state
        # before it is whole, so it is dropped. A whole line that does not check out is damage.
        for line in lines[:-1]:
            try:
                rec = json.loads(line)
                ok = (rec.pop("h") == _record_hash(header, rec) and rec["n"] == len(ck.tokens) + len(rec["t"])
                      and all(isinstance(t, int) for t in rec["t"]))
            except (ValueError, KeyError, TypeError, AttributeError):
                ok = False
            if not ok:
                raise corrupt(f"token line {len(ck.tokens)}: its checksum does not match its contents")
            ck.tokens += rec["t"]
            ck.finish_reason = rec.get("finish")
        return ck

    @classmethod
    def _from_header(cls, header: str, where: str, corrupt) -> "GenCheckpoint":
        try:
            body = json.loads(header)
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
            ck = cls(**{k: body[k] for k in _HEADER_FIELDS}, tokens=[])
            ck.params().validate()
            ok = all(isinstance(t, int) for t in ck.prompt) and ck.prompt and isinstance(ck.max_context, int)
        except (KeyError, TypeError, UserError) as e:
            raise corrupt(f"{type(e).__name__}: {e}") from None
        if not ok:
            raise corrupt("inconsistent fields")
        return ck


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _record_hash(header: str, rec: dict) -> str:
    """Ties a token line to its file's header and its own contents."""
    return hashlib.sha256((header.strip() + "\n" + _dumps(rec)).encode()).hexdigest()[:16]


def token_line(header: str, n: int, new_tokens: list[int], finish_reason: str | None = None) -> str:
    """One appended line: the tokens since the last line, the running count `n`, a checksum."""
    rec = {"n": n, "t": list(new_tokens)}
    if finish_reason is not None:
        rec["finish"] = finish_reason
    return _dumps({**rec, "h": _record_hash(header, rec)}) + "\n"


def read(path: str | Path) -> GenCheckpoint:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"--resume {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--resume {path}: cannot read it ({e})") from None
    return GenCheckpoint.from_text(text, str(path))


def write(path: str | Path, ck: GenCheckpoint) -> None:
    """The whole file, atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(ck.to_text())
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


# What --resume takes from the checkpoint: settings name -> the checkpoint's value.
def resumed_values(ck: GenCheckpoint) -> dict:
    s = ck.sampling
    return {"temp": s["temp"], "top_p": s["top_p"], "top_k": s["top_k"], "min_p": s["min_p"],
            "repetition_penalty": s["repetition_penalty"], "repetition_context_size": s["repetition_context_size"],
            "seed": s["seed"], "stop": list(s.get("stop", [])), "max_context": ck.max_context, "dtype": ck.dtype}


def resumed(ck: GenCheckpoint, settings: RankSettings, params: SamplingParams, model_source: str | None = None,
            max_tokens: int | None = None) -> tuple[RankSettings, SamplingParams]:
    """Settings and sampling of the checkpointed run: its model (or `model_source`), sampling,
    seed, dtype and context; `max_tokens` may extend or shorten it."""
    model = replace(settings.model, source=model_source or ck.model["path"], dtype=ck.dtype,
                    max_context=ck.max_context)
    params = SamplingParams(**{**ck.sampling, "stop": tuple(ck.sampling.get("stop", ())),
                               "max_tokens": max_tokens or ck.sampling["max_tokens"]})
    return replace(settings, model=model), params


def load_on_ranks(path: str, comm) -> GenCheckpoint:
    """Rank 0 reads the file (it lives on rank 0's host) and shares it: every rank agrees
    on a bad file before any can diverge (DESIGN invariant 1)."""
    import mlx.core as mx
    import numpy as np

    from ..engine.dist import agree, gather_json

    text, error = "", None
    if comm.rank == 0:
        try:
            text = read(path).to_text()
        except UserError as e:
            error = str(e)
    agree(comm, error)
    if comm.world > 1:
        n = gather_json(comm, len(text.encode()))[0]
        mine = np.frombuffer(text.encode(), dtype=np.uint8) if comm.rank == 0 else np.zeros(n, dtype=np.uint8)
        text = bytes(np.array(comm.all_sum(mx.array(mine)))).decode()  # zeros elsewhere: a broadcast
    return GenCheckpoint.from_text(text, path)


class Writer:
    """Rank 0's checkpoint during one generation; every other rank holds a no-op one.
    The first write puts the whole file in place atomically; later ones append a line."""

    def __init__(self, path: Path | None, every: int, base: GenCheckpoint | None, remove_at_end: bool,
                 on_write=None):
        self.path, self.every, self.base, self.remove_at_end = path, every, base, remove_at_end
        self.on_write = on_write
        self.written = False
        self._saved = 0  # tokens in the file
        self._header = ""

    @classmethod
    def for_rank(cls, settings: CheckpointSettings, rank: int, model_dir: Path, prompt: list[int],
                 params: SamplingParams, max_context: int, dtype: str, world: int, on_write=None) -> "Writer":
        if rank != 0 or settings.every == 0:
            return cls(None, 0, None, False)
        from ..models.tiny import cache_root

        path = settings.path or settings.resume
        remove = path is None
        if path is None:
            path = cache_root() / "checkpoints" / f"gen-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
        sampling = {**asdict(params), "stop": list(params.stop)}
        base = GenCheckpoint(model_identity(model_dir), list(prompt), [], sampling, max_context, dtype, world)
        return cls(Path(path).absolute(), settings.every, base, remove, on_write)

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
        try:
            if not self.written:
                ck = replace(self.base, tokens=list(tokens), finish_reason=finish_reason,
                             written_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                write(self.path, ck)
                self._header = ck.header_line()
            else:
                # A few bytes in one write, no fsync: a killed process loses nothing written;
                # a power cut at worst loses the last lines, and the reader drops a torn one.
                with open(self.path, "a") as f:
                    f.write(token_line(self._header, len(tokens), tokens[self._saved:], finish_reason))
        except OSError as e:  # a checkpoint is insurance: losing it must not stop the generation
            print(f"mlx-kvshard: warning: cannot write checkpoint {self.path} ({e}); "
                  f"continuing without checkpoints", file=sys.stderr, flush=True)
            self.every = 0
            return
        self.written = True
        self._saved = len(tokens)
        if self.on_write:
            self.on_write(str(self.path), len(tokens))
