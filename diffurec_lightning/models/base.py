"""What every recommender module shares: construction, optimiser, exact full-ranking evaluation.

A subclass provides ``training_step`` and ``eval_scores(batch) -> (B, N)`` scores of items 1..N;
validation, test (with per-user ranks kept for case studies) and predict_step are the same for
all models, so every model is measured by one code path. Diffusion models derive from
``DiffusionRecommender`` instead and provide only ``reverse`` (their reverse process).

Construction: the parts that are objects (``net``, ``diffusion``, ``optimizer``, ``scheduler``)
arrive as plain config nodes (``{"_target_": ..., **keys}``), and the module instantiates them
itself with ``build``. Hyperparameters therefore stay plain data, which is what lets the stock
``Module.load_from_checkpoint(path)`` rebuild a model from its checkpoint alone, under the
weights-only unpickler (an instantiated network could not be stored or rebuilt that way).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn
from torchmetrics import CatMetric

from diffurec_lightning.checkpoints import MODEL_CLASS, plain
from diffurec_lightning.diffusion.noise import UserNoise
from diffurec_lightning.diffusion.samplers import check_sampler
from diffurec_lightning.diffusion.timesteps import make_timestep_sampler
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.metrics import TopKMetrics, target_ranks, top_k_items
from diffurec_lightning.models.embedding import ItemEmbedding
from diffurec_lightning.models.transitions import TransitionPrior

Batch = dict[str, torch.Tensor]
Node = Mapping[str, Any]

# The sampler of validation, test and predict unless configured: all T ancestral steps.
DEFAULT_SAMPLER: dict[str, Any] = {"name": "ancestral", "steps": None}
# Without an optimizer node (a model built in Python): Adam at its defaults, constant rate.
DEFAULT_OPTIMIZER: dict[str, Any] = {"_target_": "torch.optim.Adam", "lr": 1e-3}
# Distinct ensemble members must draw distinct noise streams for the same user.
_ENSEMBLE_SEED_STRIDE = 1_000_003
# The checkpoint entry holding the training-step sampler's state (the loss-aware history).
TIMESTEP_STATE = "timestep_sampler_state"


def with_prior(scores: torch.Tensor, prior: torch.Tensor, weight: float) -> torch.Tensor:
    """The hybrid's ranking score of items 1..N: log p(j), the log-softmax of a model's (B, N)
    scores, plus ``weight`` times the transition prior's (B, N) log(1 + counts)."""
    return torch.log_softmax(scores.float(), dim=-1) + weight * prior


def item_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank (B,) of each target among the real items, from (B, N) scores of items 1..N
    (the padding id 0 gets -inf, so it is never ranked)."""
    return target_ranks(F.pad(scores, (1, 0), value=float("-inf")), targets)


def require(condition: bool, message: str) -> None:
    """Raise a one-line ConfigError unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().split("\n")[0]


@contextmanager
def config_errors(what: str = "model") -> Iterator[None]:
    """The one translation of a constructor's ValueError/TypeError (or Hydra's wrapper around
    one) into a one-line ConfigError naming the config node ``what``."""
    try:
        yield
    except InstantiationException as exc:
        cause: BaseException = exc
        while cause.__cause__ is not None:  # the constructor's own error, not Hydra's wrapper
            cause = cause.__cause__
        raise ConfigError(f"{what}: {_first_line(cause)}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: {_first_line(exc)}") from None


def build(node: Node, what: str, **kwargs: Any) -> Any:
    """Instantiate the config node ``node`` (model.<what>), its values as plain containers."""
    require(
        isinstance(node, Mapping) and "_target_" in node,
        f"model.{what} must be a config node with a _target_, got {node!r}",
    )
    with config_errors(f"model.{what}"):
        return instantiate(dict(node), _convert_="all", **kwargs)


def _takes_fused(factory: Any) -> bool:
    target = getattr(factory, "func", factory)
    try:
        return "fused" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


class RecommenderModule(L.LightningModule):
    """Base class: hyperparameters common to all models and the shared evaluation path.

    ``optimizer`` and ``scheduler`` are ``_partial_`` nodes (e.g. ``torch.optim.Adam`` with its
    ``lr``; ``torch.optim.lr_scheduler.StepLR`` with ``step_size``, ``gamma``), built when
    training starts; None: Adam(lr=1e-3) and a constant rate. Models without gradient steps
    (models/counting.py) pass neither.
    """

    def __init__(
        self,
        *,
        optimizer: Node | None = None,
        scheduler: Node | None = None,
        ks: Sequence[int] = (5, 10, 20),
        monitor: str = "val/ndcg@10",
        predict_k: int = 20,
    ) -> None:
        super().__init__()
        # Every constructor argument of the whole class chain (Lightning walks the subclasses'
        # __init__ frames), so subclasses must not rebind their arguments before calling this.
        # The run's config is logged whole by train.py, hence logger=False. Arguments of this
        # base that the class does not take (a counting model's optimizer) are not its own.
        own = inspect.signature(type(self).__init__).parameters
        ignore = [name for name in ("optimizer", "scheduler") if name not in own]
        self.save_hyperparameters(ignore=ignore, logger=False)
        require(predict_k >= 1, f"model.predict_k must be >= 1, got {predict_k}")
        if optimizer is not None or scheduler is not None:
            # Build both once on a probe parameter: a bad learning rate, betas or target fails
            # here with one line, not when fitting starts.
            probe = self.make_optimizer([nn.Parameter(torch.zeros(1))])
            if scheduler is not None:
                with config_errors("model.scheduler"):
                    build(scheduler, "scheduler", _partial_=True)(probe)
        self.val_metrics = TopKMetrics(ks=ks, prefix="val/")
        self.test_metrics = TopKMetrics(ks=ks, prefix="test/")
        names = [f"val/{m}@{k}" for m in ("hr", "ndcg") for k in self.val_metrics.ks]
        require(
            monitor in names,
            f"monitor={monitor!r} is not a validation metric; use one of {', '.join(names)}",
        )
        # Per-user test results, gathered across ranks, for case studies and significance tests.
        self.test_users = CatMetric()
        self.test_ranks = CatMetric()
        self.best: dict[str, float] = {}
        # The latest validation (metrics, epoch, step): saved with every checkpoint, so after a
        # checkpoint is loaded it holds the validation of exactly those weights.
        self.validation: dict[str, float] = {}

    # -- to provide ----------------------------------------------------------------------
    def eval_scores(self, batch: Batch) -> torch.Tensor:
        """(B, N) float32 scores of items 1..N for each user of the batch."""
        raise NotImplementedError

    def build_items(self, **fixed: Any) -> None:
        """``self.items``, the item table, from the hyperparameters every model names alike
        (``num_items``, ``hidden_size``, ``emb_dropout``, ``item_init``, ``max_len`` and, where
        the model has them, ``position_embedding``, ``position_init``); ``fixed``: table
        options the model does not make hyperparameters."""
        hp = self.hparams
        options = {
            key: hp[key] for key in ("position_embedding", "position_init") if key in hp
        } | fixed
        with config_errors():
            self.items = ItemEmbedding(
                num_items=hp.num_items,
                hidden_size=hp.hidden_size,
                dropout=hp.emb_dropout,
                init=hp.item_init,
                max_len=hp.max_len,
                **options,
            )

    def build_net(self, net: Node) -> nn.Module:
        """The network from its config node; it must work in the item table's size."""
        size = self.hparams.get("hidden_size")
        if isinstance(net, Mapping) and "hidden_size" in net:
            require(
                net["hidden_size"] == size,
                f"model.net.hidden_size ({net['hidden_size']}) must equal model.hidden_size ({size})",
            )
        return build(net, "net")

    def build_prior(self) -> None:
        """``self.prior``, a TransitionPrior, where ``transition_prior`` (its weight) is > 0;
        its counts are fitted in ``setup`` or come with a checkpoint."""
        weight = self.hparams.get("transition_prior", 0.0)
        require(weight >= 0, f"model.transition_prior must be >= 0, got {weight}")
        self.prior = TransitionPrior(self.hparams.num_items) if weight > 0 else None

    def setup(self, stage: str) -> None:
        prior = getattr(self, "prior", None)
        if prior is None or prior.fitted():
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "dataset"):
            raise ConfigError(
                "model.transition_prior counts its transitions on a SequenceDataModule"
            )
        prior.fit(datamodule.dataset("train"))  # training sequences only, as model=markov

    # -- optimisation --------------------------------------------------------------------
    def make_optimizer(
        self, params: list[nn.Parameter], fused: bool = False
    ) -> torch.optim.Optimizer:
        """The configured optimizer over ``params`` (fused kernels when asked and supported)."""
        node = self.hparams.get("optimizer") or DEFAULT_OPTIMIZER
        factory = build(node, "optimizer", _partial_=True)
        with config_errors("model.optimizer"):
            return factory(params, **({"fused": True} if fused and _takes_fused(factory) else {}))

    def configure_optimizers(self) -> dict[str, Any]:
        params = list(self.parameters())
        # The fused kernel updates every tensor in one pass (5x faster on CPU than the per-tensor
        # loop that Adam otherwise picks there); same update up to float rounding.
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
        optimizer = self.make_optimizer(params, fused=fused)
        if self.hparams.get("scheduler") is None:
            return {"optimizer": optimizer}
        scheduler = build(self.hparams.scheduler, "scheduler", _partial_=True)(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    # -- evaluation ----------------------------------------------------------------------
    def ranking_scores(self, batch: Batch, **scoring: Any) -> torch.Tensor:
        """``eval_scores``, plus ``transition_prior`` times the transition prior where there is
        one (then added to the log-softmax of the scores: log p(j) + w log(1 + counts))."""
        scores = self.eval_scores(batch, **scoring)
        prior = getattr(self, "prior", None)
        if prior is None:
            return scores
        return with_prior(scores, prior(batch["seq"]), self.hparams.transition_prior)

    def rank_batch(self, batch: Batch, **scoring: Any) -> torch.Tensor:
        """1-based rank of each user's target among all items (padding never ranked)."""
        return item_ranks(self.ranking_scores(batch, **scoring), batch["target"])

    def validation_sampling(self) -> dict[str, Any]:
        """Keyword arguments of ``eval_scores`` at validation (a cheaper variant; {} = as test)."""
        return {}

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.val_metrics.update(self.rank_batch(batch, **self.validation_sampling()))

    def on_validation_epoch_end(self) -> None:
        # compute() reduces sum/count states across ranks once: exact under DDP.
        values = {key: float(value) for key, value in self.val_metrics.compute().items()}
        self.val_metrics.reset()
        if not self.trainer.sanity_checking:
            self.validation = {**values, "epoch": self.current_epoch, "step": self.global_step}
        for key, value in values.items():
            self.best[key] = max(self.best.get(key, float("-inf")), value)
            self.log(key, value, prog_bar=key == self.hparams.monitor)
        self.log_dict({f"{key}_best": value for key, value in self.best.items()})

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        ranks = self.rank_batch(batch)
        self.test_metrics.update(ranks)
        self.test_users.update(batch["user"].float())
        self.test_ranks.update(ranks.float())

    def on_test_epoch_end(self) -> None:
        values = {key: float(value) for key, value in self.test_metrics.compute().items()}
        self.test_metrics.reset()
        self.log_dict(values)

    def per_user_test_ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users, ranks) of the last test run, all ranks gathered, sorted by user; then reset."""
        users = self.test_users.compute().long().reshape(-1)
        ranks = self.test_ranks.compute().long().reshape(-1)
        self.test_users.reset()
        self.test_ranks.reset()
        order = torch.argsort(users)
        return users[order], ranks[order]

    def predict_step(
        self, batch: Batch, batch_idx: int = 0, *, k: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The top ``k`` items of each user (None: ``predict_k``), padding never among them."""
        scores = F.pad(self.ranking_scores(batch), (1, 0), value=float("-inf"))
        if "exclude" in batch:  # (B, H) items not to recommend (predict.exclude_history), 0 = pad
            scores = scores.scatter(1, batch["exclude"], float("-inf"))
        values, items = top_k_items(scores, self.hparams.predict_k if k is None else k)
        return {"user": batch["user"], "items": items, "scores": values}

    # -- checkpoint state ----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["best_metrics"] = dict(self.best)
        # Plain data only (no OmegaConf lists in hparams): loadable with weights_only=True.
        checkpoint.update(plain(checkpoint))
        checkpoint["validation"] = dict(self.validation)
        # The class to call load_from_checkpoint on (eval.py reads it; never guessed).
        checkpoint[MODEL_CLASS] = f"{type(self).__module__}.{type(self).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.best = dict(checkpoint.get("best_metrics", {}))
        self.validation = dict(checkpoint.get("validation", {}))


class DiffusionRecommender(RecommenderModule):
    """A recommender whose reverse process reconstructs a target embedding x0 (B, d) that is
    rounded to items through the shared item table (``self.items``).

    The constructor checks what every diffusion model shares and records it; a subclass then
    builds its item table (first: the weights draw from the seeded RNG in this order) and calls
    ``build_denoiser``, which also builds the training-step sampler ``timesteps`` (its state is
    saved in checkpoints). Subclasses provide ``reverse(batch, member, steps, sampler)``: one
    ensemble member's x0 from ``member_noise``, running sampler ``sampler`` over ``steps``
    evenly spaced levels of the trained T (None: the configured sampling), through
    ``diffusion.samplers.sample``.
    ``ensemble_size`` members are averaged as softmax distributions (DiffuRecSys Algorithm 3).

    ``sampler`` ({name, steps}) is the reverse process of validation, test and predict;
    ``val_sampler`` ({name, steps}, a missing or null field = the sampler's) replaces it at
    training's validations only, which may then be cheaper.
    """

    def __init__(
        self,
        *,
        num_items: int,
        sampler: Node | None = None,
        val_sampler: Node | None = None,
        ensemble_size: int = 1,
        optimizer: Node | None = None,
        scheduler: Node | None = None,
        ks: Sequence[int] = (5, 10, 20),
        monitor: str = "val/ndcg@10",
        predict_k: int = 20,
    ) -> None:
        require(num_items >= 1, f"num_items must be >= 1, got {num_items}")
        require(ensemble_size >= 1, f"model.ensemble_size must be >= 1, got {ensemble_size}")
        super().__init__(
            optimizer=optimizer, scheduler=scheduler, ks=ks, monitor=monitor, predict_k=predict_k
        )

    def build_denoiser(self, net: Node, diffusion: Node, timestep_sampler: str = "uniform") -> None:
        """``self.net`` and ``self.diffusion`` from their config nodes (the same T in both), and
        ``self.timesteps``, the named sampler of the training step t."""
        self.net = self.build_net(net)
        self.diffusion = build(diffusion, "diffusion")
        steps = net.get("num_steps", self.diffusion.num_steps)
        require(
            steps == self.diffusion.num_steps,
            f"model.net.num_steps ({steps}) must equal model.diffusion.num_steps "
            f"({self.diffusion.num_steps})",
        )
        for key in ("sampler", "val_sampler"):
            unknown = set(self.hparams.get(key) or {}) - set(DEFAULT_SAMPLER)
            require(not unknown, f"model.{key} has unknown keys {sorted(unknown)}; use name, steps")
        for key, (name, steps) in (
            ("sampler", self.sampling()),
            ("val_sampler", self.sampling(**self.validation_sampling())),
        ):
            with config_errors(f"model.{key}"):
                check_sampler(name, steps, self.diffusion.num_steps)
        with config_errors():
            self.timesteps = make_timestep_sampler(
                timestep_sampler, num_steps=self.diffusion.num_steps
            )

    @property
    def sampler(self) -> dict[str, Any]:
        """The configured sampler: ``sampler`` over the defaults (all T ancestral steps)."""
        return {**DEFAULT_SAMPLER, **(self.hparams.get("sampler") or {})}

    def sampling(
        self, steps: int | None = None, sampler: str | None = None
    ) -> tuple[str, int | None]:
        """(sampler name, steps) to run: the given ones, else the configured (None steps: all T)."""
        return sampler or self.sampler["name"], self.sampler["steps"] if steps is None else steps

    def validation_sampling(self) -> dict[str, Any]:
        """``val_sampler`` as ``eval_scores`` arguments (None: the configured sampler's)."""
        node = self.hparams.get("val_sampler") or {}
        return {"steps": node.get("steps"), "sampler": node.get("name")}

    def member_noise(self, batch: Batch, member: int) -> UserNoise:
        """The per-user noise streams of ensemble member ``member``, seeded by (eval_seed,
        member, user): a user's draws never depend on the batch it is in."""
        seed = self.hparams.eval_seed + _ENSEMBLE_SEED_STRIDE * member
        return UserNoise(seed, batch["user"], self.device)

    def reverse(
        self, batch: Batch, member: int = 0, steps: int | None = None, sampler: str | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # What the loss-aware sampler has learnt, so that a resumed run draws t as this one.
        checkpoint[TIMESTEP_STATE] = self.timesteps.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # Checkpoints written before the sampler state was saved: a fresh (uniform) sampler.
        with config_errors("ckpt_path"):
            self.timesteps.load_state_dict(checkpoint.get(TIMESTEP_STATE) or {})

    def eval_scores(
        self,
        batch: Batch,
        steps: int | None = None,
        sampler: str | None = None,
        ensemble_size: int | None = None,
    ) -> torch.Tensor:
        """(B, N) ranking scores; with an ensemble (None: ``ensemble_size``), the log of the
        averaged softmax distributions."""
        members = self.hparams.ensemble_size if ensemble_size is None else ensemble_size
        # Ranking in float32 whatever the autocast: bf16 scores would create spurious ties.
        with torch.autocast(self.device.type, enabled=False):
            table = self.items.table.weight[1:].float()

            def scores(member: int) -> torch.Tensor:
                return self.reverse(batch, member, steps, sampler).float() @ table.t()  # (B, N)

            if members == 1:
                return scores(0)
            # Log of the averaged distributions: the same ranking, and log-probabilities that
            # a transition prior can be added to.
            return torch.log(
                sum(torch.softmax(scores(m), dim=-1) for m in range(members)) / members
            )
