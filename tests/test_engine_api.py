"""The Engine API in-process at world 1 (the multi-rank paths are in test_engine.py):
streaming from a thread and from asyncio, cancel, refusals before any rank sees a request,
and a chat's next turn reusing the previous turn's prompt and reply from the prefix cache."""

from __future__ import annotations

import asyncio
import threading

import pytest

import inprocess
from checkpoints import checkpoint
from mlx_kvshard.engine.generate import SamplingParams
from mlx_kvshard.serving.requests import QueueFull, Request, RequestError
from mlx_kvshard.settings import EngineSettings, ModelSettings, RankSettings

PROMPT = [(7 * i + 3) % 200 + 10 for i in range(40)]


@pytest.fixture(scope="module")
def model(ckpt_root):
    return checkpoint(ckpt_root, "llama_kv8")


def with_engine(model_dir, body, **engine_settings):
    """Run `body(engine)` on a thread while the engine runs on this one; return its result."""
    settings = RankSettings(model=ModelSettings(str(model_dir), "float32", 256, 16))
    return inprocess.with_engine(settings, EngineSettings(**{"prefill_step": 16, **engine_settings}), body)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n)


def test_next_chat_turn_reuses_prompt_and_reply(model):
    def turns(engine):
        first = engine.generate(Request(prompt_ids=PROMPT, params=greedy(8)))
        follow = PROMPT + first.tokens + [11, 12, 13]
        return first, engine.generate(Request(prompt_ids=follow, params=greedy(6)))

    first, second = with_engine(model, turns)
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens == len(PROMPT) + len(first.tokens) - 1  # all but the never-fed last token
    cold = with_engine(model, lambda e: e.generate(Request(prompt_ids=PROMPT + first.tokens + [11, 12, 13],
                                                            params=greedy(6))), prefix_cache_bytes=0)
    assert cold.usage.cached_tokens == 0 and second.tokens == cold.tokens


def test_async_stream_cancel_and_refusals(model):
    async def clients(engine):
        long = engine.submit_async(Request(prompt_ids=PROMPT, params=greedy(200)))
        short = engine.submit_async(Request(prompt_ids=PROMPT[:20], params=greedy(5), logprobs=True, top_logprobs=3))
        got = {"long": [], "short": []}

        async def read(name, handle, cancel_at=None):
            async for ev in handle:
                got[name].append(ev)
                if cancel_at and len(got[name]) == cancel_at:
                    handle.cancel()
        await asyncio.gather(read("long", long, cancel_at=4), read("short", short))
        return got

    def body(engine):
        refusals = []
        for req in (Request(prompt_ids=PROMPT, params=SamplingParams(top_p=2.0)),
                    Request(prompt_ids=[10**6]), Request(prompt="a", messages=[]),
                    Request(prompt_ids=list(range(10, 10 + 300)))):
            with pytest.raises(RequestError) as e:
                engine.submit(req)
            refusals.append(str(e.value))
        return asyncio.run(clients(engine)), refusals

    got, refusals = with_engine(model, body)
    assert refusals[0].startswith("top_p 2.0") and "outside the vocabulary" in refusals[1]
    assert "exactly one of" in refusals[2] and "max context is 256" in refusals[3]
    long, short = got["long"], got["short"]
    assert long[-1].kind == "done" and long[-1].finish_reason == "cancelled"
    assert 4 <= long[-1].usage.completion_tokens < 200
    assert short[-1].finish_reason == "length" and short[-1].usage.completion_tokens == 5
    tokens = [e for e in short if e.kind == "token"]
    assert len(tokens) == 5 and all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in tokens)
    assert all(e.logprob >= e.top_logprobs[-1][1] for e in tokens)  # greedy: the chosen token is the top one


def test_queue_full(model):
    def body(engine):
        engine.submit(Request(prompt_ids=PROMPT, params=greedy(50)))
        with pytest.raises(QueueFull) as e:
            engine.submit(Request(prompt_ids=PROMPT, params=greedy(5)))
        return str(e.value)

    assert "--max-waiting 0" in with_engine(model, body, max_batch=1, max_waiting=0)


@pytest.mark.parametrize("layout", ["padded", "groups"])
def test_row_slots_and_length_groups(model, monkeypatch, layout):
    """Padded: a finished row leaves a hole (no copy of the batch cache); a waiting prompt is
    written into it in place, and the columns every live row leaves unused are cut. Groups:
    the long prompt runs in a group of its own beside the short ones (kv/layout.py). Either
    way each request's tokens equal what it produces alone."""
    from mlx_kvshard.kv import layout as kvlayout

    events = {"placed": 0, "cut": 0, "groups": 0}
    place, cut_left, attend = kvlayout.place, kvlayout.cut_left, kvlayout.LengthGroups.attend

    def counting_place(*a):
        events["placed"] += 1
        place(*a)

    def counting_cut(*a):
        cut = cut_left(*a)
        events["cut"] += cut
        return cut

    def counting_attend(self, *a):
        events["groups"] = max(events["groups"], len(self.parts))
        return attend(self, *a)

    monkeypatch.setattr(kvlayout, "place", counting_place)
    monkeypatch.setattr(kvlayout, "cut_left", counting_cut)
    monkeypatch.setattr(kvlayout.LengthGroups, "attend", counting_attend)
    long = Request(prompt_ids=[(5 * i + 1) % 200 + 10 for i in range(180)], params=greedy(3))
    shorts = [Request(prompt_ids=PROMPT[k:k + 12], params=greedy(30)) for k in range(3)]
    requests = [long, *shorts]  # 3 rows at most: the third short waits for the long one's slot

    def together(engine):
        handles = [engine.submit(r) for r in requests]
        return [h.result().tokens for h in handles]

    got = with_engine(model, together, max_batch=3, prefix_cache_bytes=0, kv_layout=layout)
    if layout == "padded":
        assert events["placed"] >= 1 and events["cut"] >= kvlayout.TRIM_COLUMNS, events
    else:
        assert events["groups"] >= 2, events
    alone = with_engine(model, lambda e: [e.generate(r).tokens for r in requests], max_batch=1, prefix_cache_bytes=0)
    assert got == alone


def test_whole_prompts_of_one_step_prefill_together(model, monkeypatch):
    """Prompts that arrive together and fit the step's budget are prefilled as one
    left-padded batch, then extracted row by row: each request's tokens equal alone."""
    from mlx_kvshard.serving import batch

    groups = []
    together = batch.BatchState._prefill_together

    def counting(self, prompts):
        groups.append(len(prompts))
        return together(self, prompts)

    monkeypatch.setattr(batch.BatchState, "_prefill_together", counting)
    requests = [Request(prompt_ids=PROMPT[k:k + n], params=greedy(6)) for k, n in ((0, 10), (3, 20), (7, 5), (1, 16))]

    def at_once(engine):
        with engine._cond:  # the engine takes all four from one drain of its inbox
            handles = [engine.submit(r) for r in requests]
        return [h.result().tokens for h in handles]

    got = with_engine(model, at_once, max_batch=4, prefill_step=64, prefix_cache_bytes=0)
    assert groups and max(groups) >= 2, groups
    alone = with_engine(model, lambda e: [e.generate(r).tokens for r in requests], max_batch=1, prefix_cache_bytes=0)
    assert got == alone


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=14),
    SamplingParams(max_tokens=14, temp=0.9, top_k=40, seed=7, repetition_penalty=1.3, stop=("qz",)),
], ids=["greedy", "sampled-penalized"])
def test_a_resumed_request_continues_exactly(model, params):
    """Request.resume (a request migrated after its group was lost) continues at token
    index len(resume) with the same key and the same processor history: the tokens, the
    text after them and the usage equal one undisturbed request's."""
    def both(engine):
        events = list(engine.submit(Request(prompt_ids=PROMPT, params=params)))
        cut = 5
        rest = engine.generate(Request(prompt_ids=PROMPT, params=params, resume=tuple(
            ev.token for ev in events[:cut])))
        return events, cut, rest

    events, cut, rest = with_engine(model, both, prefix_cache_bytes=0)
    tokens = [ev.token for ev in events if ev.kind == "token"]
    assert len(tokens) > cut and events[-1].kind == "done"
    assert tokens[:cut] + rest.tokens == tokens
    # the text continues where the client's copy stopped (what the first cut token events carried)
    assert "".join(ev.text for ev in events[:cut]) + rest.text == "".join(ev.text for ev in events)
    assert rest.usage.prompt_tokens == len(PROMPT) and rest.usage.completion_tokens == len(tokens)
    assert rest.finish_reason == events[-1].finish_reason


def test_resume_refusals_and_a_resume_that_had_already_stopped(model):
    """Refused without prompt ids or room. A request whose group was lost after its last
    token but before its "done" (it met a stop string) ends at once with the "done" the
    undisturbed run sent: same text tail, reason and usage, no token generated past it."""
    def refusals(engine):
        out = []
        for req in (Request(prompt="hi", resume=(1, 2)), Request(prompt_ids=PROMPT, params=greedy(2), resume=(1, 2))):
            with pytest.raises(RequestError) as e:
                engine.submit(req)
            out.append(str(e.value))
        text = engine.generate(Request(prompt_ids=PROMPT, params=greedy(14))).text
        params = SamplingParams(max_tokens=14, stop=(text[len(text) // 2:len(text) // 2 + 2],))
        stopped = list(engine.submit(Request(prompt_ids=PROMPT, params=params)))
        tokens = [ev.token for ev in stopped if ev.kind == "token"]
        again = list(engine.submit(Request(prompt_ids=PROMPT, params=params, resume=tuple(tokens))))
        return out, stopped, again

    (no_ids, no_room), stopped, again = with_engine(model, refusals)
    assert "resume continues a request given by prompt_ids" in no_ids
    assert "resume holds 2 tokens, max_tokens is 2" in no_room
    assert stopped[-1].finish_reason == "stop" and len(stopped) - 1 < 14
    u = stopped[-1].usage
    assert [(e.kind, e.text, e.finish_reason, e.usage.prompt_tokens, e.usage.completion_tokens) for e in again] == [
        ("done", stopped[-1].text, "stop", u.prompt_tokens, u.completion_tokens)]
