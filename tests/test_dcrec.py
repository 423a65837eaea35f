"""DCRec: sequence layout, loss terms, CondLN, samplers, masking, reproducibility, learning, toys."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from builders import dcrec
from torch import nn

from diffurec_lightning.config import compose_config
from diffurec_lightning.diffusion.gaussian import GaussianDiffusion, evenly_spaced_steps
from diffurec_lightning.diffusion.samplers import SAMPLERS, sample, sampling_process
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.models.base import RecommenderModule
from diffurec_lightning.models.dcrec import CondLayerNorm, DualConditionalTransformer
from diffurec_lightning.models.dcrec_module import (
    DCRecModule,
    annealed_lambda,
    dcrec_loss_terms,
    diffusion_sequences,
    sequence_mask,
)
from diffurec_lightning.train import train

torch.set_num_threads(1)

TINY = {"hidden_size": 16, "num_blocks": 2, "num_heads": 2, "num_steps": 20, "max_len": 8}
SMALL = [
    "model.hidden_size=32",
    "model.net.num_blocks=2",
    "model.net.num_heads=2",
    "model.diffusion.num_steps=20",
    "model.sampler.name=skip",
    "model.sampler.steps=4",
]


def tiny_model(**overrides) -> DCRecModule:
    torch.manual_seed(0)
    return dcrec(num_items=12, **{**TINY, **overrides}).eval()


def batch_of(seq: list[list[int]], users: list[int] | None = None) -> dict[str, torch.Tensor]:
    seq_t = torch.tensor(seq)
    return {
        "seq": seq_t,
        "target": torch.ones(len(seq), dtype=torch.long),
        "user": torch.tensor(users if users is not None else list(range(len(seq)))),
    }


# -- sequence layout -----------------------------------------------------------------------
def test_sequences_are_aligned_with_the_target_last() -> None:
    history, prior = diffusion_sequences(torch.tensor([[0, 0, 3, 4]]), max_len=10)
    assert history.tolist() == [[0, 0, 0, 3, 4]]  # H0, one column earlier than S0
    assert prior.tolist() == [[0, 0, 3, 4, 0]]  # K = S0 with padding in the target slot
    assert sequence_mask(prior).tolist() == [[False, False, True, True, True]]


def test_full_history_drops_its_oldest_item_from_s0_only() -> None:
    history, prior = diffusion_sequences(torch.tensor([[1, 2, 3, 4]]), max_len=4)
    assert history.tolist() == [[1, 2, 3, 4]]
    assert prior.tolist() == [[2, 3, 4, 0]]


def test_window_of_a_user_does_not_depend_on_the_batch_width() -> None:
    narrow = diffusion_sequences(torch.tensor([[3, 4]]), max_len=6)
    wide = diffusion_sequences(torch.tensor([[0, 0, 0, 3, 4]]), max_len=6)
    for a, b in zip(narrow, wide, strict=True):
        assert a[:, -3:].tolist() == b[:, -3:].tolist() and not b[:, :-3].any()


# -- loss ----------------------------------------------------------------------------------
def test_annealed_lambda_matches_the_formula() -> None:
    assert annealed_lambda(0) == pytest.approx(0.203)
    assert annealed_lambda(100) == pytest.approx(0.2 * (1 / 3) ** 9 + 0.003)
    assert annealed_lambda(150) == annealed_lambda(400) == pytest.approx(0.003)


def test_loss_terms_on_hand_made_tensors() -> None:
    x_start_pred = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])  # (B=1, W=2, d=2)
    x_start = torch.tensor([[[5.0, 5.0], [1.0, 1.0]]])
    scores = torch.tensor([[0.0, math.log(3.0)]])  # items 1, 2
    target = torch.tensor([2])
    terms = dcrec_loss_terms(x_start_pred, x_start, torch.tensor([[False, True]]), scores, target)
    assert terms["prior"].item() == pytest.approx(2.0)  # (2^2 + 0^2) / 2, padded row ignored
    assert terms["mse"].item() == pytest.approx(1.0)  # ((2-1)^2 + (0-1)^2) / 2
    assert terms["ce"].item() == pytest.approx(math.log(4 / 3))  # -log(3 / (1 + 3))
    full = dcrec_loss_terms(x_start_pred, x_start, torch.tensor([[True, True]]), scores, target)
    assert full["prior"].item() == pytest.approx(1.5)  # (1 + 1 + 4 + 0) / 4


def test_training_loss_combines_the_terms_with_lambda() -> None:
    model = tiny_model().train()
    logged: dict[str, float] = {}
    model.log = lambda key, value, **kw: logged.__setitem__(key, float(value))
    model.log_dict = lambda values, **kw: logged.update({k: float(v) for k, v in values.items()})
    loss = model.training_step(batch_of([[0, 2, 3], [4, 5, 6]]), 0)
    loss.backward()
    lam = logged["train/lambda"]
    assert lam == pytest.approx(0.203)
    expected = (
        logged["train/loss_prior"]
        + (1 - lam) * logged["train/loss_mse"]
        + lam * logged["train/loss_ce"]
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert model.items.table.weight.grad is not None


@pytest.mark.parametrize("prior_positions", ["real", "all"])
@pytest.mark.parametrize("stop_target_gradient", [True, False])
def test_one_batch_loss_terms_match_the_formulas(
    prior_positions: str, stop_target_gradient: bool
) -> None:
    """L_T, L_t and L_z of one training step, recomputed from their definitions: S_t from
    q(S_t | S0) with the offset noise, the three terms from S0_hat, and the gradient that
    reaches the item table through (or not through) the L_t target."""
    model = tiny_model(
        dropout=0.0,
        emb_dropout=0.0,
        prior_positions=prior_positions,
        stop_target_gradient=stop_target_gradient,
    ).train()
    batch = batch_of([[0, 2, 3], [4, 5, 6]])
    batch["target"] = torch.tensor([7, 8])
    captured: dict = {}
    model.net.register_forward_hook(
        lambda module, args, output: captured.update(x_t=args[0], t=args[1], pred=output)
    )
    logged: dict[str, float] = {}
    model.log = lambda key, value, **kw: logged.__setitem__(key, float(value))
    model.log_dict = lambda values, **kw: logged.update({k: float(v) for k, v in values.items()})
    torch.manual_seed(5)
    loss = model.training_step(batch, 0)

    # S0 = [i_1..i_n, target], K = [i_1..i_n, pad] over the window W = L + 1 = 4.
    start = torch.tensor([[0, 2, 3, 7], [4, 5, 6, 8]])
    prior_ids = torch.tensor([[0, 2, 3, 0], [4, 5, 6, 0]])
    real = torch.tensor([[False, True, True, True], [True, True, True, True]])
    x0 = model.items(start)  # with its graph: the L_t target may be trainable
    torch.manual_seed(5)
    noise = torch.randn(2, 4, 16)
    t = torch.randint(20, (2,))
    assert torch.equal(captured["t"], t)
    abar = torch.cumprod(1 - model.diffusion.betas, 0)[t][:, None, None]
    offset = model.hparams.prior_offset_strength * model.items(
        prior_ids
    )  # the history prior K, scaled
    expected_x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * (noise + offset)
    torch.testing.assert_close(captured["x_t"], expected_x_t)

    pred = captured["pred"]  # S0_hat (B, W, d)
    squares = pred.pow(2).mean(-1)  # (B, W)
    positions = real if prior_positions == "real" else torch.ones_like(real)
    prior = squares[positions].sum() / positions.sum()
    target_slot = x0[:, -1].detach() if stop_target_gradient else x0[:, -1]
    mse = (pred[:, -1] - target_slot).pow(2).mean()
    logits = pred[:, -1] @ model.items.table.weight[1:].t()
    ce = -(torch.log_softmax(logits, -1)[torch.arange(2), batch["target"] - 1]).mean()
    assert logged["train/loss_prior"] == pytest.approx(prior.item(), rel=1e-5)
    assert logged["train/loss_mse"] == pytest.approx(mse.item(), rel=1e-5)
    assert logged["train/loss_ce"] == pytest.approx(ce.item(), rel=1e-5)
    lam = annealed_lambda(0)
    by_hand = prior + (1 - lam) * mse + lam * ce
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    table = model.items.table.weight
    (grad,) = torch.autograd.grad(loss, table, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(by_hand, table, retain_graph=True)
    torch.testing.assert_close(grad, expected_grad)
    # The L_t target's own gradient: zero when detached, not when trainable.
    (through_target,) = torch.autograd.grad(mse, x0, retain_graph=True, allow_unused=True)
    assert (through_target is None) is stop_target_gradient


def test_authors_initialisation_of_the_item_and_position_tables() -> None:
    small = tiny_model(item_init="small_normal", position_init="small_normal")
    authors = tiny_model()  # the default
    for table in ("table", "positions"):
        assert getattr(small.items, table).weight.std().item() == pytest.approx(0.02, rel=0.2)
        assert getattr(authors.items, table).weight.std().item() == pytest.approx(1.0, rel=0.2)
    cfg = compose_config(["model=dcrec", "model.position_init=small_normal", "paths.output_dir=x"])
    assert cfg.model.position_init == "small_normal"
    with pytest.raises(ConfigError, match="position_init"):
        tiny_model(position_init="xavier")
    with pytest.raises(ConfigError, match="prior_positions"):
        tiny_model(prior_positions="some")


# -- network -------------------------------------------------------------------------------
def test_condln_with_zero_modulation_is_layernorm_at_init() -> None:
    torch.manual_seed(0)
    x, condition = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    expected = nn.LayerNorm(16)(x)
    torch.testing.assert_close(CondLayerNorm(16, dropout=0.1).eval()(x, condition), expected)
    network = DualConditionalTransformer(
        hidden_size=16, num_blocks=2, num_heads=2, dropout=0.1, num_steps=20
    )
    for norm in [network.out_norm, *(block.cond_norm for block in network.blocks)]:
        torch.testing.assert_close(norm(x, condition), expected)


def test_network_output_ignores_padded_positions() -> None:
    torch.manual_seed(0)
    network = DualConditionalTransformer(
        hidden_size=16, num_blocks=2, num_heads=2, dropout=0.0, num_steps=20
    ).eval()
    x_t, history = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    seq_mask = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    history_mask = torch.tensor([[False, False, False, True, True, True], [True] * 6])
    t = torch.tensor([3, 7])
    out = network(x_t, t, history, seq_mask, history_mask)
    assert out.shape == (2, 6, 16)
    x_t2, history2 = x_t.clone(), history.clone()
    x_t2[0, :2] = 100.0
    history2[0, :3] = -100.0
    out2 = network(x_t2, t, history2, seq_mask, history_mask)
    torch.testing.assert_close(out2[0, 2:], out[0, 2:])
    torch.testing.assert_close(out2[1], out[1])


def test_reference_query_masking_lets_padding_leak() -> None:
    batch = batch_of([[0, 0, 3, 4]])
    changed = {}
    for mask in ("keys", "queries"):
        model = tiny_model(attention_mask=mask)
        with torch.no_grad():
            before = model.eval_scores(batch)
            model.items.table.weight[0] += 1.0  # real positions attend to padding in "queries"
            after = model.eval_scores(batch)
        assert torch.isfinite(after).all()
        changed[mask] = (before - after).abs().max().item()
    assert changed["keys"] == 0.0 and changed["queries"] > 0.0
    with pytest.raises(ConfigError, match="keys, queries"):
        tiny_model(attention_mask="rows")


# -- samplers ------------------------------------------------------------------------------
def _recording_denoiser(x0: torch.Tensor, visited: list[int]):
    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        visited.append(int(t[0]))
        return x0.expand_as(x_t)

    return denoise


@pytest.mark.parametrize("steps", [None, 20, 5, 1])
def test_skip_visits_the_same_levels_as_ancestral(steps: int | None) -> None:
    diffusion = GaussianDiffusion(num_steps=20, schedule="linear", variance="posterior")
    x0 = torch.randn(1, 3, 4)
    visits = {}
    for name in SAMPLERS:
        visits[name] = []
        out = sample(
            name,
            diffusion,
            _recording_denoiser(x0, visits[name]),
            torch.randn(2, 3, 4),
            lambda i: torch.randn(2, 3, 4),
            steps=steps,
        )
        torch.testing.assert_close(out, x0.expand(2, 3, 4))  # an exact x0 predictor is kept
    expected = list(reversed(evenly_spaced_steps(20, steps or 20)))
    assert visits["skip"] == visits["ancestral"] == expected


def test_all_steps_process_is_the_trained_one() -> None:
    diffusion = GaussianDiffusion(num_steps=20, schedule="linear", variance="posterior")
    assert sampling_process(diffusion, 20) is diffusion
    respaced = diffusion.respaced(evenly_spaced_steps(20, 20))
    torch.testing.assert_close(respaced.alphas_cumprod, diffusion.alphas_cumprod)
    torch.testing.assert_close(respaced.betas, diffusion.betas)


def test_skip_re_noises_the_prediction_to_the_next_level() -> None:
    diffusion = GaussianDiffusion(num_steps=20, schedule="linear", variance="posterior")
    x0_hat, noise, offset = torch.randn(1, 4), torch.randn(1, 4), torch.randn(1, 4)
    inputs: list[torch.Tensor] = []

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inputs.append(x_t)
        return x0_hat

    sample(
        "skip", diffusion, denoise, torch.zeros(1, 4), lambda i: noise, steps=2, forward_mean=offset
    )
    abar = diffusion.alphas_cumprod[0]  # steps=2 keeps levels 0 and 19
    expected = abar.sqrt() * x0_hat + (1 - abar).sqrt() * (noise + offset)
    torch.testing.assert_close(inputs[1], expected)


# -- module --------------------------------------------------------------------------------
def test_shapes_and_one_evaluation_path() -> None:
    model = tiny_model()
    batch = batch_of([[0, 0, 3, 4], [1, 2, 3, 4]])
    with torch.no_grad():
        assert model.reverse_sequence(batch).shape == (2, 5, 16)
        assert model.reverse(batch).shape == (2, 16)
        assert model.eval_scores(batch).shape == (2, 12)
    for hook in ("validation_step", "test_step", "predict_step", "rank_batch"):
        assert getattr(DCRecModule, hook) is getattr(RecommenderModule, hook)


@pytest.mark.parametrize("sampler", [{"name": "ancestral"}, {"name": "skip", "steps": 3}])
def test_padding_never_changes_predictions(sampler: dict) -> None:
    model = tiny_model(sampler=sampler)
    base = batch_of([[0, 0, 3, 4], [5, 6, 7, 8]])
    wider = batch_of([[0, 0, 0, 0, 3, 4], [0, 0, 5, 6, 7, 8]])  # extra left padding
    with torch.no_grad():
        expected = model.eval_scores(base)
        torch.testing.assert_close(model.eval_scores(wider), expected)
        model.items.table.weight[0] += 1.0  # what padded positions hold changes
        torch.testing.assert_close(model.eval_scores(base), expected)


def test_a_users_scores_do_not_depend_on_the_batch() -> None:
    model = tiny_model()
    with torch.no_grad():
        together = model.eval_scores(batch_of([[0, 0, 3, 4], [1, 2, 3, 4]], users=[10, 11]))
        alone = model.eval_scores(batch_of([[3, 4]], users=[10]))
        other_seed = tiny_model(eval_seed=5).eval_scores(batch_of([[3, 4]], users=[10]))
    torch.testing.assert_close(alone[0], together[0])
    assert not torch.allclose(other_seed[0], together[0])


@pytest.mark.parametrize("name", ["ancestral", "skip"])
def test_reverse_steps_for_the_curves_tool(name: str) -> None:
    """steps=T' runs the configured sampler over T' levels: what model.sampler.steps=T' does."""
    batch = batch_of([[0, 3, 4], [5, 6, 7]])
    chosen = tiny_model(sampler={"name": name, "steps": 4})
    free = tiny_model(sampler={"name": name})
    with torch.no_grad():
        torch.testing.assert_close(free.eval_scores(batch, steps=4), chosen.eval_scores(batch))
        torch.testing.assert_close(free.eval_scores(batch, steps=20), free.eval_scores(batch))
        assert not torch.allclose(free.eval_scores(batch, steps=2), free.eval_scores(batch))


def test_ensemble_and_respaced_process_for_the_curves_tool() -> None:
    model = tiny_model(ensemble_size=2)
    batch = batch_of([[0, 3, 4]])
    with torch.no_grad():
        log_probs = model.eval_scores(batch, steps=3)  # an ensemble: log of the averaged softmax
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(1))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sampler": {"name": "bogus"}}, "ancestral, skip, ddim"),
        ({"sampler": {"name": "skip", "steps": 21}}, "1..20"),
        ({"prior_offset_strength": -1.0}, "prior_offset_strength"),
        ({"lambda_start": 0.9, "lambda_floor": 0.2}, "lambda"),
    ],
)
def test_bad_settings_raise_one_line_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_model(**overrides)


# -- training runs -------------------------------------------------------------------------
def run(out: Path, *overrides: str) -> dict:
    cfg = compose_config(
        [
            f"paths.output_dir={out}",
            "logger=csv",
            "model=dcrec",
            "callbacks.progress_bar=null",
            "callbacks.representation=null",
            *overrides,
        ]
    )
    return train(cfg)


def test_dcrec_learns_the_synthetic_rule(run_env: Path) -> None:
    results = run(
        run_env / "run",
        "data=synthetic",
        "trainer.max_epochs=4",
        "trainer.check_val_every_n_epoch=4",
        "model.emb_dropout=0.1",
        *SMALL,
    )
    assert results["test"]["test/hr@10"] > 0.9
    assert results["model"] == "dcrec"


def test_fast_dev_run_on_real_toys(run_env: Path) -> None:
    results = run(run_env / "run", "data=toys", "debug=fast", *SMALL)
    assert {"test/hr@10", "test/ndcg@20"} <= set(results["test"])
    assert results["dataset"] == "toys" and results["model"] == "dcrec"
