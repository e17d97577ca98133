"""Screenshots of a spatialrl run in the MLflow UI, for docs/screenshots.

Starts `mlflow ui` on the given store, opens the experiment's newest run (or --run-id) in
headless Chromium and saves: experiment_plain_link.png (where the experiment's plain link
lands), experiment.png (its runs, through spatialrl.tracking.ui_url), metrics.png (training
and held-out charts), eval_images.png (the image slider's card at the last evaluation and the
full-size captioned samples it opens) and system_metrics.png.

Needs Playwright and a Chromium outside the project's dependencies:

    .venv/bin/pip install playwright && apt-get install -y chromium   # Debian's chromium
    .venv/bin/python scripts/dashboard_screenshots.py --tracking-uri sqlite:////tmp/shots/mlflow.db
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient
from PIL import Image
from playwright.sync_api import Page, sync_playwright

from spatialrl.tracking import ui_url

# Without the background-networking flags Chromium's own connections fail on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDTH, HEIGHT, MAX_HEIGHT, SHORT = 1400, 1000, 4000, 640
GAP = 8  # between the image card and the full-size image in eval_images.png
MAX_BYTES = 300_000
RENDER_S = 8  # the SPA polls forever, so "network idle" never comes: wait for it to draw
# Four sections of whole rows of three charts (the eval row also holds the image card).
METRICS = ("^(eval/(relation_accuracy|all_relations_correct|readable_objects|reward_mean"
           "|reward_rule_agreement)|reward/(mean|std|sigma_mean)|learn/(policy_loss|approx_kl"
           "|grad_norm)|time/(iteration_s|rollout_s|learn_s))$")
# The MLflow Assistant panel opens on first load and would cover a third of every page.
NO_ASSISTANT = ("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")
# The image card lists every run param above its image (~150 here, burying it) unless the
# chart's "Show run parameters" is off; the UI keeps that, and the slider's step, per run tab.
IMAGE_CARDS = """([runId, step]) => {
  for (const key of Object.keys(localStorage).filter(k => k.includes(runId))) {
    const state = JSON.parse(localStorage.getItem(key));
    for (const chart of state.compareRunCharts || [])
      if (chart.type === 'IMAGE') Object.assign(chart, {showRunParams: false, step});
    localStorage.setItem(key, JSON.stringify(state));
  }
}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", default="spatialrl-local")
    parser.add_argument("--run-id", help="default: the experiment's newest run")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--port", type=int, default=5055)
    args = parser.parse_args()

    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} in {args.tracking_uri}")
    run_id = args.run_id or client.search_runs(
        [experiment.experiment_id], order_by=["attribute.start_time DESC"], max_results=1,
    )[0].info.run_id
    eval_steps = sorted(m.step for m in client.get_metric_history(run_id, "eval/reward_mean"))
    args.out.mkdir(parents=True, exist_ok=True)

    base = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                               args.tracking_uri, "--host", "127.0.0.1", "--port", str(args.port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(base, server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                                 args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
            context.add_init_script(NO_ASSISTANT)
            page = context.new_page()

            # MLflow 3.17 ignores the experiment's kind tag (spatialrl.tracking's
            # EXPERIMENT_KIND_TAG): the plain link lands on the GenAI side.
            _open(page, f"{base}/#/experiments/{experiment.experiment_id}")
            print(f"the plain experiment link opens {_title(page)}")
            _save(_grab(page, bottom=SHORT), args.out / "experiment_plain_link.png")
            _open(page, ui_url(base, experiment.experiment_id))
            print(f"ui_url's link opens {_title(page)}")
            _save(_grab(page, bottom=SHORT), args.out / "experiment.png")

            run_page = ui_url(base, experiment.experiment_id, run_id)
            metrics, system = (run_page.replace("?", f"/{tab}?")
                               for tab in ("model-metrics", "system-metrics"))
            for url in (system, metrics):  # each tab saves its chart layout on first load
                _open(page, url)
            page.evaluate(IMAGE_CARDS, [run_id, eval_steps[-1]])
            page.reload()  # else the page's own state overwrites the edit

            _open(page, metrics)
            page.get_by_placeholder("Search metric charts").fill(METRICS)
            time.sleep(2)
            _shoot(page, args.out / "metrics.png")

            _open(page, metrics)
            page.get_by_placeholder("Search metric charts").fill("eval/samples")
            time.sleep(2)
            thumbnail = page.locator("img[src*='eval~samples']").first
            box = page.locator("div").filter(has=thumbnail, has_text="eval/samples").last
            box = box.bounding_box()
            card = _grab(page, bottom=box["y"] + box["height"] + 16)
            thumbnail.click()  # MLflow's preview of the full-size image
            time.sleep(3)
            box = page.locator(".rc-image-preview-img").bounding_box()
            preview = _grab(page, top=box["y"], bottom=box["y"] + box["height"])
            both = Image.new("RGB", (WIDTH, card.height + GAP + preview.height), "grey")
            both.paste(card, (0, 0))
            both.paste(preview, (0, card.height + GAP))
            _save(both, args.out / "eval_images.png")

            _open(page, system)
            page.get_by_text("eval", exact=True).first.click()  # fold the image card away
            _shoot(page, args.out / "system_metrics.png")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for(url: str, server: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"mlflow ui exited with {server.returncode}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _open(page: Page, url: str) -> None:
    page.set_viewport_size({"width": WIDTH, "height": HEIGHT})
    page.goto(url)
    time.sleep(RENDER_S)


def _title(page: Page) -> str:
    """The page's title: "Overview" (of traces) on the GenAI side, "Runs" on model training."""
    return repr(page.locator("h1, h2").first.inner_text())


def _shoot(page: Page, path: Path) -> None:
    """The whole page: the UI scrolls inside a panel, so the window grows to show it all."""
    hidden = page.evaluate("""Math.max(0, ...Array.from(document.querySelectorAll('*'))
        .filter(e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowY))
        .map(e => e.scrollHeight - e.clientHeight))""")
    page.set_viewport_size({"width": WIDTH, "height": min(HEIGHT + hidden, MAX_HEIGHT)})
    time.sleep(3)
    _save(_grab(page), path)


def _grab(page: Page, top: float = 0, bottom: float | None = None) -> Image.Image:
    image = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    return image.crop((0, int(top), image.width, int(bottom or image.height)))


def _save(image: Image.Image, path: Path) -> None:
    image.save(path, optimize=True)
    if path.stat().st_size > MAX_BYTES:  # charts and UI chrome lose nothing to a 256-colour palette
        image.quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"{path}: {image.width}x{image.height}, {path.stat().st_size // 1000} KB")


if __name__ == "__main__":
    main()
