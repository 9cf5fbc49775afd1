"""The report folder of a contract-shaped MLflow store: files, links, MLflow artifacts, the
parent run's summary (best metrics, description, best.csv), and index.html opened in headless
Chromium with every <img> checked to have loaded."""
from __future__ import annotations

import base64
import functools
import http.server
import importlib.util
import re
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from browser import CHROMIUM_FLAGS, chromium

from analysis.report import make_report
from analysis.summary import BEST_COLUMNS, best_per_family, format_best
from study import contract as C

_spec = importlib.util.spec_from_file_location(
    "analysis_store", Path(__file__).with_name("analysis_store.py"))
store = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store)

# Same-origin wrapper: once the report (in the iframe) has loaded, write each image's
# naturalWidth into this page's DOM, which --dump-dom prints.
CHECK_PAGE = """<!DOCTYPE html><html><body><pre id="result">pending</pre>
<iframe id="report" src="index.html" width="1200" height="800"></iframe>
<script>
document.getElementById('report').addEventListener('load', function () {
  var imgs = this.contentDocument.images, out = [];
  for (var i = 0; i < imgs.length; i++)
    out.push(imgs[i].alt + '=' + (imgs[i].complete ? imgs[i].naturalWidth : -1));
  document.getElementById('result').textContent = 'images:' + imgs.length + ';' + out.join(';');
});
</script></body></html>"""



class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.ids = [], [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append((attrs["alt"], attrs["src"]))
        if tag == "a":
            self.links.append((attrs["href"], attrs.get("download")))


def _data(uri: str) -> tuple[str, bytes]:
    """(mime type, bytes) of a base64 data URI."""
    match = re.fullmatch(r"data:([\w/.+-]+);base64,([A-Za-z0-9+/=]+)", uri)
    assert match, uri[:80]
    return match.group(1), base64.b64decode(match.group(2), validate=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    uri = store.build_store(root)
    out = make_report(store.STUDY, tracking_uri=uri, out_dir=root / "report")
    return uri, out


def test_report_folder_has_every_table_figure_and_summary(report):
    _, out = report
    for name in ("index.md", "index.html", "summary.md", "summary.csv", "best.csv"):
        assert (out / name).stat().st_size > 0, name
    for table in ("best_lr", "final_test_accuracy", "tuneability", "cost_to_target",
                  "trial_counts", "critical_batch_size", "tuning_budget", "baseline_comparison"):
        for ext in ("csv", "md", "tex"):
            assert (out / "tables" / f"{table}.{ext}").exists(), (table, ext)
    pngs = sorted(p.stem for p in (out / "figures").glob("*.png"))
    assert pngs == sorted(["lr_sensitivity", "lr_bs_heatmaps", "learning_curves", "variance",
                           "grad_histograms"])  # 2 problems: no performance profiles
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0] == ("dataset,model,family,variant,batch_size,best_lr,edge,"
                          "test_accuracy (%),train_loss,n_diverged")
    assert len(summary) == 1 + len(store.MODELS) * len(store.FAMILIES) * 2
    md = (out / "index.md").read_text()
    assert "Not drawn: performance profiles need at least 5 problems" in md
    assert md.count("![") == 5 and "| mnist1d | mlp | adam |" in md
    assert md.startswith("# Study `demo`\n\n## Claims\n")


def test_index_html_is_self_contained_and_index_md_links_resolve(report):
    """index.html needs no file beside it (MLflow previews it in a sandboxed blob: iframe):
    every image is a data URI of the figure's PNG, every link a data URI download of a report
    file or an anchor on the page. index.md keeps its relative links."""
    _, out = report
    parser = _Links()
    parser.feed((out / "index.html").read_text())
    assert len(parser.images) == 5  # no performance profiles over 2 problems
    for name, src in parser.images:
        mime, data = _data(src)
        assert mime == "image/png" and data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert data == (out / "figures" / f"{name}.png").read_bytes(), name
    files = {p.name: p for p in out.rglob("*") if p.is_file()}
    downloads = [(href, name) for href, name in parser.links if not href.startswith("#")]
    # claims.csv, best.csv, summary.csv/.md, each table's csv/md/tex
    assert len(downloads) == 1 + 3 + 3 * 8
    for href, name in downloads:
        mime, data = _data(href)
        assert name in files and data == files[name].read_bytes(), name
        assert mime == {".csv": "text/csv", ".md": "text/markdown",
                        ".tex": "application/x-tex"}[Path(name).suffix], (name, mime)
    anchors = [href[1:] for href, _ in parser.links if href.startswith("#")]
    assert anchors and set(anchors) <= parser.ids
    assert not re.search(r"""(?:src|href)=['"](?!data:|#)""", (out / "index.html").read_text())
    md = (out / "index.md").read_text()
    targets = re.findall(r"\]\(([^)]+)\)", md)
    assert len(targets) == 5 + 1 + 3 + 3 * 8  # 5 figures (no profiles)
    for target in targets:
        assert (out / target).is_file(), target


def test_report_is_logged_on_the_parent_run(report):
    from mlflow import MlflowClient

    uri, _ = report
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name(store.STUDY).experiment_id],
                                filter_string=f"tags.`{C.TAG_KIND}` = '{C.KIND_STUDY}'")[0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, C.REPORT_DIR)}
    assert {f"{C.REPORT_DIR}/{name}" for name in ("index.html", "best.csv", "figures",
                                                  "tables")} <= logged


def test_parent_run_carries_best_metrics_description_and_best_csv(report):
    from mlflow import MlflowClient

    from analysis.load import load_mlflow

    uri, out = report
    best = best_per_family(out)
    assert tuple(best.columns) == BEST_COLUMNS
    assert len(best) == len(store.MODELS) * len(store.FAMILIES)
    by = best.set_index(["model", "family"])
    for model in store.MODELS:  # each family's best grid LR by construction, at batch 32
        assert by.loc[(model, "sgd"), "lr"] == 0.1 and by.loc[(model, "adam"), "lr"] == 0.003
        assert (by.loc[model, "batch_size"] == 32).all()
    trials, _ = load_mlflow(store.STUDY, uri)
    parent = MlflowClient(uri).get_run(trials.attrs["parent_run_id"])
    metrics = parent.data.metrics
    assert len([k for k in metrics if k.startswith(C.BEST_PREFIX)]) == 2 * len(best)
    for row in best.itertuples():
        seeds = trials[(trials["model"] == row.model) & (trials["family"] == row.family)
                       & (trials["lr"] == row.lr) & (trials["batch_size"] == row.batch_size)]
        assert len(seeds) == row.n_seeds and row.n_seeds >= 1
        for metric in ("val_accuracy", "test_accuracy"):  # percent, one decimal
            percent = pytest.approx(100 * seeds[metric].mean(), abs=0.05)
            assert best.at[row.Index, f"{metric} (%)"] == percent
            key = f"{C.BEST_PREFIX}{row.model}/{row.family}/{metric}_pct"
            assert metrics[key] == percent, key
    note = parent.data.tags[C.TAG_NOTE]
    assert f"`{store.STUDY}`" in note and "mnist1d" in note
    assert "56 trials: 52 finished, 2 diverged, 2 errored" in note
    rows = [line for line in note.splitlines() if line.startswith("| ") and "family" not in line]
    assert len(rows) == len(best)
    sgd, want = next(r for r in rows if r.startswith("| mlp | sgd |")), by.loc[("mlp", "sgd")]
    for cell in (f"{want['val_accuracy (%)']:.1f}", f"{want['test_accuracy (%)']:.1f}", "0.1",
                 "32", "2"):
        assert f"| {cell} |" in sgd + "|", (cell, sgd)
    text = format_best(best).splitlines()
    assert text[0].split()[:2] == ["model", "family"] and len(text) == 1 + len(best)


def test_images_load_in_headless_chromium(report, tmp_path):
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary found (apt-get install -y chromium)")
    _, out = report
    (out / "_check.html").write_text(CHECK_PAGE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/_check.html"
        done = subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=10000", "--dump-dom", url],
            check=False, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
        (out / "_check.html").unlink()
    match = re.search(r"images:(\d+);([^<]*)", done.stdout)
    assert match, f"no result in the dumped DOM; stderr: {done.stderr[-2000:]}"
    assert int(match.group(1)) == 5
    widths = dict(item.rsplit("=", 1) for item in match.group(2).split(";"))
    assert all(int(w) > 0 for w in widths.values()), widths


def test_tune_only_report_says_what_it_could_not_draw(tmp_path):
    storage = store.build_tune_results(tmp_path / "results")
    out = make_report(store.STUDY, results_dir=storage, out_dir=tmp_path / "report")
    md = (out / "index.md").read_text()
    assert "Ray Tune results" in md
    for reason in ("no grad_hist.json artifacts available", "no var/dir_var or var/dir_nvar",
                   "at least 5 problems", "no var/noise_scale metrics"):
        assert reason in md, reason
    assert sorted(p.stem for p in (out / "figures").glob("*.png")) == [
        "learning_curves", "lr_bs_heatmaps", "lr_sensitivity"]
    summary = pd.read_csv(out / "summary.csv").set_index("family")
    assert summary.loc["sgd", "best_lr"] == 0.1 and summary.loc["adam", "best_lr"] == 0.003
    assert (summary["n_diverged"] == 0).all()


def test_cli_reports_a_missing_study_as_an_error_not_a_traceback(report, tmp_path, capsys):
    from analysis.__main__ import main

    uri, _ = report
    assert main(["report", "--study", "no_such_study", "--tracking-uri", uri]) == 2
    assert "no MLflow experiment" in capsys.readouterr().err
    missing_db = f"sqlite:///{tmp_path / 'absent.db'}"
    assert main(["report", "--study", "demo", "--tracking-uri", missing_db,
                 "--results", str(tmp_path / "empty")]) == 2
    assert "no <trial>/result.json" in capsys.readouterr().err
    assert not (tmp_path / "absent.db").exists()  # no empty store left behind
