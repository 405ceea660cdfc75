"""Users' packages add to creditrl's registries (methods, tasks, engines, sinks) through entry-point groups.

Each group is imported once, the first time a registry is asked for a name it does not have; a
package registers through the registry's decorators when it is imported.  A package that fails to
load only warns: a broken plugin must not break the library.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

_loaded: set[str] = set()


def load_plugins(group: str, kind: str, register: Callable[[Any], None] | None = None) -> None:
    """Import every entry point of `group` (once per process), passing each loaded object to `register` when
    given; a failure warns with the plugin's name and `kind` ("task", "engine", ...)."""
    if group in _loaded:
        return
    _loaded.add(group)
    for ep in entry_points(group=group):
        try:
            loaded = ep.load()
            if register is not None:
                register(loaded)
        except Exception as exc:  # a plugin must not break the library
            warnings.warn(f"creditrl: {kind} plugin {ep.name!r} ({ep.value}) failed to load: {exc!r}",
                          RuntimeWarning, stacklevel=3)
