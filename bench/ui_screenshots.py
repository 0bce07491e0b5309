"""Screenshots of the Dagster UI in headless Chromium: the asset graph, and a ``synthetic_anomalies``
materialization with its preview image (docs/ui_asset_graph.png, docs/ui_materialization.png).

    python bench/ui_screenshots.py [--out docs] [--chromium chromium] [--category brick] [--method cutpaste]

Builds a tiny demo (one category, 64 px) in a temporary DAGSTER_HOME, materializes ingest, the adapter and the
synthesis of one category x method partition in process, starts ``dagster-webserver`` on 127.0.0.1, drives
Chromium through its DevTools protocol (navigate, wait for the page to settle, open the preview, capture) and
stops everything. It fails, writing nothing, when the preview image did not render (not loaded, or 0 px wide).
"""
from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WIDTH, HEIGHT = 1600, 1000


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol (websocket, JSON messages)."""

    def __init__(self, binary: str, profile: Path):
        from pipelines.ui_server import free_port

        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             f"--remote-debugging-port={self.port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=5) as r:
                    pages = [t for t in json.loads(r.read()) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError("chromium's DevTools endpoint did not come up")
            time.sleep(0.3)
        from websockets.sync.client import connect

        self.debug_shot = Path(tempfile.gettempdir()) / "ui_screenshots_failed.png"
        self._connection = connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
        self.ws = self._connection.__enter__()  # left in close()
        self.ids = itertools.count(1)
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 90.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            if time.monotonic() > deadline:
                self.screenshot(self.debug_shot)
                raise TimeoutError(f"the page never showed {what or expression} (page as it was: {self.debug_shot})")
            time.sleep(0.5)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", what="a loaded document")

    def click(self, expression: str, what: str) -> None:
        """Click the element ``expression`` (JS) evaluates to; an error naming ``what`` when there is none."""
        if not self.js(f"(() => {{ const el = {expression}; if (!el) return false; el.click(); return true; }})()"):
            self.screenshot(self.debug_shot)
            raise RuntimeError(f"no {what} on the page (page as it was: {self.debug_shot})")

    def key(self, key: str, code: str, keycode: int) -> None:
        for kind in ("rawKeyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=keycode)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        if getattr(self, "ws", None):
            self._connection.__exit__(None, None, None)
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def materialize_demo(home: Path, category: str, method: str) -> None:
    import dagster as dg

    from assets.partitions import CATEGORY
    from ops.demo_data import build_demo_dataset
    from pipelines.definitions import build_definitions
    from pipelines.jobs import GENERATION_JOB, INGEST_JOB

    data = build_demo_dataset(home / "forge" / "data", categories=[category], size=64)
    defs = build_definitions(storage_root=str(home / "forge" / "storage"), dataset_roots=[str(data)],
                             n_per_partition=6)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(CATEGORY, [category])
        ok = defs.resolve_job_def(INGEST_JOB).execute_in_process(partition_key=category, instance=instance).success
        gen = defs.resolve_job_def(GENERATION_JOB).execute_in_process(
            partition_key=str(dg.MultiPartitionKey({"category": category, "method": method})), instance=instance,
            asset_selection=[dg.AssetKey("anomaly_adapters"), dg.AssetKey("synthetic_anomalies")])
        if not (ok and gen.success):
            raise RuntimeError("the demo materialization failed")


# the preview is an <img> of the opened Markdown dialog (another, hidden dialog may be in the page: the first-visit
# community one); rendered = loaded and wider than 0 px
PREVIEW_RENDERED = ("[...document.querySelectorAll('[role=dialog] img')].some(i => i.complete && i.naturalWidth > 0 &&"
                    " i.getBoundingClientRect().width > 0)")


def icon_button(label: str) -> str:
    """JS for the last button showing the icon ``label`` (the graph's own controls come after the navigation's)."""
    return f"[...document.querySelectorAll('button')].filter(b => b.querySelector('[aria-label=\"{label}\"]')).pop()"


def text_element(text: str) -> str:
    """JS for the innermost (last in document order) element whose text starts with ``text``."""
    return (f"[...document.querySelectorAll('body *')].filter(e => (e.innerText || '').trim()"
            f".startsWith({json.dumps(text)})).pop()")


def dismiss_community_dialog(browser: Browser, wait: float = 0.0) -> None:
    """The first-visit "Join the Dagster community" dialog comes a moment after the page: wait up to ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        if browser.js("document.body.innerText.includes('Join the Dagster community')"):
            browser.click(text_element("Skip"), "community dialog's Skip button")
            browser.wait_for("!document.body.innerText.includes('Join the Dagster community')",
                             what="the community dialog closed")
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.5)


def shoot_asset_graph(browser: Browser, url: str, path: Path) -> None:
    browser.goto(f"{url}/asset-groups")
    browser.wait_for("document.body.innerText.includes('generation')", what="the asset graph")
    dismiss_community_dialog(browser, wait=15)
    browser.click(icon_button("settings"), "graph settings button")
    browser.wait_for("document.body.innerText.includes('all groups')", what="the graph settings menu")
    browser.js(f"{text_element('Expand all groups')}?.click()")  # absent when the groups are already expanded
    browser.key("Escape", "Escape", 27)
    browser.click(icon_button("panel_show_right"), "asset sidebar toggle")
    browser.wait_for("document.body.innerText.includes('synthet')", what="the expanded asset nodes")
    time.sleep(3)  # the graph lays itself out and fits the view after the nodes appear
    dismiss_community_dialog(browser)
    browser.screenshot(path)


def shoot_materialization(browser: Browser, url: str, partition: str, path: Path) -> None:
    browser.goto(f"{url}/assets/synthetic_anomalies?view=events&partition={urllib.request.quote(partition)}")
    dismiss_community_dialog(browser, wait=5)
    browser.wait_for(f"!!{text_element('[Show Markdown]')}", what="the materialization's preview link")
    for attempt in range(3):  # a click before the page wired its handlers opens nothing: click again
        browser.click(text_element("[Show Markdown]"), "preview link")
        try:
            browser.wait_for("!!document.querySelector('[role=dialog] img')", timeout=20, what="the preview dialog")
            break
        except TimeoutError:
            if attempt == 2:
                raise
    browser.wait_for(PREVIEW_RENDERED, what="a rendered preview image")
    time.sleep(1)
    dismiss_community_dialog(browser)
    browser.screenshot(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--category", default="brick")
    parser.add_argument("--method", default="cutpaste")
    parser.add_argument("--home", help="keep the demo instance in this folder and reuse it on the next call")
    args = parser.parse_args(argv)
    from pipelines.ui_server import UIServer

    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="ui_shots_") as tmp:
        home = Path(args.home or tmp)
        home.mkdir(parents=True, exist_ok=True)
        fresh = not (home / "dagster.yaml").exists()
        shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
        env = {"ANOMALY_FORGE_HOME": str(home / "forge"), "ANOMALY_FORGE_NO_PROGRESS": "1",
               "ANOMALY_FORGE_DATASETS": str(home / "forge" / "data"), "ANOMALY_FORGE_MODEL": "tiny"}
        os.environ.update(env)
        if fresh:
            t0 = time.monotonic()
            materialize_demo(home, args.category, args.method)
            print(f"demo materialized in {time.monotonic() - t0:.0f} s", flush=True)
        graph, mat = home / "graph.png", home / "mat.png"
        with UIServer(home, env=env) as server:
            browser = Browser(args.chromium, home / "chromium")
            try:
                shoot_asset_graph(browser, server.url, graph)
                shoot_materialization(browser, server.url, f"{args.category}|{args.method}", mat)
            finally:
                browser.close()
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(graph, out / "ui_asset_graph.png")
        shutil.copy(mat, out / "ui_materialization.png")
    print(f"wrote {out / 'ui_asset_graph.png'} and {out / 'ui_materialization.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
