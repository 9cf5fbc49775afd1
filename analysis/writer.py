"""One writer for every table: CSV (raw numbers), Markdown and LaTeX (formatted for reading).

Kept free of optional dependencies (no tabulate; no pandas Styler) so reports render anywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

NOT_REACHED = "not reached"
PERCENT = " (%)"
ACCURACY_DIGITS = 1   # accuracies on 400-10,000 examples: a tenth of a point is the resolution


def percent_name(column: str) -> str:
    return f"{column}{PERCENT}"


def accuracy_in_percent(frame: pd.DataFrame, digits: int = ACCURACY_DIGITS) -> pd.DataFrame:
    """Every ``*accuracy`` column (fractions, as trials log them) in percent, rounded to
    ``digits`` and named '<column> (%)': the one unit of accuracy in every table."""
    columns = [c for c in frame.columns if isinstance(c, str) and c.endswith("accuracy")]
    out = frame.copy()
    for column in columns:
        out[column] = (100 * pd.to_numeric(out[column], errors="coerce")).round(digits)
    return out.rename(columns={c: percent_name(c) for c in columns})


@dataclass
class Table:
    """A named result table plus the sentence a reader needs to interpret it."""

    name: str
    title: str
    frame: pd.DataFrame
    note: str = ""
    paths: dict[str, Path] = field(default_factory=dict)


def format_value(value) -> str:
    """Readable cell text: 4 significant digits, ∞ as 'not reached', missing as '–'."""
    if value is None or value is pd.NA:
        return "–"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return NOT_REACHED
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def _cells(frame: pd.DataFrame) -> list[list[str]]:
    return [[format_value(v) for v in row] for row in frame.itertuples(index=False)]


def to_markdown(frame: pd.DataFrame) -> str:
    header = [str(c) for c in frame.columns]
    rows = _cells(frame)
    esc = [[c.replace("|", "\\|") for c in row] for row in [header] + rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "±": r"$\pm$", "–": "--", "∞": r"$\infty$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(frame: pd.DataFrame, caption: str = "", label: str = "") -> str:
    """A booktabs table (needs \\usepackage{booktabs} in the paper)."""
    header = [latex_escape(str(c)) for c in frame.columns]
    body = [[latex_escape(c) for c in row] for row in _cells(frame)]
    lines = [r"\begin{table}[t]", r"\centering", r"\small"]
    if caption:
        lines.append(rf"\caption{{{latex_escape(caption)}}}")
    if label:
        lines.append(rf"\label{{tab:{label}}}")
    lines += [r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule",
              " & ".join(header) + r" \\", r"\midrule"]
    lines += [" & ".join(r) + r" \\" for r in body]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html(frame: pd.DataFrame) -> str:
    from html import escape

    head = "".join(f"<th>{escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
                   for row in _cells(frame))
    return f'<table class="result"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def write_table(table: Table, out_dir: Path) -> Table:
    """Write ``<name>.csv``, ``.md`` and ``.tex`` under ``out_dir``; records the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{table.name}.csv", "md": out_dir / f"{table.name}.md",
             "tex": out_dir / f"{table.name}.tex"}
    table.frame.to_csv(paths["csv"], index=False)
    note = f"\n{table.note}\n" if table.note else ""
    paths["md"].write_text(f"### {table.title}\n{note}\n{to_markdown(table.frame)}")
    paths["tex"].write_text(to_latex(table.frame, caption=table.title, label=table.name))
    table.paths = paths
    return table
