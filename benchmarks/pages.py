"""One page writer for every benchmark: a benchmark measures, then hands its section to ``update_section``."""

from __future__ import annotations

from pathlib import Path


def update_section(path: Path, heading: str, text: str) -> None:
    """Replace the section of ``path`` that starts with the line ``heading`` (up to the next "## " heading or the end),
    or append it; everything else in the file is kept byte for byte. ``text`` starts with ``heading``."""
    current = path.read_text() if path.exists() else ""
    lines = current.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == heading), None)
    body = text if text.endswith("\n") else text + "\n"
    if start is None:
        prefix = current if current.endswith("\n") or not current else current + "\n"
        new = prefix + ("\n" if prefix and not prefix.endswith("\n\n") else "") + body
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + body + ("\n" + tail if tail and not body.endswith("\n\n") else tail)
    path.write_text(new)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
