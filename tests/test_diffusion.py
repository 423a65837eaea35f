"""Diffusion math: schedules against their closed forms, q/p against method.md, noise, samplers."""

from __future__ import annotations

import math

import pytest
import torch

from diffurec_lightning.diffusion import (
    SCHEDULES,
    TIMESTEP_SAMPLERS,
    GaussianDiffusion,
    LossAwareSampler,
    UniformSampler,
    UserNoise,
    evenly_spaced_steps,
    get_betas,
    make_timestep_sampler,
    offset_noise,
)

T = 32


def _cosine_abar(x: float) -> float:
    return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2


def _trunc_cos_abar(x: float) -> float:
    return math.cos((x + 0.1) / 1.1 * math.pi / 2) ** 2


def _sqrt_abar(x: float) -> float:
    return 1 - math.sqrt(x + 0.0001)


# (schedule, step k, beta_k for T = 32), each written out from the schedule's definition.
CLOSED_FORMS = [
    ("linear", 0, 1000 / 32 * 1e-4),
    ("linear", 31, 1000 / 32 * 0.02),
    ("linear", 7, 0.003125 + 7 * (0.625 - 0.003125) / 31),
    ("cosine", 0, 1 - _cosine_abar(1 / 32) / _cosine_abar(0)),
    ("cosine", 15, 1 - _cosine_abar(16 / 32) / _cosine_abar(15 / 32)),
    ("cosine", 31, 0.999),  # abar(1) = 0: clipped
    ("sqrt", 0, 1 - _sqrt_abar(1 / 32) / _sqrt_abar(0)),
    ("sqrt", 10, 1 - _sqrt_abar(11 / 32) / _sqrt_abar(10 / 32)),
    ("sqrt", 31, 0.999),  # abar(1) < 0: clipped
    ("trunc_lin", 0, 0.013125),
    ("trunc_lin", 31, 0.635),
    ("trunc_lin", 12, 0.013125 + 12 * 0.621875 / 31),
    ("trunc_cos", 0, 1 - _trunc_cos_abar(0)),
    ("trunc_cos", 1, 1 - _trunc_cos_abar(1 / 32) / _trunc_cos_abar(0)),
    ("trunc_cos", 31, 1 - _trunc_cos_abar(31 / 32) / _trunc_cos_abar(30 / 32)),
    ("pw_lin", 0, 0.013125),
    ("pw_lin", 4, 0.013125 - 4 * 0.01 / 9),
    ("pw_lin", 9, 0.003125),
    ("pw_lin", 10, 0.003125),
    ("pw_lin", 20, 0.003125 + 10 * 0.621875 / 21),
    ("pw_lin", 31, 0.625),
]


@pytest.mark.parametrize(("name", "k", "expected"), CLOSED_FORMS)
def test_schedule_matches_closed_form(name: str, k: int, expected: float) -> None:
    betas = get_betas(name, T)
    assert betas.dtype == torch.float64
    assert betas.shape == (T,)
    assert betas[k].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_trunc_lin_as_in_method_md() -> None:
    # T = 32: linear from 0.01 + 0.1/T to 0.01 + 20/T.
    expected = [0.01 + 0.1 / 32 + k * (20 / 32 - 0.1 / 32) / 31 for k in range(32)]
    torch.testing.assert_close(
        get_betas("trunc_lin", 32), torch.tensor(expected, dtype=torch.float64)
    )
    # 0.01 + 20/T exceeds 1 for T = 10 and T = 20: the end becomes 0.01 + 1/T.
    ten = [0.02 + 0.01 * k for k in range(10)]
    torch.testing.assert_close(get_betas("trunc_lin", 10), torch.tensor(ten, dtype=torch.float64))
    assert get_betas("trunc_lin", 20)[-1].item() == pytest.approx(0.06)
    assert get_betas("trunc_lin", 21)[-1].item() == pytest.approx(0.01 + 20 / 21)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("num_steps", [20, 32, 100])
def test_betas_lie_in_unit_interval(name: str, num_steps: int) -> None:
    betas = get_betas(name, num_steps)
    assert bool((betas > 0).all() and (betas <= 1).all())


def test_schedule_errors() -> None:
    with pytest.raises(ValueError, match="choose one of: linear, cosine, sqrt, trunc_lin"):
        get_betas("quadratic", T)
    with pytest.raises(ValueError, match="num_steps"):
        get_betas("trunc_lin", 0)
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        get_betas("linear", 8)  # 0.02 * 1000/8 = 2.5
    with pytest.raises(ValueError, match="fixed_large, posterior"):
        GaussianDiffusion(variance="learned")


def _method_md_posterior(schedule: str, num_steps: int) -> tuple[list, list, list]:
    """c1, c2 and beta_tilde from method.md, in plain float64 Python."""
    betas = get_betas(schedule, num_steps).tolist()
    abar, prod = [], 1.0
    for beta in betas:
        prod *= 1 - beta
        abar.append(prod)
    c1, c2, var = [], [], []
    for s, beta in enumerate(betas):
        prev = abar[s - 1] if s > 0 else 1.0
        c1.append(beta * math.sqrt(prev) / (1 - abar[s]))
        c2.append((1 - prev) * math.sqrt(1 - beta) / (1 - abar[s]))
        var.append(beta * (1 - prev) / (1 - abar[s]))
    return c1, c2, var


@pytest.mark.parametrize("schedule", ["trunc_lin", "cosine"])
def test_posterior_matches_method_md(schedule: str) -> None:
    diffusion = GaussianDiffusion(num_steps=T, schedule=schedule)
    c1, c2, var = _method_md_posterior(schedule, T)
    torch.testing.assert_close(
        diffusion.posterior_mean_coef1, torch.tensor(c1, dtype=torch.float32)
    )
    torch.testing.assert_close(
        diffusion.posterior_mean_coef2, torch.tensor(c2, dtype=torch.float32)
    )
    torch.testing.assert_close(diffusion.posterior_variance, torch.tensor(var, dtype=torch.float32))

    generator = torch.Generator().manual_seed(0)
    x_start, x_t = torch.randn(2, 5, 8, generator=generator)  # (B, d) each
    t = torch.tensor([0, 1, 7, 30, 31])
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    c1_t, c2_t = torch.tensor(c1)[t, None], torch.tensor(c2)[t, None]
    torch.testing.assert_close(mean, (c1_t * x_start + c2_t * x_t).float())
    torch.testing.assert_close(variance, torch.tensor(var)[t, None].expand(5, 8).float())
    # The log is clipped at s = 0, where the posterior variance is 0.
    assert math.isclose(log_variance[0, 0].item(), math.log(var[1]), rel_tol=1e-6)
    assert math.isclose(log_variance[1, 0].item(), math.log(var[1]), rel_tol=1e-6)


def test_model_variances() -> None:
    betas = get_betas("trunc_lin", T)
    _, _, var = _method_md_posterior("trunc_lin", T)
    large = GaussianDiffusion(num_steps=T, variance="fixed_large").model_log_variance
    small = GaussianDiffusion(num_steps=T, variance="posterior").model_log_variance
    expected_large = [math.log(var[1])] + [math.log(b) for b in betas[1:].tolist()]
    expected_small = [math.log(var[1])] + [math.log(v) for v in var[1:]]
    torch.testing.assert_close(large, torch.tensor(expected_large, dtype=torch.float32))
    torch.testing.assert_close(small, torch.tensor(expected_small, dtype=torch.float32))


def test_buffers_are_float32_and_not_saved() -> None:
    diffusion = GaussianDiffusion()
    assert diffusion.num_steps == 32
    assert diffusion.alphas_cumprod.dtype == torch.float32
    assert torch.equal(diffusion.timestep_map, torch.arange(32))
    assert diffusion.state_dict() == {}


def test_q_sample() -> None:
    diffusion = GaussianDiffusion(num_steps=T)
    x_start, noise = torch.randn(2, 4, 6)
    t = torch.tensor([0, 5, 20, 31])
    abar = torch.cumprod(1 - get_betas("trunc_lin", T), 0)[t, None]
    expected = abar.sqrt() * x_start + (1 - abar).sqrt() * noise
    torch.testing.assert_close(diffusion.q_sample(x_start, t, noise), expected.float())


def test_p_sample_noise_only_before_last_step() -> None:
    diffusion = GaussianDiffusion(num_steps=T)
    x_start_pred, x_t = torch.randn(2, 3, 4)
    t = torch.tensor([0, 1, 31])
    mean, log_variance = diffusion.p_mean_variance(x_start_pred, x_t, t)
    x_prev = diffusion.p_sample(x_start_pred, x_t, t, torch.ones(3, 4))
    torch.testing.assert_close(x_prev[0], mean[0])
    torch.testing.assert_close(x_prev[1:] - mean[1:], torch.exp(0.5 * log_variance[1:]))


@pytest.mark.parametrize("variance", ["fixed_large", "posterior"])
def test_reverse_loop_with_oracle_ends_at_x0(variance: str) -> None:
    diffusion = GaussianDiffusion(num_steps=T, variance=variance)
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 16, generator=generator)  # (B, d)
    seen_steps = []

    def oracle(x_t: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        seen_steps.append(model_t[0].item())
        return x0

    noise_calls = []

    def noise_fn(i: int) -> torch.Tensor:
        noise_calls.append(i)
        return torch.randn(6, 16, generator=generator)

    x_T = torch.randn(6, 16, generator=generator)
    x_out, x_start_pred = diffusion.p_sample_loop(oracle, x_T, noise_fn)
    torch.testing.assert_close(x_out, x0, rtol=0, atol=1e-5)
    assert x_start_pred is x0
    assert seen_steps == list(range(T - 1, -1, -1))
    assert noise_calls == list(range(T - 1, 0, -1))


def test_reverse_loop_under_no_grad_and_autocast() -> None:
    diffusion = GaussianDiffusion(num_steps=8, schedule="cosine")
    net = torch.nn.Linear(16, 16)
    x_T = torch.randn(4, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        x_out, x_start_pred = diffusion.p_sample_loop(
            lambda x_t, t: net(x_t), x_T, lambda i: torch.randn(4, 16)
        )
    assert x_out.shape == (4, 16) and x_start_pred.shape == (4, 16)
    assert bool(torch.isfinite(x_out).all())
    assert not x_out.requires_grad


def test_respaced_all_steps_equals_original() -> None:
    for variance in ("fixed_large", "posterior"):
        diffusion = GaussianDiffusion(num_steps=T, schedule="trunc_lin", variance=variance)
        spaced = diffusion.respaced(range(T))
        assert spaced.num_steps == T
        assert torch.equal(spaced.timestep_map, diffusion.timestep_map)
        for name, buffer in diffusion.named_buffers():
            torch.testing.assert_close(getattr(spaced, name), buffer, msg=name)


def test_respaced_subset_keeps_alpha_bar_and_maps_steps() -> None:
    diffusion = GaussianDiffusion(num_steps=T, schedule="cosine")
    steps = evenly_spaced_steps(T, 8)
    spaced = diffusion.respaced(steps)
    assert spaced.num_steps == 8 and spaced.variance == diffusion.variance
    assert spaced.timestep_map.tolist() == steps
    torch.testing.assert_close(spaced.alphas_cumprod, diffusion.alphas_cumprod[steps])
    # Respacing twice composes the maps back to original indices.
    assert spaced.respaced([0, 7]).timestep_map.tolist() == [0, 31]
    seen = []
    x0 = torch.randn(2, 4)
    x_out, _ = spaced.p_sample_loop(
        lambda x_t, t: seen.append(t.tolist()) or x0, torch.randn(2, 4), lambda i: torch.randn(2, 4)
    )
    assert [s[0] for s in seen] == steps[::-1]
    torch.testing.assert_close(x_out, x0, rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        diffusion.respaced([0, T])


def test_evenly_spaced_steps() -> None:
    assert evenly_spaced_steps(32, 32) == list(range(32))
    assert evenly_spaced_steps(32, 2) == [0, 31]
    assert evenly_spaced_steps(32, 1) == [31]
    assert evenly_spaced_steps(32, 8) == [0, 4, 9, 13, 18, 22, 27, 31]
    for count in range(2, 33):
        steps = evenly_spaced_steps(32, count)
        assert len(set(steps)) == count and steps[0] == 0 and steps[-1] == 31
    with pytest.raises(ValueError):
        evenly_spaced_steps(4, 5)


@pytest.mark.parametrize("offset", [0.0, 2.0, -5.0])
def test_offset_noise_shifts_mean_only(offset: float) -> None:
    like = torch.zeros(4000, 64)
    noise = offset_noise(like, offset, generator=torch.Generator().manual_seed(0))
    assert noise.shape == like.shape
    assert noise.mean().item() == pytest.approx(0.1 * offset, abs=0.005)
    assert noise.std().item() == pytest.approx(1.0, abs=0.005)
    if offset == 0.0:
        plain = torch.randn(4000, 64, generator=torch.Generator().manual_seed(0))
        assert torch.equal(noise, plain)


def _draws(users: list[int], num_rows: list[int], max_rows: int) -> dict[int, list[torch.Tensor]]:
    """Per user: the real rows of two rows() calls and two vectors() calls."""
    noise = UserNoise(seed=7, users=torch.tensor(users), device="cpu")
    out = {user: [] for user in users}
    for _ in range(2):
        rows = noise.rows(torch.tensor(num_rows), max_rows, 8)  # (B, max_rows, 8)
        vectors = noise.vectors(8)  # (B, 8)
        for b, user in enumerate(users):
            assert torch.equal(
                rows[b, : max_rows - num_rows[b]], torch.zeros(max_rows - num_rows[b], 8)
            )
            out[user] += [rows[b, max_rows - num_rows[b] :], vectors[b]]
    return out


def test_user_noise_ignores_batch_composition() -> None:
    # Each user's row count is a property of the user (its history length), the padding is not.
    rows_of = {3: 2, 11: 5, 40: 0, 5: 1, 9: 3}
    first = _draws([3, 11, 40], [rows_of[u] for u in (3, 11, 40)], max_rows=5)
    second = _draws([9, 11, 5, 3, 40], [rows_of[u] for u in (9, 11, 5, 3, 40)], max_rows=7)
    for user in (3, 11, 40):
        for a, b in zip(first[user], second[user], strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(first[3][1], first[11][1])  # users get different streams
    other_seed = UserNoise(seed=8, users=torch.tensor([3]), device="cpu")
    other_seed.rows(torch.tensor([2]), 5, 8)
    assert not torch.equal(other_seed.vectors(8)[0], first[3][1])


def test_user_noise_rows_are_standard_normal_in_stream_order() -> None:
    noise = UserNoise(seed=0, users=torch.arange(64), device="cpu")
    rows = noise.rows(torch.full((64,), 10), 10, 32)
    assert rows.mean().item() == pytest.approx(0.0, abs=0.02)
    assert rows.std().item() == pytest.approx(1.0, abs=0.02)
    # One row-block per user, drawn in one go: row j is the j-th group of 32 stream values.
    single = UserNoise(seed=0, users=torch.tensor([5]), device="cpu").rows(
        torch.tensor([10]), 10, 32
    )
    assert torch.equal(single[0], rows[5])


def test_uniform_sampler() -> None:
    sampler = UniformSampler(num_steps=T)
    t, weights = sampler.sample(4096, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (4096,)
    assert t.min().item() == 0 and t.max().item() == T - 1
    assert torch.equal(weights, torch.ones(4096))
    sampler.update(t, torch.rand(4096))  # accepted and ignored


def test_loss_aware_sampler_follows_losses() -> None:
    sampler = LossAwareSampler(num_steps=4, history_per_term=3)
    uniform = torch.full((4,), 0.25, dtype=torch.float64)
    sampler.update(torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, 2]), torch.ones(10))  # step 3 short
    assert not sampler.warmed_up()
    torch.testing.assert_close(sampler.probabilities(), uniform)
    # Step 2 gets large losses; more than history_per_term at once keeps only the newest.
    sampler.update(torch.tensor([3, 3, 2, 2, 2, 2]), torch.tensor([1.0, 1.0, 0.0, 9.0, 9.0, 9.0]))
    assert sampler.warmed_up()
    p = sampler.probabilities()
    assert p.sum().item() == pytest.approx(1.0)
    assert p[2].item() > 0.6 > p[0].item()
    # sqrt(E[L^2]) = 9 for step 2 and 1 elsewhere: p = 0.999 * (9 or 1) / 12 + 0.001 / 4.
    assert p[2].item() == pytest.approx(0.999 * 9 / 12 + 0.00025)
    t, weights = sampler.sample(20000, "cpu", generator=torch.Generator().manual_seed(0))
    assert (t == 2).float().mean().item() == pytest.approx(p[2].item(), abs=0.02)
    torch.testing.assert_close(weights, (1 / (4 * p[t])).float())
    # Newer small losses push the old large ones out again.
    sampler.update(torch.tensor([2, 2, 2]), torch.ones(3))
    torch.testing.assert_close(sampler.probabilities(), uniform)


def test_loss_aware_sampler_state_round_trips() -> None:
    trained = LossAwareSampler(num_steps=4, history_per_term=3)
    trained.update(torch.arange(4).repeat(4), torch.arange(16, dtype=torch.float32))
    state = trained.state_dict()
    fresh = LossAwareSampler(num_steps=4, history_per_term=3)
    fresh.load_state_dict(state)
    assert fresh.warmed_up()
    torch.testing.assert_close(fresh.probabilities(), trained.probabilities(), rtol=0, atol=0)
    draws = [s.sample(64, "cpu", torch.Generator().manual_seed(1)) for s in (fresh, trained)]
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    # The ring buffer continues where it stopped: the same update gives the same state.
    for sampler in (fresh, trained):
        sampler.update(torch.tensor([1, 1]), torch.tensor([5.0, 6.0]))
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    state["history"][:] = 0  # a copy: the sampler's own history is untouched
    assert trained.warmed_up() and trained.state_dict()["history"].abs().sum() > 0
    untouched = LossAwareSampler(num_steps=4, history_per_term=3)
    untouched.load_state_dict({})  # a checkpoint without sampler state: the fresh state
    assert not untouched.warmed_up()
    with pytest.raises(ValueError, match="num_steps, history_per_term"):
        LossAwareSampler(num_steps=5, history_per_term=3).load_state_dict(trained.state_dict())
    UniformSampler(num_steps=4).load_state_dict(trained.state_dict())  # not its state: ignored
    assert UniformSampler(num_steps=4).state_dict() == {}


def test_make_timestep_sampler() -> None:
    assert isinstance(make_timestep_sampler("uniform", num_steps=T), UniformSampler)
    assert isinstance(make_timestep_sampler("loss_aware", num_steps=T), LossAwareSampler)
    assert set(TIMESTEP_SAMPLERS) == {"uniform", "loss_aware"}
    with pytest.raises(ValueError, match="choose one of: uniform, loss_aware"):
        make_timestep_sampler("importance", num_steps=T)
