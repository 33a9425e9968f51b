"""The knobs: one module each (:mod:`~autosearch.knobs.prune`, :mod:`~autosearch.knobs.rank`,
:mod:`~autosearch.knobs.bits`), registered here by name.

A new knob is one module defining a :class:`Knob` subclass and calling :func:`register`; a space
brings it in with a top-level ``plugins: [package.module]`` list (or a package declares it under the
``autosearch.knobs`` entry-point group). Nothing else names a knob.

Example:
    >>> from autosearch.knobs import knob, knob_names
    >>> knob_names()
    ['prune', 'rank', 'bits']
    >>> knob("bits").neutral
    32
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from autosearch.errors import ConfigError
from autosearch.knobs.base import Knob

__all__ = ["Knob", "knob", "knob_names", "knobs", "known", "load_plugins", "register", "unregister"]

_REGISTRY: dict[str, Knob] = {}
_ENTRY_POINTS_LOADED = False


def register(k: Knob, *, replace: bool = False) -> Knob:
    """Add a knob to the registry (its ``name`` is its key in spaces and candidates)."""
    if not k.name or not k.name.isidentifier():
        raise ConfigError(f"knob {type(k).__name__} needs a name that is an identifier, got {k.name!r}")
    if k.name in ("quant", "recovery"):
        raise ConfigError(f"knob name {k.name!r} is taken by a candidate's option section; choose another")
    if k.name in _REGISTRY and not replace and type(_REGISTRY[k.name]) is not type(k):
        raise ConfigError(f"a knob named {k.name!r} is already registered ({type(_REGISTRY[k.name]).__name__})")
    _REGISTRY[k.name] = k
    return k


def unregister(name: str) -> None:
    """Remove a knob (tests that register a toy knob clean up with this)."""
    _REGISTRY.pop(name, None)


def _entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="autosearch.knobs"):
        obj = ep.load()
        register(obj() if isinstance(obj, type) else obj)


def knobs() -> list[Knob]:
    """Every registered knob, in sampling and build order."""
    _entry_points()
    return sorted(_REGISTRY.values(), key=lambda k: (k.order, k.name))


def knob_names() -> list[str]:
    """Names of the registered knobs, in order."""
    return [k.name for k in knobs()]


def knob(name: str) -> Knob:
    """The registered knob called ``name``.

    Raises:
        ConfigError: no such knob (the message lists those there are).
    """
    _entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown knob {name!r}; registered knobs: {', '.join(knob_names())} "
                          "(a space loads more with 'plugins: [package.module]')") from None


def known(names: Iterable[str]) -> list[Knob]:
    """The registered knobs among ``names`` (a stored study may name a plug-in not loaded now), in order."""
    wanted = set(names)
    return [k for k in knobs() if k.name in wanted]


def load_plugins(modules: Iterable[str], *, source: str | None = None) -> None:
    """Import the modules a space names under ``plugins:`` (each registers its knobs)."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            where = f" in {source}" if source else ""
            raise ConfigError(f"plugin module {mod!r}{where} cannot be imported ({exc}); check the name under "
                              "'plugins:' and that it is installed or on PYTHONPATH") from None


def _builtins() -> None:
    from autosearch.knobs.bits import Bits
    from autosearch.knobs.prune import Prune
    from autosearch.knobs.rank import Rank

    for k in (Prune(), Rank(), Bits()):
        register(k)


_builtins()
