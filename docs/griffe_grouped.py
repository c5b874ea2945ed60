"""Griffe extension: parameters documented together, ``a, b, c: description``.

fastxent's docstrings are Google style, and several list options that share one description
on one entry (``ignore_index, label_smoothing, z_loss: as in ...``), the grouping numpydoc
documents for parameters. Google style has no such form, so before a docstring is parsed each
such entry becomes one entry per name with the shared description; a name may carry a type in
parentheses (``class_weight ((V,) values)``), and the list of names may run onto the next
line. Anything else is left to the parser, whose warnings fail the strict build (a warning
about a line after such an entry may name a line a few lines off: the entry grew).
"""

from __future__ import annotations

import re

import griffe

_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments|Other Parameters):\s*$")


def _split_top_level(text: str, separator: str) -> list[str]:
    """``text`` cut at each ``separator`` outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _head_and_rest(text: str) -> tuple[str, str] | None:
    """The names before the first top-level colon, and what follows; None without one."""
    parts = _split_top_level(text, ":")
    if len(parts) < 2:
        return None
    return parts[0], ":".join(parts[1:])


def expand_grouped_parameters(docstring: str) -> str:
    """The docstring with every grouped parameter entry written as one entry per name."""
    lines = docstring.split("\n")
    out: list[str] = []
    i = 0
    section_indent = None  # indentation of the current parameter section's title
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        match = _SECTION.match(line)
        if match:
            section_indent = len(match.group(1))
            out.append(line)
            i += 1
            continue
        if section_indent is not None and stripped and indent <= section_indent:
            section_indent = None  # the section ended
        if section_indent is None or not stripped:
            out.append(line)
            i += 1
            continue
        # An entry starts at this indentation; its names may continue on lines ending in ",".
        header, j = stripped, i + 1
        while _head_and_rest(header) is None and header.endswith(",") and j < len(lines):
            header += " " + lines[j].strip()
            j += 1
        split = _head_and_rest(header)
        names = _split_top_level(split[0], ",") if split else []
        if len(names) < 2:
            out.append(line)
            i += 1
            continue
        description = [split[1].strip()]
        while j < len(lines) and lines[j].strip() and len(lines[j]) - len(lines[j].lstrip()) > indent:
            description.append(lines[j].strip())
            j += 1
        text = " ".join(description)
        for name in names:
            out.append(f"{' ' * indent}{name.strip()}: {text}")
        i = j
    return "\n".join(out)


class GroupedParameters(griffe.Extension):
    """Rewrites grouped parameter entries before griffe parses a docstring."""

    def on_instance(self, *, node, obj, agent, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = expand_grouped_parameters(obj.docstring.value)
