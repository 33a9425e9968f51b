"""The bundled search-space presets (``cnn``, ``quant``, ``transformer``).

The YAML files have one home, the top-level ``search_spaces/`` folder of the
source tree. The packaging (``pyproject.toml``, ``package-dir``) installs that
folder as the subpackage ``autosearch.search_spaces``, so a wheel carries them
and :func:`importlib.resources.files` finds them after a normal
``pip install``; nothing is copied in the source tree.

When ``autosearch`` is imported from a source checkout (a ``pyproject.toml``
beside the package), the checkout's own ``search_spaces/`` wins: with the
checkout put first on ``PYTHONPATH`` (a git worktree, say) the import system
would otherwise resolve ``autosearch.search_spaces`` through whatever editable
install the environment holds, possibly of another tree, or not at all.

Example:
    >>> from autosearch.presets import preset_names, read_preset
    >>> "cnn" in preset_names()
    True
    >>> read_preset("cnn.yaml").startswith("#")
    True
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from autosearch.errors import ConfigError

if TYPE_CHECKING:
    from importlib.abc import Traversable  # importlib.resources.abc from Python 3.11

__all__ = ["is_preset_file", "preset_names", "preset_path", "read_preset"]

_PACKAGE = "autosearch.search_spaces"
_SUFFIX = ".yaml"


def _root() -> Traversable:
    """The folder that holds the presets."""
    tree = Path(__file__).resolve().parent.parent
    if (tree / "pyproject.toml").is_file() and (tree / "search_spaces").is_dir():
        return tree / "search_spaces"  # a source checkout: its own presets
    try:
        root = resources.files(_PACKAGE)
    except ModuleNotFoundError:
        root = None
    if root is None or not any(p.name.endswith(_SUFFIX) for p in root.iterdir()):
        raise ConfigError(
            f"this install of autosearch ({tree / 'autosearch'}) lacks its search-space presets ({_PACKAGE}/*{_SUFFIX}); "
            "reinstall it (pip install autosearch, or pip install -e . in a checkout)"
        )
    return root


def _stem(name: str) -> str:
    return name.removesuffix(_SUFFIX)


def preset_names() -> list[str]:
    """Names of the bundled presets, sorted (``["cnn", "quant", "transformer"]``)."""
    return sorted(_stem(p.name) for p in _root().iterdir() if p.name.endswith(_SUFFIX) and p.is_file())


def _find(name: str) -> Traversable:
    stem = _stem(str(name))
    item = _root() / f"{stem}{_SUFFIX}"
    if "/" in stem or "\\" in stem or not stem or not item.is_file():
        raise ConfigError(f"unknown search-space preset {name!r}; presets: {', '.join(preset_names())}")
    return item


def preset_path(name: str) -> Path:
    """File of a preset by name (``cnn`` or ``cnn.yaml``).

    Raises:
        ConfigError: no such preset (the message lists the presets there are), or the
            presets are not files on disk (a zip import: use :func:`read_preset`).
    """
    item = _find(name)
    if not isinstance(item, Path):
        raise ConfigError(f"preset {name!r} lies inside an archive ({item}), not on disk; read it with autosearch.presets.read_preset")
    return item


def read_preset(name: str) -> str:
    """Text of a preset by name (``cnn`` or ``cnn.yaml``).

    Raises:
        ConfigError: no such preset (the message lists the presets there are).
    """
    return _find(name).read_text(encoding="utf-8")


def is_preset_file(path: str | Path | None) -> bool:
    """Whether ``path`` is one of the bundled presets' files (not a user's copy of one elsewhere)."""
    if not path:
        return False
    try:
        root = _root()
    except ConfigError:
        return False
    return isinstance(root, Path) and Path(path).resolve().parent == root.resolve() and Path(path).suffix == _SUFFIX
