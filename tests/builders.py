"""Modules built in Python from a few flat sizes, for tests: the config nodes (``net``,
``diffusion``, ``optimizer``, ``scheduler``) written out as the model YAMLs write them."""

from __future__ import annotations

from typing import Any

from diffurec_lightning.models.dcrec_module import DCRecModule
from diffurec_lightning.models.diffusion_module import DiffusionRecModule
from diffurec_lightning.models.sequential_module import SequentialRecModule

APPROXIMATORS = {
    "diffurec": "diffurec_lightning.models.approximators.DiffuRecApproximator",
    "cross_attention": "diffurec_lightning.models.approximators.CrossAttentionApproximator",
}
NETWORKS = {
    "sasrec": "diffurec_lightning.models.sequential.SASRec",
    "gru4rec": "diffurec_lightning.models.sequential.GRU4Rec",
}
OPTIMIZERS = {"adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW"}


def gaussian(num_steps: int, schedule: str, variance: str) -> dict[str, Any]:
    return {
        "_target_": "diffurec_lightning.diffusion.gaussian.GaussianDiffusion",
        "num_steps": num_steps,
        "schedule": schedule,
        "variance": variance,
    }


def optimisation(
    lr: float, weight_decay: float, optimizer: str, betas: Any, step_size: int, gamma: float
) -> dict[str, Any]:
    return {
        "optimizer": {
            "_target_": OPTIMIZERS.get(optimizer, optimizer),
            "_partial_": True,
            "lr": lr,
            "weight_decay": weight_decay,
            "betas": tuple(betas),
        },
        "scheduler": {
            "_target_": "torch.optim.lr_scheduler.StepLR",
            "_partial_": True,
            "step_size": step_size,
            "gamma": gamma,
        },
    }


def approximator_node(
    name: str = "diffurec",
    *,
    hidden_size: int = 128,
    num_blocks: int = 4,
    num_heads: int = 4,
    dropout: float = 0.1,
    num_steps: int = 32,
    block_output_dropout: bool = False,
) -> dict[str, Any]:
    return {
        "_target_": APPROXIMATORS[name],
        "hidden_size": hidden_size,
        "num_blocks": num_blocks,
        "num_heads": num_heads,
        "dropout": dropout,
        "num_steps": num_steps,
        "block_output_dropout": block_output_dropout,
    }


def diffurec(
    *,
    num_items: int,
    approximator: str = "diffurec",
    hidden_size: int = 128,
    num_blocks: int = 4,
    num_heads: int = 4,
    dropout: float = 0.1,
    block_output_dropout: bool = False,
    num_steps: int = 32,
    schedule: str = "trunc_lin",
    variance: str = "fixed_large",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    betas: Any = (0.9, 0.999),
    lr_step_size: int = 100,
    lr_gamma: float = 0.1,
    **rest: Any,
) -> DiffusionRecModule:
    """A DiffusionRecModule from the sizes the tests vary (the rest passed through)."""
    net = approximator_node(
        approximator,
        hidden_size=hidden_size,
        num_blocks=num_blocks,
        num_heads=num_heads,
        dropout=dropout,
        num_steps=num_steps,
        block_output_dropout=block_output_dropout,
    )
    return DiffusionRecModule(
        num_items=num_items,
        net=net,
        diffusion=gaussian(num_steps, schedule, variance),
        hidden_size=hidden_size,
        **optimisation(lr, weight_decay, optimizer, betas, lr_step_size, lr_gamma),
        **rest,
    )


def dcrec(
    *,
    num_items: int,
    hidden_size: int = 128,
    num_blocks: int = 4,
    num_heads: int = 4,
    dropout: float = 0.1,
    attention_mask: str = "keys",
    num_steps: int = 50,
    schedule: str = "linear",
    variance: str = "posterior",
    lr: float = 0.004,
    lr_gamma: float = 1.0,
    **rest: Any,
) -> DCRecModule:
    """A DCRecModule from the sizes the tests vary (the rest passed through)."""
    net = {
        "_target_": "diffurec_lightning.models.dcrec.DualConditionalTransformer",
        "hidden_size": hidden_size,
        "num_blocks": num_blocks,
        "num_heads": num_heads,
        "dropout": dropout,
        "num_steps": num_steps,
        "attention_mask": attention_mask,
    }
    return DCRecModule(
        num_items=num_items,
        net=net,
        diffusion=gaussian(num_steps, schedule, variance),
        hidden_size=hidden_size,
        **optimisation(lr, 0.0, "adam", (0.9, 0.999), 100, lr_gamma),
        **rest,
    )


def sequential(
    *,
    num_items: int,
    network: dict[str, Any],
    hidden_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    betas: Any = (0.9, 0.999),
    lr_step_size: int = 100,
    lr_gamma: float = 1.0,
    **rest: Any,
) -> SequentialRecModule:
    """A SequentialRecModule; ``network`` = {name: sasrec | gru4rec, its own keys}."""
    options = {key: value for key, value in network.items() if key != "name"}
    net = {"_target_": NETWORKS[network["name"]], "hidden_size": hidden_size, **options}
    return SequentialRecModule(
        num_items=num_items,
        net=net,
        hidden_size=hidden_size,
        **optimisation(lr, weight_decay, optimizer, betas, lr_step_size, lr_gamma),
        **rest,
    )
