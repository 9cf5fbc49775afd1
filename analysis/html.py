"""The report's ``index.html``: one self-contained page. Figures are embedded as
``data:image/png;base64`` images and every table file (CSV, Markdown, LaTeX) as a ``data:`` URI
download link, so the page needs no file beside it.

Why: MLflow's UI previews an HTML artifact in a sandboxed iframe whose document is a ``blob:``
URL (MLflow 3.x, ``ShowArtifactHtmlView``: ``<iframe class="mlflow-html-iframe"
sandbox="allow-scripts" src={URL.createObjectURL(new Blob([html]))}>``), where relative paths
such as ``figures/x.png`` resolve against nothing and break. ``index.md`` keeps relative links.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from analysis.writer import Table, to_html

MIME = {".csv": "text/csv", ".md": "text/markdown", ".tex": "application/x-tex",
        ".png": "image/png", ".json": "application/json"}

_CSS = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
        "table.result{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}"
        "table.result td,table.result th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "table.result th{background:#f0f0f0}img{max-width:100%;border:1px solid #eee}"
        ".note{color:#555}nav{font-size:13px;line-height:1.6}")


def data_uri(path: Path, mime: str | None = None) -> str:
    """The file's bytes as a ``data:<mime>;base64,...`` URI."""
    path = Path(path)
    mime = mime or MIME.get(path.suffix, "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def download_link(path: Path, label: str | None = None) -> str:
    """An ``<a download>`` whose href carries the file itself."""
    path = Path(path)
    return (f"<a download='{html.escape(path.name)}' href='{data_uri(path)}'>"
            f"{html.escape(label or path.name)}</a>")


def write_index_html(out: Path, *, study: str, intro: str, sections: list[tuple[str, str, str,
                     list[Path], pd.DataFrame]], table_list: list[Table], figs: dict,
                     captions: dict[str, str], opening: list[Table] = (),
                     warnings: tuple[str, list[str]] | None = None) -> Path:
    """Write ``out/index.html``. ``opening``: tables the page opens with (the claims), then
    ``warnings`` (title, sentences: the protocol checks), the intro, ``sections`` (anchor,
    title, note, files, frame: the best settings, the summary), the result tables and
    ``figs`` (name -> FigureResult)."""
    esc = html.escape
    contents = [(t.name, t.title) for t in opening]
    contents += [("protocol", warnings[0])] if warnings else []
    contents += [(anchor, title) for anchor, title, *_ in sections]
    contents += [(t.name, t.title) for t in table_list]
    contents += [(f"fig-{name}", f"Figure: {name}") for name in figs]
    nav = " · ".join(f"<a href='#{esc(a)}'>{esc(t)}</a>" for a, t in contents)
    parts = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(study)} report"
              f"</title><style>{_CSS}</style></head><body>"),
             f"<h1>Study {esc(study)}</h1><nav>{nav}</nav>"]
    for table in opening:
        links = " · ".join(download_link(p, Path(p).name) for p in table.paths.values())
        parts += [f"<h2 id='{esc(table.name)}'>{esc(table.title)}</h2>",
                  f"<p class='note'>{esc(table.note)}</p><p>{links}</p>", to_html(table.frame)]
    if warnings:
        items = "".join(f"<li>{esc(w)}</li>" for w in warnings[1])
        parts.append(f"<h2 id='protocol'>{esc(warnings[0])}</h2><ul>{items}</ul>")
    parts.append(f"<p>{esc(intro)}</p>")
    for anchor, title, note, files, frame in sections:
        links = " · ".join(download_link(p) for p in files if Path(p).is_file())
        parts += [f"<h2 id='{esc(anchor)}'>{esc(title)}</h2>",
                  f"<p class='note'>{esc(note)}</p><p>{links}</p>", to_html(frame)]
    for table in table_list:
        links = " · ".join(download_link(p, kind) for kind, p in table.paths.items())
        parts += [f"<h2 id='{esc(table.name)}'>{esc(table.title)}</h2>",
                  f"<p class='note'>{esc(table.note)}</p><p>{links}</p>", to_html(table.frame)]
    parts.append("<h2>Figures</h2>")
    for name, fig in figs.items():
        parts.append(f"<h3 id='fig-{esc(name)}'>{esc(name)}</h3>")
        if fig.path:
            parts.append(f"<p class='note'>{esc(captions[name])}</p>"
                         f"<img src='{data_uri(fig.path, 'image/png')}' alt='{esc(name)}'>")
        else:
            parts.append(f"<p class='note'>Not drawn: {esc(fig.reason)}.</p>")
    parts.append("</body></html>")
    path = Path(out) / "index.html"
    path.write_text("\n".join(parts))
    return path
