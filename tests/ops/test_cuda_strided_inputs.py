"""The CUDA launchers on non-contiguous and expanded inputs (issue 27: a data pointer taken
without .contiguous() or strides reads the wrong elements). Each op runs on a GPU ("cuda") and on
the CUDA emulation ("emu") with every input a strided or expanded view, against the CPU op on
contiguous copies. The families with their own strided cases (nm_sparse_linear, topk_mlp's b_up,
tree_attention's caches, tree_dwconv's v, compact_kv_cache) are tested in their files."""
import pytest
import torch

from leanformer.reference import ancestor_mask
from tests.helpers import GPU_DEVICES, random_parents

ops = torch.ops.leanformer


def strided(t, device):
    """t on `device` as a view with the same values whose last dim has stride 2."""
    return torch.stack([t, torch.zeros_like(t)], -1).to(device)[..., 0]


def assert_same(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_sla_forward_strided(device, causal):
    B, T, H, Dk, Dv = 2, 9, 3, 8, 6
    q, k = torch.randn(B, T, H, Dk).relu(), torch.randn(B, T, H, Dk).relu()
    v = torch.randn(B, T, H, Dv)
    S0, z0 = torch.rand(B, H, Dk, Dv), torch.rand(B, H, Dk)
    args = (q, k, v, S0, z0) if causal else (q, k, v, None, None)
    expected = ops.sla_forward(*args, causal, 1e-6)
    actual = ops.sla_forward(*[strided(a, device) if a is not None else None for a in args], causal, 1e-6)
    for a, e in zip(actual, expected):
        assert_same(a, e, atol=1e-4)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_tree_linear_attention_strided(device):
    B, T, H, Dk, Dv = 2, 7, 2, 8, 5
    q, k = torch.randn(B, T, H, Dk).relu(), torch.randn(B, T, H, Dk).relu()
    v = torch.randn(B, T, H, Dv)
    S, z = torch.rand(B, H, Dk, Dv), torch.rand(B, H, Dk) + 1
    mask = ancestor_mask(random_parents(T, B))
    expected = ops.tree_linear_attention(q, k, v, S, z, mask, 1e-6)
    actual = ops.tree_linear_attention(*[strided(a, device) for a in (q, k, v, S, z, mask)], 1e-6)
    assert_same(actual, expected, atol=1e-4)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_topk_activation_strided(device):
    h = torch.randn(5, 40)
    for act in ("relu", "gelu"):
        values, indices = ops.topk_activation(strided(h, device), 7, act)
        ev, ei = ops.topk_activation(h, 7, act)
        assert torch.equal(indices.cpu(), ei)
        assert_same(values, ev)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_verify_tree_greedy_strided_and_expanded(device):
    B, T, V = 3, 6, 50
    logits = torch.randn(B, T, V)
    parents = random_parents(T)
    tokens = torch.randint(0, V, (1, T)).expand(B, T)  # one drafted tree for every sequence
    expected = ops.verify_tree_greedy(logits, tokens.contiguous(), parents)
    actual = ops.verify_tree_greedy(strided(logits, device), tokens.to(device),
                                    parents.to(device).unsqueeze(0).expand(B, T))
    for a, e in zip(actual, expected):
        assert torch.equal(a.cpu(), e)
