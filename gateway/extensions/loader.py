"""Finding, configuring and instantiating plugins from the ``plugins:`` config.

A plugin entry is found by, in order: ``path`` (a ``.py`` file), ``module``
(``pkg.mod`` or ``pkg.mod:Class``), an ``octopus.plugins`` entry point with the entry's
name, or a built-in (``jwt-auth`` → ``plugins.jwt_auth``). In a module the class is
``PLUGIN`` if defined, else the one ``Plugin`` subclass the module defines.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from plugins.api import Plugin

ENTRY_POINT_GROUP = "octopus.plugins"


class PluginError(Exception):
    """A plugin that cannot be loaded or configured; the message names the entry."""


@dataclass
class LoadedPlugins:
    """Plugin instances by entry name, and the global middleware chain."""

    by_name: dict[str, Plugin]
    middleware: list[Plugin]
    #: Entry name → where its class came from: ``builtin``, ``module``, ``file`` or
    #: ``entry-point`` (shown by ``/_/plugins``).
    sources: dict[str, str] = field(default_factory=dict)

    def chain_for(self, names: tuple[str, ...]) -> list[Plugin]:
        """Global middleware, then the route's own plugins (each plugin once)."""
        chain = list(self.middleware)
        for name in names:
            plugin = self.by_name.get(name)
            if plugin is not None and plugin not in chain:
                chain.append(plugin)
        return chain


def builtin_module(name: str) -> str:
    return "plugins." + name.replace("-", "_")


def plugin_source(entry: Any) -> str:
    """Where ``load_plugin_class`` finds ``entry``'s class (same order of precedence)."""
    if entry.path:
        return "file"
    if entry.module:
        return "module"
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return "entry-point" if any(p.name == entry.name for p in points) else "builtin"


def load_plugin_class(entry: Any) -> type[Plugin]:
    where = f"plugin {entry.name!r}"
    if entry.path:
        return _class_in(_module_from_file(Path(entry.path), where), where)
    if entry.module:
        module_name, _, attribute = entry.module.partition(":")
        module = _import(module_name, where)
        if attribute:
            found = getattr(module, attribute, None)
            if not (isinstance(found, type) and issubclass(found, Plugin)):
                raise PluginError(f"{where}: {entry.module} is not a Plugin class")
            return found
        return _class_in(module, where)
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if point.name == entry.name:
            loaded = point.load()
            if isinstance(loaded, ModuleType):
                return _class_in(loaded, where)
            if isinstance(loaded, type) and issubclass(loaded, Plugin):
                return loaded
            raise PluginError(f"{where}: entry point {point.value} is not a Plugin class")
    return _class_in(_import(builtin_module(entry.name), where), where)


def build_plugin(entry: Any, index: int | None = None) -> Plugin:
    """An instance configured from ``entry.config``."""
    cls = load_plugin_class(entry)
    plugin = cls()
    try:
        config = cls.Config.model_validate(entry.config or {})
    except ValidationError as exc:
        label = f"plugins[{index}]" if index is not None else "plugin"
        lines = [
            f"{label} ({entry.name}): config.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors()
        ]
        raise PluginError("\n".join(lines)) from None
    plugin.configure(config)
    failure = getattr(entry, "failure", None)
    if failure and plugin.metadata.kind != "auth":
        plugin.failure_mode = failure
    return plugin


def load_plugins(settings: Any) -> LoadedPlugins:
    """Every enabled ``plugins`` entry, plus built-ins named only in ``middleware``."""
    from settings import MIDDLEWARE_ALIASES

    by_name: dict[str, Plugin] = {}
    sources: dict[str, str] = {}
    for index, entry in enumerate(settings.plugins):
        if entry.enabled:
            by_name[entry.name] = build_plugin(entry, index)
            sources[entry.name] = plugin_source(entry)
    middleware: list[Plugin] = []
    for name in settings.middleware:
        plugin = by_name.get(name)
        if plugin is None and name in MIDDLEWARE_ALIASES:
            target = MIDDLEWARE_ALIASES[name]
            if name == "auth":  # the configured auth plugin, whichever it is
                plugin = next(
                    (p for p in by_name.values() if p.metadata.kind == "auth"), by_name.get(target)
                )
            else:
                plugin = by_name.get(target)
            name = target
        if plugin is None:
            if any(e.name == name and not e.enabled for e in settings.plugins):
                continue
            plugin = build_plugin(_Entry(name))
            by_name[name] = plugin
            sources[name] = plugin_source(_Entry(name))
        if plugin not in middleware:
            middleware.append(plugin)
    return LoadedPlugins(by_name, middleware, sources)


@dataclass
class _Entry:
    name: str
    module: str | None = None
    path: str | None = None
    config: dict[str, Any] | None = None


def _import(name: str, where: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise PluginError(f"{where}: cannot import {name}: {exc}") from None


def _module_from_file(path: Path, where: str) -> ModuleType:
    if not path.is_file():
        raise PluginError(f"{where}: no such file {path}")
    module_name = f"octopus_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"{where}: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise PluginError(f"{where}: {path} failed to import: {exc}") from None
    return module


def _class_in(module: ModuleType, where: str) -> type[Plugin]:
    declared = getattr(module, "PLUGIN", None)
    if isinstance(declared, type) and issubclass(declared, Plugin):
        return declared
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, Plugin)
        and value is not Plugin
        and value.__module__ == module.__name__
    ]
    if len(found) != 1:
        raise PluginError(
            f"{where}: {module.__name__} must define PLUGIN or exactly one Plugin subclass "
            f"(found {len(found)})"
        )
    return found[0]
