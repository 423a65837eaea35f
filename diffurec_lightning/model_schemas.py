"""Typed schemas of the ``model`` config group (Hydra structured configs).

Each model YAML names its schema first in its defaults list (``- diffurec_schema``; a YAML that
extends another, such as ``diffurecsys.yaml``, inherits it), so composition checks the types and
the keys of the whole model, its ``net``, ``diffusion``, ``optimizer`` and ``scheduler`` nodes
included: ``model.diffusion.num_steps=abc``, ``model.optimizer.lr=abc`` or
``model.hidden_size=abc`` fail before any data is read, and a misspelt key in a model YAML is an
error instead of an ignored setting.

The schemas carry types only (every field is ``???``): the YAML files stay the one place for the
values and their documentation. A composed config keeps the schema's key order, so each
dataclass lists its keys in the order of its YAML. The ``_target_`` of a node may name another
class that takes the same arguments (``torch.optim.AdamW`` for ``Adam``,
``CrossAttentionApproximator`` for ``DiffuRecApproximator``); a class with other arguments is a
new schema here plus its YAML. Keys can still be added on purpose from the command line with
``+`` (``+model.optimizer.amsgrad=true``; cli.check_overrides checks that the class takes it).
"""

from dataclasses import dataclass, field

from omegaconf import MISSING

# OmegaConf reads these annotations at runtime: no `from __future__ import annotations` here.


# -- nodes the modules instantiate themselves (_target_ = the class) -----------------------------
@dataclass
class GaussianDiffusionSchema:
    _target_: str = MISSING
    num_steps: int = MISSING
    schedule: str = MISSING
    variance: str = MISSING


@dataclass
class ApproximatorSchema:
    """DiffuRecApproximator | CrossAttentionApproximator (models/approximators.py)."""

    _target_: str = MISSING
    hidden_size: int = MISSING
    num_blocks: int = MISSING
    num_heads: int = MISSING
    dropout: float = MISSING
    block_output_dropout: bool = MISSING
    num_steps: int = MISSING


@dataclass
class DualConditionalTransformerSchema:
    _target_: str = MISSING
    hidden_size: int = MISSING
    num_blocks: int = MISSING
    num_heads: int = MISSING
    dropout: float = MISSING
    num_steps: int = MISSING
    attention_mask: str = MISSING


@dataclass
class SASRecNetSchema:
    _target_: str = MISSING
    hidden_size: int = MISSING
    num_blocks: int = MISSING
    num_heads: int = MISSING
    dropout: float = MISSING
    block_output_dropout: bool = MISSING


@dataclass
class GRU4RecNetSchema:
    _target_: str = MISSING
    hidden_size: int = MISSING
    state_size: int = MISSING
    num_layers: int = MISSING
    dropout: float = MISSING


@dataclass
class AdamSchema:
    """torch.optim.Adam | torch.optim.AdamW, built as a partial (the module passes the params)."""

    _target_: str = MISSING
    _partial_: bool = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    betas: list[float] = MISSING


@dataclass
class StepLRSchema:
    _target_: str = MISSING
    _partial_: bool = MISSING
    step_size: int = MISSING
    gamma: float = MISSING


@dataclass
class SamplerSchema:
    """The reverse process (``sampler``; ``val_sampler``, where null = the sampler's)."""

    name: str | None = MISSING
    steps: int | None = MISSING


# -- the models (one per YAML that does not extend another) -------------------------------------
@dataclass
class DiffuRecSchema:
    """diffurec.yaml, and diffurecsys_v1.yaml / diffurecsys.yaml, which extend it."""

    _target_: str = MISSING
    _recursive_: bool = MISSING
    _convert_: str = MISSING
    name: str = MISSING
    num_items: int = MISSING
    hidden_size: int = MISSING
    emb_dropout: float = MISSING
    position_embedding: bool = MISSING
    item_init: str = MISSING
    max_len: int = MISSING
    net: ApproximatorSchema = field(default_factory=ApproximatorSchema)
    diffusion: GaussianDiffusionSchema = field(default_factory=GaussianDiffusionSchema)
    timestep_sampler: str = MISSING
    lambda_scale: float = MISSING
    offset_noise_strength: float = MISSING
    ensemble_size: int = MISSING
    sampler: SamplerSchema = field(default_factory=SamplerSchema)
    val_sampler: SamplerSchema = field(default_factory=SamplerSchema)
    eval_seed: int = MISSING
    optimizer: AdamSchema = field(default_factory=AdamSchema)
    scheduler: StepLRSchema | None = field(default_factory=StepLRSchema)
    ks: list[int] = MISSING
    monitor: str = MISSING
    predict_k: int = MISSING


@dataclass
class DCRecSchema:
    _target_: str = MISSING
    _recursive_: bool = MISSING
    _convert_: str = MISSING
    name: str = MISSING
    num_items: int = MISSING
    hidden_size: int = MISSING
    emb_dropout: float = MISSING
    item_init: str = MISSING
    position_init: str = MISSING
    max_len: int = MISSING
    net: DualConditionalTransformerSchema = field(default_factory=DualConditionalTransformerSchema)
    diffusion: GaussianDiffusionSchema = field(default_factory=GaussianDiffusionSchema)
    prior_offset_strength: float = MISSING
    offset_in_training: bool = MISSING
    stop_target_gradient: bool = MISSING
    prior_positions: str = MISSING
    sampler: SamplerSchema = field(default_factory=SamplerSchema)
    val_sampler: SamplerSchema = field(default_factory=SamplerSchema)
    lambda_start: float = MISSING
    lambda_floor: float = MISSING
    lambda_epochs: int = MISSING
    lambda_power: float = MISSING
    ensemble_size: int = MISSING
    eval_seed: int = MISSING
    optimizer: AdamSchema = field(default_factory=AdamSchema)
    scheduler: StepLRSchema | None = field(default_factory=StepLRSchema)
    ks: list[int] = MISSING
    monitor: str = MISSING
    predict_k: int = MISSING


@dataclass
class SASRecSchema:
    _target_: str = MISSING
    _recursive_: bool = MISSING
    _convert_: str = MISSING
    name: str = MISSING
    num_items: int = MISSING
    objective: str = MISSING
    hidden_size: int = MISSING
    emb_dropout: float = MISSING
    position_embedding: bool = MISSING
    item_init: str = MISSING
    max_len: int = MISSING
    net: SASRecNetSchema = field(default_factory=SASRecNetSchema)
    optimizer: AdamSchema = field(default_factory=AdamSchema)
    scheduler: StepLRSchema | None = field(default_factory=StepLRSchema)
    ks: list[int] = MISSING
    monitor: str = MISSING
    predict_k: int = MISSING


@dataclass
class GRU4RecSchema(SASRecSchema):
    """SASRec's module keys (same module class) with the GRU encoder's ``net``."""

    net: GRU4RecNetSchema = field(default_factory=GRU4RecNetSchema)  # type: ignore[assignment]


@dataclass
class PopSchema:
    _target_: str = MISSING
    _convert_: str = MISSING
    name: str = MISSING
    num_items: int = MISSING
    ks: list[int] = MISSING
    monitor: str = MISSING
    predict_k: int = MISSING


@dataclass
class MarkovSchema:
    _target_: str = MISSING
    _convert_: str = MISSING
    name: str = MISSING
    num_items: int = MISSING
    order: int = MISSING
    last_weight: float = MISSING
    second_last_weight: float = MISSING
    backoff: float = MISSING
    normalize: bool = MISSING
    ks: list[int] = MISSING
    monitor: str = MISSING
    predict_k: int = MISSING


# ConfigStore names in the model group (``- <name>`` first in a model YAML's defaults list).
MODEL_SCHEMAS = {
    "diffurec_schema": DiffuRecSchema,
    "dcrec_schema": DCRecSchema,
    "sasrec_schema": SASRecSchema,
    "gru4rec_schema": GRU4RecSchema,
    "pop_schema": PopSchema,
    "markov_schema": MarkovSchema,
}
