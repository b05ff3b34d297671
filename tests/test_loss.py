"""The blockwise label-smoothed cross-entropy has F.cross_entropy's value and gradient; the blockwise symmetric KL, the written-out one's."""

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from translator import loss as loss_module
from translator.loss import cross_entropy, symmetric_kl

PAD = 0


def logits_and_targets(rows=37, vocab=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype).requires_grad_()
    target = torch.randint(1, vocab, (rows,), generator=g)
    target[::5] = PAD  # padding positions: no loss, no gradient
    return logits, target


def value_and_grad(fn, logits, target, eps):
    logits.grad = None
    value = fn(logits, target)
    (value * 3.0).backward()  # a loss scale other than 1 reaches the gradient
    return value.detach(), logits.grad.clone()


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("block_elements", [1, 64, 1 << 20])  # a row a block, a few rows a block, all rows in one
def test_value_and_gradient_equal_torch_cross_entropy(monkeypatch, eps, block_elements):
    monkeypatch.setattr(loss_module, "BLOCK_ELEMENTS", block_elements)
    logits, target = logits_and_targets()
    ours = value_and_grad(lambda x, t: cross_entropy(x, t, eps, ignore_index=PAD), logits, target, eps)
    torch_ = value_and_grad(lambda x, t: F.cross_entropy(x, t, ignore_index=PAD, label_smoothing=eps), logits, target, eps)
    torch.testing.assert_close(ours[0], torch_[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], torch_[1], rtol=1e-5, atol=1e-7)
    assert ours[1][target == PAD].abs().sum() == 0


def test_bf16_logits_get_a_bf16_gradient_close_to_the_fp32_one():
    logits, target = logits_and_targets(dtype=torch.bfloat16)
    ours_value, ours_grad = value_and_grad(lambda x, t: cross_entropy(x, t, 0.1, ignore_index=PAD), logits, target, 0.1)
    assert ours_grad.dtype == torch.bfloat16
    exact = logits.detach().float().requires_grad_()
    ref_value, ref_grad = value_and_grad(lambda x, t: F.cross_entropy(x, t, ignore_index=PAD, label_smoothing=0.1), exact, target, 0.1)
    torch.testing.assert_close(ours_value, ref_value, rtol=1e-6, atol=1e-6)  # computed in fp32 from the same bf16 values
    torch.testing.assert_close(ours_grad.float(), ref_grad, rtol=1e-2, atol=1e-5)  # one bf16 rounding


def test_without_gradients_only_the_value_is_computed():
    logits, target = logits_and_targets()
    with torch.no_grad():
        value = cross_entropy(logits, target, 0.1, ignore_index=PAD)
    torch.testing.assert_close(value, F.cross_entropy(logits.detach(), target, ignore_index=PAD, label_smoothing=0.1))


def test_fp16_gradients_take_the_loss_scale_before_they_are_rounded_to_fp16():
    """GradScaler's scale reaches the logits' gradient in backward: tiny entries must survive it."""
    logits, target = logits_and_targets(dtype=torch.float16)
    scale = 2.0**16
    (cross_entropy(logits, target, 0.0, ignore_index=PAD) * scale).backward()
    ours = logits.grad.float() / scale
    exact = logits.detach().float().requires_grad_()
    F.cross_entropy(exact, target, ignore_index=PAD).backward()
    assert exact.grad.abs().min() < 1e-8  # entries fp16 cannot hold unscaled
    torch.testing.assert_close(ours, exact.grad, rtol=2e-3, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 0.37, 1 / 3])  # accumulation and DDP weigh each batch's mean by its share of the tokens
def test_a_scaled_low_precision_gradient_is_rounded_once_as_torch_rounds_it_under_autocast(dtype, scale):
    """Training scales each batch's loss (its tokens' share, x world size); that scale must be in the
    gradient before it is cast to bf16/fp16, as in F.cross_entropy under autocast (computed in fp32)."""
    loss_scale = 2.0**16 if dtype == torch.float16 else 1.0  # GradScaler's, in backward
    logits, target = logits_and_targets(rows=300, vocab=500, dtype=dtype)
    (cross_entropy(logits, target, 0.1, ignore_index=PAD, scale=scale) * loss_scale).backward()
    ours = logits.grad.clone()
    logits.grad = None
    with torch.autocast("cpu", dtype=dtype):
        reference = F.cross_entropy(logits, target, ignore_index=PAD, label_smoothing=0.1)
    (reference * scale * loss_scale).backward()
    assert ours.dtype == logits.grad.dtype == dtype
    differ = (ours != logits.grad).float().mean().item()
    assert differ < 0.01, f"{differ:.1%} of the gradient's entries differ from torch's (a second rounding?)"
    torch.testing.assert_close(ours.float(), logits.grad.float(), rtol=2**-7, atol=2.0**-24)  # one ulp (or one fp16 subnormal step) at most


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loss_on_every_device_is_torch_cross_entropy_times_the_scale(device, dtype):
    logits, target = logits_and_targets(dtype=dtype)
    logits, target = logits.detach().to(device).requires_grad_(), target.to(device)
    ours = value_and_grad(lambda x, t: cross_entropy(x, t, 0.1, ignore_index=PAD, scale=0.37), logits, target, 0.1)
    exact = logits.detach().float().requires_grad_()
    ref = value_and_grad(lambda x, t: 0.37 * F.cross_entropy(x, t, ignore_index=PAD, label_smoothing=0.1), exact, target, 0.1)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1].float(), ref[1], rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)


def written_out_symmetric_kl(logits_a, logits_b, counted):
    """R-Drop's term as the paper writes it, through autograd: the reference."""
    log_a, log_b = F.log_softmax(logits_a[counted].float(), dim=-1), F.log_softmax(logits_b[counted].float(), dim=-1)
    return 0.5 * (F.kl_div(log_b, log_a, log_target=True, reduction="sum") + F.kl_div(log_a, log_b, log_target=True, reduction="sum"))


@pytest.mark.parametrize("block_elements", [1, 64, 1 << 20])
def test_symmetric_kl_value_and_gradients_equal_the_written_out_form(monkeypatch, block_elements):
    monkeypatch.setattr(loss_module, "BLOCK_ELEMENTS", block_elements)
    (a, target), (b, _) = logits_and_targets(seed=0), logits_and_targets(seed=1)
    counted = target != PAD
    results = []
    for fn in (symmetric_kl, written_out_symmetric_kl):
        a.grad = b.grad = None
        value = fn(a, b, counted)
        (value * 3.0).backward()
        results.append((value.detach(), a.grad.clone(), b.grad.clone()))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert results[0][1][~counted].abs().sum() == 0 and results[0][2][~counted].abs().sum() == 0
    assert results[0][0] > 0  # the premise: the two distributions differ


@pytest.mark.parametrize("device", DEVICES)
def test_symmetric_kl_on_every_device_equals_the_written_out_form(device):
    (a, target), (b, _) = logits_and_targets(seed=0), logits_and_targets(seed=1)
    a, b = (x.detach().to(device).requires_grad_() for x in (a, b))
    counted = (target != PAD).to(device)
    exact_a, exact_b = (x.detach().clone().requires_grad_() for x in (a, b))
    (3.0 * symmetric_kl(a, b, counted)).backward()
    (3.0 * written_out_symmetric_kl(exact_a, exact_b, counted)).backward()
    for ours, reference in ((a, exact_a), (b, exact_b)):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-5, atol=1e-6)
        assert ours.grad[~counted].abs().sum() == 0
    torch.testing.assert_close(symmetric_kl(a, b, counted), written_out_symmetric_kl(a, b, counted), rtol=1e-5, atol=1e-6)


def test_symmetric_kl_of_bf16_logits_gets_bf16_gradients_close_to_the_fp32_ones():
    (a, target), (b, _) = logits_and_targets(dtype=torch.bfloat16, seed=0), logits_and_targets(dtype=torch.bfloat16, seed=1)
    counted = target != PAD
    symmetric_kl(a, b, counted).backward()
    exact_a, exact_b = (x.detach().float().requires_grad_() for x in (a, b))
    written_out_symmetric_kl(exact_a, exact_b, counted).backward()
    assert a.grad.dtype == b.grad.dtype == torch.bfloat16
    torch.testing.assert_close(a.grad.float(), exact_a.grad, rtol=1e-2, atol=1e-4)  # one bf16 rounding
    torch.testing.assert_close(b.grad.float(), exact_b.grad, rtol=1e-2, atol=1e-4)
