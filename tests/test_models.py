"""Network-level checks: masking of padded keys, block chaining, item table, step embedding."""

from __future__ import annotations

import pytest
import torch
from builders import diffurec

from diffurec_lightning.errors import ConfigError
from diffurec_lightning.models.approximators import (
    CrossAttentionApproximator,
    DiffuRecApproximator,
)
from diffurec_lightning.models.diffusion_module import DiffusionRecModule
from diffurec_lightning.models.embedding import ItemEmbedding

torch.set_num_threads(1)
APPROXIMATORS = {"diffurec": DiffuRecApproximator, "cross_attention": CrossAttentionApproximator}
SIZES = {"hidden_size": 16, "num_blocks": 3, "num_heads": 2, "dropout": 0.0, "num_steps": 8}


def _inputs(width: int, pad: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    real = width - pad
    seq_emb = torch.randn(2, real, 16, generator=g)
    x_t = torch.randn(2, 16, generator=g)
    lam = torch.randn(2, real, 16, generator=g)
    t = torch.tensor([3, 7])
    return seq_emb, x_t, lam, t


@pytest.mark.parametrize("name", list(APPROXIMATORS))
def test_padded_keys_cannot_change_the_output(name: str) -> None:
    torch.manual_seed(0)
    net = APPROXIMATORS[name](**SIZES).eval()
    seq_emb, x_t, lam, t = _inputs(5, 0)
    mask = torch.ones(2, 5, dtype=torch.bool)
    plain = net(seq_emb, mask, x_t, t, lam)
    # Three more positions of left padding holding garbage embeddings and lambdas.
    junk = torch.randn(2, 3, 16) * 100
    padded = net(
        torch.cat([junk, seq_emb], 1),
        torch.cat([torch.zeros(2, 3, dtype=torch.bool), mask], 1),
        x_t,
        t,
        torch.cat([junk, lam], 1),
    )
    torch.testing.assert_close(plain, padded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(APPROXIMATORS))
def test_every_block_feeds_the_next(name: str) -> None:
    torch.manual_seed(0)
    net = APPROXIMATORS[name](**SIZES).eval()
    seq_emb, x_t, lam, t = _inputs(4, 0)
    mask = torch.ones(2, 4, dtype=torch.bool)
    before = net(seq_emb, mask, x_t, t, lam)
    with torch.no_grad():  # the public code ignored every block but the last
        for p in net.blocks[0].parameters():
            p.add_(0.5)
    assert not torch.allclose(before, net(seq_emb, mask, x_t, t, lam))


@pytest.mark.parametrize("name", list(APPROXIMATORS))
def test_noised_target_reaches_the_output(name: str) -> None:
    torch.manual_seed(0)
    net = APPROXIMATORS[name](**SIZES).eval()
    seq_emb, x_t, lam, t = _inputs(4, 0)
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert not torch.allclose(net(seq_emb, mask, x_t, t, lam), net(seq_emb, mask, x_t * 3, t, lam))
    assert not torch.allclose(
        net(seq_emb, mask, x_t, t, lam), net(seq_emb, mask, x_t, t + 1, lam)
    )  # the step embedding matters


def test_item_table_scores_never_include_padding() -> None:
    table = ItemEmbedding(num_items=5, hidden_size=4, dropout=0.0)
    x = torch.randn(3, 4)
    scores = table.scores(x)
    assert scores.shape == (3, 5)
    torch.testing.assert_close(scores[:, 0], x @ table.table.weight[1])


def test_item_init_choices() -> None:
    torch.manual_seed(0)
    small = ItemEmbedding(num_items=2000, hidden_size=64, dropout=0.0).table.weight.detach().std()
    ref = ItemEmbedding(num_items=2000, hidden_size=64, dropout=0.0, init="reference")
    assert (
        abs(float(small) - 0.02) < 0.002 and abs(float(ref.table.weight.detach().std()) - 1) < 0.05
    )
    with pytest.raises(ValueError, match="small_normal, reference"):
        ItemEmbedding(num_items=2, hidden_size=4, dropout=0.0, init="zeros")


def test_position_embedding_counts_from_the_most_recent_item() -> None:
    torch.manual_seed(0)
    emb = ItemEmbedding(
        num_items=9, hidden_size=8, dropout=0.0, position_embedding=True, max_len=6
    ).eval()
    short = emb(torch.tensor([[3, 4, 5]]))
    long = emb(torch.tensor([[0, 0, 3, 4, 5]]))
    torch.testing.assert_close(short, long[:, 2:])


def test_evaluation_noise_depends_only_on_user_and_seed() -> None:
    torch.manual_seed(0)
    model = diffurec(num_items=30, **{**SIZES, "approximator": "cross_attention"}).eval()
    seq = torch.tensor([[0, 0, 1, 2], [5, 6, 7, 8], [0, 0, 0, 9]])
    batch = {"seq": seq, "user": torch.tensor([10, 11, 12]), "target": torch.tensor([3, 9, 10])}
    with torch.no_grad():
        together = model.eval_scores(batch)
        alone = model.eval_scores({k: v[2:] for k, v in batch.items()})
        trimmed = model.eval_scores({"seq": seq[2:, 3:], "user": batch["user"][2:]})
    torch.testing.assert_close(together[2:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, trimmed, rtol=1e-5, atol=1e-5)
    model.hparams.eval_seed = 1
    with torch.no_grad():
        assert not torch.allclose(model.eval_scores(batch), together)


def test_ensemble_averages_member_distributions() -> None:
    torch.manual_seed(0)
    model = diffurec(num_items=30, **SIZES, ensemble_size=3).eval()
    batch = {"seq": torch.tensor([[0, 1, 2], [4, 5, 6]]), "user": torch.tensor([0, 1])}
    with torch.no_grad():
        ensemble = model.eval_scores(batch)
        table = model.items.table.weight[1:]
        members = [torch.softmax(model.reverse(batch, m) @ table.t(), -1) for m in range(3)]
    # The log of the averaged distributions: ranks as the average does, and a prior can be
    # added to it (model.transition_prior).
    torch.testing.assert_close(ensemble, torch.log(sum(members) / 3))
    torch.testing.assert_close(ensemble.exp().sum(-1), torch.ones(2))


def test_eval_steps_run_a_respaced_reverse_process() -> None:
    batch = {"seq": torch.tensor([[0, 1, 2], [4, 5, 6]]), "user": torch.tensor([0, 1])}

    def model(**extra) -> DiffusionRecModule:
        torch.manual_seed(0)
        return diffurec(num_items=30, **SIZES, **extra).eval()

    with torch.no_grad():
        full, fewer = model().eval_scores(batch), model(sampler={"steps": 2}).eval_scores(batch)
        torch.testing.assert_close(fewer, model().eval_scores(batch, steps=2))
        torch.testing.assert_close(model(sampler={"steps": 8}).eval_scores(batch), full)
    assert not torch.allclose(fewer, full)
    with pytest.raises(ConfigError, match=r"model.sampler: sampler steps must be null or in 1..8"):
        model(sampler={"steps": 9})


def test_val_steps_change_validation_only() -> None:
    """model.val_sampler: training's validation is cheaper, test keeps model.sampler."""
    batch = {
        "seq": torch.tensor([[0, 1, 2], [4, 5, 6], [0, 0, 7]]),
        "user": torch.tensor([0, 1, 2]),
        "target": torch.tensor([3, 7, 8]),
    }
    torch.manual_seed(0)
    model = diffurec(num_items=30, **SIZES, val_sampler={"name": "ddim", "steps": 2}).eval()
    with torch.no_grad():
        model.validation_step(batch, 0)
        model.test_step(batch, 0)
        cheap = model.rank_batch(batch, steps=2, sampler="ddim")
        full = model.rank_batch(batch)
    validation = model.val_metrics.compute()
    test = model.test_metrics.compute()
    model.val_metrics.reset()
    model.val_metrics.update(cheap)
    assert validation == model.val_metrics.compute()
    model.test_metrics.reset()
    model.test_metrics.update(full)
    assert test == model.test_metrics.compute()
    with pytest.raises(ConfigError, match="model.val_sampler: unknown sampler"):
        diffurec(num_items=30, **SIZES, val_sampler={"name": "bogus"})
    with pytest.raises(ConfigError, match="model.val_sampler: sampler steps"):
        diffurec(num_items=30, **SIZES, val_sampler={"steps": 99})
