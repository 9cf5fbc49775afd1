"""Plugins: modules that register extra optimizer families (``plugins:`` in a spec).

An entry is either a module name importable where the sweep runs (the working folder or
``PYTHONPATH``), e.g. ``my_families``, or a path to a ``.py`` file, e.g.
``plugins/my_family.py`` (relative to the spec file's folder). The driver imports them while
validating the spec, and every trial worker imports them again before it trains (Ray workers
get the plugin files' folders on their ``PYTHONPATH``).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def is_file_plugin(entry: str) -> bool:
    return entry.endswith(".py")


def resolve(entry: str, base: Path | None) -> str:
    """A file plugin as an absolute path (relative ones are relative to ``base``)."""
    if not is_file_plugin(entry):
        return entry
    path = Path(entry).expanduser()
    return str(path if path.is_absolute() else (base or Path.cwd()) / path)


def import_plugin(entry: str) -> None:
    """Import one plugin (idempotent); raise ImportError with a message naming it."""
    if not is_file_plugin(entry):
        importlib.import_module(entry)
        return
    path = Path(entry)
    name = path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return
    if not path.is_file():
        raise ImportError(f"no such file {path}")
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def import_plugins(entries) -> None:
    for entry in entries:
        import_plugin(entry)


def plugin_folders(entries) -> list[str]:
    """Folders of file plugins, for the trial workers' PYTHONPATH (a plugin may import
    helpers that sit beside it)."""
    return [str(Path(e).parent) for e in entries if is_file_plugin(e)]
