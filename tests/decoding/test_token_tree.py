"""TokenTree: static trees from prefix-closed paths, dynamic (EAGLE-2) trees, masks, depths,
duplicates, padding, retrieve indices, edge cases and bad inputs."""
import pytest
import torch

from leanformer.decoding import TokenTree, TreeShape
from leanformer.decoding.distill import rank_accuracy
from leanformer.decoding.token_tree import PAD


def ancestors(parents, i):
    out = {i}
    while parents[i] >= 0:
        i = parents[i]
        out.add(i)
    return out


def check_consistent(tree: TokenTree):
    B, T = tree.tokens.shape
    for b in range(B):
        par = tree.parents[b].tolist()
        assert par[0] == -1
        for i in range(1, T):
            assert 0 <= par[i] < i
            assert tree.depths[b, i] == tree.depths[b, par[i]] + 1
            assert set(tree.mask[b, i].nonzero().flatten().tolist()) == ancestors(par, i)
        n = int(tree.num_nodes[b])
        assert (tree.tokens[b, n:] == PAD).all() and (tree.tokens[b, :n] >= 0).all()
        kids = {}
        for i in range(1, n):  # no two siblings share a token
            assert (par[i], int(tree.tokens[b, i])) not in kids
            kids[(par[i], int(tree.tokens[b, i]))] = i


def test_static_tree_sorted_and_filled():
    shape = TokenTree.from_paths([[1], [0, 0], [0], [0, 1], [1, 0], [0, 0, 0]])
    assert shape.paths == [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    assert shape.parents == [-1, 0, 0, 1, 1, 2, 3]
    assert (shape.depth, shape.top_k, shape.num_nodes) == (3, 2, 7)
    cand = torch.tensor([[[10, 11], [20, 21], [30, 31]]])
    tree = shape.fill(torch.tensor([5]), cand)
    assert tree.tokens.tolist() == [[5, 10, 11, 20, 21, 20, 30]]
    assert tree.depths.tolist() == [[0, 1, 1, 2, 2, 2, 3]]
    check_consistent(tree)
    assert tree.retrieve_indices().tolist() == [[[0, 1, 4, -1], [0, 2, 5, -1], [0, 1, 3, 6]]]


def test_single_node_and_depth_one():
    tree = TokenTree.from_nodes([[(-1, 7)]])
    assert tree.tokens.tolist() == [[7]] and tree.mask.tolist() == [[[True]]]
    assert tree.retrieve_indices().tolist() == [[[0]]]
    wide = TokenTree.from_paths([[i] for i in range(40)]).fill(torch.tensor([1, 2]), torch.arange(80).view(2, 1, 40))
    check_consistent(wide)
    assert wide.size == 41 and (wide.depths[:, 1:] == 1).all()


def test_duplicate_siblings_merged_and_padded():
    shape = TokenTree.from_paths([[0], [1], [2], [0, 0], [1, 0], [1, 1]])
    # heads propose the same token twice at depth 1 (ranks 0 and 1): those merge, and their
    # children become siblings, where the duplicate again merges
    cand = torch.tensor([[[4, 4, 6], [8, 8, 9]], [[1, 2, 3], [4, 5, 6]]])
    tree = shape.fill(torch.tensor([0, 0]), cand)
    check_consistent(tree)
    assert tree.num_nodes.tolist() == [4, 7]
    assert tree.tokens[0].tolist() == [0, 4, 6, 8, PAD, PAD, PAD]
    assert tree.parents[0, :4].tolist() == [-1, 0, 0, 1]
    # padding nodes see only the root and themselves
    assert tree.mask[0, 5].nonzero().flatten().tolist() == [0, 5]


def test_dynamic_tree_keeps_best_cumulative_logprob():
    torch.manual_seed(0)
    lp = torch.randn(2, 4, 50).log_softmax(-1)
    tree = TokenTree.dynamic(torch.tensor([3, 4]), lp, num_nodes=12, top_k=4)
    check_consistent(tree)
    assert tree.size == 12
    for b in range(2):
        score = {}
        for i in range(1, int(tree.num_nodes[b])):
            p = int(tree.parents[b, i])
            score[i] = score.get(p, 0.0) + lp[b, int(tree.depths[b, i]) - 1, int(tree.tokens[b, i])].item()
        # brute force: the 11 best nodes of the full top-4 expansion tree
        best, frontier = [], [(0.0, ())]
        for d in range(4):
            v, t = lp[b, d].topk(4)
            frontier = [(s + vi.item(), path + (ti.item(),)) for s, path in frontier for vi, ti in zip(v, t)]
            best += frontier
        expect = sorted(s for s, _ in best)[::-1][:11]
        assert sorted(score.values())[::-1] == pytest.approx(expect, abs=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"path \[1, 0\] has no parent path \[1\]"):
        TokenTree.from_paths([[0], [0, 0], [1, 0]])
    with pytest.raises(ValueError, match="non-empty"):
        TokenTree.from_paths([])
    shape = TokenTree.from_paths([[0], [0, 1]])
    with pytest.raises(ValueError, match="candidates must be"):
        shape.fill(torch.tensor([0]), torch.zeros(1, 1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="parents must come earlier"):
        TokenTree.from_nodes([[(-1, 0), (2, 1), (0, 3)]])
    with pytest.raises(ValueError, match="logprobs must be"):
        TokenTree.dynamic(torch.tensor([0]), torch.zeros(1, 5), num_nodes=3, top_k=2)


def test_fill_of_distinct_candidates_equals_the_node_by_node_tree():
    """The cached-structure fill (static shapes, distinct top-k candidates) builds exactly what
    the general node list builds."""
    shape = TokenTree.from_paths([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0]])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 50, generator=g)
    roots = torch.tensor([4, 9, 1])
    fast = shape.build(roots, logits)
    cand = logits.topk(shape.top_k, dim=-1).indices.tolist()
    nodes = [[(-1, int(roots[b]))] + [(shape.parents[i + 1], cand[b][len(p) - 1][p[-1]]) for i, p in enumerate(shape.paths)]
             for b in range(3)]
    slow = TokenTree.from_nodes(nodes, num_nodes=shape.num_nodes)
    for name in ("tokens", "parents", "depths", "mask", "num_nodes"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    check_consistent(fast)


def test_tree_from_accuracies_keeps_the_most_likely_paths():
    acc = [[0.6, 0.2, 0.05], [0.5, 0.25, 0.1], [0.4, 0.1, 0.05]]
    shape = TreeShape.from_accuracies(acc, 7)
    # products: (0) .6, (0,0) .3, (1) .2, (0,1) .15, (0,0,0) .12, (1,0) .1, then (0,2) .06
    assert [list(p) for p in shape.paths] == [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    assert shape.num_nodes == 7 and shape.depth == 3
    big = TreeShape.from_accuracies(torch.tensor(acc), 100)  # asks for more than exist: all 39 paths
    assert big.num_nodes == 1 + 3 + 9 + 27
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        TreeShape.from_accuracies([[1.5]], 3)
    with pytest.raises(ValueError, match="num_nodes must be >= 2"):
        TreeShape.from_accuracies(acc, 1)


def test_rank_accuracy_counts_where_the_teacher_token_ranks():
    class Shifted(torch.nn.Module):
        """Drafts offset k at t with the teacher's own logits at t + k + 1, except that offset 1
        swaps its two best tokens: rank 0 always right at offset 0, rank 1 at offset 1."""

        def sequence_drafts(self, ids):
            teacher = torch.randn(2, 10, 7, generator=torch.Generator().manual_seed(0))
            drafts = torch.zeros(2, 10, 2, 7)
            drafts[:, :9, 0] = teacher[:, 1:]
            second = teacher[:, 2:].clone()
            top2 = second.topk(2, dim=-1).indices
            second.scatter_(-1, top2, second.gather(-1, top2.flip(-1)))
            drafts[:, :8, 1] = second
            return teacher, drafts

    acc = rank_accuracy(Shifted(), torch.zeros(2, 10, dtype=torch.long), top_k=3)
    assert acc.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
