"""``method.mode=paper|reference``: one switch for every behaviour where our default departs from the official code.

Each method class declares ``PAPER_MODE`` (the values its mode-controlled switches take by default: the papers'
evident intent, our fixes) and ``REFERENCE_MODE`` (what the official training script does), each a dict
``switch -> value``, keyed first by configuration when the official scripts differ per configuration (see
:func:`configuration`). A mode-controlled switch is ``null`` in ``conf/method/<name>.yaml``; precedence per switch:

    an explicit value (method.<switch>=... on the command line, a row, an experiment) > the mode's table >
    ``PAPER_MODE`` (a switch the official script's behaviour is not known for keeps the paper value) > None

so ``method.mode=reference method.update_all_ema=true`` runs the reference in everything but that one switch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lla.errors import ConfigError

MODES = ("paper", "reference")


def configuration(backbone, base: str | None = None) -> str:
    """The key of a per-configuration mode table: ``cifar`` or ``imagenet`` (ImageNet ResNets and VGG), with
    ``/<base>`` appended when a base rule is given, e.g. ``cifar/dgl``."""
    family = "imagenet" if getattr(backbone, "family", "") in ("imagenet_resnet", "vgg") else "cifar"
    return f"{family}/{base}" if base else family


def mode_table(table: Mapping[str, Any], config: str) -> dict[str, Any]:
    """The table for ``config``: a flat table applies everywhere; a keyed one is looked up by the full key
    (``cifar/dgl``), then by the family (``cifar``)."""
    if not table or not all(isinstance(v, Mapping) for v in table.values()):
        return dict(table)
    family = config.split("/")[0]
    return dict(table.get(config, table.get(family, {})))


def resolve_mode(mode: str, explicit: Mapping[str, Any], paper: Mapping[str, Any], reference: Mapping[str, Any],
                 config: str = "cifar") -> dict[str, Any]:
    """The value of every mode-controlled switch: ``explicit[key]`` when not None, else the mode's table's value,
    else the paper table's, else None (the method's own automatic choice)."""
    if mode not in MODES:
        raise ConfigError("method.mode", f"unknown mode {mode!r}", ", ".join(MODES))
    table = mode_table(paper, config)
    if mode == "reference":
        table.update(mode_table(reference, config))
    keys = set(explicit) | set(table)
    return {key: explicit.get(key) if explicit.get(key) is not None else table.get(key) for key in keys}
