"""Checks that run before anything heavy, so every bad input ends as one line ``error: <key>: <problem>; allowed: ...``
and exit code 2, never a traceback.

Cheapest first:

1. :func:`check_command` reads the command line before Hydra composes anything: overrides that do not parse, an
   unknown option of a config group (``method=nope``), an unknown ``+key``.
2. :func:`explain_hydra_error` turns what Hydra still rejects while composing (``trainer.max_epoch=3``, an option of
   another method such as ``method=dgl method.ema_momentum=0.9``) into a ConfigError that names the closest valid key.
3. :func:`check_config` checks the composed config (optimizer, trainer keys, counters) before any object is built;
   :func:`check_before_fit` checks the data files on disk and runs one dry forward pass at the real image size, before
   the Trainer exists.

The run folder is also decided here (:func:`run_dir`): a pure function of the command, so rerunning a command finds
the folder, and the checkpoint, of the first attempt.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lla import naming
from lla.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}


# ---------------------------------------------------------------------------------------------- run folder
def _override_list(overrides: Any) -> list[str] | str:
    if overrides is None or isinstance(overrides, str):
        return overrides or []
    return [str(o) for o in overrides]


def run_name(overrides: Any) -> str:
    """A command's overrides -> its folder name (``k-8_method-dgl``; lla.naming): readable, passable back to Hydra
    unquoted, ``default`` without overrides. Keys that do not change the experiment are left out."""
    return naming.run_name(_override_list(overrides))


def run_dir(explicit: str | None, overrides: Any) -> str:
    """``hydra.run.dir``: ``run_dir=<path>`` when given, else ``outputs/<run name>`` (sorted, so ``k=8 method=dgl``
    and ``method=dgl k=8`` share a folder). A folder the same command created under the old ``k=8,method=dgl``
    naming is used when it exists and the new one does not, so an old run still resumes."""
    if explicit:
        return str(explicit)
    items = _override_list(overrides)
    if isinstance(items, str):
        return f"outputs/{run_name(items)}"
    return naming.existing_folder(f"outputs/{run_name(items)}", f"outputs/{naming.legacy_run_name(items)}")


def job_subdir(num: Any, overrides: Any, sweep_dir: Any = None) -> str:
    """``hydra.sweep.subdir``: ``<job number>_<run name>`` (the old naming's folder when only that one exists)."""
    items = _override_list(overrides)
    new = f"{num}_{run_name(items)}"
    if sweep_dir is None or isinstance(items, str):
        return new
    old = f"{num}_{naming.legacy_run_name(items)}"
    return Path(naming.existing_folder(str(Path(str(sweep_dir)) / new), str(Path(str(sweep_dir)) / old))).name


def register_resolvers() -> None:
    """``${lla_run_dir:...}`` / ``${lla_job_subdir:...}`` / ``${lla_run_name:...}`` for conf/config.yaml; any
    process that composes imports us."""
    OmegaConf.register_new_resolver("lla_run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("lla_job_subdir", job_subdir, replace=True)
    OmegaConf.register_new_resolver("lla_run_name", run_name, replace=True)


register_resolvers()


# ---------------------------------------------------------------------------------------------- helpers
def closest(word: str, options: Sequence[str], prefix: str = "") -> str:
    """``allowed`` text: ``did you mean <prefix><best>? a, b, c`` (the hint only when something is close)."""
    options = sorted(str(o) for o in options)
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    hint = f"did you mean {prefix}{close[0]}? " if close else ""
    return hint + (", ".join(options) or "(none)")


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The menu of a config group: the YAML files in ``conf/<group>/``."""
    folder = Path(conf_dir) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def config_groups(conf_dir: Path = CONF_DIR) -> set[str]:
    return {p.name for p in Path(conf_dir).iterdir() if p.is_dir() and p.name != "hydra"}


def _top_level_keys(conf_dir: Path) -> set[str]:
    primary = OmegaConf.load(Path(conf_dir) / "config.yaml")
    return {str(k) for k in primary if k not in ("defaults", "hydra")}


def _has_key(node: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node[part]
    return True


def _option_has_key(group: str, option: str, key: str, conf_dir: Path) -> bool:
    """Whether ``conf/<group>/<option>.yaml`` sets ``key`` (a full key such as ``method.ema_momentum``)."""
    path = Path(conf_dir) / group / f"{option}.yaml"
    global_package = "@package _global_" in path.read_text()[:500]
    node = OmegaConf.load(path)
    return _has_key(node, key if global_package else key.partition(".")[2])


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------- 1. command line
def _parse(overrides: Sequence[str]) -> list:
    """Hydra's own override parser, one override at a time so an error names the one that failed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser, parsed = OverridesParser.create(), []
    for text in overrides:
        try:
            parsed.extend(parser.parse_overrides([text]))
        except OverrideParseException as err:
            key = text.split("=", 1)[0].lstrip("+~") or text
            raise ConfigError(key, f"cannot parse {text!r} ({_first_line(err)})", quoting_hint(text)) from None
    return parsed


def quoting_hint(text: str) -> str:
    """How to pass ``text`` to Hydra: a value holding ``= , : [ ] { } ( )``, quotes or spaces goes in double quotes
    for Hydra, inside single quotes for the shell (folders lla creates never need this)."""
    key, sep, value = str(text).partition("=")
    if not sep or not value:
        return "key=value, e.g. k=8"
    inner = value.strip("'\"").replace("\\", "\\\\").replace('"', '\\"')
    return (f"key=value, e.g. k=8; quote a value that holds = , : [ ] {{ }} ( ) or spaces, double quotes for Hydra "
            f"inside single quotes for the shell: '{key}=\"{inner}\"'")


def _values(override) -> list[str]:
    """The option names a group override asks for (every value of a sweep ``method=dgl,man``)."""
    if override.is_sweep_override():
        try:
            return [str(v) for v in override.sweep_string_iterator()]
        except Exception:  # glob(...) sweeps need Hydra's config loader: let Hydra check them
            return []
    value = override.value()
    return [value] if isinstance(value, str) else []


def command_overrides(argv: Sequence[str]) -> list[str] | None:
    """The ``key=value`` overrides of a ``run.py`` command line, read with Hydra's own argument parser."""
    from lla.compat import hydra_args_parser

    try:
        args, _ = hydra_args_parser().parse_known_args(list(argv))
    except SystemExit:  # argparse has printed a usage error; Hydra will print it again and exit 2
        return None
    return list(args.overrides or [])


def check_command(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject, before Hydra composes, overrides that cannot parse, unknown group options and unknown ``+keys``."""
    overrides = command_overrides(argv)
    if not overrides:
        return
    groups, top = config_groups(conf_dir), _top_level_keys(conf_dir)
    for o in _parse(overrides):
        key = o.key_or_group
        if key.startswith("hydra") or o.is_delete():
            continue
        if key in groups:
            options = group_options(key, conf_dir)
            for value in _values(o):
                if value not in options:
                    raise ConfigError(key, f"unknown {key} {value!r}", closest(value, options))
        elif (o.is_add() or o.is_force_add()) and key.split(".")[0] not in top | groups:
            root = key.split(".")[0]
            raise ConfigError(key, f"unknown top-level key {root!r}", closest(root, top | groups))


# ---------------------------------------------------------------------------------------------- 2. Hydra errors
def _compose_groups(overrides: Sequence[str], conf_dir: Path) -> tuple[DictConfig, dict[str, str]] | None:
    """The config with only the command's group choices applied: what a key override should have matched."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    groups, keep = config_groups(conf_dir), []
    for o in _parse(overrides):
        if o.key_or_group in groups and not o.is_delete():
            values = _values(o)
            if values:
                keep.append(f"{'+' if o.is_add() else ''}{o.key_or_group}={values[0]}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name="config", overrides=keep, return_hydra_config=True)
        choices = {str(k): str(v) for k, v in cfg.hydra.runtime.choices.items()}
    except Exception:
        return None
    finally:
        GlobalHydra.instance().clear()
    return cfg, choices


def unknown_key(key: str, overrides: Sequence[str], conf_dir: Path = CONF_DIR) -> ConfigError:
    """``trainer.max_epoch`` -> "unknown key; allowed: did you mean trainer.max_epochs? ..."; for an option of
    another group member (``method=dgl method.ema_momentum=0.9``) say which members have it."""
    composed = _compose_groups(overrides, conf_dir)
    parent, _, leaf = key.rpartition(".")
    problem, valid = "unknown key", []
    if composed is not None:
        cfg, choices = composed
        node = cfg if not parent else OmegaConf.select(cfg, parent)
        if isinstance(node, DictConfig):
            valid = [str(k) for k in node if k not in _HYDRA_KEYS and not (not parent and k == "hydra")]
        group = key.split(".")[0]
        if parent == group and group in config_groups(conf_dir) and group in choices:
            chosen = choices[group]
            owners = [opt for opt in group_options(group, conf_dir)
                      if opt != chosen and _option_has_key(group, opt, key, conf_dir)]
            problem = (f"not an option of {group} {chosen} (only of {', '.join(owners)})" if owners
                       else f"unknown key for {group} {chosen}")
    return ConfigError(key, problem, closest(leaf, valid, f"{parent}." if parent else ""))


def failed_override(overrides: Sequence[str], conf_dir: Path = CONF_DIR) -> tuple[str, str] | None:
    """Which key override Hydra could not apply, found by applying them as Hydra does (in order, to the config with
    the command's group choices) and reading OmegaConf's typed errors, never Hydra's messages:
    ``("unknown", key)`` (``key=v`` or ``~key`` on a key that is not there), ``("exists", key)`` (``+key=v`` on one
    that is), ``("other", key)`` (any other failure), or None when every override applies."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    composed = _compose_groups(overrides, conf_dir)
    if composed is None:
        return None
    cfg, _ = composed
    groups = config_groups(conf_dir)
    for o in _parse(overrides):
        key = o.key_or_group
        if key in groups or o.is_sweep_override():
            continue
        try:
            value = o.value()
            current = OmegaConf.select(cfg, key, throw_on_missing=False)
            if o.is_delete():
                if current is None:
                    return "unknown", key
                if value is not None and value != current:
                    return "other", key
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                with open_dict(node):
                    del node[leaf]
            elif o.is_add():
                if current is not None and not isinstance(value, (dict, list)):
                    return "exists", key
                OmegaConf.update(cfg, key, value, merge=True, force_add=True)
            elif o.is_force_add():
                OmegaConf.update(cfg, key, value, merge=True, force_add=True)
            else:
                OmegaConf.update(cfg, key, value, merge=True)
        except (ConfigAttributeError, ConfigKeyError) as err:
            return "unknown", str(err.full_key or key)
        except OmegaConfBaseException:
            return "other", key
    return None


def explain_hydra_error(err: BaseException, argv: Sequence[str], conf_dir: Path = CONF_DIR) -> ConfigError | None:
    """A one-line ConfigError for an error Hydra raised while reading the command or composing; None otherwise.

    The error is recognised by its type and structure (the OmegaConf error it was raised from and that error's
    ``full_key``; MissingConfigException's ``missing_cfg_file`` and ``options``; otherwise the override that fails
    when applied as Hydra applies it), never by its message text: only the fallback line quotes Hydra's message."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    overrides = command_overrides(argv) or []
    if isinstance(err, OverrideParseException):
        return ConfigError("override", _first_line(err), "key=value, e.g. k=8")
    if isinstance(err, MissingConfigException):
        missing = str(getattr(err, "missing_cfg_file", "") or "")
        group, _, name = missing.rpartition("/")
        if group and name:
            options = list(getattr(err, "options", None) or group_options(group, conf_dir))
            return ConfigError(group, f"unknown {group} {name!r}", closest(name, options))
        return ConfigError("config", _first_line(err))
    if isinstance(err, ConfigCompositionException):
        cause = err.__cause__
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
            return unknown_key(str(cause.full_key), overrides, conf_dir)  # ``key=v`` on a key that is not there
        failed = failed_override(overrides, conf_dir)
        if failed is not None and failed[0] == "unknown":
            return unknown_key(failed[1], overrides, conf_dir)
        if failed is not None and failed[0] == "exists":
            key = failed[1]
            return ConfigError(key, "already exists, so it cannot be added with +", f"{key}=<value>")
        return ConfigError("config", _first_line(err))
    return None


# ---------------------------------------------------------------------------------------------- 3. composed config
def _int_at_least(value: Any, key: str, low: int, allowed: str | None = None) -> int:
    try:
        number = int(value)
        if number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be an integer, got {value!r}", allowed or f">= {low}") from None
    if number < low:
        raise ConfigError(key, f"must be >= {low}, got {number}", allowed or f">= {low}")
    return number


def check_config(cfg: DictConfig) -> None:
    """Checks that need neither data nor a model: optimizer recipe, Trainer keys and lengths, checkpoint/NaN knobs."""
    from lla.config import check_keys
    from lla.optim import OptimConfig

    optim = OmegaConf.to_container(cfg.optim, resolve=True) if "optim" in cfg else {}
    fields = [f.name for f in dataclasses.fields(OptimConfig)]
    for key in optim:
        if key not in fields:
            raise ConfigError(f"optim.{key}", "unknown key", closest(str(key), fields, "optim."))
    OptimConfig(**optim).validate()

    if "trainer" in cfg:
        check_keys(cfg.trainer, "trainer")
        max_steps = _int_at_least(cfg.trainer.get("max_steps", -1), "trainer.max_steps", -1, "-1 (no limit) or >= 1")
        if max_steps == 0:
            raise ConfigError("trainer.max_steps", "must be -1 (no limit) or >= 1, got 0", "-1 or >= 1")
        # the LR schedule is laid out over max_epochs (lla.optim), so it must be a real length
        _int_at_least(cfg.trainer.get("max_epochs", 1), "trainer.max_epochs", 1)
        _int_at_least(cfg.trainer.get("accumulate_grad_batches", 1), "trainer.accumulate_grad_batches", 1)
        from lla.optim import check_clipping
        check_clipping(cfg.trainer.get("gradient_clip_val"), cfg.trainer.get("gradient_clip_algorithm"))
    if cfg.get("k") is not None:
        _int_at_least(cfg.k, "k", 1, "1..number of layers of the backbone")
    _int_at_least(cfg.get("seed", 0), "seed", 0)
    checkpoint = cfg.get("checkpoint") or {}
    _int_at_least(checkpoint.get("every_n_steps", 0), "checkpoint.every_n_steps", 0, "0 (epoch ends only) or >= 1")
    _int_at_least(cfg.get("nan_check_every", 0), "nan_check_every", 0, "0 (only before checkpoints) or >= 1")
    _int_at_least(cfg.get("progress_every", 1), "progress_every", 1)
    for key in ("resume", "channels_last"):
        if not isinstance(cfg.get(key, False), bool):
            raise ConfigError(key, f"must be true or false, got {cfg.get(key)!r}", "true, false")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path not in (None, "", "last", "hpc") and not Path(str(ckpt_path)).expanduser().is_file():
        raise ConfigError("ckpt_path", f"{ckpt_path} does not exist",
                          "a .ckpt file, last (the run folder's checkpoints/last.ckpt), or null")


# ---------------------------------------------------------------------------------------------- 4. data and shapes
def dry_forward(model, image_size: int) -> Exception | None:
    """Run every module and its loss once on two random images, in eval mode without gradients: the error a shape
    mismatch raises, or None. Leaves the model, its BN statistics and the global RNG as they were."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            device = next(model.parameters()).device
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, 3, image_size, image_size, generator=g).to(device)
            batch = (x, torch.arange(2, device=device) % max(int(model.num_classes), 1))
            h = x
            for k in range(model.num_modules):  # the engine's step loop, forward half (lla.engine)
                inp = h.detach()
                model.step_inputs.append(inp)
                h = model.forward_module(k, inp)
                if k == model.num_modules - 1:
                    model.final_loss(h, batch)
                else:
                    model.local_loss(k, h, batch)
    except (RuntimeError, ValueError, IndexError) as err:
        return err
    finally:
        model.step_inputs.clear()
        if hasattr(model, "_x01_cache"):
            model._x01_cache = None
        model.train(was_training)
    return None


_SHAPE_ERROR = re.compile(r"size|shape|dimension|mat1|mat2|kernel|out of bounds|Expected .*input", re.IGNORECASE)


def check_image_size(model, image_size: int, method: str = "") -> None:
    """Raise ConfigError if the backbone or the method's aux nets / decoders cannot take ``image_size`` images."""
    import torch

    err = dry_forward(model, image_size)
    if err is None or not _SHAPE_ERROR.search(str(err)):
        return  # fine, or a failure that has nothing to do with sizes (training will show it as it is)
    backbone, what = model.backbone, f"{model.backbone.name}" + (f" with {method}" if method else "")

    def backbone_takes(size: int) -> bool:
        was = backbone.training
        backbone.eval()
        try:
            with torch.no_grad():
                backbone(torch.zeros(1, 3, size, size, device=next(backbone.parameters()).device))
            return True
        except (RuntimeError, ValueError):
            return False
        finally:
            backbone.train(was)

    if not backbone_takes(image_size):
        larger = next((s for s in (16, 32, 64, 96, 128, 224) if s > image_size and backbone_takes(s)), None)
        if larger is None:
            raise err  # not a size problem: let the real error show
        raise ConfigError("dataset.image_size", f"{backbone.name} cannot take {image_size}x{image_size} images "
                          f"({_first_line(err)})", f"{larger} or larger")
    raise ConfigError("dataset.image_size", f"{what}: the aux nets cannot take {image_size}x{image_size} images "
                      f"({_first_line(err)})", "a larger image size, or a K that cuts the backbone earlier")


def check_before_fit(dm, model, method: str = "") -> None:
    """Data files on disk (missing / truncated, unless they are about to be downloaded) and the image size."""
    if not getattr(dm, "download", False) and hasattr(dm, "check"):
        dm.check()
    check_image_size(model, int(dm.image_size), method)
