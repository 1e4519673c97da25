"""Name -> class registries behind `get_process`, `get_solver`, `get_reward`.

A registry maps the short names users type on the command line to classes, and also accepts
an import path ``"my_pkg.my_module:MyClass"`` so third-party plug-ins need no registration
call at all.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


def import_submodules(package: str) -> None:
    """Import every module of ``package`` once. Registration is an import's side effect, so a
    new built-in process, solver or reward is one new file in its package."""
    import pkgutil

    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{package}.{info.name}")


class SoctuneError(ValueError):
    """A user mistake. Its message is one line that names the fix; the CLI prints it without a
    traceback."""


class UnknownNameError(SoctuneError):
    """A name that no registry entry (and no importable path) matches."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    description: str


class Registry(Generic[T]):
    """A named collection of plug-ins of one kind (``"process"``, ``"solver"``, ``"reward"``).

    >>> reg = Registry[type]("widget")
    >>> @reg.register("box", "a box")
    ... class Box: ...
    >>> reg.get("box") is Box
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str = "") -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; the description is shown by
        ``soctune list``. Defaults to the first docstring line."""

        def deco(obj: T) -> T:
            desc = description or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            if name in self._entries and self._entries[name].obj is not obj:
                raise SoctuneError(f"{self.kind} '{name}' is already registered; pick another name")
            self._entries[name] = Entry(name, obj, desc)
            try:
                setattr(obj, "registered_name", name)
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> T:
        """Look ``name`` up; ``"pkg.module:Attr"`` imports a plug-in instead."""
        if name in self._entries:
            return self._entries[name].obj
        if ":" in name:
            module_name, _, attr = name.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise UnknownNameError(
                    f"cannot import {self.kind} plug-in module '{module_name}' ({exc}); "
                    "check the import path 'package.module:Name' and that it is on PYTHONPATH"
                ) from None
            try:
                return getattr(module, attr)
            except AttributeError:
                raise UnknownNameError(
                    f"module '{module_name}' has no attribute '{attr}' for {self.kind} '{name}'"
                ) from None
        raise UnknownNameError(
            f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())} "
            f"(or a plug-in as 'package.module:Name')"
        )

    def build(self, name: str, **options: Any) -> Any:
        """Instantiate the entry with keyword options, turning bad options into a one-line error."""
        cls = self.get(name)
        try:
            return cls(**options)
        except TypeError as exc:
            if "unexpected keyword argument" in str(exc) or "missing" in str(exc):
                raise SoctuneError(f"bad options for {self.kind} '{name}': {exc}") from None
            raise


# ------------------------------------------------------------------ listing without importing
#: kind -> (sub-package of soctune holding the built-ins, names a registration call may use)
BUILTIN_PACKAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "process": ("sde", ("register_process", "PROCESSES.register")),
    "solver": ("solvers", ("register_solver", "SOLVERS.register")),
    "reward": ("rewards", ("register_reward", "REWARDS.register")),
}


def _call_name(func: Any) -> str | None:
    import ast

    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return None


def _scan_registrations(source: str, filename: str, callers: tuple[str, ...]) -> dict[str, str] | None:
    """{name: description} of the ``register_*("name", "description")`` calls in one module's
    source; ``None`` when a call is not plain literals (only an import can tell then)."""
    import ast

    tree = ast.parse(source, filename)
    found: dict[str, str] = {}
    decorators: set[int] = set()
    calls: list[tuple[ast.Call, ast.AST | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and _call_name(deco.func) in callers:
                    decorators.add(id(deco))
                    calls.append((deco, node))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and id(node) not in decorators and _call_name(node.func) in callers:
            calls.append((node, None))
    for call, target in calls:
        args = list(call.args)
        kwargs = {k.arg: k.value for k in call.keywords}
        name_node = args[0] if args else kwargs.get("name")
        desc_node = args[1] if len(args) > 1 else kwargs.get("description")
        if len(args) > 2 or None in kwargs or not isinstance(name_node, ast.Constant) \
                or not isinstance(name_node.value, str):
            return None
        if desc_node is not None:
            if not (isinstance(desc_node, ast.Constant) and isinstance(desc_node.value, str)):
                return None
            desc = desc_node.value
        else:
            desc = ""
        if not desc:  # Registry.register falls back to the first docstring line of the object
            if target is None:
                return None
            desc = (ast.get_docstring(target, clean=False) or "").strip().split("\n")[0]
        found[name_node.value] = desc
    return found


def list_builtin(kind: str) -> list[tuple[str, str]] | None:
    """[(name, one-line description)] of the built-in ``kind`` ("process", "solver", "reward"),
    read from the registration calls in the package's source without importing it (so without
    torch): what ``list_processes()`` / ``list_solvers()`` / ``list_rewards()`` return, in the
    same order. ``None`` when a registration is not literal and only an import can tell."""
    from pathlib import Path

    package, callers = BUILTIN_PACKAGES[kind]
    entries: dict[str, str] = {}
    for path in sorted((Path(__file__).parent / package).glob("*.py")):
        source = path.read_text(encoding="utf-8")
        if not any(c.rpartition(".")[2] in source for c in callers):
            continue
        found = _scan_registrations(source, str(path), callers)
        if found is None:
            return None
        entries.update(found)
    return [(n, entries[n]) for n in sorted(entries)]
