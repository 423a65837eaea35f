"""A large synthetic raw interaction file, and a peak-memory measurement of importing one.

    python -m diffurec_lightning.data.generate --rows 20000000 --out /tmp/big.csv
    python -m diffurec_lightning.data.generate --measure /tmp/big.csv

The file is written chunk by chunk, so generating it needs little memory. Users and items are
drawn from power laws (a few very active users, a few very popular items, long tails of both),
timestamps uniformly over about six years, and the rows come in random order like a log.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl

from diffurec_lightning.data.importers import import_interactions
from diffurec_lightning.data.store import read_meta

USER_EXPONENT = 0.6  # activity ~ rank^-0.6: most users keep >= 5 interactions at 20 per user
ITEM_EXPONENT = 1.0  # popularity ~ rank^-1 (Zipf), the usual shape of item popularity
FIRST_TIME, TIME_SPAN = 1_400_000_000, 200_000_000  # epoch seconds: 2014-05 to 2020-10


def power_law(n: int, exponent: float) -> np.ndarray:
    """Probabilities proportional to rank^-exponent over n ids (rank 1 most likely)."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def write_interactions(
    out: Path, *, rows: int, users: int, items: int, seed: int = 0, chunk_rows: int = 1_000_000
) -> Path:
    """Write `rows` synthetic interactions (user_id, item_id, timestamp) as CSV to `out`."""
    rng = np.random.default_rng(seed)
    user_p, item_p = power_law(users, USER_EXPONENT), power_law(items, ITEM_EXPONENT)
    # Shuffle which id gets which rank, so popularity does not follow the id order.
    user_names, item_names = rng.permutation(users), rng.permutation(items)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as handle:
        for start in range(0, rows, chunk_rows):
            size = min(chunk_rows, rows - start)
            chunk = pl.DataFrame(
                {
                    "user": user_names[rng.choice(users, size=size, p=user_p)],
                    "item": item_names[rng.choice(items, size=size, p=item_p)],
                    "timestamp": FIRST_TIME + rng.integers(0, TIME_SPAN, size=size),
                }
            ).select(
                pl.format("u{}", "user").alias("user_id"),
                pl.format("i{}", "item").alias("item_id"),
                "timestamp",
            )
            chunk.write_csv(handle, include_header=start == 0)
    return out


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB).

    This counts pages of memory-mapped files too: polars maps the files it scans, and those
    clean pages are given back whenever memory is short, so they are not memory the import needs.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonymousMemoryPeak:
    """Samples the process's anonymous resident memory (heap, not mapped files) in a thread.

    Linux only (reads RssAnon from /proc/self/status); `peak_mib` stays None elsewhere.
    """

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss_anon_mib() -> float | None:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) / 1024  # kB
        except OSError:
            return None
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            current = self._rss_anon_mib()
            if current is not None:
                self.peak_mib = max(self.peak_mib or 0.0, current)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> AnonymousMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(path: Path, *, k_core: int, cache_dir: Path | None) -> dict[str, float | int | str]:
    """Import `path` once, timing it; run in a fresh process so the peak RSS is the import's."""
    work = Path(tempfile.mkdtemp(prefix="diffurec-measure-")) if cache_dir is None else None
    target = cache_dir if cache_dir is not None else work / "cache"
    try:
        with AnonymousMemoryPeak() as anonymous:
            start = time.perf_counter()
            import_interactions(path, target, k_core=k_core)
            wall = time.perf_counter() - start
        meta = read_meta(target)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "file": str(path),
        "file_mib": round(path.stat().st_size / 2**20, 1),
        "raw_rows": meta["num_raw_rows"],
        "users": meta["num_users"],
        "items": meta["num_items"],
        "interactions": meta["num_interactions"],
        "k_core": k_core,
        "k_core_iterations": meta["k_core_iterations"],
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_anonymous_rss_mib": None
        if anonymous.peak_mib is None
        else round(anonymous.peak_mib, 1),
        "polars": pl.__version__,
        "threads": pl.thread_pool_size(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", type=Path, help="write a synthetic CSV here")
    mode.add_argument("--measure", type=Path, help="import this file and report time and peak RSS")
    parser.add_argument("--rows", type=int, default=20_000_000, help="interactions to generate")
    parser.add_argument("--users", type=int, help="number of users (default rows / 20)")
    parser.add_argument("--items", type=int, help="number of items (default rows / 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k-core", type=int, default=5, help="k for --measure")
    parser.add_argument("--cache-dir", type=Path, help="keep the --measure cache here")
    args = parser.parse_args(argv)

    if args.out is not None:
        users = args.users or max(args.rows // 20, 1)
        items = args.items or max(args.rows // 200, 1)
        write_interactions(args.out, rows=args.rows, users=users, items=items, seed=args.seed)
        print(f"wrote {args.rows} interactions ({users} users, {items} items) to {args.out}")
        return 0
    for key, value in measure(args.measure, k_core=args.k_core, cache_dir=args.cache_dir).items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
