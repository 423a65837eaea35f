"""Command-line overrides checked before Hydra runs: a mistake gets one ``error:`` line, exit 2.

Hydra composes the config before the body of a ``@hydra.main`` function runs, so the error
handling there never sees a misspelt key (``data.max_lenn=5``), an unknown option
(``data=bogus``) or a value of the wrong type (``seed=abc``, which Hydra accepts and training
trips over much later). ``run`` composes the same config with the compose API first and turns
each of these into one line that names the setting and the fix; then it hands over to Hydra,
so that multirun (``-m``, checked with the first value of every sweep), ``--help`` and
``--cfg`` (not checked) behave as before.
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from diffurec_lightning.config import CONF_DIR, compose_config
from diffurec_lightning.errors import ConfigError, DiffuRecError

_CHECKED_FLAGS = {"-m", "--multirun"}  # any other flag (--help, --cfg job, ...) is Hydra's alone
_KINDS = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}
# The kinds of value each kind of default accepts (a str setting takes whatever YAML made of it,
# e.g. trainer.precision=16).
_ACCEPTS = {
    "int": {"int"},
    "float": {"int", "float"},
    "bool": {"bool"},
    "str": {"str", "int", "float", "bool"},
    "list": {"list"},
    "dict": {"dict"},
}
_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "list": "a list such as [5, 10]",
    "dict": "a mapping such as {a: 1}",
}


def fail(exc: BaseException) -> None:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)


def run(main: Callable[[], Any], config_name: str) -> None:
    """Check ``sys.argv``'s overrides against ``conf/<config_name>.yaml``, then call ``main``."""
    args = sys.argv[1:]
    if not {arg for arg in args if arg.startswith("-")} - _CHECKED_FLAGS:
        try:
            check_overrides([arg for arg in args if not arg.startswith("-")], config_name)
        except DiffuRecError as exc:
            fail(exc)
    main()


def _kind(value: Any) -> str | None:
    if isinstance(value, ListConfig):
        return "list"
    if isinstance(value, DictConfig):
        return "dict"
    return _KINDS.get(type(value))


def _is_group(key: str) -> bool:
    return "/" in key or (CONF_DIR / key).is_dir()


def _close(word: str, node: Any) -> str:
    keys = [str(key) for key in node] if isinstance(node, DictConfig | dict) else []
    match = difflib.get_close_matches(word, keys, n=1)
    return f" (did you mean {match[0]}?)" if match else ""


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_resolution_failure=False, throw_on_missing=False)


def check_overrides(overrides: list[str], config_name: str = "train") -> DictConfig:
    """The composed config; a ConfigError naming the setting for an unknown key or option, a
    malformed override, a value whose type differs from the default's, or a ``+key`` that the
    ``_target_`` it is added to does not take."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(f"cannot read the overrides: {_one_line(exc)}") from None
    # A sweep (seed=1,2 under -m) is checked with its first value; one without a list of
    # values (a sweeper's interval) is left to the sweeper.
    parsed = [o for o in parsed if not o.is_sweep_override() or _first_value(o) is not None]
    concrete = [
        f"{o.input_line.split('=', 1)[0]}={_first_value(o)}"
        if o.is_sweep_override()
        else o.input_line
        for o in parsed
    ]
    groups = [line for o, line in zip(parsed, concrete, strict=True) if _is_group(o.key_or_group)]
    defaults = None
    try:
        defaults = compose_config(groups, config_name)  # for the types of the settings
        cfg = compose_config(concrete, config_name)
    except HydraException as exc:
        raise ConfigError(_describe(exc, defaults)) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    _check_required(cfg)
    for override, line in zip(parsed, concrete, strict=True):
        key = override.key_or_group
        if _is_group(key) or key.startswith("hydra.") or override.type == OverrideType.DEL:
            continue
        raw = line.split("=", 1)[1]
        if override.type == OverrideType.ADD:
            _check_parameter(cfg, key)
            continue
        old, new = _select(defaults, key), _select(cfg, key)
        old_kind, new_kind = _kind(old), _kind(new)
        if new == "auto":
            continue  # Lightning takes "auto" for its counts (trainer.devices=auto)
        if old_kind and new_kind and new_kind not in _ACCEPTS[old_kind]:
            shown = _as_override(old)
            raise ConfigError(
                f"{key}={raw}: expected {_EXPECTED[old_kind]} (the default is {shown}); "
                f"e.g. {key}={shown}"
            )
    return cfg


# Settings that must be given (``???`` in the YAML), and what to pass; model.num_items comes
# from the data.
_REQUIRED = {
    "data.source.path": "data=custom needs data.source.path=<file> (CSV/TSV/Parquet/.inter/.dat or .pkl)",
    "ckpt_path": "ckpt_path is required: pass ckpt_path=<run>/checkpoints/<file>.ckpt",
}
_FILLED_IN = {"model.num_items"}


def _missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys whose value is literally ``???`` (interpolations are left unresolved: the run's
    ``${hydra:...}`` paths only exist once Hydra runs)."""
    found = []
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            found += _missing_keys(child, f"{prefix}{key}.")
        elif not child._is_interpolation() and child._is_missing():
            found.append(f"{prefix}{key}")
    return found


def _as_override(value: Any) -> str:
    """A value as it is written on the command line (true, [5, 10], 0.001)."""
    if isinstance(value, ListConfig | DictConfig):
        value = OmegaConf.to_container(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_as_override(item) for item in value) + "]"
    return str(value)


def _first_value(override: Any) -> str | None:
    try:
        return next(iter(override.sweep_string_iterator()))
    except Exception:  # IntervalSweep and the like have no values to list
        return None


def _check_required(cfg: DictConfig) -> None:
    for key in sorted(set(_missing_keys(cfg)) - _FILLED_IN):
        raise ConfigError(_REQUIRED.get(key, f"{key} must be set: pass {key}=<value>"))


def _check_parameter(cfg: DictConfig, key: str) -> None:
    """A ``+a.b=v`` added next to a ``_target_`` must be one of that target's parameters."""
    from hydra.utils import get_object

    parent_key, _, name = key.rpartition(".")
    parent = _select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or "_target_" not in parent:
        return
    try:
        signature = inspect.signature(get_object(parent._target_))
    except (ValueError, TypeError, ImportError, AttributeError):
        return
    parameters = signature.parameters
    if name in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return
    known = [p for p in parameters if p not in ("self", "args", "kwargs")]
    match = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {parent_key}.{match[0]}?" if match else f"it takes {', '.join(known)}"
    raise ConfigError(f"+{key}: {parent._target_} has no parameter '{name}'; {hint}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\n")[0].split())


def _describe(exc: BaseException, defaults: DictConfig | None) -> str:
    """Hydra's composition errors, as one line that says what to change."""
    text = str(exc)
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if missing and getattr(exc, "options", None):
        group, option = missing.groups()
        return f"{group}={option}: no such option; choose one of: {', '.join(exc.options)}"
    if missing:
        return f"{missing.group(1)}={missing.group(2)}: no such option in conf/{missing.group(1)}/"
    merging = re.search(r"Error merging override ([^=\s]+)=(.*)", text)
    if merging and exc.__cause__ is not None:
        # A typed schema (diffurec_lightning/schemas.py) refused the value.
        key, raw = merging.groups()
        old = _select(defaults, key) if defaults is not None else None
        kind = _kind(old)
        if kind in _EXPECTED and old is not None:
            shown = _as_override(old)
            return (
                f"{key}={raw}: expected {_EXPECTED[kind]} (the default is {shown}); "
                f"e.g. {key}={shown}"
            )
        return f"{key}={raw}: {_one_line(exc.__cause__)}"
    override = re.search(r"Could not override '([^']+)'", text)
    if override:
        key = override.group(1)
        parent_key, _, name = key.rpartition(".")
        parent = _select(defaults, parent_key) if defaults is not None and parent_key else defaults
        if parent is None and parent_key:
            return (
                f"{key}: '{parent_key}' is not set here, so '{name}' cannot be changed; "
                f"to add it anyway write +{key}=<value>"
            )
        return (
            f"{key}: no such setting{_close(name, parent)}; check the spelling, or write "
            f"+{key}=<value> to add a new one"
        )
    return _one_line(exc)
