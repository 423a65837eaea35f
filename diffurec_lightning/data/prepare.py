"""``python -m diffurec_lightning.data.prepare data=toys``: prepare a dataset cache, train nothing.

Any Hydra override of train.yaml is accepted (``data=custom data.source.path=...``); ``force=true``
rebuilds the cache even when it exists. The work itself is ``data.source``'s ``prepare``
(data/sources.py).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from diffurec_lightning.cli import check_overrides
    from diffurec_lightning.data.store import read_meta
    from diffurec_lightning.errors import DiffuRecError
    from diffurec_lightning.train import _user_error

    overrides = sys.argv[1:] if argv is None else argv
    force = "force=true" in overrides
    try:
        cfg = check_overrides([o for o in overrides if o != "force=true"])
        try:
            source = instantiate(cfg.data.source)
        except InstantiationException as exc:
            raise (_user_error(exc) or exc) from None
        cache_dir = source.prepare(cfg.paths.data_dir, force=force)
    except DiffuRecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = read_meta(cache_dir)
    print(
        f"{meta['name']}: {meta['num_users']:,} users, {meta['num_items']:,} items, "
        f"{meta['num_interactions']:,} interactions, {meta['num_train_prefixes']:,} training "
        f"prefixes -> {cache_dir}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
