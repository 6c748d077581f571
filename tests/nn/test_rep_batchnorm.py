"""nn.RepBN and nn.PRepBN: RepBN's running statistics follow nn.BatchNorm1d and skip masked
tokens; PRepBN's LayerNorm-to-RepBN schedule survives a save and load, its training forward is
the mix of the two and its eval forward (RepBN) compiles."""
import io

import pytest
import torch

from leanformer.nn import PRepBN, RepBN
from leanformer.reference import progressive_norm_reference
from tests.helpers import TORCH_DEVICES as DEVICES


@pytest.mark.parametrize("device", DEVICES)
def test_running_statistics_follow_batchnorm(device):
    x = torch.randn(8, 20, 6, device=device) * 2 + 3
    bn = torch.nn.BatchNorm1d(6).to(device)
    m = RepBN(6).to(device)
    for _ in range(3):
        bn(x.reshape(-1, 6))
        m(x)
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)
    assert m.num_batches_tracked.item() == 3
    m.eval(), bn.eval()
    torch.testing.assert_close(m(x), bn(x.reshape(-1, 6)).view_as(x) + x)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_excludes_padding_from_statistics(device):
    x = torch.randn(4, 10, 5, device=device)
    mask = torch.ones(4, 10, dtype=torch.bool, device=device)
    mask[:, 7:] = False
    padded = x.clone()
    padded[:, 7:] = 1e4  # garbage in the padding must not move the statistics
    m1, m2 = RepBN(5).to(device), RepBN(5).to(device)
    y1 = m1(x, mask=mask)
    y2 = m2(padded, mask=mask)
    torch.testing.assert_close(y1[:, :7], y2[:, :7])
    torch.testing.assert_close(m1.running_mean, m2.running_mean)
    torch.testing.assert_close(m1.running_var, m2.running_var)


def test_prepbn_schedule_survives_save_and_load():
    m = PRepBN(6, total_steps=4, warmup_steps=2)
    x = torch.randn(5, 7, 6)
    gammas = []
    for _ in range(5):
        gammas.append(m.gamma())
        m(x)
    assert gammas == [1.0, 1.0, 1.0, 0.75, 0.5]
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = PRepBN(6, total_steps=4, warmup_steps=2)
    m2.load_state_dict(torch.load(buf))
    assert m2.gamma() == 0.25 and int(m2.step) == 5
    for _ in range(3):
        m2(x)
    assert m2.gamma() == 0.0
    # In eval it is exactly RepBN with the trained statistics.
    m2.eval()
    ref = RepBN(6)
    ref.load_state_dict(m2.bn.state_dict())
    torch.testing.assert_close(m2(x), ref.eval()(x))


def test_prepbn_training_equals_the_mix_and_compiles_in_eval():
    m = PRepBN(8, total_steps=10)
    m.step.fill_(3)
    x = torch.randn(4, 5, 8)
    rm, rv = m.bn.running_mean.clone(), m.bn.running_var.clone()
    y = m(x)
    ref = progressive_norm_reference(x, m.ln.weight, m.ln.bias, m.bn.weight, m.bn.bias, m.bn.alpha,
                                     rm, rv, 0.7, training=True)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    m.eval()
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x))
