"""Upgrade a checkpoint of the flat-hyperparameter layout to the config-object layout.

Before issue 13 the modules took flat keys (``lr``, ``lr_gamma``, ``approximator``, ``num_blocks``,
``network: {name: ...}``, ``delta``, ``offset`` ...) and built their parts from name registries.
Now ``net``, ``diffusion``, ``optimizer`` and ``scheduler`` are config nodes, ``delta`` is
``lambda_scale`` (DiffuRec) or ``prior_offset_strength`` (DCRec), ``offset`` is
``offset_noise_strength``, ``eval_sampler``/``eval_steps`` are ``sampler: {name, steps}`` and
``val_sampler``/``val_steps`` ``val_sampler: {name, steps}``, and every module keeps its
network as ``net``. ``upgrade`` maps one
layout onto the other without changing a weight, so the upgraded model scores exactly as before.
Run through ``python -m diffurec_lightning.checkpoints FILE`` (checkpoints.py).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from diffurec_lightning.checkpoints import MODEL_CLASS

_MODELS = "diffurec_lightning.models"
APPROXIMATORS = {
    "diffurec": f"{_MODELS}.approximators.DiffuRecApproximator",
    "cross_attention": f"{_MODELS}.approximators.CrossAttentionApproximator",
}
NETWORKS = {"sasrec": f"{_MODELS}.sequential.SASRec", "gru4rec": f"{_MODELS}.sequential.GRU4Rec"}
OPTIMIZERS = {"adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW"}
GAUSSIAN = "diffurec_lightning.diffusion.gaussian.GaussianDiffusion"


def _optimisation(hp: dict[str, Any]) -> None:
    hp["optimizer"] = {
        "_target_": OPTIMIZERS[hp.pop("optimizer", "adam")],
        "_partial_": True,
        "lr": hp.pop("lr", 1e-3),
        "weight_decay": hp.pop("weight_decay", 0.0),
        "betas": list(hp.pop("betas", (0.9, 0.999))),
    }
    hp["scheduler"] = {
        "_target_": "torch.optim.lr_scheduler.StepLR",
        "_partial_": True,
        "step_size": hp.pop("lr_step_size", 100),
        "gamma": hp.pop("lr_gamma", 0.1),
    }


def _diffusion(hp: dict[str, Any], schedule: str, variance: str) -> dict[str, Any]:
    return {
        "_target_": GAUSSIAN,
        "num_steps": hp.pop("num_steps"),
        "schedule": hp.pop("schedule", schedule),
        "variance": hp.pop("variance", variance),
    }


def _blocks(hp: dict[str, Any], steps: int, dropout: float) -> dict[str, Any]:
    return {
        "hidden_size": hp["hidden_size"],
        "num_blocks": hp.pop("num_blocks", 4),
        "num_heads": hp.pop("num_heads", 4),
        "dropout": hp.pop("dropout", dropout),
        "num_steps": steps,
    }


def _upgrade_hparams(hp: dict[str, Any]) -> tuple[str, str]:
    """Rewrite ``hp`` in place; return (model class, old network attribute)."""
    _optimisation(hp)
    if "network" in hp:  # SequentialRecModule
        network = dict(hp.pop("network"))
        net = {"_target_": NETWORKS[network.pop("name")], "hidden_size": hp["hidden_size"]}
        hp["net"] = {**net, **network}
        return f"{_MODELS}.sequential_module.SequentialRecModule", "network"
    if "lambda_start" in hp:  # DCRecModule
        diffusion = _diffusion(hp, "linear", "posterior")
        net = {"_target_": f"{_MODELS}.dcrec.DualConditionalTransformer"}
        net.update(_blocks(hp, diffusion["num_steps"], 0.1))
        net["attention_mask"] = hp.pop("attention_mask", "keys")
        hp.update(net=net, diffusion=diffusion, prior_offset_strength=hp.pop("delta", 0.1))
        hp.setdefault("val_sampler", None)  # validations ran the sampler
        return f"{_MODELS}.dcrec_module.DCRecModule", "network"
    diffusion = _diffusion(hp, "trunc_lin", "fixed_large")  # DiffusionRecModule
    net = {"_target_": APPROXIMATORS[hp.pop("approximator", "diffurec")]}
    net.update(_blocks(hp, diffusion["num_steps"], 0.1))
    net["block_output_dropout"] = hp.pop("block_output_dropout", False)
    hp.update(net=net, diffusion=diffusion)
    hp["lambda_scale"] = hp.pop("delta", 0.001)
    hp["offset_noise_strength"] = hp.pop("offset", 0.0)
    hp["sampler"] = {
        "name": hp.pop("eval_sampler", "ancestral"),
        "steps": hp.pop("eval_steps", None),
    }
    hp["val_sampler"] = {"name": hp.pop("val_sampler", None), "steps": hp.pop("val_steps", None)}
    return f"{_MODELS}.diffusion_module.DiffusionRecModule", "approximator"


def upgrade(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint in the config-object layout (same weights, network under ``net.``)."""
    hp = dict(checkpoint["hyper_parameters"])
    model_class, old = _upgrade_hparams(hp)
    state = OrderedDict(
        (f"net.{key[len(old) + 1 :]}" if key.startswith(f"{old}.") else key, value)
        for key, value in checkpoint["state_dict"].items()
    )
    return {**checkpoint, "hyper_parameters": hp, "state_dict": state, MODEL_CLASS: model_class}
