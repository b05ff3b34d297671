"""Label-smoothed cross-entropy over the vocabulary, and R-Drop's symmetric KL, each with its gradient computed in the same pass.

`F.cross_entropy` makes about eight passes over the (N, V) logits: the cast to fp32, the
log-softmax, the smoothing term's sum, and in backward a zero-fill, a scatter, an add and the
log-softmax gradient. At a Multi30k batch (4k target tokens x 8k pieces, 130 MB in fp32) that
was a quarter of a CPU training step. Here the rows go through in blocks that stay in cache,
and the gradient of each row's loss

    loss = -(1 - eps) log p[target] - (eps / V) sum_j log p[j]
    d loss / d logits = p - (1 - eps) onehot(target) - eps / V

is written once, while its block is at hand, with the caller's `scale` (gradient accumulation,
data parallelism) already in, so a bf16 gradient is rounded once, as F.cross_entropy's under
autocast is. fp16's gradient stays in fp32 until GradScaler's loss scale arrives in backward
(or small gradients would flush to 0). On GPUs F.cross_entropy is a fused kernel and is used as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_ELEMENTS = 1 << 20  # fp32 elements per block of rows: 4 MB, so a block stays in cache


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float, ignore_index: int, scale: float = 1.0) -> torch.Tensor:
    """`scale` times the mean over the rows whose target is not `ignore_index`: the value and gradient of
    `scale * F.cross_entropy(logits, target, ignore_index=..., label_smoothing=...)`. logits (N, V), target (N,)."""
    if logits.device.type != "cpu":
        return scale * F.cross_entropy(logits.float(), target, ignore_index=ignore_index, label_smoothing=label_smoothing)
    return _SmoothedCrossEntropy.apply(logits, target, label_smoothing, ignore_index, scale)


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """R-Drop's consistency term (Liang et al., 2021): (KL(p_a || p_b) + KL(p_b || p_a)) / 2 per counted row,
    summed over the rows. logits (N, V) of the same inputs under two dropout masks; counted (N,) bool.

    On the CPU in blocks of rows, its gradient written in the same pass (as the cross-entropy's): through
    autograd, its passes over (N, V) fp32 tensors made an R-Drop step 4.2x a plain one instead of 2x."""
    if logits_a.device.type != "cpu":  # every row, the uncounted ones weighed 0: picking rows would wait for the GPU
        log_a, log_b = F.log_softmax(logits_a.float(), dim=-1), F.log_softmax(logits_b.float(), dim=-1)
        return 0.5 * (((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(dim=-1) * counted).sum()
    return _SymmetricKL.apply(logits_a, logits_b, counted)


class _SmoothedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, eps: float, ignore_index: int, scale: float) -> torch.Tensor:
        rows, vocab = logits.shape
        counted = target != ignore_index  # (N,)
        n = counted.sum()
        grad_dtype = torch.float32 if logits.dtype == torch.float16 else logits.dtype
        grad = torch.empty_like(logits, dtype=grad_dtype) if ctx.needs_input_grad[0] else None
        ctx.logits_dtype = logits.dtype
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        block = max(1, BLOCK_ELEMENTS // vocab)
        # Two fp32 buffers serve every block: fresh 4 MB tensors would each be mapped and faulted in anew.
        # fp32 needs neither: the logits are read where they are, and an fp32 gradient is written in place
        # (11% of the loss's time, the same values).
        grad_in_place = grad is not None and grad.dtype == torch.float32
        buffer = dict(size=(min(block, rows), vocab), dtype=torch.float32, device=logits.device)
        as_float = None if logits.dtype == torch.float32 else torch.empty(**buffer)
        log_probs_buffer = None if grad_in_place else torch.empty(**buffer)
        for start in range(0, rows, block):
            end = min(start + block, rows)
            part = slice(start, end)
            gold = target[part, None].clamp(min=0)  # (b, 1); an ignored row's index is never used
            weight = counted[part, None]  # (b, 1)
            source = logits[part] if as_float is None else as_float[: end - start].copy_(logits[part])
            log_probs = torch.log_softmax(source, dim=-1, out=grad[part] if grad_in_place else log_probs_buffer[: end - start])  # (b, V)
            gold_log_prob = log_probs.gather(-1, gold)
            row_loss = -(1 - eps) * gold_log_prob - (eps / vocab) * log_probs.sum(-1, keepdim=True)
            total += (row_loss * weight).sum()
            if grad is not None:
                probs = log_probs.exp_().sub_(eps / vocab)
                probs.scatter_add_(-1, gold, torch.full_like(gold_log_prob, eps - 1))
                probs.mul_(weight * (scale / n))
                if not grad_in_place:
                    grad[part] = probs
        ctx.save_for_backward(grad)
        return total * scale / n

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved gradient is a constant: no double backward
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return _chain(grad, grad_loss, ctx.logits_dtype), None, None, None, None


class _SymmetricKL(torch.autograd.Function):
    """With d = log p_a - log p_b and KL_ab = sum p_a d, KL_ba = -sum p_b d per row:

        loss = (KL_ab + KL_ba) / 2
        d loss / d logits_a = (p_a (d - KL_ab) + p_a - p_b) / 2,   and for b with a and b swapped (d -> -d)."""

    @staticmethod
    def forward(ctx, logits_a: torch.Tensor, logits_b: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        rows, vocab = logits_a.shape
        grad_dtype = torch.float32 if logits_a.dtype == torch.float16 else logits_a.dtype
        wants_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grads = [torch.empty_like(logits_a, dtype=grad_dtype) for _ in range(2)] if wants_grad else []
        ctx.logits_dtype = logits_a.dtype
        total = torch.zeros((), dtype=torch.float32, device=logits_a.device)
        block = max(1, BLOCK_ELEMENTS // vocab)
        for start in range(0, rows, block):
            part, weight = slice(start, min(start + block, rows)), counted[start:start + block, None]  # (b, 1)
            log_a, log_b = (torch.log_softmax(x[part].float(), dim=-1) for x in (logits_a, logits_b))  # (b, V)
            p_a, p_b, d = log_a.exp(), log_b.exp(), log_a - log_b
            kl_ab, kl_ba = (p_a * d).sum(-1, keepdim=True), -(p_b * d).sum(-1, keepdim=True)  # (b, 1)
            total += ((kl_ab + kl_ba) * weight).sum() / 2
            if grads:
                grads[0][part] = ((d - kl_ab).mul_(p_a).add_(p_a).sub_(p_b)).mul_(weight / 2)
                grads[1][part] = ((d.neg_() - kl_ba).mul_(p_b).add_(p_b).sub_(p_a)).mul_(weight / 2)
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved gradient is a constant: no double backward
    def backward(ctx, grad_loss: torch.Tensor):
        grad_a, grad_b = ctx.saved_tensors
        return _chain(grad_a, grad_loss, ctx.logits_dtype), _chain(grad_b, grad_loss, ctx.logits_dtype), None


def _chain(grad: torch.Tensor, grad_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad_loss times the saved (N, V) gradient, in the logits' dtype. A plain `loss.backward()` passes 1:
    then the pass over (N, V) is skipped (2% of a bf16 step). The CPU tensor's `.item()` syncs nothing."""
    if grad_loss.item() != 1:
        grad = grad * grad_loss.to(grad.dtype)
    return grad.to(dtype)
