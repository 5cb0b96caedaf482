"""What admission reserves for the running rows' KV layout (kv/layout.py), and which
layout a rank runs. Pure Python: rank 0's scheduler imports it without MLX."""

from __future__ import annotations

GROUP_SLACK = 0.10  # groups: a row's left padding stays within this share of its own tokens...
PAD_FLOOR = 32  # ...or this many tokens, if more


def pad_allowance(tokens: int) -> int:
    """The left padding a row of `tokens` may get in its length group. The floor keeps short
    rows from each opening a group: on the tiny preset's serve mix (16-144-token rows, 8
    clients) the 10% rule alone made up to 7 groups and served 0.93x the padded batch's
    tokens/s, a 32-token floor 4 groups and 0.99x (medians of 3 interleaved runs; docs/engine.md)."""
    return max(int(GROUP_SLACK * tokens), PAD_FLOOR)


LAYOUTS = ("auto", "groups", "padded")


def resolve_layout(asked: str, pipeline: bool, sequence_sharded: bool) -> str:
    """`auto` is groups except where the batch's layout is another room's (pipeline
    micro-batches slice one padded batch; sequence-sharded rows are engine/seqkv.py's);
    asking for groups there is refused."""
    from ..errors import UserError

    if asked not in LAYOUTS:
        raise UserError(f"--kv-layout {asked}: choose one of {', '.join(LAYOUTS)}")
    other = "--pp" if pipeline else "sequence-sharded KV" if sequence_sharded else None
    if asked == "groups" and other:
        raise UserError(f"not implemented: --kv-layout groups with {other} (that batch keeps one padded layout); "
                        f"leave --kv-layout at auto")
    return "padded" if asked == "padded" or other else "groups"


def admission_tokens(layout: str, reserves: list[int]) -> int:
    """KV tokens per rank that sequences reserving `reserves` (prompt + max_tokens each) can
    come to hold. Padded: every row as long as the longest. Groups: each row its own tokens
    plus the left padding its group may give it (`pad_allowance`; a row alone has none).
    Neither counts the columns a cache allocates ahead (256 at a time padded, 1/8 of a
    group's columns in groups): that is the headroom of --kv-memory-fraction."""
    if not reserves:
        return 0
    if layout == "padded":
        return len(reserves) * max(reserves)
    if len(reserves) == 1:
        return reserves[0]
    return sum(r + pad_allowance(r) for r in reserves)
