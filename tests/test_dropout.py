"""The CPU dropout drops at rate p, scales the rest by 1 / (1 - p), is seeded, and is the identity in eval."""

import math

import pytest
import torch

from translator.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_drops_at_rate_p_and_scales_what_it_keeps(p):
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of the four lanes a draw gives
    out = dropout(torch.ones(n), p, training=True)
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / (1 - p)))


def test_lanes_are_independent_of_position():
    """Each 16-bit lane of a 64-bit draw drops at the same rate (a plain int64 `random_()` never sets the top bit)."""
    torch.manual_seed(1)
    out = dropout(torch.ones(400_000, 4), 0.5, training=True)
    rates = (out == 0).double().mean(0)
    assert (rates - 0.5).abs().max() < 5 * math.sqrt(0.25 / 400_000)


def test_seeded_and_the_gradient_is_the_mask():
    x = torch.randn(7, 9, 11, requires_grad=True)
    torch.manual_seed(3)
    a = dropout(x, 0.2, training=True)
    torch.manual_seed(3)
    b = dropout(x, 0.2, training=True)
    assert torch.equal(a, b)
    a.sum().backward()
    torch.testing.assert_close(x.grad, (a != 0).float() / 0.8)


def test_identity_in_eval_and_at_zero():
    x = torch.randn(5, 6)
    layer = Dropout(0.3).eval()
    assert layer(x) is x
    assert dropout(x, 0.0, training=True) is x


def test_keeps_dtype_and_shape_of_a_noncontiguous_input():
    x = torch.randn(6, 10, dtype=torch.bfloat16).t()
    out = dropout(x, 0.1, training=True)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.9, rtol=1e-2, atol=0)


def test_output_and_gradient_are_one_shared_mask_in_each_dtype():
    """x and the upstream gradient are multiplied by the same 0 / scale mask, exactly, with the mask
    that the same generator state gives."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(64, 33).to(dtype).requires_grad_()
        torch.manual_seed(5)
        mask = keep_mask(x, 0.3)
        torch.manual_seed(5)
        out = dropout(x, 0.3, training=True)
        grad = torch.randn_like(out)
        out.backward(grad)
        assert torch.equal(out, x.detach() * mask) and torch.equal(x.grad, grad * mask)
        assert set(mask.unique().tolist()) == {0.0, torch.tensor(1 / 0.7, dtype=dtype).item()}


@pytest.mark.parametrize("p", [1 - 2**-18, 0.999999])
def test_a_rate_next_to_one_still_drops_almost_everything(p):
    """round(p * 2^16) = 2^16 must not wrap the int16 threshold around (which would keep everything)."""
    torch.manual_seed(0)
    out = dropout(torch.ones(100_000), p, training=True)
    assert (out != 0).sum() < 20
