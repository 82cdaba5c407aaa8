"""Config checks that run before anything heavy: unknown keys name the closest valid key."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from lla.errors import ConfigError

_HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}


def accepted_kwargs(target) -> tuple[set[str], bool]:
    """Names a callable accepts; walks the MRO of a class whose __init__ forwards **kwargs to its base."""
    names: set[str] = set()
    open_kwargs = False
    objs = [c.__init__ for c in inspect.getmro(target) if "__init__" in vars(c)] if inspect.isclass(target) else [target]
    for obj in objs:
        try:
            params = inspect.signature(obj).parameters.values()
        except (TypeError, ValueError):
            continue
        has_var_kw = False
        for p in params:
            if p.kind is p.VAR_KEYWORD:
                has_var_kw = True
            elif p.kind is not p.VAR_POSITIONAL and p.name != "self":
                names.add(p.name)
        if not has_var_kw:
            return names, False
        open_kwargs = True
        if not inspect.isclass(target):
            break
    return names, open_kwargs


def _resolve_target(path: str, group: str):
    try:
        return get_object(path)
    except Exception as err:
        raise ConfigError(f"{group}._target_", f"cannot import {path!r} ({err})", "a class or function path") from None


def check_keys(cfg: DictConfig | Mapping, group: str, provided: set[str] = frozenset()) -> None:
    """Raise ConfigError for a key the group's ``_target_`` does not accept, suggesting the closest one."""
    if not cfg or "_target_" not in cfg:
        return
    target = _resolve_target(cfg["_target_"], group)
    names, open_kwargs = accepted_kwargs(target)
    if open_kwargs:
        return
    allowed = sorted(names - set(provided))
    for key in cfg:
        if key in _HYDRA_KEYS or key in names:
            continue
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f"did you mean {group}.{close[0]}? " if close else ""
        raise ConfigError(f"{group}.{key}", f"unknown key for {cfg['_target_']}",
                          f"{hint}{', '.join(allowed) or '(none)'}")


def instantiate_checked(cfg: DictConfig, group: str, **kwargs: Any):
    """``hydra.utils.instantiate`` after :func:`check_keys`, so a typo fails with one clear line."""
    check_keys(cfg, group, provided=set(kwargs))
    try:
        return instantiate(cfg, **kwargs)
    except Exception as err:
        # Hydra wraps constructor errors in InstantiationException; surface our one-line ConfigError instead.
        cause = err
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


def to_plain(cfg) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
