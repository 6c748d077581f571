"""leanformer.decoding.sampling: the warps (temperature, top-k, top-p) a sampled token is drawn
under, in plain and in tree decoding alike."""
import torch

from leanformer.decoding import warp_logits, warp_probs


def test_warp_logits_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    assert torch.isinf(warp_logits(logits, top_k=2)).tolist() == [[False, True, True, True, False]]
    p = logits.softmax(-1)[0]  # sorted: 4 (.64), 0 (.24), 1 (.09), 2, 3
    kept = lambda top_p: (~torch.isinf(warp_logits(logits, top_p=top_p)))[0].nonzero().flatten().tolist()
    assert kept(0.5) == [4]
    assert kept(float(p[4] + p[0]) - 1e-3) == [0, 4]
    assert kept(1.0) == [0, 1, 2, 3, 4]
    torch.testing.assert_close(warp_probs(logits, temperature=2.0), (logits / 2).softmax(-1))
    torch.testing.assert_close(warp_probs(logits, top_k=2)[0, [0, 4]], p[[0, 4]] / (p[0] + p[4]))
