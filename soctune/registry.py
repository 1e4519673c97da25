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


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside soctune (the user's line, not
    the library frame that noticed the problem), so filters and the printed location point
    at the call the user can change."""
    import os
    import sys
    import warnings

    package_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level, frame = 2, sys._getframe(1)  # stacklevel 1 is this function itself
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package_dir):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


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
        self._builtins: set[str] | None = None

    def register(self, name: str, description: str = "") -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; the description is shown by
        ``soctune list``. Defaults to the first docstring line."""

        def deco(obj: T) -> T:
            desc = description or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            old = self._entries.get(name)
            if old is not None and old.obj is not obj:
                if _is_builtin(obj) and not _is_builtin(old.obj):
                    # the built-ins load lazily: a user's earlier replacement stays in force
                    return obj
                warn_user(self._replacing(name, old.obj, obj))
            elif old is None and not _is_builtin(obj) and name in self._builtin_names():
                warn_user(self._replacing(name, None, obj))
            self._entries[name] = Entry(name, obj, desc)
            try:
                setattr(obj, "registered_name", name)
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def _builtin_names(self) -> set[str]:
        """Names soctune itself registers for this kind (read from source, so also those whose
        module is not imported yet)."""
        if self._builtins is None:
            listed = list_builtin(self.kind) if self.kind in BUILTIN_PACKAGES else None
            self._builtins = {n for n, _ in listed} if listed is not None else set()
        return self._builtins

    def _replacing(self, name: str, old: Any, new: Any) -> str:
        """The warning of a registration that replaces an entry: a re-run definition (a notebook
        cell run again) or, said plainly, a built-in."""
        if old is None or _is_builtin(old):
            return (f"{self.kind} '{name}' is a soctune built-in; {_qualname(new)} replaces it in this session "
                    f"(register under another name to keep the built-in)")
        return f"{self.kind} '{name}' registered again: {_qualname(new)} replaces the earlier {_qualname(old)}"

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
        """Instantiate the entry with keyword options, turning bad options into a one-line error
        that names the accepted ones."""
        cls = self.get(name)
        accepted = constructor_options(cls)
        unknown = sorted(set(options) - set(accepted)) if accepted is not None else []
        if unknown:
            raise SoctuneError(f"bad options for {self.kind} '{name}': unknown {', '.join(unknown)}; "
                               f"it accepts {', '.join(accepted or []) or 'no options'}")
        try:
            return cls(**options)
        except TypeError as exc:
            if "unexpected keyword argument" in str(exc) or "missing" in str(exc):
                hint = f"; it accepts {', '.join(accepted)}" if accepted else ""
                raise SoctuneError(f"bad options for {self.kind} '{name}': {exc}{hint}") from None
            raise


def constructor_options(obj: Any) -> list[str] | None:
    """The keyword options ``obj(**options)`` accepts, sorted; ``None`` when it takes arbitrary
    keywords that cannot be listed.

    A class's ``__init__`` that forwards ``**kwargs`` adds its parent's options (walking the
    MRO); a class with a ``declared_params()`` classmethod (:class:`~soctune.sde.base.Process`)
    takes those as its ``**kwargs``; ``nn.Module``/``object`` take none."""
    import inspect

    names: set[str] = set()
    klasses = [k for k in obj.__mro__ if "__init__" in vars(k)] if inspect.isclass(obj) else [obj]
    for klass in klasses:
        if klass is object or getattr(klass, "__module__", "").startswith("torch."):
            return sorted(names)
        init = klass.__init__ if inspect.isclass(klass) else klass
        try:
            params = list(inspect.signature(init).parameters.values())
        except (TypeError, ValueError):
            return None
        names.update(p.name for p in params[1 if inspect.isclass(klass) else 0:]
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return sorted(names)
        if "declared_params" in vars(klass):
            return sorted(names | set(obj.declared_params()))
    return None if not inspect.isclass(obj) else sorted(names)


def _is_builtin(obj: Any) -> bool:
    return str(getattr(obj, "__module__", "")).startswith("soctune.")


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


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
