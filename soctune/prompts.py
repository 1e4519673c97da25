"""Prompt sets: text files a run trains and evaluates on.

A prompt set is a ``.txt`` file (one prompt per line; empty lines and lines starting with ``#``
are skipped), a ``.jsonl`` file (one JSON object per line with a ``"prompt"`` string and any
other keys as metadata), or the name of a set shipped with soctune (``soctune list prompts``).
Torch-free, so listing the shipped sets costs nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .registry import SoctuneError

SHIPPED_DIR = Path(__file__).parent / "assets" / "prompts"


@dataclass(frozen=True)
class PromptEntry:
    """One prompt and its metadata (the other keys of its JSON line; empty for ``.txt``)."""

    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)


def shipped_prompt_sets() -> dict[str, str]:
    """Shipped sets: name -> the description in the file's first ``#`` line."""
    out = {}
    for f in sorted(SHIPPED_DIR.glob("*.txt")):
        first = f.read_text().splitlines()[0] if f.stat().st_size else ""
        out[f.stem] = first.lstrip("# ").strip() if first.startswith("#") else ""
    return out


def resolve_prompt_file(spec: str | Path) -> Path:
    """A prompt file path, or the file of a shipped set called ``spec``."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    shipped = SHIPPED_DIR / f"{spec}.txt"
    if shipped.is_file() and not p.exists():
        return shipped
    raise SoctuneError(f"prompt file '{spec}' does not exist; pass a .txt (one prompt per line) or .jsonl "
                       f"(\"prompt\" per line) file, or a shipped set: {', '.join(shipped_prompt_sets())}")


def read_prompt_file(spec: str | Path) -> list[PromptEntry]:
    """The prompts of a file or shipped set, in file order (see the module docstring). A bad
    line is a one-line :class:`SoctuneError` naming the file and the line number."""
    path = resolve_prompt_file(spec)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise SoctuneError(f"prompt file '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    entries: list[PromptEntry] = []
    jsonl = path.suffix.lower() == ".jsonl"
    for no, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or (not jsonl and line.startswith("#")):
            continue
        if not jsonl:
            entries.append(PromptEntry(line))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SoctuneError(f"{path}:{no}: not a JSON object ({exc.msg} at column {exc.colno}); each line of a "
                               ".jsonl prompt file is {\"prompt\": \"...\", ...}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise SoctuneError(f"{path}:{no}: expected an object with a non-empty \"prompt\" string, got "
                               f"{line[:80]}")
        entries.append(PromptEntry(obj["prompt"].strip(), {k: v for k, v in obj.items() if k != "prompt"}))
    if not entries:
        raise SoctuneError(f"prompt file '{path}' holds no prompts")
    return entries


def prompt_list(spec: str | Path) -> list[str]:
    """Just the prompt strings of :func:`read_prompt_file`."""
    return [e.prompt for e in read_prompt_file(spec)]


__all__ = ["PromptEntry", "SHIPPED_DIR", "prompt_list", "read_prompt_file", "resolve_prompt_file",
           "shipped_prompt_sets"]
