"""The arena planner: every intermediate (and each step's kernel workspace) placed in one static buffer by
greedy best fit over lifetimes (TFLM GreedyMemoryPlanner style), random orders tried when it misses the bound."""
from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)
from qcompile.targets.tvm.executors.static_c.program import (
    ALIGN,
    ArenaPlan,
    StaticProgram,
    align_up,
)


# ----------------------------------------------------------------------------------- arena plan
def workspace_buffer(step: int) -> str:
    return f"__ws{step}"


def plan_with_workspace(program: StaticProgram, per_kernel: dict[str, int]) -> ArenaPlan:
    """Arena plan where each kernel's workspace is one more buffer, live during its step only."""
    sizes = {b.name: b.nbytes for b in program.buffers.values() if b.kind == "arena"}
    spans = lifetimes(program)
    for i, step in enumerate(program.steps):
        if step.kind == "kernel" and per_kernel.get(step.symbol, 0) > 0:
            sizes[workspace_buffer(i)] = per_kernel[step.symbol]
            spans[workspace_buffer(i)] = (i, i)
    return plan_arena(sizes, spans)


def lifetimes(program: StaticProgram) -> dict[str, tuple[int, int]]:
    """First (producing) and last (reading) step index of every arena buffer."""
    spans: dict[str, list[int]] = {}
    for i, step in enumerate(program.steps):
        for name in step.args:
            buf = program.views[name].buffer
            if program.buffers[buf].kind == "arena":
                spans.setdefault(buf, []).append(i)
    return {b: (min(s), max(s)) for b, s in spans.items()}


RANDOM_ORDERS = 400  # extra seeded random orders tried when the greedy orders miss the liveness bound


def _place(order: list[str], sizes: dict[str, int], spans: dict[str, tuple[int, int]], align: int) -> dict[str, int]:
    """Best-fit placement in `order`: each buffer takes the smallest gap among lifetime-overlapping placed ones."""
    offsets: dict[str, int] = {}
    for buf in order:
        need = align_up(sizes[buf], align)
        lo, hi = spans[buf]
        live = sorted(
            (offsets[o], align_up(sizes[o], align)) for o in offsets if spans[o][0] <= hi and lo <= spans[o][1]
        )
        best, cur = None, 0
        for off, size in live:
            gap = off - cur
            if gap >= need and (best is None or gap < best[1]):
                best = (cur, gap)
            cur = max(cur, off + size)
        offsets[buf] = best[0] if best is not None else cur
    return offsets


def plan_arena(sizes: dict[str, int], spans: dict[str, tuple[int, int]], align: int = ALIGN) -> ArenaPlan:
    """Greedy best-fit (TFLM's GreedyMemoryPlanner) under a few orders: by size (TFLM's), by size x lifetime, by
    first use, by lifetime length, then seeded random orders while above the liveness bound; the smallest arena
    wins (ties: the first found). Deterministic."""
    def dur(b: str) -> int:
        return spans[b][1] - spans[b][0] + 1
    keys = [lambda b: (-align_up(sizes[b], align), spans[b][0], b),
            lambda b: (-align_up(sizes[b], align) * dur(b), spans[b][0], b),
            lambda b: (spans[b][0], -sizes[b], b),
            lambda b: (-dur(b), -sizes[b], b)]
    best: dict[str, int] | None = None
    arena = 0
    for key in keys:
        offsets = _place(sorted(sizes, key=key), sizes, spans, align)
        total = max((offsets[b] + align_up(sizes[b], align) for b in offsets), default=0)
        if best is None or total < arena:
            best, arena = offsets, total
    steps = max((hi for _, hi in spans.values()), default=-1) + 1
    bound = max(
        (sum(align_up(sizes[b], align) for b, (lo, hi) in spans.items() if lo <= s <= hi) for s in range(steps)),
        default=0,
    )
    rng = np.random.default_rng(0)  # seeded: the same model always gets the same plan
    names = sorted(sizes)
    for _ in range(RANDOM_ORDERS if arena > bound and len(names) <= 512 else 0):
        offsets = _place([names[i] for i in rng.permutation(len(names))], sizes, spans, align)
        total = max((offsets[b] + align_up(sizes[b], align) for b in offsets), default=0)
        if total < arena:
            best, arena = offsets, total
            if arena == bound:
                break
    return ArenaPlan(best or {}, arena, bound, align)
