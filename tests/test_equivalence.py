"""The fast paths give the results of a plain implementation written out here, on the same draws.

The reference below pads every history to max_len, computes every position of every block, uses
separate Q/K/V products and an explicit masked softmax, embeds the step per row, recomputes
everything at every reverse step, draws each user's noise call by call, one user at a time, and
ranks with a plain comparison. The module instead pads per batch, buckets by length, fuses
projections, caches the first cross-attention's keys and values, computes only the last position
in the last block, prefetches the noise and uses its own cross-entropy backward. Same seeds, so
losses, gradients, scores and metrics must agree within float32 tolerance.

Dropout is off in these comparisons (its masks are drawn for differently shaped tensors in the
two implementations); the cheaper dropout itself is tested for its distribution below.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from builders import diffurec

from diffurec_lightning.data.datamodule import SequenceDataModule
from diffurec_lightning.data.sources import SyntheticSource
from diffurec_lightning.diffusion import noise as noise_module
from diffurec_lightning.diffusion.noise import user_seed
from diffurec_lightning.models import functional
from diffurec_lightning.models.diffusion_module import DiffusionRecModule
from diffurec_lightning.models.functional import dropout
from diffurec_lightning.models.layers import additive_mask, attention, short_attention

torch.set_num_threads(1)
MAX_LEN = 10
NUM_ITEMS = 40
KS = (1, 5, 10)
TOL = {"rtol": 1e-4, "atol": 1e-5}
VARIANTS = {
    "diffurec": {"approximator": "diffurec"},
    "diffurecsys": {"approximator": "cross_attention", "offset_noise_strength": 1.0},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> SequenceDataModule:
    datamodule = SequenceDataModule(
        name="synthetic",
        data_dir=str(tmp_path_factory.mktemp("data")),
        max_len=MAX_LEN,
        batch_size=24,
        eval_batch_size=16,
        source=SyntheticSource(num_users=48, num_items=NUM_ITEMS, seed=3),
    )
    datamodule.setup()
    return datamodule


def make_model(variant: str, hidden_size: int = 32, **options: object) -> DiffusionRecModule:
    torch.manual_seed(0)
    model = diffurec(
        num_items=NUM_ITEMS,
        hidden_size=hidden_size,
        num_blocks=3,
        num_heads=2,
        dropout=0.0,
        emb_dropout=0.0,
        num_steps=8,
        max_len=MAX_LEN,
        eval_seed=5,
        ks=KS,
        **VARIANTS[variant],
        **options,
    )
    with torch.no_grad():  # trained-looking weights: a larger table spreads the scores
        model.items.table.weight.normal_(0, 0.5)
    return model


# -- the plain reference --------------------------------------------------------------------------
def left_pad(seq: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(seq, (width - seq.shape[1], 0))


def layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.t() + layer.bias


def multi_head(mha, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor):
    b, n, d = query.shape
    heads, size = mha.num_heads, d // mha.num_heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, x.shape[1], heads, size).permute(0, 2, 1, 3)

    q, k, v = (
        split(linear(mha.query, query)),
        split(linear(mha.key, context)),
        split(linear(mha.value, context)),
    )
    scores = q @ k.transpose(-1, -2) / math.sqrt(size)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = (torch.softmax(scores, -1) @ v).permute(0, 2, 1, 3).reshape(b, n, d)
    return linear(mha.out, out)


def self_block(block, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    normed = layer_norm(block.attn_norm, h)
    h = h + multi_head(block.attn, normed, normed, mask)
    inner = F.gelu(linear(block.ffn.up, layer_norm(block.ffn_norm, h)))
    return h + linear(block.ffn.down, inner)


def step_embedding(module, t: torch.Tensor) -> torch.Tensor:
    half = module.hidden_size // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    args = (t.float() * module.scale)[:, None] * freqs[None]  # scale = 1000 / T
    features = torch.cat([torch.cos(args), torch.sin(args)], -1)
    hidden = F.silu(linear(module.mlp[0], features))
    return linear(module.mlp[2], hidden)


def approximator(net, seq_emb, mask, x_t, t, lam) -> torch.Tensor:
    condition = lam * (x_t + step_embedding(net.step_embedding, t))[:, None, :]
    if net.__class__.__name__ == "DiffuRecApproximator":
        h = seq_emb + condition
        for block in net.blocks:
            h = self_block(block, h, mask)
    else:
        h = seq_emb
        for block in net.blocks:
            h = h + multi_head(block.cross, condition, layer_norm(block.cross_norm, h), mask)
            h = self_block(block.block, h, mask)
    return layer_norm(net.out_norm, h[:, -1])


def embed(model: DiffusionRecModule, seq: torch.Tensor) -> torch.Tensor:
    return layer_norm(model.items.norm, model.items.table.weight[seq])


def reference_loss(model: DiffusionRecModule, batch: dict, seed: int) -> torch.Tensor:
    """The training loss on the same draws as training_step: t, then the noise, then lambda."""
    hp, diffusion = model.hparams, model.diffusion
    seq, target = batch["seq"], batch["target"]
    torch.manual_seed(seed)
    t = torch.randint(model.diffusion.num_steps, (len(target),))
    noise = torch.randn(len(target), hp.hidden_size) + 0.1 * hp.offset_noise_strength
    lam = hp.lambda_scale + hp.lambda_scale * torch.randn(*seq.shape, hp.hidden_size)
    abar = torch.cumprod(1 - diffusion.betas.double(), 0).float()
    x_start = model.items.table.weight[target]
    x_t = abar[t].sqrt()[:, None] * x_start + (1 - abar[t]).sqrt()[:, None] * noise
    full = left_pad(seq, MAX_LEN)
    lam = F.pad(lam, (0, 0, MAX_LEN - seq.shape[1], 0))
    x0 = approximator(model.net, embed(model, full), full > 0, x_t, t, lam)
    scores = x0 @ model.items.table.weight[1:].t()
    return F.cross_entropy(scores, target - 1)


def reference_scores(
    model: DiffusionRecModule, seq: torch.Tensor, users: torch.Tensor, sampler: str = "ancestral"
):
    """The reverse process one user at a time, each user's noise drawn call by call.

    ancestral: x_{i-1} = c1 x0 + c2 x_i + sigma_i eps (fresh eps); ddim (eta 0): x_{i-1} =
    sqrt(abar_{i-1}) x0 + sqrt(1 - abar_{i-1}) (x_i - sqrt(abar_i) x0) / sqrt(1 - abar_i).
    """
    hp, diffusion = model.hparams, model.diffusion
    abar = diffusion.alphas_cumprod
    d, rows, scale = hp.hidden_size, [], hp.lambda_scale
    for history, user in zip(seq, users.tolist(), strict=True):
        history = left_pad(history[history > 0][None], MAX_LEN)
        length = int((history > 0).sum())
        generator = torch.Generator().manual_seed(user_seed(hp.eval_seed, user))

        def draw(n: int, generator=generator) -> torch.Tensor:
            return torch.empty(n).normal_(generator=generator)

        seq_emb, x = embed(model, history), draw(d)[None]
        for i in reversed(range(model.diffusion.num_steps)):
            lam = torch.zeros(1, MAX_LEN, d)
            lam[0, MAX_LEN - length :] = scale + scale * draw(length * d).view(length, d)
            t = torch.tensor([i])
            x0 = approximator(model.net, seq_emb, history > 0, x, t, lam)
            if sampler == "ddim":
                eps = (x - abar[i].sqrt() * x0) / (1 - abar[i]).sqrt()
                x = x0 if i == 0 else abar[i - 1].sqrt() * x0 + (1 - abar[i - 1]).sqrt() * eps
                continue
            x_prev = diffusion.posterior_mean_coef1[i] * x0 + diffusion.posterior_mean_coef2[i] * x
            if i > 0:  # the last step adds no noise
                x_prev = x_prev + torch.exp(0.5 * diffusion.model_log_variance[i]) * draw(d)[None]
            x = x_prev
        rows.append(x @ model.items.table.weight[1:].t())
    return torch.cat(rows)


def reference_metrics(scores: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    own = scores[torch.arange(len(target)), target - 1]
    ranks = (scores >= own[:, None]).sum(1).double()  # ties count against the target
    out = {}
    for k in KS:
        hit = ranks <= k
        out[f"val/hr@{k}"] = float(hit.double().mean())
        out[f"val/ndcg@{k}"] = float(torch.where(hit, 1 / torch.log2(ranks + 1), 0.0).mean())
    return out


# -- the comparisons ------------------------------------------------------------------------------
def train_batches(data: SequenceDataModule, count: int) -> list[dict]:
    dataset = data.dataset("train")
    batches = data.train_batch_sampler().global_batches()
    return [dataset.__getitems__(batch.tolist()) for batch in batches[:count]]


@pytest.fixture(params=[True, False], ids=["custom_kernels", "pytorch_ops"])
def kernels(request: pytest.FixtureRequest):
    """Both CPU paths: our autograd functions (the default) and PyTorch's own ops (the form
    torch.compile traces, bench.kernels=plain|compile)."""
    functional.set_custom_kernels(request.param)
    yield request.param
    functional.set_custom_kernels(True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_steps_match_the_reference(
    variant: str, data: SequenceDataModule, kernels: bool
) -> None:
    assert functional.custom_kernels(torch.device("cpu")) is kernels
    fast = make_model(variant).train()
    plain = copy.deepcopy(fast)
    fast_opt = fast.configure_optimizers()["optimizer"]
    plain_opt = plain.configure_optimizers()["optimizer"]
    batches = train_batches(data, 4)
    assert len({batch["seq"].shape[1] for batch in batches}) > 1  # several batch widths
    for step, batch in enumerate(batches):
        torch.manual_seed(100 + step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a Trainer
            loss = fast.training_step(batch, step)
        expected = reference_loss(plain, batch, seed=100 + step)
        torch.testing.assert_close(loss, expected, **TOL)
        for opt, value in ((fast_opt, loss), (plain_opt, expected)):
            opt.zero_grad()
            value.backward()
        for (name, p), q in zip(fast.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6, msg=name)
        fast_opt.step()
        plain_opt.step()


@pytest.mark.parametrize(
    ("variant", "hidden_size"), [("diffurec", 32), ("diffurecsys", 32), ("diffurecsys", 24)]
)
def test_validation_matches_the_reference(
    variant: str, hidden_size: int, data: SequenceDataModule
) -> None:
    """hidden 32 reads prefetched noise, hidden 24 draws it call by call (not whole blocks)."""
    model = make_model(variant, hidden_size).eval()
    dataset = data.dataset("val")
    with torch.inference_mode():
        for batch in data.val_dataloader():
            model.validation_step(batch, 0)
        metrics = {k: float(v) for k, v in model.val_metrics.compute().items()}
        everyone = dataset.__getitems__(list(range(len(dataset))))
        fast = model.eval_scores(everyone)
        plain = reference_scores(model, everyone["seq"], everyone["user"])
    torch.testing.assert_close(fast, plain, **TOL)
    expected = reference_metrics(plain, everyone["target"])
    assert metrics == pytest.approx(expected, abs=1e-6)
    assert 0 < expected["val/hr@10"] < 1  # the comparison is not vacuous


def test_ddim_validation_matches_the_reference(data: SequenceDataModule) -> None:
    """model.val_sampler=ddim: training's validation runs eta-0 DDIM, test keeps ancestral."""
    model = make_model("diffurecsys", val_sampler={"name": "ddim"}).eval()
    dataset = data.dataset("val")
    with torch.inference_mode():
        for batch in data.val_dataloader():
            model.validation_step(batch, 0)
        metrics = {k: float(v) for k, v in model.val_metrics.compute().items()}
        everyone = dataset.__getitems__(list(range(len(dataset))))
        ddim = reference_scores(model, everyone["seq"], everyone["user"], sampler="ddim")
        ancestral = reference_scores(model, everyone["seq"], everyone["user"])
        torch.testing.assert_close(model.eval_scores(everyone, sampler="ddim"), ddim, **TOL)
        torch.testing.assert_close(model.eval_scores(everyone), ancestral, **TOL)  # test's path
    assert metrics == pytest.approx(reference_metrics(ddim, everyone["target"]), abs=1e-6)
    assert not torch.allclose(ddim, ancestral)  # the two samplers differ


def test_user_scores_do_not_depend_on_the_batch(data: SequenceDataModule) -> None:
    model = make_model("diffurecsys").eval()
    dataset = data.dataset("val")
    everyone = dataset.__getitems__(list(range(len(dataset))))
    with torch.inference_mode():
        together = model.eval_scores(everyone)
        for start in range(0, len(dataset), 7):
            part = dataset.__getitems__(list(range(start, min(start + 7, len(dataset)))))
            torch.testing.assert_close(model.eval_scores(part), together[start : start + 7], **TOL)


@pytest.mark.parametrize("steps_per_chunk", [1, 3])
def test_noise_prefetched_in_chunks_reads_the_same_values(
    steps_per_chunk: int, data: SequenceDataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model("diffurecsys").eval()
    batch = next(iter(data.val_dataloader()))
    with torch.inference_mode():
        whole = model.eval_scores(batch)
        width, d = batch["seq"].shape[1], model.hparams.hidden_size
        budget = steps_per_chunk * len(batch["seq"]) * (width + 1) * d
        monkeypatch.setattr(noise_module, "_PREFETCH_VALUES", budget)
        torch.testing.assert_close(model.eval_scores(batch), whole, rtol=0, atol=0)


def test_dropout_keeps_the_distribution() -> None:
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    out = dropout(x, 0.1, training=True)
    kept = out != 0
    assert abs(float(kept.double().mean()) - 0.9) < 4 * math.sqrt(0.09 / len(x))
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.9))
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0, training=True) is x
    # Independent draws: neighbouring elements are uncorrelated.
    a, b = kept[:-1].double(), kept[1:].double()
    assert abs(float(((a - 0.9) * (b - 0.9)).mean())) < 4 * 0.09 / math.sqrt(len(a))


def test_attention_with_dropout_matches_sdpa_when_nothing_is_dropped() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 8), torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 8)
    mask = torch.rand(3, 1, 1, 6) > 0.3
    mask[..., -1] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention(q, k, v, mask, 1e-12, training=True), expected, **TOL)
    torch.testing.assert_close(attention(q, k, v, mask, 0.5, training=False), expected)


def test_short_attention_matches_sdpa_in_bf16() -> None:
    """bf16 attention without dropout on the CPU (the written-out products) equals SDPA: within
    bf16 rounding of a float64 reference, as close as SDPA's own bf16 kernel, on padded keys."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(64, 4, n, 32) for n in (9, 9, 9))
    mask = torch.rand(64, 1, 1, 9) > 0.4
    mask[..., -1] = True  # the most recent item is always real
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    low = [x.bfloat16() for x in (q, k, v)]
    fast = attention(*low, additive_mask(mask), 0.1, training=False)
    fused = F.scaled_dot_product_attention(*low, attn_mask=mask)
    assert fast.dtype == torch.bfloat16
    fast_error = float((fast.double() - reference).abs().max())
    fused_error = float((fused.double() - reference).abs().max())
    assert fast_error < 3 * fused_error + 1e-3 and fast_error < 0.05
    torch.testing.assert_close(short_attention(*low, mask), fast, rtol=0, atol=0)  # bool mask too


# -- the lean training functions against the plain compositions, on one explicit mask ------------
def _double(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_lean_dropout_functions_pass_gradcheck() -> None:
    torch.manual_seed(0)
    keep = torch.rand(2, 3, 4, 5) > 0.3
    x = _double(2, 3, 4, 5)
    assert torch.autograd.gradcheck(lambda x: functional._MaskedScale.apply(x, keep, 1.5), (x,))
    q, k, v = _double(2, 3, 4, 6), _double(2, 3, 5, 6), _double(2, 3, 5, 6)
    bias = torch.zeros(2, 1, 1, 5, dtype=torch.float64)
    bias[0, ..., :2] = float("-inf")  # padded keys
    attend = functional._DropoutAttention.apply
    assert torch.autograd.gradcheck(lambda *a: attend(*a, bias, keep, 1.5), (q, k, v))
    u, weight, bias = _double(2, 4, 8), _double(3, 8), _double(3)
    mask = torch.rand(2, 4, 8) > 0.3
    ffn = functional._GeluDropoutLinear.apply
    assert torch.autograd.gradcheck(lambda *a: ffn(a[0], mask, 1.5, *a[1:]), (u, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_functions_equal_the_plain_composition(dtype: torch.dtype) -> None:
    """Same values and gradients as the autograd composition, also under bf16 autocast."""
    torch.manual_seed(0)
    keep = torch.rand(2, 3, 4, 6) > 0.2
    q, k, v = (torch.randn(2, 3, n, 8, requires_grad=True) for n in (4, 6, 6))
    bias = torch.zeros(2, 1, 1, 6)
    bias[1, ..., :3] = float("-inf")
    u = torch.randn(2, 4, 32, requires_grad=True)
    mask = torch.rand(2, 4, 32) > 0.2
    layer = torch.nn.Linear(32, 8)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else TOL
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        lean = [
            functional._DropoutAttention.apply(q, k, v, bias, keep, 1.25),
            functional._GeluDropoutLinear.apply(u, mask, 1.25, layer.weight, layer.bias),
        ]
        plain = [
            torch.matmul(
                torch.softmax((q @ k.transpose(-1, -2) / 8**0.5).float() + bias, -1) * keep * 1.25,
                v,
            ),
            layer(F.gelu(u) * mask * 1.25),
        ]
    inputs = [q, k, v, u, layer.weight, layer.bias]
    for a, b in zip(lean, plain, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    lean_grads = torch.autograd.grad(sum(o.float().sum() for o in lean), inputs)
    plain_grads = torch.autograd.grad(sum(o.float().sum() for o in plain), inputs)
    for a, b in zip(lean_grads, plain_grads, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.slow  # make test-all: inductor compiles for about a minute on 2 cores
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_approximator_matches_eager(variant: str, data: SequenceDataModule) -> None:
    """bench.kernels=compile measures this: the approximator compiled in place (dynamic shapes)
    over PyTorch's ops returns what the eager one returns, for two batch widths."""
    model = make_model(variant).eval()
    compiled = copy.deepcopy(model)
    functional.set_custom_kernels(False)
    try:
        compiled.net.compile(dynamic=True)
        dataset = data.dataset("val")
        batches = data.eval_batch_sampler("val").global_batches()
        widths = {}
        for batch in batches:
            widths.setdefault(int(dataset.lengths[batch].max()), batch)
        assert len(widths) > 1
        with torch.inference_mode():
            for batch in list(widths.values())[:2]:
                items = dataset.__getitems__(batch.tolist())
                torch.testing.assert_close(
                    compiled.eval_scores(items), model.eval_scores(items), **TOL
                )
    finally:
        functional.set_custom_kernels(True)


def test_lean_cross_entropy_equals_pytorchs() -> None:
    """Loss and gradient of F.cross_entropy, on rows near one-hot and on a target so far below
    the top score that its probability underflows (the loss takes the logsumexp form there)."""
    torch.manual_seed(0)
    scores = torch.randn(6, 50) * 3
    scores[1, 7] += 40.0  # near one-hot, target elsewhere
    scores[2, 3] += 200.0  # the target's probability underflows in float32
    scores.requires_grad_(True)
    target = torch.tensor([0, 1, 4, 49, 7, 3])
    weights = torch.rand(6)
    lean = functional._CrossEntropy.apply(scores, target)
    plain = F.cross_entropy(scores, target, reduction="none")
    assert torch.isfinite(lean).all()
    torch.testing.assert_close(lean, plain)
    grads = [torch.autograd.grad((o * weights).sum(), scores)[0] for o in (lean, plain)]
    torch.testing.assert_close(*grads)
    x = _double(3, 7)
    cross_entropy = functional._CrossEntropy.apply
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, torch.tensor([0, 6, 2])), (x,))
