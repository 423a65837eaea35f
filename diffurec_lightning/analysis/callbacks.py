"""Case studies at test time, as Lightning callbacks (conf/callbacks/analysis.yaml).

CaseStudyCallback: metrics of head- vs long-tail-target users and of five sequence-length groups,
from the per-user test ranks the module keeps; logged as ``test/head/hr@10``,
``test/len1/ndcg@10``, ..., written to ``case_studies.json`` and ``test_ranks.parquet``, and
drawn as a grouped bar chart (``case_studies.png``) in the run folder and in W&B.

RepresentationCallback: t-SNE of the reconstructed target representations x0 of a sample of test
users, coloured by k-means cluster and marked head/tail (the DiffuRecSys paper's Figure 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import polars as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from diffurec_lightning.analysis import groups, plots
from diffurec_lightning.io import write_json, write_parquet


def log_images(trainer: L.Trainer, key: str, paths: Sequence[Path]) -> None:
    """Send images to every W&B logger of the trainer (other loggers keep only the files)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(p) for p in paths])


def _output_dir(trainer: L.Trainer, output_dir: str | None) -> Path:
    return Path(output_dir or trainer.default_root_dir)


def _test_targets(store: Any, users: np.ndarray) -> np.ndarray:
    # The test target is the last item of each user's full sequence.
    return np.asarray(store.items)[store.offsets[users + 1] - 1]


def case_study_panels(result: dict, metrics: Sequence[str]) -> list[plots.BarPanel]:
    """The bar-chart panels of one run: head/tail and the five length groups, one bar per metric."""
    pop, length = result["popularity"], result["length"]
    pop_names = list(pop)
    len_names = list(length)
    pop_labels = [f"{n}\n({int(pop[n]['users'])} users)" for n in pop_names]
    len_labels = [
        f"G{i + 1}: {label}\n({int(length[n]['users'])})"
        for i, (n, label) in enumerate(zip(len_names, result["length_labels"], strict=True))
    ]
    return [
        (
            "head vs long-tail target",
            pop_labels,
            {m: [pop[n][m] for n in pop_names] for m in metrics},
        ),
        (
            "sequence length group (length range)",
            len_labels,
            {m: [length[n][m] for n in len_names] for m in metrics},
        ),
    ]


class CaseStudyCallback(L.Callback):
    """Head/long-tail and sequence-length case studies after every test epoch."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        head_fraction: float = 0.2,
        percentiles: Sequence[float] = (20, 40, 60, 80),
        chart_metrics: Sequence[str] = ("hr@10", "ndcg@10"),
        output_dir: str | None = None,
        save_ranks: bool = True,
    ) -> None:
        self.enabled = enabled
        self.head_fraction = head_fraction
        self.percentiles = tuple(percentiles)
        self.chart_metrics = tuple(chart_metrics)
        self.output_dir = output_dir
        self.save_ranks = save_ranks
        self.result: dict | None = None

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        # fast_dev_run only checks that things run; like Lightning's own loggers, stay quiet.
        if (
            not self.enabled
            or trainer.fast_dev_run
            or not hasattr(pl_module, "per_user_test_ranks")
        ):
            return
        if datamodule is None or not hasattr(datamodule, "item_counts"):
            rank_zero_warn("case studies need the SequenceDataModule (item counts, lengths)")
            return
        # Every rank must take part: the per-user ranks are gathered across processes.
        users, ranks = (t.cpu().numpy() for t in pl_module.per_user_test_ranks())
        if users.size == 0:
            return
        store = datamodule.store
        ks = pl_module.test_metrics.ks
        self.result = groups.case_studies(
            ranks,
            _test_targets(store, users),
            store.lengths[users],
            store.lengths,
            datamodule.item_counts(),
            ks,
            head_fraction=self.head_fraction,
            percentiles=self.percentiles,
        )
        for study in ("popularity", "length"):
            for name, values in self.result[study].items():
                for metric, value in values.items():
                    if metric != "users":
                        pl_module.log(f"test/{name}/{metric}", value)
        if trainer.is_global_zero:
            self._write(trainer, users, ranks)

    def _write(self, trainer: L.Trainer, users: np.ndarray, ranks: np.ndarray) -> None:
        out = _output_dir(trainer, self.output_dir)
        write_json(out / "case_studies.json", self.result)
        if self.save_ranks:
            frame = pl.DataFrame({"user": users.astype(np.int32), "rank": ranks.astype(np.int64)})
            write_parquet(out / "test_ranks.parquet", frame)
        metrics = [m for m in self.chart_metrics if m in self.result["popularity"]["head"]]
        chart = plots.grouped_bar_chart(
            case_study_panels(self.result, metrics),
            out / "case_studies.png",
            title="Case studies (test set)",
        )
        log_images(trainer, "test/case_studies", [chart])


class RepresentationCallback(L.Callback):
    """t-SNE picture of the reconstructed x0 of ``num_users`` sampled test users (global zero)."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        num_users: int = 1000,
        num_clusters: int = 8,
        perplexity: float = 30.0,
        head_fraction: float = 0.2,
        seed: int = 0,
        output_dir: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.num_users = num_users
        self.num_clusters = num_clusters
        self.perplexity = perplexity
        self.head_fraction = head_fraction
        self.seed = seed
        self.output_dir = output_dir

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if not (self.enabled and trainer.is_global_zero and hasattr(pl_module, "reverse")):
            return
        if trainer.fast_dev_run:
            return
        if datamodule is None or not hasattr(datamodule, "item_counts"):
            return
        users, x0 = sample_representations(pl_module, datamodule, self.num_users, self.seed)
        head = groups.head_items(datamodule.item_counts(), self.head_fraction)
        is_head = head[_test_targets(datamodule.store, users)]
        points, clusters = tsne_with_clusters(x0, self.num_clusters, self.perplexity, self.seed)
        path = plots.embedding_scatter(
            points,
            clusters,
            is_head,
            _output_dir(trainer, self.output_dir) / "tsne.png",
            title=f"t-SNE of reconstructed x0: {len(users)} test users, "
            f"{self.num_clusters} k-means clusters",
        )
        log_images(trainer, "test/tsne", [path])


@torch.no_grad()
def sample_representations(
    module: L.LightningModule, datamodule: Any, num_users: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(users, x0) for a seeded random sample of test users: x0 from one reverse process."""
    dataset = datamodule.dataset("test")
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(dataset), size=min(num_users, len(dataset)), replace=False))
    was_training = module.training
    module.eval()
    chunks, users = [], []
    try:
        for start in range(0, len(picked), datamodule.eval_batch_size):
            batch = dataset.__getitems__(
                picked[start : start + datamodule.eval_batch_size].tolist()
            )
            batch = {key: value.to(module.device) for key, value in batch.items()}
            chunks.append(module.reverse(batch).float().cpu())
            users.append(batch["user"].cpu())
    finally:
        module.train(was_training)
    return torch.cat(users).numpy(), torch.cat(chunks).numpy()


def tsne_with_clusters(
    x: np.ndarray, num_clusters: int, perplexity: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE coordinates and k-means labels (clustered in the original space)."""
    from sklearn.cluster import KMeans
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(x)
    # One thread: on a shared CPU, OpenMP/BLAS thread pools oversubscribe and run 10x slower.
    with threadpool_limits(limits=1):
        clusters = KMeans(n_clusters=min(num_clusters, n), n_init=10, random_state=seed)
        labels = clusters.fit_predict(x)
        # t-SNE requires perplexity < n; (n - 1) / 3 is the usual safe bound for small samples.
        perplexity = min(perplexity, max((n - 1) / 3, 1.0))
        tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed, n_jobs=1)
        points = tsne.fit_transform(x)
    return points, labels
