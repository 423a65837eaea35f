"""Typed schemas of the ``model`` config group (Hydra structured configs).

Each model YAML names its schema first in its defaults list (``- diffurec_schema``; a YAML that
extends another, such as ``diffurecsys.yaml``, inherits it), so composition checks the types and
the keys of the whole model, its ``net``, ``diffusion``, ``optimizer`` and ``scheduler`` nodes
included: ``model.diffusion.num_steps=abc``, ``model.optimizer.lr=abc`` or
``model.hidden_size=abc`` fail before any data is read, and a misspelt key in a model YAML is an
error instead of an ignored setting.

The schemas carry types only (every field is ``???``): the YAML files stay the one place for the
values and their documentation. A composed config keeps the schema's key order (a base class's
shared keys first), not its YAML's; nothing reads the keys in order. The ``_target_`` of a node
may name another class that takes the same arguments (``torch.optim.AdamW`` for ``Adam``,
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
class _TransformerSchema:
    """The keys every transformer encoder takes; each net adds its own after them."""

    _target_: str = MISSING
    hidden_size: int = MISSING
    num_blocks: int = MISSING
    num_heads: int = MISSING
    dropout: float = MISSING


@dataclass
class ApproximatorSchema(_TransformerSchema):
    """DiffuRecApproximator | CrossAttentionApproximator (models/approximators.py)."""

    block_output_dropout: bool = MISSING
    num_steps: int = MISSING


@dataclass
class DualConditionalTransformerSchema(_TransformerSchema):
    num_steps: int = MISSING
    attention_mask: str = MISSING


@dataclass
class SASRecNetSchema(_TransformerSchema):
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
# Shared keys live in a base class, declared once; dataclass inheritance puts a base's keys first.
@dataclass
class _ModuleSchema:
    """The keys of every module: its class, the data's item count and the evaluation."""

    _target_: str = MISSING
    _convert_: str = MISSING
    name: str = MISSING
    num_items: int = MISSING
    ks: list[int] = MISSING
    monitor: str = MISSING
    predict_k: int = MISSING


@dataclass
class _TrainedModuleSchema(_ModuleSchema):
    """The keys of the gradient-trained modules (they build their nested nodes themselves)."""

    _recursive_: bool = MISSING
    hidden_size: int = MISSING
    emb_dropout: float = MISSING
    item_init: str = MISSING
    max_len: int = MISSING
    optimizer: AdamSchema = field(default_factory=AdamSchema)
    scheduler: StepLRSchema | None = field(default_factory=StepLRSchema)


@dataclass
class _DiffusionModuleSchema(_TrainedModuleSchema):
    """The keys of the diffusion family (DiffuRec, DCRec): forward and reverse process."""

    diffusion: GaussianDiffusionSchema = field(default_factory=GaussianDiffusionSchema)
    sampler: SamplerSchema = field(default_factory=SamplerSchema)
    val_sampler: SamplerSchema = field(default_factory=SamplerSchema)
    ensemble_size: int = MISSING
    eval_seed: int = MISSING


@dataclass
class DiffuRecSchema(_DiffusionModuleSchema):
    """diffurec.yaml, and diffurecsys_v1.yaml / diffurecsys.yaml, which extend it."""

    position_embedding: bool = MISSING
    net: ApproximatorSchema = field(default_factory=ApproximatorSchema)
    timestep_sampler: str = MISSING
    lambda_scale: float = MISSING
    offset_noise_strength: float = MISSING
    transition_prior: float = MISSING


@dataclass
class DCRecSchema(_DiffusionModuleSchema):
    position_init: str = MISSING
    net: DualConditionalTransformerSchema = field(default_factory=DualConditionalTransformerSchema)
    prior_offset_strength: float = MISSING
    offset_in_training: bool = MISSING
    stop_target_gradient: bool = MISSING
    prior_positions: str = MISSING
    lambda_start: float = MISSING
    lambda_floor: float = MISSING
    lambda_epochs: int = MISSING
    lambda_power: float = MISSING


@dataclass
class SASRecSchema(_TrainedModuleSchema):
    objective: str = MISSING
    position_embedding: bool = MISSING
    transition_prior: float = MISSING
    net: SASRecNetSchema = field(default_factory=SASRecNetSchema)


@dataclass
class GRU4RecSchema(SASRecSchema):
    """SASRec's module keys (same module class) with the GRU encoder's ``net``."""

    net: GRU4RecNetSchema = field(default_factory=GRU4RecNetSchema)  # type: ignore[assignment]


@dataclass
class PopSchema(_ModuleSchema):
    """Pop has no keys beyond the common ones."""


@dataclass
class MarkovSchema(_ModuleSchema):
    order: int = MISSING
    last_weight: float = MISSING
    second_last_weight: float = MISSING
    backoff: float = MISSING
    normalize: bool = MISSING


# ConfigStore names in the model group (``- <name>`` first in a model YAML's defaults list).
MODEL_SCHEMAS = {
    "diffurec_schema": DiffuRecSchema,
    "dcrec_schema": DCRecSchema,
    "sasrec_schema": SASRecSchema,
    "gru4rec_schema": GRU4RecSchema,
    "pop_schema": PopSchema,
    "markov_schema": MarkovSchema,
}
