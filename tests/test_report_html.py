"""The report folder of a contract-shaped MLflow store: files, links, MLflow artifacts, and
index.html opened in headless Chromium with every <img> checked to have loaded."""
from __future__ import annotations

import functools
import http.server
import importlib.util
import re
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from analysis.report import make_report

_spec = importlib.util.spec_from_file_location(
    "analysis_store", Path(__file__).with_name("analysis_store.py"))
store = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store)

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
# Same-origin wrapper: once the report (in the iframe) has loaded, write each image's
# naturalWidth into this page's DOM, which --dump-dom prints.
CHECK_PAGE = """<!DOCTYPE html><html><body><pre id="result">pending</pre>
<iframe id="report" src="index.html" width="1200" height="800"></iframe>
<script>
document.getElementById('report').addEventListener('load', function () {
  var imgs = this.contentDocument.images, out = [];
  for (var i = 0; i < imgs.length; i++)
    out.push(imgs[i].getAttribute('src') + '=' + (imgs[i].complete ? imgs[i].naturalWidth : -1));
  document.getElementById('result').textContent = 'images:' + imgs.length + ';' + out.join(';');
});
</script></body></html>"""


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.hrefs = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.hrefs.append(attrs["href"])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    uri = store.build_store(root)
    out = make_report(store.STUDY, tracking_uri=uri, out_dir=root / "report")
    return uri, out


def test_report_folder_has_every_table_figure_and_summary(report):
    _, out = report
    for name in ("index.md", "index.html", "summary.md", "summary.csv"):
        assert (out / name).stat().st_size > 0, name
    for table in ("best_lr", "final_test_accuracy", "tuneability", "cost_to_target",
                  "trial_counts", "critical_batch_size"):
        for ext in ("csv", "md", "tex"):
            assert (out / "tables" / f"{table}.{ext}").exists(), (table, ext)
    pngs = sorted(p.stem for p in (out / "figures").glob("*.png"))
    assert pngs == sorted(["lr_sensitivity", "lr_bs_heatmaps", "learning_curves", "variance",
                           "grad_histograms", "performance_profiles"])
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0] == ("dataset,model,family,variant,batch_size,best_lr,test_accuracy,"
                          "train_loss,n_diverged")
    assert len(summary) == 1 + len(store.MODELS) * len(store.FAMILIES) * 2
    md = (out / "index.md").read_text()
    assert md.count("![") == 6 and "| adam | sgd | svrg |" in md


def test_every_link_and_image_in_index_html_resolves(report):
    _, out = report
    parser = _Links()
    parser.feed((out / "index.html").read_text())
    assert len(parser.images) == 6
    for target in parser.images + parser.hrefs:
        assert (out / target).is_file(), target


def test_report_is_logged_on_the_parent_run(report):
    from mlflow import MlflowClient

    uri, _ = report
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name(store.STUDY).experiment_id],
                                filter_string="tags.`gradstudy.kind` = 'study'")[0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/index.html", "report/figures", "report/tables"} <= logged


def test_images_load_in_headless_chromium(report, tmp_path):
    binary = _chromium()
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
    assert int(match.group(1)) == 6
    widths = dict(item.rsplit("=", 1) for item in match.group(2).split(";"))
    assert all(int(w) > 0 for w in widths.values()), widths


def test_tune_only_report_says_what_it_could_not_draw(tmp_path):
    storage = store.build_tune_results(tmp_path / "results")
    out = make_report(store.STUDY, results_dir=storage, out_dir=tmp_path / "report")
    md = (out / "index.md").read_text()
    assert "Ray Tune results" in md
    for reason in ("no grad_hist.json artifacts available", "no var/dir_var or var/dir_nvar",
                   "at least 2 problems", "no var/noise_scale metrics"):
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
