"""Completion text as OpenAI returns it (issue 16 part 4): the decoded completion tokens,
leading space kept (prompt + text reads right), a multi-byte character split across tokens
never cut in a delta, deltas joining to exactly the whole text (a stop string across tokens
included); chat content has its first space trimmed as before. On `tiny`'s byte-level BPE tokenizer; the server's side is in
test_request_safety.py (same decoder, through HTTP)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from liveness_procs import REPO, env_for
from mlx_kvshard.engine.generate import StopChecker
from mlx_kvshard.models.tiny import tiny_model_dir

MULTI_BYTE = " café 日本語 🙂 naïve"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(tiny_model_dir())


def deltas(tok, text: str, context: str = "Hello", chat: bool = False) -> tuple[list[str], str]:
    stopper = StopChecker(tok, (), tok.encode(context), trim_first_space=chat)
    out = [stopper.add(t)[0] for t in tok.encode(text)]
    return out, stopper.flush()


def test_multi_byte_characters_split_across_tokens_arrive_whole(tok):
    ids = tok.encode(MULTI_BYTE)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some character really is split across tokens
    parts, tail = deltas(tok, MULTI_BYTE)
    assert "".join(parts) + tail == MULTI_BYTE
    assert not any("\ufffd" in p for p in parts) and tail == ""
    assert "" in parts  # held back while a character was incomplete


def test_leading_space_kept_for_a_completion_trimmed_for_chat(tok):
    parts, tail = deltas(tok, " Paris.", "The capital of France is")
    assert parts[0] == " Paris" and "".join(parts) + tail == " Paris."
    parts, tail = deltas(tok, " Paris.", "The capital of France is", chat=True)
    assert "".join(parts) + tail == "Paris."


def test_incomplete_character_at_the_end_is_flushed(tok):
    ids = tok.encode("é")
    assert len(ids) > 1
    stopper = StopChecker(tok, (), tok.encode("Hello"))
    assert stopper.add(ids[0])[0] == ""
    assert stopper.flush() == tok.decode(ids[:1])  # the lone lead byte, as U+FFFD


def test_a_stop_string_across_tokens_is_never_shown(tok):
    """Text that may begin a stop string waits for the next token: the deltas join to the
    text cut before the stop string (nothing shown has to be taken back)."""
    ids = tok.encode(" The capital of France")
    for stop, want in (("ital of", " The cap"), ("Franc!", " The capital of France"), ("e c", " Th")):
        stopper = StopChecker(tok, (stop,), tok.encode("Hi"))
        shown, done = "", False
        for t in ids:
            piece, done = stopper.add(t)
            shown += piece
            if done:
                break
        shown += stopper.flush()
        assert shown == stopper.text == want, (stop, shown)
        assert done == (stop in " The capital of France")


def test_generate_json_text_is_the_decoded_tokens(tok):
    proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "generate", "--model", "tiny", "--prompt", "alpha beta",
                           "--no-chat-template", "--max-tokens", "8", "--temp", "0", "--json"],
                          capture_output=True, text=True, timeout=600, env=env_for("completion-text"), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["text"] == tok.decode(out["tokens"]) and out["text"].startswith(" "), out["text"]
