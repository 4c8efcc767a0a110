"""Shared prefixes: compute the prompt of N responses once (docs/best_of_n.md).

`plan_batches` turns the sequences of one scoring call into packed groups
(batches), and `Plan.call()` lays them end to end for one core call. Sequences that start with the same tokens (N responses to one
prompt, chosen and rejected, multi-turn conversations with a common history)
become a tree: each shared prefix is one segment computed once, and each
sequence keeps only the tokens after its deepest shared prefix. The core
(`_core.Model.forward(..., parent=...)`) scores every segment as its whole
token list (its parents' tokens, then its own), bit-identical to scoring it
alone, so sharing never changes a result.

How prefixes are found: sort the sequences (a lexicographic order keeps the
sequences that share a prefix next to each other), take the longest common
prefix of neighbours, and build the compressed trie those lengths describe.
A prefix is capped one token short of every sequence through it, so each
sequence keeps at least one token of its own (a sequence that is a prefix of
another, or two identical sequences, still share all but their last token).
A trie node becomes a segment only when it adds at least `min_shared` tokens
to the segment above it; shorter ones are folded into their children.

Packing: segments are laid out depth first, each batch holding at most
`budget` tokens counted once per segment (a prefix is counted once however
many continuations it has). A family (a prefix and what continues it) that
fits a batch is never split; one that does not is split between batches,
each carrying its prefix again.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

#: Shortest shared prefix (in tokens) that automatic detection computes once.
DEFAULT_MIN_SHARED = 16


@dataclass
class CoreBatch:
    """One packed group: its segments, plus where each scored sequence's row is."""

    tokens: np.ndarray                 # (T,) int32: every segment's own tokens
    cu_seqlens: np.ndarray             # (S+1,) int64
    parent: Optional[np.ndarray]       # (S,) int64, -1 = none; None when no segment has a parent
    reward_pos: Optional[np.ndarray]   # (S,) int64 positions in each segment's full sequence, or None
    gating_pos: Optional[np.ndarray]   # (S,) int64, or None
    sequences: np.ndarray              # (n,) int64: the caller's indices of the sequences scored here
    rows: np.ndarray                   # (n,) int64: their output rows (segments) in this batch


@dataclass
class CoreCall:
    """Every batch of a plan as one core call: its packed groups end at `groups` (segment counts)."""

    tokens: np.ndarray
    cu_seqlens: np.ndarray
    parent: Optional[np.ndarray]
    reward_pos: Optional[np.ndarray]
    gating_pos: Optional[np.ndarray]
    groups: np.ndarray   # (G,) int64: the segment count at the end of each group
    rows: np.ndarray     # (n,) int64: sequence i's output row
    scored: np.ndarray   # (S+1,) int64: sequences whose rows are among the first k segments (for progress)


@dataclass
class Plan:
    """The batches of one call and what sharing saved (token counts, deterministic)."""

    batches: List[CoreBatch]
    tokens_in: int        # sum of the sequences' lengths
    tokens_computed: int  # rows the core computes: sum of the batches' token counts
    shared_segments: int  # prefix segments over all batches

    def call(self) -> CoreCall:
        """The batches laid end to end, for one `_core.Model.forward(..., parent=, groups=)`."""
        bs = self.batches
        first = np.cumsum([0] + [b.cu_seqlens.size - 1 for b in bs])  # first segment of each batch
        tok_first = np.cumsum([0] + [b.tokens.size for b in bs])
        n = sum(b.sequences.size for b in bs)
        rows = np.empty(n, dtype=np.int64)
        scored = np.zeros(first[-1] + 1, dtype=np.int64)
        for b, f in zip(bs, first):
            rows[b.sequences] = b.rows + f
            scored[b.rows + f + 1] = 1
        parents = []
        for b, f in zip(bs, first):
            p = np.full(b.cu_seqlens.size - 1, -1, dtype=np.int64) if b.parent is None else b.parent.copy()
            p[p >= 0] += f
            parents.append(p)

        def cat(name: str) -> Optional[np.ndarray]:
            parts = [getattr(b, name) for b in bs]
            return None if parts[0] is None else np.concatenate(parts)

        cu = np.concatenate([[0]] + [b.cu_seqlens[1:] + t for b, t in zip(bs, tok_first)]).astype(np.int64)
        par = np.concatenate(parents)
        return CoreCall(np.concatenate([b.tokens for b in bs]), cu, par if (par >= 0).any() else None,
                        cat("reward_pos"), cat("gating_pos"), first[1:].astype(np.int64), rows, np.cumsum(scored))


@dataclass
class _Node:
    depth: int                        # tokens of the full sequence up to the end of this node
    seq: int = -1                     # leaves: the sequence; internal nodes: -1
    children: List["_Node"] = field(default_factory=list)
    first: int = 0                    # smallest sequence index below (orders siblings)
    source: int = -1                  # a sequence below: the node's tokens are seqs[source][...:depth]


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def _trie(seqs: Sequence[np.ndarray]) -> _Node:
    """The compressed trie of `seqs`, prefixes capped one token short of each sequence."""
    order = sorted(range(len(seqs)), key=lambda i: seqs[i].tobytes())
    root = _Node(0)
    stack = [root]
    prev = -1
    for i in order:
        if prev >= 0:
            lcp = min(_common_prefix(seqs[prev], seqs[i]), seqs[prev].size - 1, seqs[i].size - 1)
            last = None
            while stack[-1].depth > lcp:
                last = stack.pop()
                if stack[-1].depth > lcp:
                    stack[-1].children.append(last)
                    last = None
            if last is not None:
                if stack[-1].depth == lcp:
                    stack[-1].children.append(last)
                else:
                    node = _Node(lcp, children=[last])
                    stack.append(node)
        stack.append(_Node(seqs[i].size, seq=i))
        prev = i
    while len(stack) > 1:
        node = stack.pop()
        stack[-1].children.append(node)
    # members and sibling order, bottom up (iterative: tries can be deep)
    post: List[_Node] = []
    todo = [root]
    while todo:
        node = todo.pop()
        post.append(node)
        todo.extend(node.children)
    for node in reversed(post):
        if node.seq >= 0:
            node.first = node.source = node.seq
        else:
            node.children.sort(key=lambda c: c.first)
            node.first = node.children[0].first
            node.source = node.children[0].source
    return root


@dataclass
class _Segment:
    parent: int       # segment index, -1
    start: int        # first own position in the full sequence
    end: int          # full length
    source: int       # sequence holding the tokens
    seq: int          # the scored sequence (leaves), -1 for a shared prefix
    size: int = 0     # tokens of this segment and every segment below it


def _segments(root: _Node, min_shared: int) -> List[_Segment]:
    """Depth-first segments: trie nodes adding >= min_shared tokens, and every sequence."""
    segs: List[_Segment] = []
    todo = [(c, -1, 0) for c in reversed(root.children)]  # (node, parent segment, start)
    while todo:
        node, par, start = todo.pop()
        if node.seq >= 0:
            segs.append(_Segment(par, start, node.depth, node.source, node.seq))
            continue
        if min_shared > 0 and node.depth - start >= min_shared:
            segs.append(_Segment(par, start, node.depth, node.source, -1))
            par, start = len(segs) - 1, node.depth
        todo.extend((c, par, start) for c in reversed(node.children))
    for s in reversed(segs):  # children come after their parent
        s.size += s.end - s.start
        if s.parent >= 0:
            segs[s.parent].size += s.size
    return segs


def plan_batches(seqs: Sequence[np.ndarray], budget: int, min_shared: int = DEFAULT_MIN_SHARED,
                 reward_pos: Optional[np.ndarray] = None, gating_pos: Optional[np.ndarray] = None) -> Plan:
    """Packs `seqs` (non-empty int32 arrays) into core batches of at most `budget` tokens.

    `min_shared` <= 0 turns sharing off (every sequence is its own segment, in
    the given order). `reward_pos` / `gating_pos` (per sequence, positions in
    the sequence) are carried to the segments that score them; a shared
    prefix gets positions of its first sequence that fall inside it (its own
    row is computed but never returned).
    """
    if min_shared > 0:
        segs = _segments(_trie(seqs), min_shared)
    else:
        segs = [_Segment(-1, 0, s.size, i, i, s.size) for i, s in enumerate(seqs)]
    batches: List[CoreBatch] = []
    cur: List[int] = []          # segments in the batch being filled
    local: Dict[int, int] = {}   # segment -> its index in `cur`
    used = 0

    def flush() -> None:
        nonlocal cur, local, used
        if cur:
            batches.append(_core_batch(seqs, segs, cur, reward_pos, gating_pos))
        cur, local, used = [], {}, 0

    for k, s in enumerate(segs):
        if s.seq < 0:
            continue
        chain = [k]
        while segs[chain[-1]].parent >= 0:
            chain.append(segs[chain[-1]].parent)
        chain.reverse()  # root first
        missing = [c for c in chain if c not in local]
        cost = sum(segs[c].end - segs[c].start for c in missing)
        # what starts here: a new group (all of it, when its top is a shared prefix) or one sequence
        starting = segs[missing[0]].size
        if cur and (used + cost > budget or (starting <= budget < used + starting)):
            flush()  # a group that fits a batch of its own is not split
            missing = chain
            cost = sum(segs[c].end - segs[c].start for c in missing)
        for c in missing:
            local[c] = len(cur)
            cur.append(c)
        used += cost
    flush()
    computed = int(sum(b.tokens.size for b in batches))
    shared = int(sum(b.cu_seqlens.size - 1 - b.rows.size for b in batches))
    return Plan(batches, int(sum(x.size for x in seqs)), computed, shared)


def _core_batch(seqs: Sequence[np.ndarray], segs: List[_Segment], members: List[int],
                reward_pos: Optional[np.ndarray], gating_pos: Optional[np.ndarray]) -> CoreBatch:
    """The core arrays for segments `members` (parents before children)."""
    # a prefix with a single continuation in this batch saves nothing: fold it into that continuation
    n_children = Counter(segs[c].parent for c in members)
    keep = [c for c in members if segs[c].seq >= 0 or n_children[c] >= 2]
    index = {c: j for j, c in enumerate(keep)}

    def kept_parent(c: int) -> int:
        p = segs[c].parent
        while p >= 0 and p not in index:
            p = segs[p].parent
        return p

    parents = [kept_parent(c) for c in keep]
    starts = [segs[p].end if p >= 0 else 0 for p in parents]
    parts = [seqs[segs[c].source][st:segs[c].end] for c, st in zip(keep, starts)]
    cu = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum([p.size for p in parts], out=cu[1:])
    par = np.array([index[p] if p >= 0 else -1 for p in parents], dtype=np.int64)
    scored = [c for c in keep if segs[c].seq >= 0]

    def positions(pos: Optional[np.ndarray], default_last: bool) -> Optional[np.ndarray]:
        if pos is None:
            return None
        out = np.empty(len(keep), dtype=np.int64)
        for j, c in enumerate(keep):
            s = segs[c]
            if s.seq >= 0:
                out[j] = pos[s.seq]
            else:  # a prefix: its first sequence's position when inside it, else any valid one
                p = int(pos[s.source])
                out[j] = p if p < s.end else (s.end - 1 if default_last else 0)
        return out

    return CoreBatch(tokens=np.concatenate(parts) if len(parts) > 1 else parts[0], cu_seqlens=cu,
                     parent=par if (par >= 0).any() else None,
                     reward_pos=positions(reward_pos, True), gating_pos=positions(gating_pos, False),
                     sequences=np.array([segs[c].seq for c in scored], dtype=np.int64),
                     rows=np.array([index[c] for c in scored], dtype=np.int64))
