"""The typed concept syntax of SEGA Prompt: a prompt and its concepts in one text box.

    a portrait photo of a woman, natural light
    + glasses :6 @10-
    - (red hat:1.2) :5 thr=0.95 w=0.5 @0.2-0.8

A concept starts with `+` (add) or `-` (remove) at the start of a line or right after a `;`, so
one line can hold several (`+ glasses; + beard :4`). Its text runs up to its first setting; the
settings follow, separated by spaces, in any order:

    :5          edit scale (the wired node's edit_scale)
    thr=0.95    threshold in [0, 1)          (also threshold=)
    w=0.5       weight                       (also weight=)
    @10-30      acts from step 10 up to step 30 (exclusive); @10- to the end, @-30 from the start
    @0.2-0.8    the same as fractions of the schedule (a `.` in either bound makes both fractions)

Every other line is the prompt. A line starting with `#` is a comment (ComfyUI's frontend removes
`//` and `/* */` comments and rewrites `{a|b}` itself, so the syntax uses neither). `\\` before one
of `+ - ; : @ = #` makes it plain text; ComfyUI's own `(word:1.2)` weighting and `\\(` escapes reach
the text encoder untouched. Pure Python: no torch, no ComfyUI.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .concepts import SEGAValueError

SPECIALS = "+-;:@=#"
SCALE_MAX = 100.0
WEIGHT_MAX = 10.0
# the wired SEGA Concept's defaults (the paper's)
DEFAULT_SCALE = 5.0
DEFAULT_THRESHOLD = 0.9
DEFAULT_WEIGHT = 1.0
DEFAULT_WARMUP = 10
_KEYS = {"thr": "threshold", "threshold": "threshold", "w": "weight", "weight": "weight"}
_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)\Z")


@dataclass(frozen=True)
class Window:
    """Where a concept acts: [start, end) in sampler steps, or in fractions of the schedule.

    end None: to the end of the run."""

    start: float = DEFAULT_WARMUP
    end: Optional[float] = None
    fraction: bool = False


@dataclass(frozen=True)
class TypedConcept:
    """One concept as written in a SEGA Prompt box."""

    text: str
    reverse: bool = False
    scale: float = DEFAULT_SCALE
    threshold: float = DEFAULT_THRESHOLD
    weight: float = DEFAULT_WEIGHT
    window: Window = Window()


@dataclass(frozen=True)
class ParsedPrompt:
    prompt: str
    concepts: Tuple[TypedConcept, ...]


def _fail(where: str, line: int, col: int, message: str):
    raise SEGAValueError(f"{where}, line {line} col {col}: {message}")


def _split_unescaped(text: str, sep: str) -> List[Tuple[int, str]]:
    """Pieces of `text` between unescaped `sep` characters, with their start columns (0-based)."""
    pieces, start, i = [], 0, 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in SPECIALS:
            i += 2
            continue
        if text[i] == sep:
            pieces.append((start, text[start:i]))
            start = i + 1
        i += 1
    pieces.append((start, text[start:]))
    return pieces


def _unescape(text: str) -> str:
    return re.sub(r"\\([" + re.escape(SPECIALS) + r"])", r"\1", text)


def _escape(text: str) -> str:
    """Concept text as written: escapes only what parse_prompt would otherwise read as syntax (a
    `;`, `#` or `=`, a `:` or `@` opening a word, a backslash before a special character)."""
    text = re.sub(r"(?<=\\)([" + re.escape(SPECIALS) + r"])", r"\\\1", text)
    text = re.sub(r"(?<!\\)([;#=])", r"\\\1", text)
    return re.sub(r"(^|\s)([:@])", r"\1\\\2", text)


def _tokens(text: str) -> List[Tuple[int, str]]:
    return [(m.start(), m.group()) for m in re.finditer(r"\S+", text)]


def _is_setting(token: str) -> bool:
    return token[0] in ":@" or ("=" in token and not token.startswith("\\") and "\\=" not in token)


def _number(where, line, col, token, value: str, what: str) -> float:
    if not _NUMBER.match(value):
        _fail(where, line, col, f"'{token}': {what} must be a number, got '{value}'")
    return float(value)


def _window(where: str, line: int, col: int, token: str) -> Window:
    body = token[1:]
    if body.count("-") != 1:
        _fail(where, line, col, f"'{token}' is not a step window; expected @START-END, @START- or @-END "
                                f"(steps like @10-30, or fractions like @0.2-0.8)")
    a, b = body.split("-")
    if not a and not b:
        _fail(where, line, col, f"'{token}' gives neither a start nor an end; expected e.g. @10- or @0.2-0.8")
    fraction = "." in a or "." in b
    start = _number(where, line, col, token, a, "the window's start") if a else 0.0
    end = _number(where, line, col, token, b, "the window's end") if b else None
    if fraction:
        for v in (start, end):
            if v is not None and v > 1.0:
                _fail(where, line, col, f"'{token}' is outside [0, 1]; fractions of the schedule run from 0 to 1 "
                                        f"(write whole numbers for steps)")
    if end is not None and end <= start:
        _fail(where, line, col, f"'{token}' ends before it starts; the end must be after the start")
    if not fraction:
        start, end = int(start), None if end is None else int(end)
    return Window(start=start, end=end, fraction=fraction)


def _concept(where: str, line: int, col: int, segment: str) -> TypedConcept:
    """One `+ text settings` segment; `col` is its 1-based column in the line."""
    reverse = segment[0] == "-"
    body = segment[1:]
    tokens = _tokens(body)
    first = next((k for k, (_, t) in enumerate(tokens) if _is_setting(t)), len(tokens))
    text_end = tokens[first][0] if first < len(tokens) else len(body)
    text = _unescape(body[:text_end].strip())
    if not text:
        _fail(where, line, col, f"'{segment[0]}' needs the concept's text after it, e.g. "
                                f"'{segment[0]} glasses'")
    settings = {}
    for offset, token in tokens[first:]:
        tcol = col + 1 + offset
        if not _is_setting(token):
            _fail(where, line, tcol, f"found '{token}' after the concept's settings; expected a setting "
                                     f"(:scale, thr=, w=, @window). Put the text before the settings, or "
                                     f"write '\\:' for a literal ':'")
        if token[0] == ":":
            key, value = "scale", _number(where, line, tcol, token, token[1:], "the edit scale")
            if not (math.isfinite(value) and value <= SCALE_MAX):
                _fail(where, line, tcol, f"'{token}' is outside [0, {SCALE_MAX:g}]")
        elif token[0] == "@":
            key, value = "window", _window(where, line, tcol, token)
        else:
            name, raw = token.split("=", 1)
            key = _KEYS.get(name)
            if key is None:
                _fail(where, line, tcol, f"'{token}': unknown setting '{name}'; expected thr=, w=, :scale or "
                                         f"@window")
            value = _number(where, line, tcol, token, raw, name)
            if key == "threshold" and not value < 1.0:
                _fail(where, line, tcol, f"'{token}' is outside [0, 1)")
            if key == "weight" and value > WEIGHT_MAX:
                _fail(where, line, tcol, f"'{token}' is outside [0, {WEIGHT_MAX:g}]")
        if key in settings:
            _fail(where, line, tcol, f"'{token}' sets the {key} a second time")
        settings[key] = value
    return TypedConcept(text=text, reverse=reverse, **settings)


def parse_prompt(text: str, where: str = "SEGA Prompt") -> ParsedPrompt:
    """The prompt and the concepts of a SEGA Prompt text box; SEGAValueError naming line and column."""
    if not isinstance(text, str):
        raise SEGAValueError(f"{where}: the text must be a string, got {type(text).__name__}")
    prompt_lines, concepts = [], []
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        if line.lstrip().startswith("#"):
            continue
        prompt_part, in_concepts = [], False
        for k, (start, piece) in enumerate(_split_unescaped(line, ";")):
            stripped = piece.lstrip()
            col = start + len(piece) - len(stripped) + 1
            if stripped[:1] in ("+", "-"):
                concepts.append(_concept(where, number, col, stripped.rstrip()))
                in_concepts = True
            elif in_concepts:
                if stripped:
                    _fail(where, number, col, f"found '{stripped.split()[0]}' after a ';' that follows a concept; "
                                              f"expected another concept (+ or -). Put the prompt on its own line")
            else:
                # a ';' inside the prompt is prompt text
                prompt_part.append(piece if k == 0 else ";" + piece)
        if prompt_part:
            prompt_lines.append(_unescape("".join(prompt_part)))
    return ParsedPrompt(prompt="\n".join(prompt_lines).strip(), concepts=tuple(concepts))


def _number_text(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


def render_concept(c: TypedConcept) -> str:
    """One concept as SEGA Prompt text; parse_prompt reads it back to the same concept."""
    parts = [("- " if c.reverse else "+ ") + _escape(c.text)]
    if c.scale != DEFAULT_SCALE:
        parts.append(":" + _number_text(c.scale))
    if c.threshold != DEFAULT_THRESHOLD:
        parts.append("thr=" + _number_text(c.threshold))
    if c.weight != DEFAULT_WEIGHT:
        parts.append("w=" + _number_text(c.weight))
    w = c.window
    if w != Window():
        show = (lambda v: repr(float(v))) if w.fraction else (lambda v: str(int(v)))
        parts.append("@" + show(w.start) + "-" + ("" if w.end is None else show(w.end)))
    return " ".join(parts)


def render_prompt(parsed: ParsedPrompt) -> str:
    """A ParsedPrompt as text: the prompt, then one concept per line."""
    lines = [_escape_prompt(line) for line in parsed.prompt.split("\n")] if parsed.prompt else []
    return "\n".join(lines + [render_concept(c) for c in parsed.concepts])


def _escape_prompt(line: str) -> str:
    """A prompt line as text that parse_prompt reads back unchanged: `;` and `#` escaped, a leading
    `+`/`-` escaped, and a backslash that would escape a special character doubled."""
    line = re.sub(r"(?<=\\)([" + re.escape(SPECIALS) + r"])", r"\\\1", line)
    line = re.sub(r"(?<!\\)([;#])", r"\\\1", line)
    stripped = line.lstrip()
    if stripped[:1] in ("+", "-"):
        line = line[: len(line) - len(stripped)] + "\\" + stripped
    return line
