"""BENCHMARKS.md sections owned by one tool each, between its start/end markers (the rest of the file is kept)."""
from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, start: str, end: str, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
