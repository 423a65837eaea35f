"""Model options as config flags: each does what its config comment says.

Blocks, hidden size, per-block output dropout (DiffuRec code), optimiser (Adam with L2 weight
decay or AdamW with decoupled decay, betas) and the offset-noise constant.
"""

from __future__ import annotations

import pytest
import torch
from builders import diffurec, sequential
from hydra.utils import instantiate

from diffurec_lightning.config import compose_config
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.models.layers import SelfAttentionBlock

torch.set_num_threads(1)

TINY = {"num_items": 12, "hidden_size": 16, "num_heads": 2, "num_steps": 8, "max_len": 8}


def model_from_config(model: str, *overrides: str) -> torch.nn.Module:
    cfg = compose_config([f"model={model}", "paths.output_dir=unused", *overrides])
    torch.manual_seed(0)
    return instantiate(cfg.model, num_items=12)


def test_block_output_dropout_drops_the_block_output_in_training_only() -> None:
    torch.manual_seed(0)
    plain = SelfAttentionBlock(16, 2, dropout=0.5)
    dropped = SelfAttentionBlock(16, 2, dropout=0.5, output_dropout=True)
    dropped.load_state_dict(plain.state_dict())  # the flag adds no parameters
    x, mask = torch.randn(4, 6, 16), torch.ones(4, 1, 1, 6, dtype=torch.bool)
    zeros = (dropped.train()(x, mask) == 0).float().mean().item()
    assert zeros == pytest.approx(0.5, abs=0.1)
    assert (plain.train()(x, mask) == 0).float().mean().item() == 0.0
    torch.testing.assert_close(dropped.eval()(x, mask), plain.eval()(x, mask))


@pytest.mark.parametrize(
    ("model", "flag", "blocks"),
    [
        ("diffurec", "model.net.block_output_dropout", lambda m: m.net.blocks),
        ("diffurecsys", "model.net.block_output_dropout", lambda m: m.net.blocks),
        ("sasrec", "model.net.block_output_dropout", lambda m: m.net.blocks),
    ],
)
def test_block_output_dropout_flag_reaches_every_block(model: str, flag: str, blocks) -> None:
    def outputs(module: torch.nn.Module) -> list:
        return [getattr(block, "block", block).output_dropout for block in blocks(module)]

    assert all(dropout is None for dropout in outputs(model_from_config(model)))
    assert all(dropout is not None for dropout in outputs(model_from_config(model, f"{flag}=true")))


def test_num_blocks_and_hidden_size() -> None:
    torch.manual_seed(0)
    module = diffurec(**TINY, num_blocks=3, dropout=0.0, emb_dropout=0.0).eval()
    assert len(module.net.blocks) == 3
    assert module.items.table.weight.shape == (13, 16)
    seq = torch.tensor([[0, 2, 3, 4], [5, 6, 7, 8]])
    emb, lam = module.items(seq), torch.full((2, 4, 16), 0.001)
    x_t, t = torch.randn(2, 16), torch.tensor([1, 5])
    with torch.no_grad():
        out = module.net(emb, seq > 0, x_t, t, lam)
        assert out.shape == (2, 16)
        # Blocks are chained: the first block's weights reach the output through the others
        # (a weight, not a bias: a constant shift would vanish in the next LayerNorm).
        module.net.blocks[0].ffn.up.weight.mul_(-1.0)
        assert not torch.allclose(module.net(emb, seq > 0, x_t, t, lam), out)
    wide = model_from_config("diffurec", "model.hidden_size=32", "model.net.num_blocks=2")
    assert wide.items.table.weight.shape[1] == 32 and len(wide.net.blocks) == 2


@pytest.mark.parametrize("offset", [0.0, 5.0])
def test_offset_shifts_the_training_noise_mean(offset: float) -> None:
    torch.manual_seed(0)
    module = diffurec(**TINY, num_blocks=1, offset_noise_strength=offset).train()
    noises: list[torch.Tensor] = []
    q_sample = module.diffusion.q_sample
    module.diffusion.q_sample = lambda x, t, noise: noises.append(noise) or q_sample(x, t, noise)
    module.log = lambda *args, **kwargs: None
    seq = torch.randint(1, 13, (2048, 4))
    module.training_step({"seq": seq, "target": seq[:, -1], "user": torch.arange(2048)}, 0)
    (noise,) = noises  # 32768 values: the mean's standard error is 0.0055
    assert noise.mean().item() == pytest.approx(0.1 * offset, abs=0.03)
    assert noise.std().item() == pytest.approx(1.0, abs=0.02)


def _one_step(optimizer: str, weight_decay: float) -> tuple[torch.optim.Optimizer, dict]:
    """One optimiser step with zero gradients: only the weight decay moves the weights."""
    torch.manual_seed(0)
    module = sequential(
        num_items=12,
        network={"name": "gru4rec", "state_size": 8},
        hidden_size=8,
        lr=0.01,
        weight_decay=weight_decay,
        optimizer=optimizer,
        betas=(0.8, 0.9),
    )
    opt = module.configure_optimizers()["optimizer"]
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(module.named_parameters())
    return opt, {name: (before[name], after[name].detach()) for name in before}


def test_adamw_decays_the_weights_decoupled_and_adam_through_the_gradient() -> None:
    opt, weights = _one_step("adamw", 0.1)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"]
    assert tuple(opt.param_groups[0]["betas"]) == (0.8, 0.9)  # a list from the config node
    for before, after in weights.values():  # w <- w (1 - lr wd), nothing else
        torch.testing.assert_close(after, before * (1 - 0.01 * 0.1))
    opt, weights = _one_step("adam", 0.1)
    assert type(opt) is torch.optim.Adam
    before, after = weights["items.table.weight"]
    # L2 in the gradient (g = wd w), normalised by Adam: the first step is lr g / (|g| + eps),
    # about lr sign(w) whatever |w|; AdamW's would be lr wd w, 500 times smaller here.
    g = 0.1 * before
    torch.testing.assert_close(before - after, 0.01 * g / (g.abs() + 1e-8), atol=1e-7, rtol=1e-4)
    for before, after in _one_step("adam", 0.0)[1].values():
        torch.testing.assert_close(after, before)
    with pytest.raises(ConfigError, match="model.optimizer: .*torch.optim.Nope"):
        _one_step("torch.optim.Nope", 0.0)
    with pytest.raises(ConfigError, match="model.optimizer: Invalid learning rate: -1"):
        sequential(num_items=12, network={"name": "gru4rec"}, hidden_size=8, lr=-1)
    override = "model.optimizer._target_=torch.optim.AdamW"
    module = model_from_config("sasrec", override)
    assert type(module.configure_optimizers()["optimizer"]) is torch.optim.AdamW
    assert module.hparams.optimizer["betas"] == [0.9, 0.999]
