"""The report as a person sees it in the REAL MLflow UI: a real ``mlflow ui`` server on
127.0.0.1, a contract-shaped store built in it, ``make_report`` logging ``report/`` on the
parent run, then headless Chromium opening the UI's page of ``report/index.html``.

How MLflow 3.x shows an HTML artifact (read in the installed build,
``mlflow/server/js/build/static/js/930.*.chunk.js``, class ``ShowArtifactHtmlView``): it fetches
the artifact's text and renders ``<iframe class="mlflow-html-iframe" sandbox="allow-scripts"
src={URL.createObjectURL(new Blob([html], {type: "text/html"}))}>``: an opaque-origin document
at a ``blob:`` URL, where a relative ``figures/x.png`` cannot load. The report embeds its figures
as data URIs; this test proves they load there.

Driving the page: Chromium's DevTools protocol over ``--remote-debugging-pipe`` (JSON messages
ending in NUL on file descriptors 3 and 4; stdlib only, no port, no websocket). The sandboxed
iframe runs out of process, so it is reached as its own auto-attached ``iframe`` target and
its images are read with ``Runtime.evaluate`` in that target's session.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from browser import CHROMIUM_FLAGS, chromium

from analysis.report import make_report
from study import contract as C

_spec = importlib.util.spec_from_file_location(
    "analysis_store", Path(__file__).with_name("analysis_store.py"))
store = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store)

WIDTH, HEIGHT = 1400, 1000
# Read inside the report's iframe: its title and, per image, alt=naturalWidth (-1: not loaded).
REPORT_STATE = """JSON.stringify({title: document.title, url: location.href.slice(0, 40),
  images: Array.from(document.images).map(i => [i.alt, i.complete ? i.naturalWidth : -1])})"""
IFRAMES = """JSON.stringify(Array.from(document.querySelectorAll('iframe')).map(f =>
  ({cls: f.className, sandbox: f.getAttribute('sandbox'), src: (f.src || '').slice(0, 40)})))"""



class DevTools:
    """A minimal Chrome DevTools protocol client over ``--remote-debugging-pipe``."""

    def __init__(self, binary: str, profile: Path, log: Path):
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4: bash maps them (dash
        # takes single-digit descriptors only; no preexec_fn in a process with threads).
        bash = shutil.which("bash") or "/bin/bash"
        cmd = [bash, "-c", f'exec "$0" "$@" 3<&{to_r} 4>&{from_w}', binary, *CHROMIUM_FLAGS,
               f"--user-data-dir={profile}", "--remote-debugging-pipe",
               f"--window-size={WIDTH},{HEIGHT}", "about:blank"]
        self._log = open(log, "w")
        self.proc = subprocess.Popen(cmd, pass_fds=(to_r, from_w), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        os.close(to_r)
        os.close(from_w)
        self._buf, self._id = b"", 0
        self.iframes: dict[str, str] = {}  # session id -> target id of attached iframes

    def close(self) -> None:
        """Stop the browser this object started (its own process only)."""
        os.close(self._to_w)
        os.close(self._from_r)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_r], [], [], left)[0]:
                raise TimeoutError("no message from chromium")
            chunk = os.read(self._from_r, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed its debugging pipe")
            self._buf += chunk
        message, self._buf = self._buf.split(b"\0", 1)
        return json.loads(message)

    def _event(self, message: dict) -> None:
        params = message.get("params", {})
        if message.get("method") == "Target.attachedToTarget":
            if params["targetInfo"]["type"] == "iframe":
                self.iframes[params["sessionId"]] = params["targetInfo"]["targetId"]
        elif message.get("method") == "Target.detachedFromTarget":
            self.iframes.pop(params.get("sessionId"), None)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._recv(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self._event(reply)

    def evaluate(self, expression: str, session: str):
        result = self.call("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True}, session)
        return json.loads(result["result"].get("value") or "null")

    def open_page(self, url: str) -> str:
        """A new tab at ``url`` whose out-of-process iframes attach themselves; its session."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target,
                                                      "flatten": True})["sessionId"]
        self.call("Page.enable", session=session)
        self.call("Target.setAutoAttach", {"autoAttach": True, "flatten": True,
                                           "waitForDebuggerOnStart": False}, session)
        self.call("Emulation.setDeviceMetricsOverride", {
            "width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session)
        self.call("Page.navigate", {"url": url}, session)
        return session


def _report_frame(devtools: DevTools, page: str, title: str, timeout_s: float = 45.0):
    """Poll until an iframe of the page shows the report with every image decoded; returns
    (iframe session, its state, the page's iframes) or fails with what was last seen."""
    deadline = time.monotonic() + timeout_s
    seen = {}
    while time.monotonic() < deadline:
        for session in list(devtools.iframes):
            try:
                state = devtools.evaluate(REPORT_STATE, session)
            except (RuntimeError, TimeoutError):  # the iframe navigated or went away
                continue
            seen = state or seen
            images = state["images"] if state else []
            if state and state["title"] == title and images and all(
                    w != -1 for _, w in images):
                return session, state, devtools.evaluate(IFRAMES, page)
        devtools.call("Runtime.evaluate", {"expression": "1"}, page)  # drains events
        time.sleep(0.3)
    pytest.fail(f"the report never finished loading in MLflow's iframe; last seen: {seen}; "
                f"page iframes: {devtools.evaluate(IFRAMES, page)}")


@pytest.mark.slow
def test_report_renders_with_its_figures_in_the_mlflow_ui(mlflow_server, tmp_path):
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary found (apt-get install -y chromium)")
    from mlflow import MlflowClient

    store.build_store(tmp_path / "store", tracking_uri=mlflow_server.uri)
    out = make_report(store.STUDY, tracking_uri=mlflow_server.uri, out_dir=tmp_path / "report")
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(store.STUDY).experiment_id
    parent = client.search_runs([experiment],
                                filter_string=f"tags.`{C.TAG_KIND}` = '{C.KIND_STUDY}'")[0]
    figures = sorted(p.stem for p in (out / "figures").glob("*.png"))
    assert len(figures) == 5   # 2 problems: no performance profiles
    url = (f"{mlflow_server.uri}/#/experiments/{experiment}/runs/{parent.info.run_id}"
           f"/artifacts/{C.REPORT_DIR}/index.html")

    devtools = DevTools(binary, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        page = devtools.open_page(url)
        frame, state, iframes = _report_frame(devtools, page, f"{store.STUDY} report")
        # the preview is the sandboxed blob: iframe the module docstring describes
        preview = [f for f in iframes if "mlflow-html-iframe" in f["cls"]]
        assert preview and "allow-same-origin" not in (preview[0]["sandbox"] or ""), iframes
        assert state["url"].startswith("blob:"), state
        widths = dict(state["images"])
        assert sorted(widths) == figures
        assert all(w > 0 for w in widths.values()), f"images that did not load: {widths}"
        # a person's view: the UI with the first figure of the report in its preview
        devtools.evaluate("document.getElementById('fig-lr_sensitivity').scrollIntoView(),"
                          "'null'", frame)
        time.sleep(0.5)
        shot = devtools.call("Page.captureScreenshot", {"format": "png"}, page)["data"]
    finally:
        devtools.close()
    png = tmp_path / "mlflow_ui_report.png"
    png.write_bytes(base64.b64decode(shot))
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (WIDTH, HEIGHT)
