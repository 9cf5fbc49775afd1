"""Pure helpers of ``study.spec``: checks of single values (learning-rate grids, the study name),
reading a spec file's text, and turning pydantic's errors into one line per problem.

Every problem is one line ``<source>: <dotted field>: <message> (got <value>)``: the CLI prints
each line of a ``SpecError`` as its own ``error:`` line.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


class SpecError(ValueError):
    """A spec problem; each line of the message names the field and the offending value."""


class Problem(ValueError):
    """Raised by validators: a message that already shows the offending value, and ``field``,
    the dotted path below the validator's own location (``families`` + ``sgd.variants``)."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


def shown(value: Any, limit: int = 120) -> str:
    """``repr(value)``, cut short when long (a 1,000-entry list is not worth a screen)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# -- the study name ------------------------------------------------------------------------------

NAME_RULE = "must be a plain folder name (letters, digits, _ . -, not starting with . or -)"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_name(name: str) -> str:
    """The study name becomes a folder (results/<name>, reports/<name>) and an MLflow
    experiment: no path separators, no ``.``/``..``, nothing a shell or a URL would mangle."""
    if not _NAME.fullmatch(name):
        raise Problem(f"{NAME_RULE} (got {shown(name)})")
    return name


# -- learning rates ------------------------------------------------------------------------------

LR_FORMS = "give a number, a list of numbers > 0, or {low, high, num}"
RANGE_KEYS = ("low", "high", "num")


def parse_lr(value: Any) -> list[float] | dict[str, Any] | None:
    """A learning-rate grid as written (a number, a list of numbers, ``{low, high, num}``) ->
    a list of floats or a ``{low, high, num}`` dict; None stays None (not set). One
    ``Problem`` per mistake, naming what is allowed."""
    if value is None:
        return None
    if isinstance(value, dict):
        return _log_range(value)
    if isinstance(value, list):
        if not value:
            raise Problem("the learning-rate grid is empty (got [])")
        return [_positive(v, field=str(i)) for i, v in enumerate(value)]
    return [_positive(value)]


def _positive(value: Any, field: str = "", forms: str = LR_FORMS) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Problem(f"must be a number (got {shown(value)}){_text_hint(value)}; {forms}", field)
    if not math.isfinite(value):
        raise Problem(f"must be a finite number (got {shown(value)}); {forms}", field)
    if value <= 0:
        raise Problem(f"must be > 0 (got {shown(value)}); {forms}", field)
    return float(value)


_EXP = re.compile(r"([-+]?[0-9]+(?:\.[0-9]*)?)[eE]([-+]?)([0-9]+)")


def _text_hint(value: Any) -> str:
    """YAML 1.1 (PyYAML) reads ``1e-3`` as text: it wants a '.' and a signed exponent."""
    if not isinstance(value, str):
        return ""
    m = _EXP.fullmatch(value.strip())
    if m:
        mantissa, sign, digits = m.groups()
        number = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{sign or '+'}{digits}"
        if number != value.strip():
            return f" (YAML reads {value} as text; write {number})"
    try:
        float(value)
    except ValueError:
        return ""
    return " (a number in quotes is text; drop the quotes)"


def _log_range(raw: dict) -> dict[str, Any]:
    for key in raw:
        if key not in RANGE_KEYS:
            raise Problem(f"unknown key in {{low, high, num}} (got {shown(key)})", str(key))
    missing = [k for k in RANGE_KEYS if k not in raw]
    if missing:
        raise Problem(f"{{low, high, num}} needs {' and '.join(missing)} (got {shown(raw)})")
    forms = "low and high are numbers > 0, num a whole number >= 1"
    low = _positive(raw["low"], "low", forms)
    high = _positive(raw["high"], "high", forms)
    num = raw["num"]
    if (isinstance(num, bool) or not isinstance(num, (int, float))
            or not float(num).is_integer() or num < 1):
        raise Problem(f"must be a whole number >= 1 (got {shown(num)})", "num")
    if high < low:
        raise Problem(f"must be >= low ({raw['low']!r}) (got {raw['high']!r})", "high")
    return {"low": low, "high": high, "num": int(num)}


def log_range_values(low: float, high: float, num: int) -> list[float]:
    """``num`` log-spaced values from low to high (6 significant digits)."""
    if num == 1:
        return [low]
    step = (math.log(high) - math.log(low)) / (num - 1)
    return [float(f"{math.exp(math.log(low) + i * step):.6g}") for i in range(num)]


def model_label(model: Any, models: list) -> str:
    """``mlp``, or ``mlp0`` / ``mlp1`` when the study has two models of one kind."""
    same = [m for m in models if m.name == model.name]
    if len(same) == 1:
        return model.name
    return f"{model.name}{same.index(model)}"


# -- reading a spec file -------------------------------------------------------------------------

def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; every way it can fail is a one-line ``SpecError``."""
    if path.is_dir():
        raise SpecError(f"{path}: is a folder, not a spec file")
    if not path.exists():
        raise SpecError(f"{path}: no such spec file")
    if not path.is_file():
        raise SpecError(f"{path}: not a regular file, not a spec file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SpecError(f"{path}: cannot read the spec file ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:      # binary: an image, an archive, UTF-16 ...
        raise SpecError(f"{path}: not a text (YAML) file")
    try:
        return yaml.safe_load(text)
    except yaml.reader.ReaderError as err:   # control characters: binary that decodes as UTF-8
        raise SpecError(f"{path}: not a text (YAML) file (control character "
                        f"#x{err.character:04x} at character {err.position})") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: YAML syntax error{yaml_error_text(err)}") from None
    except RecursionError:
        raise SpecError(f"{path}: YAML syntax error: nested too deeply") from None


def yaml_error_text(err: yaml.YAMLError) -> str:
    """``' at line 3, column 3: expected ...'``: PyYAML's multi-line message on one line."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None:
        return ": " + one_line(str(err))
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    text = f"{where}: {one_line(problem)}"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context:
        at = (f" at line {context_mark.line + 1}, column {context_mark.column + 1}"
              if context_mark else "")
        text += f" ({one_line(context)}{at})"
    return text


# -- pydantic's errors -> one line per problem -----------------------------------------------------

def one_line(text: str) -> str:
    return " ".join(str(text).split())


def format_errors(err: ValidationError, source: str) -> str:
    """One ``<source>: <field>: <message> (got <value>)`` line per problem, no repeats."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not str(p).startswith(("list[", "function-"))]
        msg = e["msg"].removeprefix("Value error, ")
        problem = (e.get("ctx") or {}).get("error")
        value = e.get("input")
        if isinstance(problem, Problem):
            loc += [problem.field] if problem.field else []
            got = ""                                  # the message shows the value itself
        else:
            got = "" if isinstance(value, dict) and value else f" (got {shown(value)})"
        field = ".".join(loc).replace(".[", "[")    # estimators[2], not estimators.[2]
        lines.append(f"{source}: {field}: {one_line(msg)}{got}" if field
                     else f"{source}: {one_line(msg)}{got}")
    return "\n".join(dict.fromkeys(lines))
