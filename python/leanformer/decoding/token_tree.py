"""Token trees for tree-verified decoding: a static shape from a prefix-closed list of paths
(Medusa's ``generate_medusa_buffers``), filled per step with the drafter's candidates; or a
dynamic tree of the N best nodes by cumulative log-probability (EAGLE-2)."""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

PAD = -1  # tree-token padding: never a real token id (Medusa padded with 0, a real id)


def _sorted_paths(paths: Sequence[Sequence[int]]) -> List[Tuple[int, ...]]:
    """Paths sorted by (length, lexicographic), deduplicated; raises on a path whose prefix is
    missing, naming the first such path."""
    out = sorted({tuple(int(c) for c in p) for p in paths}, key=lambda p: (len(p), p))
    if not out or any(len(p) == 0 for p in out):
        raise ValueError("paths must be a non-empty list of non-empty paths (the root is implicit)")
    have = set(out)
    for p in out:
        if any(c < 0 for c in p):
            raise ValueError(f"path {list(p)} has a negative candidate rank")
        if len(p) > 1 and p[:-1] not in have:
            raise ValueError(f"the paths are not prefix-closed: path {list(p)} has no parent path {list(p[:-1])}")
    return out


class TreeShape:
    """The token-free shape of a static tree: node 0 is the root, node i > 0 is ``paths[i - 1]``
    (head-1's candidate ``path[0]``, then head-2's ``path[1]``, ...).

    Parents, depths and the ancestor mask are fixed by the shape, so they are built once (per
    device) and each step only gathers the drafter's tokens: siblings are distinct ranks of one
    top-k, so a static tree never has duplicate siblings to merge."""

    def __init__(self, paths: List[Tuple[int, ...]], parents: List[int]):
        self.paths, self.parents = paths, parents
        self._structure = {}
        # read by build() every decoding step: computed once, not per step
        self._depth = max(len(p) for p in paths)
        self._top_k = max(max(p) for p in paths) + 1

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> "TreeShape":
        ordered = _sorted_paths(paths)
        index = {(): 0, **{p: i + 1 for i, p in enumerate(ordered)}}
        return cls(ordered, [-1] + [index[p[:-1]] for p in ordered])

    @classmethod
    def from_accuracies(cls, accuracy, num_nodes: int) -> "TreeShape":
        """Medusa's sparse tree: the ``num_nodes - 1`` paths with the highest estimated
        acceptance probability, a path's estimate being the product of ``accuracy[d][r]`` (how
        often the drafter's rank-r candidate at depth d is the token, measured on held-out text,
        e.g. by :func:`leanformer.decoding.distill.rank_accuracy`) along it. Prefix-closed because
        a path never scores above its prefix (ties go to the shorter, then lexicographically
        smaller path)."""
        acc = [[float(a) for a in row] for row in (accuracy.tolist() if isinstance(accuracy, Tensor) else accuracy)]
        if not acc or any(not row for row in acc) or any(not 0 <= a <= 1 for row in acc for a in row):
            raise ValueError("accuracy must be a non-empty [depth][top_k] table of probabilities in [0, 1]")
        if num_nodes < 2:
            raise ValueError(f"num_nodes must be >= 2 (the root and one candidate), got {num_nodes}")
        heap = [(-acc[0][r], 1, (r,)) for r in range(len(acc[0]))]
        heapq.heapify(heap)
        chosen = []
        while heap and len(chosen) < num_nodes - 1:
            neg, _, path = heapq.heappop(heap)
            chosen.append(path)
            d = len(path)
            if d < len(acc):
                for r in range(len(acc[d])):
                    heapq.heappush(heap, (neg * acc[d][r], d + 1, path + (r,)))
        return cls.from_paths(chosen)

    def __repr__(self) -> str:
        return f"TreeShape(num_nodes={self.num_nodes}, depth={self.depth}, paths={[list(p) for p in self.paths]})"

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def top_k(self) -> int:
        """Candidates needed per depth (the largest rank used, plus one)."""
        return self._top_k

    def structure(self, device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(parents [T], depths [T], mask [T, T], flat candidate index [T - 1])`` on
        ``device``, built once: node i > 0 takes candidate ``depth * top_k + rank``."""
        def build():
            proto = TokenTree.from_nodes([[(-1, 0)] + [(self.parents[i + 1], i) for i in range(len(self.paths))]],
                                         device=device)
            flat = torch.tensor([(len(p) - 1) * self.top_k + p[-1] for p in self.paths], dtype=torch.long,
                                device=device)
            return proto.parents[0], proto.depths[0], proto.mask[0], flat

        return self.cached("structure", device, build)

    def fill(self, root_tokens: Tensor, candidates: Tensor) -> "TokenTree":
        """The tree with tokens: ``root_tokens [B]``, ``candidates [B, depth, top_k]`` (the
        drafter's ranked tokens per future position, distinct within a position)."""
        B = root_tokens.shape[0]
        if candidates.dim() != 3 or candidates.shape[0] != B or candidates.shape[1] < self.depth \
                or candidates.shape[2] < self.top_k:
            raise ValueError(f"candidates must be [B={B}, depth>={self.depth}, top_k>={self.top_k}], "
                             f"got {tuple(candidates.shape)}")
        cand = candidates[:, :self.depth, :self.top_k]
        srt = cand.sort(dim=-1).values
        if bool((srt[..., 1:] == srt[..., :-1]).any()):  # a repeated candidate: merge node by node
            cl, roots = cand.tolist(), root_tokens.tolist()
            nodes = [[(-1, roots[b])] + [(self.parents[i + 1], cl[b][len(p) - 1][p[-1]])
                                         for i, p in enumerate(self.paths)] for b in range(B)]
            return TokenTree.from_nodes(nodes, num_nodes=self.num_nodes, device=root_tokens.device)
        return self._fill_distinct(root_tokens, cand)

    def _fill_distinct(self, root_tokens: Tensor, cand: Tensor) -> "TokenTree":
        B = root_tokens.shape[0]
        parents, depths, mask, flat = self.structure(root_tokens.device)
        cand = cand.reshape(B, -1)
        tokens = torch.cat([root_tokens[:, None].long(), cand[:, flat].long()], dim=1)
        T = self.num_nodes
        return TokenTree(tokens, parents.expand(B, T), depths.expand(B, T), mask.expand(B, T, T),
                         torch.full((B,), T, dtype=torch.long, device=tokens.device), shape=self)

    def cached(self, key, device, build):
        """``build()`` once per ``(key, device)``: structure derived from the shape alone (a
        drafter's extension of the tree, say) need not be rebuilt every step."""
        # tensors made under inference mode are not for use outside it: one entry per mode
        k = (key, str(torch.device(device) if device is not None else "cpu"), torch.is_inference_mode_enabled())
        if k not in self._structure:
            self._structure[k] = build()
        return self._structure[k]

    def build(self, root_tokens: Tensor, draft_logits: Tensor) -> "TokenTree":
        """Fills the tree with the ``top_k`` best tokens of ``draft_logits [B, depth, V]``."""
        if draft_logits.shape[1] < self.depth:
            raise ValueError(f"the tree is {self.depth} deep, the drafter proposes {draft_logits.shape[1]} positions")
        # top-k indices are distinct: no sibling duplicates to look for
        return self._fill_distinct(root_tokens, draft_logits[:, :self.depth].topk(self.top_k, dim=-1).indices)

    @property
    def size(self) -> int:
        return self.num_nodes


@dataclass
class TokenTree:
    """A batch of token trees, padded to ``T`` nodes. Node 0 is the root (the last verified
    token); ``parents[b, i] < i`` (-1 for the root); padding nodes hang off the root with token
    -1, so they never match a real token and see only the root and themselves.

    Attributes:
        tokens ``[B, T]`` int64 (-1 padding); parents ``[B, T]``; depths ``[B, T]`` (the
        position offsets: node i sits at ``cache_len + depths[i]``); mask ``[B, T, T]`` bool
        (``[i, j]`` iff j is i or an ancestor of i); num_nodes ``[B]`` real nodes per tree.
    """

    tokens: Tensor
    parents: Tensor
    depths: Tensor
    mask: Tensor
    num_nodes: Tensor
    shape: Optional["TreeShape"] = field(default=None, repr=False, compare=False)  # the static shape it fills

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> TreeShape:
        """A static tree's shape (fill it per step with :meth:`TreeShape.fill`)."""
        return TreeShape.from_paths(paths)

    @classmethod
    def from_nodes(cls, nodes: List[List[Tuple[int, int]]], *, num_nodes: Optional[int] = None,
                   device=None) -> "TokenTree":
        """From per-sequence lists of ``(parent, token)`` in topological order (entry 0 the root),
        merging a node into an earlier sibling with the same token (its children follow it)."""
        trees = []
        for seq in nodes:
            remap, seen, kept = {}, {}, []
            for i, (parent, token) in enumerate(seq):
                if i == 0:
                    if parent != -1:
                        raise ValueError("node 0 must be the root (parent -1)")
                    remap[0] = 0
                    kept.append((-1, token))
                    continue
                if not 0 <= parent < i:
                    raise ValueError(f"node {i} has parent {parent}: parents must come earlier (0 <= parent < {i})")
                p = remap[parent]
                if (p, token) in seen:  # a duplicate sibling: one node, one verification
                    remap[i] = seen[(p, token)]
                    continue
                remap[i] = seen[(p, token)] = len(kept)
                kept.append((p, token))
            trees.append(kept)
        T = max(num_nodes or 0, max(len(t) for t in trees))
        # plain Python lists, one tensor each at the end: per-node tensor writes cost more than
        # the verifying forward of a small model
        tokens, parents, depths, masks = [], [], [], []
        for kept in trees:
            tok, par, dep, rows = [], [], [], []
            for i, (p, t) in enumerate(kept):
                row = list(rows[p]) if p >= 0 else [False] * T
                row[i] = True
                tok.append(t)
                par.append(p)
                dep.append(dep[p] + 1 if p >= 0 else 0)
                rows.append(row)
            for i in range(len(kept), T):  # padding: a child of the root with token -1
                row = [False] * T
                row[0] = row[i] = True
                tok.append(PAD)
                par.append(0)
                dep.append(1)
                rows.append(row)
            tokens.append(tok)
            parents.append(par)
            depths.append(dep)
            masks.append(rows)
        n = [len(t) for t in trees]
        return cls(*(torch.tensor(x, dtype=dt, device=device) for x, dt in
                     ((tokens, torch.long), (parents, torch.long), (depths, torch.long), (masks, torch.bool),
                      (n, torch.long))))

    @classmethod
    def dynamic(cls, root_tokens: Tensor, logprobs: Tensor, *, num_nodes: int, top_k: int) -> "TokenTree":
        """EAGLE-2's tree: from ``logprobs [B, depth, V]`` (the drafter's log-probabilities per
        future position), the ``num_nodes - 1`` non-root nodes with the best cumulative
        log-probability. Each depth expands the ``num_nodes`` best nodes of the previous one by
        their ``top_k`` tokens; the result is prefix-closed because a child never scores above
        its parent (ties go to the shallower node)."""
        if logprobs.dim() != 3 or logprobs.shape[0] != root_tokens.shape[0]:
            raise ValueError(f"logprobs must be [B={root_tokens.shape[0]}, depth, V], got {tuple(logprobs.shape)}")
        if num_nodes < 1 or top_k < 1:
            raise ValueError(f"num_nodes and top_k must be >= 1, got {num_nodes}, {top_k}")
        vals, toks = logprobs.float().topk(min(top_k, logprobs.shape[-1]), dim=-1)
        vals, toks = vals.tolist(), toks.tolist()
        out = []
        for b, root in enumerate(root_tokens.tolist()):
            # candidates: (score, depth, order, parent candidate index, token)
            cands, frontier = [], [(0.0, -1)]  # (score, index in cands; -1 is the root)
            for d in range(logprobs.shape[1]):
                level = [(s + v, d, len(cands) + n, parent, t) for n, ((s, parent), (v, t)) in
                         enumerate((f, vt) for f in frontier for vt in zip(vals[b][d], toks[b][d]))]
                level.sort(key=lambda c: (-c[0], c[2]))
                level = level[:num_nodes - 1]
                frontier = [(c[0], len(cands) + i) for i, c in enumerate(level)]
                cands.extend(level)
                if not level:
                    break
            best = sorted(range(len(cands)), key=lambda i: (-cands[i][0], cands[i][1], i))[:num_nodes - 1]
            best.sort()  # candidate order is topological (parents are added before children)
            new_index = {-1: 0, **{c: i + 1 for i, c in enumerate(best)}}
            nodes = [(-1, root)] + [(new_index[cands[c][3]], cands[c][4]) for c in best]
            out.append(nodes)
        return cls.from_nodes(out, num_nodes=num_nodes, device=root_tokens.device)

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    def retrieve_indices(self) -> Tensor:
        """``[B, num_leaves_max, max_depth + 1]``: the node indices of each root-to-leaf path
        (Medusa's retrieve indices), padded with -1."""
        B, T = self.tokens.shape
        paths_per_seq = []
        for b in range(B):
            n = int(self.num_nodes[b])
            par = self.parents[b, :n].tolist()
            is_parent = set(par[1:])
            leaves = [i for i in range(n) if i not in is_parent]
            paths = []
            for leaf in leaves:
                path, i = [], leaf
                while i >= 0:
                    path.append(i)
                    i = par[i]
                paths.append(path[::-1])
            paths_per_seq.append(paths)
        L = max(len(p) for ps in paths_per_seq for p in ps)
        W = max(len(ps) for ps in paths_per_seq)
        out = torch.full((B, W, L), -1, dtype=torch.long)
        for b, ps in enumerate(paths_per_seq):
            for r, p in enumerate(ps):
                out[b, r, :len(p)] = torch.tensor(p)
        return out.to(self.tokens.device)


@dataclass
class DynamicTree:
    """The spec of an EAGLE-2 tree for :func:`leanformer.generate`: ``num_nodes`` nodes (root
    included) grown from each depth's ``top_k`` candidates."""

    num_nodes: int
    top_k: int

    def build(self, root_tokens: Tensor, draft_logits: Tensor) -> TokenTree:
        return TokenTree.dynamic(root_tokens, draft_logits.float().log_softmax(-1), num_nodes=self.num_nodes,
                                 top_k=self.top_k)

    @property
    def size(self) -> int:
        return self.num_nodes
