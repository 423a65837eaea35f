"""Training-time building blocks that are cheaper than their PyTorch counterparts on CPU.

Each one computes the same function as the plain composition named in its docstring; what
changes is what is kept for the backward pass (bool masks instead of float ones, recomputing an
element-wise activation instead of storing it) and how the dropout mask's random bits are drawn.
At max_len 50 and batch 512 this cuts a training step's peak memory by about a third
(docs/performance.md).

All of them are CPU tricks, used only where ``custom_kernels`` says so (the CPU): on CUDA each
function here is PyTorch's own (F.dropout, scaled_dot_product_attention, F.cross_entropy), whose
fused kernels and device generator are the fast path there.

Dtypes: under autocast the inputs of the matrix products may be bfloat16; backward passes compute
in the dtype of the incoming gradient and return gradients in the dtype of each input.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

_ENABLED = True  # set_custom_kernels(False): PyTorch's own ops on the CPU too (bench.kernels)


def custom_kernels(device: torch.device) -> bool:
    """Whether the functions below replace PyTorch's on ``device``: on the CPU only, where they
    were measured (docs/performance.md); elsewhere PyTorch's fused kernels win. The one switch."""
    return device.type == "cpu" and _ENABLED


def set_custom_kernels(enabled: bool) -> None:
    """Turn the CPU functions below on (the default) or off for this process. Off, every layer
    runs PyTorch's own ops, the form torch.compile traces (the bench's ``kernels`` option
    compares the two)."""
    global _ENABLED
    _ENABLED = enabled


def uniform(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """float32 U[0, 1) values with 24 random bits each, reproducible under torch.manual_seed.

    On the CPU they come from NumPy's PCG64, seeded by one draw from torch's generator: it fills
    about twice as fast as torch.rand, whose CPU kernel steps mt19937 serially, element by element.
    """
    if not custom_kernels(device):
        return torch.rand(shape, device=device)
    seed = int(torch.randint(0, 2**62, (1,)))
    values = np.random.default_rng(seed).random(math.prod(shape), dtype=np.float32)
    return torch.from_numpy(values).view(shape)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool mask, each element True (kept) with probability 1 - p (exact up to 2^-24)."""
    return torch.ge(uniform(shape, device), p)


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale, saving only the bool mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, F.dropout's distribution: zero each element with probability p, scale the
    rest by 1 / (1 - p). Half the random bits of bernoulli_ (which off Intel CPUs draws them
    serially) and a bool mask for backward."""
    if not training or p == 0.0:
        return x
    if not custom_kernels(x.device):
        return F.dropout(x, p, training=True)
    return _MaskedScale.apply(x, keep_mask(x.shape, p, x.device), 1.0 / (1.0 - p))


def _probabilities(q, k, bias) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, Q, L)
    # The softmax runs in float32 at least (bfloat16 scores are widened first).
    return torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)) + bias, -1)


class _DropoutAttention(torch.autograd.Function):
    """dropout(softmax(q k^T / sqrt(d/H) + bias)) @ v that keeps q, k, v and a bool mask for
    backward and recomputes the (B, H, Q, L) probabilities there, as flash attention does,
    instead of storing three float tensors of that size."""

    @staticmethod
    def forward(ctx, q, k, v, bias, keep, scale: float):
        probs = _probabilities(q, k, bias)
        ctx.save_for_backward(q, k, v, bias, keep)
        ctx.scale = scale
        return torch.matmul(probs.mul_(keep).mul_(scale).to(v.dtype), v)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, bias, keep = ctx.saved_tensors
        probs = _probabilities(q, k, bias)
        dtype = grad.dtype
        dropped = probs.mul(keep).mul_(ctx.scale).to(dtype)
        grad_v = torch.matmul(dropped.transpose(-2, -1), grad).to(v.dtype)
        g = torch.matmul(grad, v.to(dtype).transpose(-2, -1)).to(probs.dtype)
        g = g.mul_(keep).mul_(ctx.scale)
        grad_scores = probs.mul_(g - (g * probs).sum(-1, keepdim=True))  # softmax backward
        grad_scores = grad_scores.mul_(q.shape[-1] ** -0.5).to(dtype)
        grad_q = torch.matmul(grad_scores, k.to(dtype)).to(q.dtype)
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q.to(dtype)).to(k.dtype)
        return grad_q, grad_k, grad_v, None, None, None


def dropout_attention(q, k, v, bias: torch.Tensor, p: float) -> torch.Tensor:
    """dropout(softmax(q k^T / sqrt(d/H) + bias), p) @ v for training: q (B, H, Q, d/H), k and v
    (B, H, L, d/H), bias an additive float mask broadcasting to (B, H, Q, L)."""
    if not custom_kernels(q.device):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
    shape = (*q.shape[:-1], k.shape[-2])
    keep = keep_mask(torch.Size(shape), p, q.device)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # not views of a fused projection
    return _DropoutAttention.apply(q, k, v, bias, keep, 1.0 / (1.0 - p))


class _GeluDropoutLinear(torch.autograd.Function):
    """linear(gelu(u) * keep * scale, weight, bias), recomputing the activation in backward
    instead of storing it (it is 4 d wide, the largest tensor of a block)."""

    @staticmethod
    def forward(ctx, u, keep, scale: float, weight, bias):
        hidden = F.gelu(u).mul_(keep).mul_(scale)
        ctx.save_for_backward(u, keep, weight)
        ctx.scale = scale
        return F.linear(hidden.to(u.dtype), weight.to(u.dtype), bias.to(u.dtype))

    @staticmethod
    def backward(ctx, grad):
        u, keep, weight = ctx.saved_tensors
        dtype = grad.dtype
        hidden = F.gelu(u).mul_(keep).mul_(ctx.scale).to(dtype)
        flat_grad = grad.reshape(-1, grad.shape[-1])
        grad_weight = (flat_grad.t() @ hidden.reshape(-1, hidden.shape[-1])).to(weight.dtype)
        grad_bias = flat_grad.sum(0).to(weight.dtype)
        grad_hidden = (grad @ weight.to(dtype)).mul_(keep).mul_(ctx.scale)
        grad_u = torch.ops.aten.gelu_backward(grad_hidden.to(u.dtype), u)
        return grad_u, None, None, grad_weight, grad_bias


def gelu_dropout_linear(
    u: torch.Tensor, p: float, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """linear(dropout(gelu(u), p), weight, bias) for training (u: the up-projection, (..., 4d))."""
    if not custom_kernels(u.device):
        return F.linear(F.dropout(F.gelu(u), p, training=True), weight, bias)
    keep = keep_mask(u.shape, p, u.device)
    return _GeluDropoutLinear.apply(u, keep, 1.0 / (1.0 - p), weight, bias)


class _CrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of float32 scores that exponentiates the (B, N) scores once: forward
    keeps the softmax p for backward, d loss / d scores = (p - onehot) * grad, where
    F.cross_entropy's log-softmax backward exponentiates all B x N log-probabilities again (and
    fills a zero (B, N) gradient of the gather first). The loss is -log p[target], except on
    rows where p[target] underflows, which take the exact logsumexp form."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1)  # (B, N)
        target_probs = probs.gather(1, target[:, None]).squeeze(1)
        losses = -torch.log(target_probs)
        far = (target_probs < _SMALLEST_PROB).nonzero().squeeze(1)  # rare: 70+ nats below the top
        if len(far):
            losses[far] = torch.logsumexp(scores[far], dim=-1) - scores[far, target[far]]
        ctx.save_for_backward(probs, target)
        return losses

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        probs, target = ctx.saved_tensors
        grad_scores = probs * grad[:, None]  # (B, N)
        rows = torch.arange(len(target), device=target.device)
        grad_scores[rows, target] -= grad
        return grad_scores, None


_SMALLEST_PROB = 1e-30  # far above float32's smallest normal (1.2e-38): -log p is exact above it


def cross_entropy(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(scores, target, reduction="none") for (B, N) float32 scores and 0-based
    targets (B,), with a cheaper backward on the CPU (the all-item loss is a large share of a
    step)."""
    if not custom_kernels(scores.device):
        return F.cross_entropy(scores, target, reduction="none")
    return _CrossEntropy.apply(scores, target)
