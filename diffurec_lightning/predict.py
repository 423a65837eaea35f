"""Top-K recommendations of every user (or of listed users) as parquet, in the original ids.

The rows are what a serving system ingests: ``user`` and ``item`` are the dataset's original ids
(strings), ``rank`` runs 1..K, ``score`` is the model's ranking score (for an ensemble, the
averaged probability). By default the whole known sequence is the history (``history=full``);
``history=test`` uses the test input instead, i.e. the last item held out. With
``exclude_history`` (the default) no user is recommended an item of that history again; the
evaluation protocol does not filter (a test target may be an item seen before).

It runs as ``trainer.predict``: the Trainer brings devices, precision and the progress bar, and
``ParquetPredictionWriter`` streams each batch into the file.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset, Sampler

from diffurec_lightning.data.store import SequenceStore, load_id_maps
from diffurec_lightning.errors import ConfigError, DataError
from diffurec_lightning.io import atomic_path


def _history_ends(store: SequenceStore) -> np.ndarray:
    return store.offsets[1:]


def _test_ends(store: SequenceStore) -> np.ndarray:
    return store.offsets[1:] - 1


# Where each user's history stops (exclusive) in the flat item array.
HISTORIES: dict[str, Callable[[SequenceStore], np.ndarray]] = {
    "full": _history_ends,
    "test": _test_ends,
}


def history_batch(
    store: SequenceStore, users: np.ndarray, ends: np.ndarray, max_len: int
) -> dict[str, torch.Tensor]:
    """Left-padded (B, L) histories of ``users``: their items up to ``ends``, most recent last."""
    starts = np.maximum(store.offsets[users], ends - max_len)
    lengths = ends - starts
    width = int(lengths.max())
    cols = np.arange(width)
    real = cols[None, :] >= (width - lengths)[:, None]  # (B, L) True = real item
    positions = np.where(real, ends[:, None] - width + cols[None, :], 0)
    seq = np.where(real, np.asarray(store.items)[positions], 0)
    return {
        "seq": torch.from_numpy(seq.astype(np.int64)),
        "target": torch.zeros(len(users), dtype=torch.long),  # unknown: nothing is scored
        "user": torch.from_numpy(users.astype(np.int64)),
    }


def read_user_file(path: str | Path) -> list[str]:
    """Original user ids from a text file (one per line) or a parquet/csv file (`user` column)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"predict.users_file={path}: no such file")
    if path.suffix in (".parquet", ".csv"):
        frame = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
        if "user" not in frame.columns:
            raise DataError(f"{path}: needs a `user` column with original user ids")
        return frame["user"].cast(pl.String).to_list()
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def select_users(user_ids: pl.DataFrame, wanted: list[str] | None) -> np.ndarray:
    """Dense indices of the wanted original ids (all users when None), in the given order."""
    if wanted is None:
        return user_ids["user"].to_numpy().astype(np.int64)
    lookup = dict(zip(user_ids["original_id"].to_list(), user_ids["user"].to_list(), strict=True))
    missing = [u for u in wanted if u not in lookup]
    if missing:
        raise DataError(
            f"{len(missing)} user id(s) not in the dataset, e.g. {missing[:3]}; "
            "the file must hold original user ids"
        )
    return np.asarray([lookup[u] for u in wanted], dtype=np.int64)


def _names(id_map: pl.DataFrame, column: str) -> np.ndarray:
    """Original id of every dense index (looked up by index, whatever the file's row order)."""
    index = id_map[column].to_numpy()
    names = np.empty(int(index.max()) + 1, dtype=object)
    names[index] = id_map["original_id"].to_numpy()
    return names


def history_items(store: SequenceStore, users: np.ndarray, ends: np.ndarray) -> torch.Tensor:
    """(B, H) every item of each user's history up to ``ends`` (not only the last max_len),
    right-padded with 0, the padding column, which is never recommended anyway."""
    starts = store.offsets[users]
    lengths = ends - starts
    width = max(int(lengths.max(initial=0)), 1)
    cols = np.arange(width)
    real = cols[None, :] < lengths[:, None]
    positions = np.where(real, starts[:, None] + cols[None, :], 0)
    return torch.from_numpy(np.where(real, np.asarray(store.items)[positions], 0).astype(np.int64))


class UserHistories(Dataset):
    """The predict dataset: position i is the i-th selected user; batches come collated."""

    def __init__(
        self,
        store: SequenceStore,
        users: np.ndarray,
        ends: np.ndarray,
        max_len: int,
        exclude_history: bool,
    ) -> None:
        self.store, self.users, self.ends = store, users, ends
        self.max_len, self.exclude_history = max_len, exclude_history

    def __len__(self) -> int:
        return len(self.users)

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        users = self.users[np.asarray(positions, dtype=np.int64)]
        batch = history_batch(self.store, users, self.ends[users], self.max_len)
        if self.exclude_history:
            batch["exclude"] = history_items(self.store, users, self.ends[users])
        return batch


class UserChunks(Sampler[list[int]]):
    """Consecutive chunks of ``batch_size`` positions, in order; with several devices each rank
    takes one contiguous run of chunks, so concatenating the ranks' outputs restores the order.
    ``ranks()`` gives (world size, rank); it is asked when the loader is iterated, since a
    DDP process knows its rank only once the Trainer has set up."""

    def __init__(self, num: int, batch_size: int, ranks: Callable[[], tuple[int, int]]) -> None:
        self.chunks = [(s, min(s + batch_size, num)) for s in range(0, num, batch_size)]
        self.ranks = ranks

    def mine(self) -> list[tuple[int, int]]:
        world, rank = self.ranks()
        return [self.chunks[i] for i in np.array_split(np.arange(len(self.chunks)), world)[rank]]

    def __iter__(self) -> Iterator[list[int]]:
        return (list(range(start, end)) for start, end in self.mine())

    def __len__(self) -> int:
        return len(self.mine())


def _passthrough(batch: Any) -> Any:
    return batch  # UserHistories.__getitems__ already collates


SCHEMA = pa.schema(
    [("user", pa.string()), ("rank", pa.int32()), ("item", pa.string()), ("score", pa.float32())]
)


class ParquetPredictionWriter(BasePredictionWriter):
    """Streams predict_step's top-K to parquet, one row group per batch, in original ids.

    The file is written under a temp name and renamed when the last batch is in, so a crash,
    Ctrl-C or preemption leaves no half-written file behind (nor a stale temp). With several
    devices every rank streams its own part, and rank zero joins the parts in rank order.
    Excluded items (``predict.exclude_history``) carry the score -inf and are dropped: a user
    whose history covers nearly all items gets fewer than K rows.
    """

    def __init__(
        self, out: str | Path, user_names: np.ndarray, item_names: np.ndarray, drop_excluded: bool
    ) -> None:
        super().__init__(write_interval="batch")
        self.out = Path(out)
        self.user_names, self.item_names = user_names, item_names
        self.drop_excluded = drop_excluded
        self._files = ExitStack()
        self._writer: pq.ParquetWriter | None = None

    def _part_path(self, rank: int) -> Path:
        return self.out.parent / f".{self.out.name}.part{rank}"

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1:
            tmp = self._files.enter_context(atomic_path(self.out))
        else:
            tmp = self._files.enter_context(atomic_path(self._part_path(trainer.global_rank)))
        self._writer = self._files.enter_context(pq.ParquetWriter(tmp, SCHEMA, compression="zstd"))

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, torch.Tensor],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        users = prediction["user"].cpu().numpy()
        items = prediction["items"].cpu().numpy()  # (B, K) dense ids
        scores = prediction["scores"].float().cpu().numpy()  # (B, K)
        k = items.shape[1]
        keep = ~np.isneginf(scores).reshape(-1) if self.drop_excluded else slice(None)
        columns = {
            "user": self.user_names[np.repeat(users, k)][keep],
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(users))[keep],
            "item": self.item_names[items.reshape(-1)][keep],
            "score": scores.reshape(-1).astype(np.float32)[keep],
        }
        self._writer.write_table(pa.table(columns, schema=SCHEMA))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._files.close()  # closes the writer, then renames the temp file
        if trainer.world_size == 1:
            return
        trainer.strategy.barrier()  # every rank's part is complete
        if trainer.is_global_zero:
            parts = [self._part_path(rank) for rank in range(trainer.world_size)]
            try:
                with (
                    atomic_path(self.out) as tmp,
                    pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer,
                ):
                    for part in parts:
                        source = pq.ParquetFile(part)
                        for group in range(source.num_row_groups):
                            writer.write_table(source.read_row_group(group))
            finally:
                for part in parts:
                    part.unlink(missing_ok=True)
        trainer.strategy.barrier()  # the joined file exists before any rank reports it

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Leaving the atomic block through the exception removes the temp file unrenamed.
        self._files.__exit__(type(exception), exception, exception.__traceback__)


def predict_to_parquet(
    trainer: L.Trainer,
    model: L.LightningModule,
    datamodule: Any,
    *,
    out: str,
    k: int = 20,
    users_file: str | None = None,
    history: str = "full",
    batch_size: int = 512,
    exclude_history: bool = True,
) -> dict[str, Any]:
    """Write the top-K recommendations of the selected users to ``out`` through
    ``trainer.predict`` (its devices, precision and progress bar); returns a summary."""
    if history not in HISTORIES:
        raise ConfigError(
            f"predict.history={history} is unknown; choose one of {sorted(HISTORIES)}"
        )
    store = datamodule.store
    if not 1 <= k <= store.num_items:
        raise ConfigError(f"predict.k must lie in 1..{store.num_items}, got {k}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"predict.batch_size must be an integer >= 1, got {batch_size!r}")
    user_ids, item_ids = load_id_maps(datamodule.cache_dir)
    users = select_users(user_ids, read_user_file(users_file) if users_file else None)
    dataset = UserHistories(
        store, users, HISTORIES[history](store), datamodule.max_len, exclude_history
    )
    loader = DataLoader(
        dataset,
        batch_sampler=UserChunks(
            len(users), batch_size, lambda: (trainer.world_size, trainer.global_rank)
        ),
        collate_fn=_passthrough,
    )
    writer = ParquetPredictionWriter(
        out, _names(user_ids, "user"), _names(item_ids, "item"), exclude_history
    )
    trainer.callbacks.append(writer)
    # The Trainer calls predict_step(batch, batch_idx): k goes in through a partial for this call
    # only, so the model's hyperparameters stay the record of how it was built.
    model.predict_step = functools.partial(type(model).predict_step, model, k=k)
    try:
        with warnings.catch_warnings():
            # Lightning cannot see that UserChunks yields every position (no drop_last): it does.
            warnings.filterwarnings("ignore", message=".*custom batch sampler `UserChunks`")
            trainer.predict(model, dataloaders=loader, return_predictions=False)
    finally:
        trainer.callbacks.remove(writer)
        del model.predict_step
    rows = pq.ParquetFile(out).metadata.num_rows
    return {"out": str(out), "users": int(len(users)), "rows": rows, "k": k}
