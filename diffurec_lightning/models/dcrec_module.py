"""DCRec (Huang et al., arXiv 2410.21967, WSDM 2026) as a LightningModule.

Training: the whole target sequence S0 (history shifted by one, target last) is noised, with
noise offset towards the history prior K (implicit condition); the Dual Conditional Transformer
reconstructs it while cross-attending to the clean history H0 (explicit condition); loss
L_T + (1 - lambda) L_t + lambda L_z with lambda annealed per epoch. Evaluation: a sampler (all T
ancestral steps, or T' skipped steps) from per-user reproducible noise, then the target slot of
S0_hat is rounded through the shared item table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from diffurec_lightning.diffusion.samplers import sample
from diffurec_lightning.models.base import (
    Batch,
    DiffusionRecommender,
    Node,
    require,
)
from diffurec_lightning.models.functional import cross_entropy


def diffusion_sequences(seq: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Item ids of the clean history H0 and the prior K, aligned with S0: (B, W) each.

    For the history i_1..i_n (left-padded): H0 = [pad, i_1..i_n], S0 = [i_1..i_n, target] and
    K = [i_1..i_n, pad], so position j of S0 holds the item after position j of H0. Only the last
    W = min(L + 1, max_len) columns are kept, which is the same window for a user in every batch
    (padding aside): only a history of max_len items loses its oldest item from S0 and K.
    """
    pad = seq.new_zeros(seq.shape[0], 1)
    width = min(seq.shape[1] + 1, max_len)
    history = torch.cat([pad, seq], dim=1)[:, -width:]
    prior = torch.cat([seq, pad], dim=1)[:, -width:]
    return history, prior


def sequence_mask(prior: torch.Tensor) -> torch.Tensor:
    """(B, W) True where S0 holds a real item: K's items plus the target slot."""
    mask = prior > 0
    mask[:, -1] = True
    return mask


def annealed_lambda(
    epoch: int, start: float = 0.2, floor: float = 0.003, epochs: int = 150, power: float = 9.0
) -> float:
    """lambda(epoch) = start (1 - min(epoch, epochs) / epochs)^power + floor (0.203 at epoch 0)."""
    return start * (1.0 - min(epoch, epochs) / epochs) ** power + floor


PRIOR_POSITIONS = ("real", "all")


def dcrec_loss_terms(
    x_start_pred: torch.Tensor,
    x_start: torch.Tensor,
    seq_mask: torch.Tensor,
    scores: torch.Tensor,
    target: torch.Tensor,
    prior_positions: str = "real",
) -> dict[str, torch.Tensor]:
    """The three terms: prior L_T, reconstruction L_t, rounding L_z.

    L_T = mean of S0_hat^2 over the real positions (``all``: every position of the window, as
    the authors' code) and dimensions; L_t = MSE between the target slots e0_hat and e0;
    L_z = cross-entropy of scores (B, N) of items 1..N with the target id.
    """
    per_position = x_start_pred.float().pow(2).mean(dim=-1)  # (B, W)
    mask = seq_mask.float() if prior_positions == "real" else torch.ones_like(per_position)
    prior = (per_position * mask).sum() / mask.sum()
    mse = F.mse_loss(x_start_pred[:, -1].float(), x_start[:, -1].float())
    ce = cross_entropy(scores.float(), target - 1).mean()
    return {"prior": prior, "mse": mse, "ce": ce}


class DCRecModule(DiffusionRecommender):
    """Dual Conditional Diffusion for sequential recommendation; defaults = authors' Beauty run.

    ``net`` (the DualConditionalTransformer) and ``diffusion`` are config nodes (see base.py).
    """

    def __init__(
        self,
        *,
        num_items: int,
        net: Node,
        diffusion: Node,
        name: str = "dcrec",
        hidden_size: int = 128,
        emb_dropout: float = 0.4,
        item_init: str = "reference",
        position_init: str = "reference",
        max_len: int = 50,
        prior_offset_strength: float = 0.1,
        offset_in_training: bool = True,
        stop_target_gradient: bool = False,
        prior_positions: str = "all",
        sampler: Node | None = None,
        val_sampler: Node | None = None,
        lambda_start: float = 0.2,
        lambda_floor: float = 0.003,
        lambda_epochs: int = 150,
        lambda_power: float = 9.0,
        ensemble_size: int = 1,
        eval_seed: int = 0,
        optimizer: Node | None = None,
        scheduler: Node | None = None,
        ks: Sequence[int] = (5, 10, 20),
        monitor: str = "val/ndcg@10",
        predict_k: int = 20,
    ) -> None:
        require(max_len >= 2, f"model.max_len must be >= 2 (history + target), got {max_len}")
        require(
            prior_offset_strength >= 0,
            f"model.prior_offset_strength must be >= 0, got {prior_offset_strength}",
        )
        require(0 <= emb_dropout < 1, f"model.emb_dropout must lie in [0, 1), got {emb_dropout}")
        require(
            prior_positions in PRIOR_POSITIONS,
            f"model.prior_positions must be one of {', '.join(PRIOR_POSITIONS)}, "
            f"got {prior_positions!r}",
        )
        require(lambda_epochs >= 1, f"model.lambda_epochs must be >= 1, got {lambda_epochs}")
        require(
            lambda_start >= 0 and lambda_floor >= 0 and lambda_start + lambda_floor <= 1,
            "model.lambda_start and lambda_floor must be >= 0 with a sum <= 1",
        )
        super().__init__(
            num_items=num_items,
            sampler=sampler,
            val_sampler=val_sampler,
            ensemble_size=ensemble_size,
            optimizer=optimizer,
            scheduler=scheduler,
            ks=ks,
            monitor=monitor,
            predict_k=predict_k,
        )
        self.build_items(position_embedding=True)
        self.build_denoiser(net, diffusion)

    def lambda_at(self, epoch: int) -> float:
        hp = self.hparams
        return annealed_lambda(
            epoch, hp.lambda_start, hp.lambda_floor, hp.lambda_epochs, hp.lambda_power
        )

    # -- training ------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        seq, target = batch["seq"], batch["target"]
        history_ids, prior_ids = diffusion_sequences(seq, self.hparams.max_len)
        start_ids = prior_ids.clone()
        start_ids[:, -1] = target
        seq_mask = sequence_mask(prior_ids)
        history = self.items(history_ids)  # (B, W, d) explicit condition H0
        x_start = self.items(start_ids)  # (B, W, d) S0
        noise = torch.randn_like(x_start)
        if self.hparams.offset_in_training:
            prior = self.hparams.prior_offset_strength * self.items(prior_ids)
            noise = noise + prior  # implicit condition K
        t, _ = self.timesteps.sample(len(target), self.device)  # uniform: all weights 1
        x_t = self.diffusion.q_sample(x_start, t, noise)
        x_start_pred = self.net(x_t, t, history, seq_mask, history_ids > 0)
        scores = self.items.scores(x_start_pred[:, -1])  # (B, N)
        # Through the target, L_t ties the table's scale to the predictions'; with e0 a constant
        # the predictions grow without bound and the network copies the target out of S_t. With
        # an N(0, 0.02) table the trainable target can shrink it to a point instead, hence the
        # N(0, 1) table of the authors' code (docs/results.md, DCRec on the CPU).
        reference = x_start.detach() if self.hparams.stop_target_gradient else x_start
        terms = dcrec_loss_terms(
            x_start_pred, reference, seq_mask, scores, target, self.hparams.prior_positions
        )
        lam = self.lambda_at(self.current_epoch)
        loss = terms["prior"] + (1.0 - lam) * terms["mse"] + lam * terms["ce"]
        size = len(target)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({f"train/loss_{k}": v for k, v in terms.items()}, batch_size=size)
        self.log("train/lambda", lam, batch_size=size)
        return loss

    # -- sampling ------------------------------------------------------------------------
    def reverse_sequence(
        self, batch: Batch, member: int = 0, steps: int | None = None, sampler: str | None = None
    ) -> torch.Tensor:
        """S0_hat (B, W, d) from the configured sampler, for one ensemble member.

        The sampler runs over ``steps`` evenly spaced levels of the trained T (None: the
        configured ``sampler.steps``); with the ``skip`` sampler that is the paper's T'. Noise
        comes from per-user streams seeded by (eval_seed, member, user) with one row per real
        position of S, so a user's result never depends on the batch it is in.
        """
        hp = self.hparams
        history_ids, prior_ids = diffusion_sequences(batch["seq"], hp.max_len)
        seq_mask = sequence_mask(prior_ids)
        history_mask = history_ids > 0
        history = self.items(history_ids)
        prior_offset = hp.prior_offset_strength * self.items(prior_ids)  # (B, W, d)
        cache = self.net.history_cache(history)  # step-independent: once per batch
        noise = self.member_noise(batch, member)
        counts, width, dim = seq_mask.sum(1), seq_mask.shape[1], history.shape[-1]

        def draw(_step: int = 0) -> torch.Tensor:
            return noise.rows(counts, width, dim).to(history.dtype)

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.net(x_t, t, history, seq_mask, history_mask, cache=cache)

        x_T = draw() + prior_offset  # S_T = N(0, I) + prior_offset_strength K
        sampler, steps = self.sampling(steps, sampler)
        return sample(
            sampler, self.diffusion, denoise, x_T, draw, steps=steps, forward_mean=prior_offset
        )

    def reverse(
        self, batch: Batch, member: int = 0, steps: int | None = None, sampler: str | None = None
    ) -> torch.Tensor:
        """e0 (B, d): the target slot of the final S0_hat (what is rounded to items)."""
        return self.reverse_sequence(batch, member, steps, sampler)[:, -1]
