#!/usr/bin/env python
"""Screenshot the MLflow UI comparison of the Table 1 runs in headless Chromium.

Starts ``mlflow server`` (the UI + REST API) on 127.0.0.1, looks up the runs to compare with ``MlflowClient``
(one run per run name that starts with ``--stage-prefix``: the latest FINISHED one, so reruns count once),
opens MLflow's compare-runs page (``#/compare-runs?runs=[...]&experiments=[...]``) and the experiment's run
table filtered to the same runs in headless Chromium, saves PNG screenshots, always stops the server, and
checks that each PNG is not blank.

The browser reaches the server as ``http://mlflow-ui.localhost:PORT`` (Chromium resolves ``*.localhost`` to
the loopback address itself), not as ``127.0.0.1``: on a page served from exactly ``localhost``/``127.0.0.1``
MLflow 3 opens its "MLflow Assistant" side panel on the first visit, which would cover a quarter of the
screenshot. The server is told to accept that host name (``--allowed-hosts``, ``--cors-allowed-origins``).
The compare page gets a window wide enough for one column per run (``--window-size auto``), so the ``fid``
row of its Metrics table shows every run.

The tracking database is only read: the server is started from a temporary working directory, so nothing
is written next to the repository.

Example::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/mlflow_screenshot.py            # tiny profile, Table 1
    OMP_NUM_THREADS=1 .venv/bin/python scripts/mlflow_screenshot.py --experiment micro --out /tmp/c.png

Needs a Chromium binary: ``apt-get install -y chromium`` (Debian) gives ``/usr/bin/chromium``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (  # headless, as root, on a closed network (no calls home)
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
    "--disable-dev-shm-usage",
)


class ScreenshotError(RuntimeError):
    pass


def find_chromium(explicit: str | None = None) -> str:
    """Path of a Chromium binary: ``explicit``, else /usr/bin/chromium, chromium-browser or google-chrome."""
    if explicit:
        path = shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
        if not path:
            raise ScreenshotError(f"Chromium binary not found: {explicit}")
        return path
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise ScreenshotError("no Chromium binary found (looked for " + ", ".join(CHROMIUM_NAMES)
                          + "); install it with: apt-get install -y chromium")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def select_runs(tracking_uri: str, experiment: str, stage_prefix: str, per_tag: str = ""):
    """The latest FINISHED run of each run name starting with ``stage_prefix`` (of each name and value of tag
    ``per_tag``: e.g. deme.group, one run per DVC experiment), sorted by run name."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ScreenshotError(f"experiment {experiment!r} not in {tracking_uri} (have: {names})")
    latest = {}
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=50000)
    for run in runs:
        name = run.info.run_name or ""
        key = (name, run.data.tags.get(per_tag, "")) if per_tag else (name, "")
        if name.startswith(stage_prefix) and key not in latest:
            latest[key] = run
    if not latest:
        raise ScreenshotError(f"no FINISHED run named {stage_prefix}* in experiment {experiment!r}")
    return exp, [latest[n] for n in sorted(latest)]


def order_runs(runs: list, order: str, metric: str) -> list:
    if order == "name":
        return sorted(runs, key=lambda r: r.info.run_name)
    if order == "time":
        return sorted(runs, key=lambda r: r.info.start_time)
    inf = float("inf")
    return sorted(runs, key=lambda r: (r.data.metrics.get(metric, inf), r.info.run_name))


def registered_merged(tracking_uri: str, experiment: str) -> str | None:
    """The name of the merge stage's registered model for this profile, if the registry has it."""
    import mlflow

    name = f"{experiment}-merged"
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return name if client.search_registered_models(filter_string=f"name = '{name}'") else None


def compare_url(base: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """MLflow 3.x compare-runs route (``Routes.getCompareRunPageRoute`` in the UI bundle)."""
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps(experiment_ids)},
                                   quote_via=urllib.parse.quote)
    return f"{base}/#/compare-runs?{query}"


def runs_table_url(base: str, experiment_id: str, run_ids: list[str], order_key: str = "metrics.`fid`") -> str:
    """The experiment's run table filtered to ``run_ids``, sorted by ``order_key`` ascending."""
    ids = ", ".join(f"'{r}'" for r in run_ids)
    query = urllib.parse.urlencode({"searchFilter": f"attributes.run_id IN ({ids})",
                                    "orderByKey": order_key, "orderByAsc": "true",
                                    "startTime": "ALL", "lifecycleFilter": "Active"},
                                   quote_via=urllib.parse.quote)
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def wait_for_server(base: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ScreenshotError(f"mlflow server exited with code {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    raise ScreenshotError(f"mlflow server did not answer at {base} within {timeout:.0f} s:\n{tail(log)}")


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def start_server(tracking_uri: str, port: int, workdir: Path, browser_host: str) -> tuple[subprocess.Popen, Path]:
    log = workdir / "mlflow_server.log"
    hosts = sorted({f"{h}:{port}" for h in ("127.0.0.1", "localhost", browser_host)})
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--allowed-hosts", ",".join(hosts), "--cors-allowed-origins", ",".join(f"http://{h}" for h in hosts)]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "wb") as fh:  # the child keeps its own handle
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, log


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server and its workers (its own process group, started by us)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def screenshot(chromium: str, url: str, out: Path, *, size: tuple[int, int], budget_ms: int,
               timeout: float, workdir: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=workdir))
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
           f"--virtual-time-budget={budget_ms}", f"--screenshot={out.resolve()}", url]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ScreenshotError(f"Chromium did not finish within {timeout:.0f} s ({url})") from None
    except BaseException:  # SIGTERM / Ctrl-C: leave no browser behind
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode != 0 or not out.exists():
        text = output.decode(errors="replace")[-3000:]
        raise ScreenshotError(f"Chromium failed (code {proc.returncode}) for {url}:\n{text}")


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
    messages separated by NUL on file descriptors 3 and 4), so a page can be clicked before its screenshot
    without any browser-automation package."""

    def __init__(self, chromium: str, size: tuple[int, int], workdir: Path):
        to_browser, self._cmd = os.pipe()
        self._out, from_browser = os.pipe()
        profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=workdir))

        def fds():
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, "--remote-debugging-pipe",
                                      f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                                      "about:blank"], pass_fds=(3, 4), preexec_fn=fds, cwd=workdir,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(to_browser)
        os.close(from_browser)
        self._buf, self._id, self.session = b"", 0, None
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def send(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        import select

        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                if not select.select([self._out], [], [], max(0.0, end - time.monotonic()))[0]:
                    raise ScreenshotError(f"Chromium did not answer {method} within {timeout:.0f} s")
                chunk = os.read(self._out, 1 << 16)
                if not chunk:
                    raise ScreenshotError(f"Chromium exited during {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise ScreenshotError(f"Chromium: {method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        raise ScreenshotError(f"the page did not show {what} within {timeout:.0f} s")

    def screenshot(self, out: Path) -> None:
        import base64

        out.parent.mkdir(parents=True, exist_ok=True)
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        out.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for fd in (self._cmd, self._out):
            with contextlib.suppress(OSError):
                os.close(fd)


# The compare page's "Artifacts" tree: click the artifact every compared run has (samples.png: deme.tracking
# logs each image under one path shared by all runs); MLflow fetches each run's file and previews it as a
# blob: image, one per run.
PREVIEWS = ("[...new Set(Array.from(document.querySelectorAll('img')).filter(i => i.src.startsWith('blob:') && "
            "i.complete && i.naturalWidth > 0).map(i => i.src))]")


def compare_with_artifact(chromium: str, url: str, out: Path, artifact: str, runs: int, *,
                          size: tuple[int, int], timeout: float, workdir: Path) -> dict:
    """Open the compare page, select ``artifact`` in its Artifacts section, switch every table to "Show diff
    only" and screenshot it with every run's preview loaded; return what the page shows (its text, with all
    params, and the previewed image URLs)."""
    browser = Browser(chromium, size, workdir)
    try:
        browser.send("Page.enable")
        browser.send("Page.navigate", {"url": url})
        name = json.dumps(artifact)
        # the innermost elements whose text is the artifact's name: its entries in the Artifacts tree
        entries = (f"Array.from(document.querySelectorAll('*')).filter(e => e.textContent.trim() === {name} && "
                   f"!Array.from(e.children).some(c => c.textContent.trim() === {name}))")
        browser.wait_for(f"{entries}.length > 0", timeout, f"the artifact {artifact}")
        browser.evaluate(f"{entries}.forEach(e => e.click())")
        images = browser.wait_for(f"(() => {{ const s = {PREVIEWS}; return s.length >= {runs} ? s : null; }})()",
                                  timeout, f"{artifact} previewed for each of the {runs} runs")
        text = browser.evaluate("document.body.innerText")
        # "Show diff only" in Parameters, Metrics and Tags: the page shrinks to what differs between the runs
        browser.evaluate("document.querySelectorAll('[role=switch]').forEach(e => e.click())")
        time.sleep(0.5)
        browser.evaluate("Array.from(document.querySelectorAll('img')).find(i => i.src.startsWith('blob:'))"
                         ".scrollIntoView({block: 'end'})")
        time.sleep(0.5)
        browser.screenshot(out)
    finally:
        browser.close()
    return {"images": images, "text": text}


def check_png(path: Path, min_bytes: int = 20_000, min_colours: int = 16) -> dict:
    """Fails unless ``path`` is a PNG with some content (not a blank or single-colour page)."""
    from PIL import Image

    if not path.is_file():
        raise ScreenshotError(f"screenshot missing: {path}")
    n_bytes = path.stat().st_size
    with Image.open(path) as im:
        size = im.size
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    n_colours = len(colours) if colours is not None else 1 << 20
    if n_bytes < min_bytes or n_colours < min_colours:
        raise ScreenshotError(f"screenshot looks blank: {path} ({n_bytes} bytes, {n_colours} colours)")
    return {"bytes": n_bytes, "colours": n_colours, "size": size}


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(ROOT / 'mlflow.db').resolve()}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Start `mlflow server` on localhost and screenshot the comparison of the Table 1 "
                    "runs (latest FINISHED run per `<stage-prefix>*` run name) in headless Chromium.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tracking-uri", default=default_tracking_uri(), help="MLflow backend store (read only)")
    p.add_argument("--experiment", default="tiny", help="experiment name (= profile)")
    p.add_argument("--stage-prefix", default="evaluate@", help="run-name prefix of the runs to compare")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "mlflow" / "table1_compare.png",
                   help="PNG of the compare-runs page")
    p.add_argument("--table-out", type=Path, default=None,
                   help="PNG of the experiment's run table filtered to the same runs "
                        "[<out stem>_runs.png next to --out]")
    p.add_argument("--no-table", action="store_true", help="skip the run-table screenshot")
    p.add_argument("--per-tag", default="", metavar="TAG",
                   help="one run per run name and value of this tag, e.g. deme.group: the same stage of the "
                        "workspace run and of each DVC experiment side by side")
    p.add_argument("--tag-values", default="", metavar="V1,V2",
                   help="with --per-tag: keep only runs whose tag has one of these values")
    p.add_argument("--artifact", default="", metavar="PATH",
                   help="open this artifact (e.g. samples.png, the sample grid every evaluate run logs) in the "
                        "compare page's Artifacts section, so the screenshot shows each run's preview side by side")
    p.add_argument("--facts", type=Path, help="with --artifact: write what the page showed (its text, the "
                                               "previewed image URLs) as JSON here")
    p.add_argument("--registry-out", type=Path, default=None,
                   help="PNG of the model-registry page of <experiment>-merged (default: <out stem>_registry.png "
                        "beside --out; skipped when that model is not registered)")
    p.add_argument("--port", type=int, default=0, help="server port (0 = pick a free one)")
    p.add_argument("--chromium", default=None,
                   help="Chromium binary [chromium, chromium-browser or google-chrome on PATH]")
    p.add_argument("--metric", default="fid", help="metric to sort by (--order metric) and to print")
    p.add_argument("--order", choices=("metric", "name", "time"), default="metric",
                   help="column order on the compare page / row order of the run table")
    p.add_argument("--window-size", default="auto",
                   help="compare-page window WIDTHxHEIGHT; auto = wide enough for one column per run, "
                        "tall enough for the Metrics table")
    p.add_argument("--table-window-size", default="1800x1400", help="run-table window WIDTHxHEIGHT")
    p.add_argument("--browser-host", default="mlflow-ui.localhost",
                   help="host name the browser uses for the server (a *.localhost name reaches 127.0.0.1; "
                        "127.0.0.1 itself makes MLflow open its Assistant panel over the page)")
    p.add_argument("--virtual-time-ms", type=int, default=20000,
                   help="Chromium --virtual-time-budget: time the React app gets to render")
    p.add_argument("--server-timeout", type=float, default=90.0, help="seconds to wait for the server")
    p.add_argument("--browser-timeout", type=float, default=120.0, help="seconds per Chromium screenshot")
    p.add_argument("--show-server-log", action="store_true", help="print the server log at the end")
    return p.parse_args(argv)


def parse_size(text: str, n_runs: int) -> tuple[int, int]:
    if text == "auto":  # sidebar + label column + ~200 px per run column; the Metrics table ends near 1.9k px
        return max(1800, 500 + 200 * n_runs), 2100
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ScreenshotError(f"window size must be WIDTHxHEIGHT or auto, got {text!r}") from None
    return w, h


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (e.g. a test's timeout) unwinds through the `finally` that stops the server
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    out = args.out.resolve()
    table_out = None if args.no_table else (args.table_out or out.with_name(f"{out.stem}_runs.png")).resolve()
    registry_out = (args.registry_out or out.with_name(f"{out.stem}_registry.png")).resolve()
    try:
        chromium = find_chromium(args.chromium)
        exp, runs = select_runs(args.tracking_uri, args.experiment, args.stage_prefix, args.per_tag)
        if args.tag_values:  # only these groups (e.g. the workspace run and one experiment)
            wanted = args.tag_values.split(",")
            runs = [r for r in runs if r.data.tags.get(args.per_tag) in wanted]
        runs = order_runs(runs, args.order, args.metric)
        compare_size = parse_size(args.window_size, len(runs))
        table_size = parse_size(args.table_window_size, len(runs))
    except ScreenshotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    run_ids = [r.info.run_id for r in runs]
    print(f"{len(runs)} runs in experiment {args.experiment!r} (id {exp.experiment_id}), "
          f"latest FINISHED run per name {args.stage_prefix}*:")
    for r in runs:
        value = r.data.metrics.get(args.metric)
        shown = "-" if value is None else f"{value:.2f}"
        print(f"  {r.info.run_name:<28} {r.info.run_id}  {args.metric}={shown}")

    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    browser_base = f"http://{args.browser_host}:{port}"
    order_key = {"metric": f"metrics.`{args.metric}`", "name": "attributes.run_name",
                 "time": "attributes.start_time"}[args.order]
    with tempfile.TemporaryDirectory(prefix="mlflow-screenshot-") as tmp:
        workdir = Path(tmp)
        proc, log = start_server(args.tracking_uri, port, workdir, args.browser_host)
        try:
            t0 = time.monotonic()
            wait_for_server(base, proc, args.server_timeout, log)
            print(f"mlflow server (pid {proc.pid}) up at {base} after {time.monotonic() - t0:.1f} s")
            shots = [(compare_url(browser_base, run_ids, [exp.experiment_id]), out, compare_size)]
            if table_out is not None:
                shots.append((runs_table_url(browser_base, exp.experiment_id, run_ids, order_key),
                              table_out, table_size))
            model = registered_merged(args.tracking_uri, args.experiment)
            if model is not None:
                shots.append((f"{browser_base}/#/models/{model}", registry_out, (1600, 900)))
            if args.artifact:  # the compare page with that artifact opened for every run, instead of as loaded
                url, path, size = shots.pop(0)
                t0 = time.monotonic()
                facts = compare_with_artifact(chromium, url, path, args.artifact, len(run_ids), size=size,
                                              timeout=args.browser_timeout, workdir=workdir)
                info = check_png(path)
                print(f"saved {path} ({info['size'][0]}x{info['size'][1]} px, {info['colours']} colours, "
                      f"{len(facts['images'])} previews of {args.artifact}, {time.monotonic() - t0:.1f} s)\n"
                      f"  url: {url}")
                if args.facts:
                    args.facts.write_text(json.dumps({"url": url, "run_ids": run_ids, **facts}, indent=1))
            for url, path, size in shots:
                t0 = time.monotonic()
                screenshot(chromium, url, path, size=size, budget_ms=args.virtual_time_ms,
                           timeout=args.browser_timeout, workdir=workdir)
                info = check_png(path)
                print(f"saved {path} ({info['size'][0]}x{info['size'][1]} px, {info['bytes']} bytes, "
                      f"{info['colours']} colours, {time.monotonic() - t0:.1f} s)\n  url: {url}")
        except ScreenshotError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            stop_server(proc)
            if args.show_server_log:
                print(tail(log, 200))
    return 0


if __name__ == "__main__":
    sys.exit(main())
