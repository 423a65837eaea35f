"""Top-K recommendations of every user (or of listed users) as parquet, in the original ids.

The rows are what a serving system ingests: ``user`` and ``item`` are the dataset's original ids
(strings), ``rank`` runs 1..K, ``score`` is the model's ranking score (for an ensemble, the
averaged probability). By default the whole known sequence is the history (``history=full``);
``history=test`` uses the test input instead, i.e. the last item held out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import polars as pl
import torch

from diffurec_lightning.data.store import SequenceStore, load_id_maps
from diffurec_lightning.errors import ConfigError, DataError
from diffurec_lightning.io import write_parquet


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


@torch.no_grad()
def recommend(
    model: L.LightningModule,
    store: SequenceStore,
    users: np.ndarray,
    *,
    k: int,
    history: str,
    max_len: int,
    batch_size: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users (U,), items (U, K) dense ids, scores (U, K)) through the model's predict_step."""
    if history not in HISTORIES:
        raise ConfigError(
            f"predict.history={history} is unknown; choose one of {sorted(HISTORIES)}"
        )
    if not 1 <= k <= store.num_items:
        raise ConfigError(f"predict.k must lie in 1..{store.num_items}, got {k}")
    ends = HISTORIES[history](store)
    model.hparams.predict_k = k
    model.to(device).eval()
    items, scores = [], []
    for start in range(0, len(users), batch_size):
        chunk = users[start : start + batch_size]
        batch = history_batch(store, chunk, ends[chunk], max_len)
        out = model.predict_step({key: v.to(device) for key, v in batch.items()}, 0)
        items.append(out["items"].cpu().numpy())
        scores.append(out["scores"].float().cpu().numpy())
    return users, np.concatenate(items), np.concatenate(scores)


def predict_to_parquet(
    model: L.LightningModule,
    datamodule: Any,
    device: torch.device,
    *,
    out: str,
    k: int = 20,
    users_file: str | None = None,
    history: str = "full",
    batch_size: int = 512,
) -> dict[str, Any]:
    """Write the recommendations of the selected users to ``out`` (atomically)."""
    user_ids, item_ids = load_id_maps(datamodule.cache_dir)
    users = select_users(user_ids, read_user_file(users_file) if users_file else None)
    users, items, scores = recommend(
        model,
        datamodule.store,
        users,
        k=k,
        history=history,
        max_len=datamodule.max_len,
        batch_size=batch_size,
        device=device,
    )
    user_names, item_names = _names(user_ids, "user"), _names(item_ids, "item")
    frame = pl.DataFrame(
        {
            "user": np.repeat(user_names[users], k).tolist(),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(users)),
            "item": item_names[items.reshape(-1)].tolist(),
            "score": scores.reshape(-1).astype(np.float32),
        },
        schema={"user": pl.String, "rank": pl.Int32, "item": pl.String, "score": pl.Float32},
    )
    write_parquet(out, frame)
    return {"out": str(out), "users": int(len(users)), "rows": frame.height, "k": k}
