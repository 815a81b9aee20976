"""The web app in a real browser: Playwright drives Debian's chromium (headless) against `flux2-lora ui`.

The app runs as its own process on a free port with one allowed folder (tmp). The tests run in order on that one
app: check the sample dataset, show a recipe's masked source (its table, and a thumbnail with the mask laid over
it), train the tiny model from the Training tab (watching progress and the loss plot update, reloading the page
mid-run), compare two of its checkpoints, train on the built-in editing dataset and see its references in the
Dataset tab, and look at the Optimization tab. Each test saves a screenshot of its tab in
build/ui-screenshots/. Processes started here (the app, and the jobs it started, found in its state folder) are
stopped by pid at the end.

Needs playwright (pip) and /usr/bin/chromium (Debian's `chromium` package; `.ci/run` installs it). Without them the
tests skip, unless FLUX2_LORA_REQUIRE_BROWSER=1 (set by CI), where they fail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "build" / "ui-screenshots"
CHROMIUM = "/usr/bin/chromium"

pytestmark = pytest.mark.slow


def _browser_available() -> str | None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    missing = _browser_available()
    if missing:
        if os.environ.get("FLUX2_LORA_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    root = tmp_path_factory.mktemp("ui-root")
    state = root / ".state"
    subprocess.run(
        [sys.executable, "-m", "flux2_lora", "data", "make-sample", "--out", str(root / "shapes")], check=True
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(root / "app.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "flux2_lora", "ui", "--root", str(root), "--state-dir", str(state), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("the app did not start: " + (root / "app.log").read_text()[-2000:])
            time.sleep(0.5)
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        page.goto(url)
        try:
            yield {"page": page, "root": root, "url": url, "state": state}
        finally:
            browser.close()
            # Stop what this test started, by pid: the app's session, then any job it left running.
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
            for record in (state / "jobs").glob("*.json"):
                pid = json.loads(record.read_text())["pid"]
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            log.close()


def _tab(page: Any, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _fill(page: Any, elem_id: str, value: str, enter: bool = False) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(value)
    if enter:
        box.press("Enter")


def test_dataset_tab_checks_a_folder_and_refuses_one_outside_the_roots(app: dict[str, Any]) -> None:
    from playwright.sync_api import expect

    page, root = app["page"], app["root"]
    _tab(page, "Dataset")
    _fill(page, "ds-path", str(root / "shapes"), enter=True)
    _fill(page, "ds-min-res", "64")
    page.locator("#ds-check").click()
    expect(page.locator("#ds-status")).to_contain_text("12 images, 12 ok, 0 errors, 0 warnings — ready to train")
    expect(page.locator("#ds-gallery img")).to_have_count(12)
    expect(page.locator("#ds-gallery")).to_contain_text("000.png: a white circle")  # captions under thumbnails
    expect(page.locator("#ds-hist img")).to_be_visible()
    expect(page.locator("#ds-stats textarea")).to_have_value(__import__("re").compile("images: 12"))
    page.screenshot(path=str(SHOTS / "dataset.png"), full_page=True)
    # At the default minimum side (256 px) every 96 px sample is listed with its reason.
    _fill(page, "ds-min-res", "256")
    page.locator("#ds-check").click()
    expect(page.locator("#ds-status")).to_contain_text("12 errors")
    expect(page.locator("#ds-problems")).to_contain_text("short side 96 px is under --min-resolution 256")
    # A folder outside the allowed root: one line, nothing read.
    _fill(page, "ds-path", "/etc", enter=True)
    page.locator("#ds-check").click()
    expect(page.locator("#ds-status")).to_contain_text("dataset: /etc is outside the folders this app may use")


def test_dataset_tab_shows_a_recipes_masked_source_with_the_mask_over_its_thumbnail(app: dict[str, Any]) -> None:
    import io
    import re

    import yaml
    from PIL import Image
    from playwright.sync_api import expect

    page, root = app["page"], app["root"]
    images, masks = root / "masked" / "images", root / "masked" / "masks"
    for folder in (images, masks):
        folder.mkdir(parents=True)
    colours = [(200, 200, 200), (40, 120, 200), (200, 120, 40), (60, 160, 60)]  # distinct: no duplicate warnings
    for i, colour in enumerate(colours):  # 2:1 pictures; the grey one has a mask whose left half is black (ignored)
        Image.new("RGB", (256, 128), colour).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a plain picture {i}\n")
    mask = Image.new("L", (256, 128), 255)
    mask.paste(0, (0, 0, 128, 128))
    mask.save(masks / "0.png")
    source = {"path": str(images), "mask_dir": str(masks), "repeats": 2, "resolutions": [256, 512], "holdout": 0}
    recipe = root / "masked" / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"datasets": [source]}}))

    _tab(page, "Dataset")
    _fill(page, "ds-recipe", str(root / "masked" / "missing.yaml"))
    page.locator("#ds-sources").click()
    expect(page.locator("#ds-status")).to_contain_text("recipe file: ")  # one line, no traceback
    expect(page.locator("#ds-status")).to_contain_text("does not exist")
    _fill(page, "ds-recipe", str(recipe))
    page.locator("#ds-sources").click()
    status = page.locator("#ds-status")
    expect(status).to_contain_text("recipe.yaml: 1 source (1 train): 4 images, 1 masked, 16 samples per epoch")
    expect(status).to_contain_text("images (train): 4 images, 1 masked, 16 samples per epoch (100%)")
    table = page.locator("#ds-sources-table")
    expect(table).to_be_visible()
    for cell in ("data.datasets[0]", str(images), "train", "256, 512", "16", "100"):
        expect(table).to_contain_text(cell)
    gallery = page.locator("#ds-gallery")
    expect(page.locator("#ds-gallery img")).to_have_count(4)
    expect(gallery).to_contain_text("[1] 0.png: a plain picture 0 — mask: ")
    expect(gallery).to_contain_text("(red: not trained)")
    # The first thumbnail is the picture with its mask laid over it: the left half red, the right half as it is.
    src = page.locator("#ds-gallery img").first.get_attribute("src")
    with Image.open(io.BytesIO(page.request.get(src).body())) as im:
        im = im.convert("RGB")
        left, right = im.getpixel((im.width // 4, im.height // 2)), im.getpixel((3 * im.width // 4, im.height // 2))
    assert left[0] > left[1] + 100 and left[0] > left[2] + 100, left
    assert right == (200, 200, 200), right
    page.screenshot(path=str(SHOTS / "dataset-sources.png"), full_page=True)
    # A plain folder check takes the mask folder too; the sources table goes away.
    _fill(page, "ds-path", str(images), enter=True)
    _fill(page, "ds-mask-dir", str(masks))
    _fill(page, "ds-min-res", "64")
    page.locator("#ds-check").click()
    expect(status).to_contain_text(re.compile(r"4 images, 4 ok, 0 errors, 0 warnings, 1 with a loss mask"))
    expect(table).to_be_hidden()
    expect(gallery).to_contain_text("0.png: a plain picture 0 — mask: ")
    _fill(page, "ds-mask-dir", "")


def test_training_tab_runs_the_tiny_model_to_the_end_with_live_progress(app: dict[str, Any]) -> None:
    from playwright.sync_api import expect

    page, root = app["page"], app["root"]
    _tab(page, "Training")
    expect(page.locator("#tr-max-steps input")).to_have_value("200")  # the preset's values fill the form
    out = root / "runs" / "browser"
    _fill(page, "tr-output", str(out))
    for name, value in {"max-steps": "40", "every-n-steps": "10", "checkpoint-every": "20", "log-every": "2"}.items():
        _fill(page, f"tr-{name}", value)
    _fill(page, "tr-extra", "--output.dir /tmp/elsewhere")  # a flag cannot take the run out of the roots
    page.locator("#tr-start").click()
    expect(page.locator("#tr-message")).to_contain_text("output.dir: /tmp/elsewhere is outside the folders")
    _fill(page, "tr-extra", "")
    page.locator("#tr-start").click()
    expect(page.locator("#tr-status")).to_contain_text("running")
    # Two jobs never write one folder.
    page.locator("#tr-start").click()
    expect(page.locator("#tr-message")).to_contain_text("is being written by train job")
    # Progress and the loss plot update while it runs: record what the page shows each half second.
    seen_steps: list[int] = []
    plots: set[str] = set()
    reloaded = False
    deadline = time.time() + 600
    while time.time() < deadline:
        text = page.locator("#train-progress-text").inner_text()
        if " of 40" in text:
            seen_steps.append(int(text.split()[1]))
        img = page.locator("#tr-plot img")
        if img.count():
            plots.add(img.first.get_attribute("src") or "")
        if not reloaded and seen_steps and 0 < seen_steps[-1] < 40:
            page.reload()  # the page finds the running job again
            _tab(page, "Training")
            expect(page.locator("#tr-status")).to_contain_text("train job")
            expect(page.locator("#tr-output input, #tr-output textarea").first).to_have_value(str(out))
            expect(page.locator("#tr-max-steps input")).to_have_value("40")
            reloaded = True
        if "finished" in page.locator("#tr-status").inner_text():
            break
        time.sleep(0.5)
    expect(page.locator("#tr-status")).to_contain_text("finished")
    expect(page.locator("#train-progress-text")).to_contain_text("step 40 of 40 (100%)")
    assert reloaded
    distinct = sorted(set(seen_steps))
    assert len(distinct) >= 3 and distinct == sorted(distinct), seen_steps  # it moved, and only forwards
    assert len(plots) >= 2, plots  # the loss plot was redrawn as steps came in
    link = page.locator("#tr-lora a").first
    expect(link).to_be_visible()
    body = page.request.get(link.get_attribute("href")).body()
    from safetensors.torch import load

    lora = load(body)
    assert lora and all(k.startswith("transformer.") for k in lora)
    assert body == (out / "lora.safetensors").read_bytes()
    expect(page.locator("#tr-samples img").first).to_be_visible()
    page.screenshot(path=str(SHOTS / "training.png"), full_page=True)


def test_evaluation_tab_compares_two_checkpoints(app: dict[str, Any]) -> None:
    from playwright.sync_api import expect

    page, root = app["page"], app["root"]
    _tab(page, "Evaluation")
    _fill(page, "ev-run", str(root / "runs" / "browser"), enter=True)
    expect(page.locator("#ev-ckpts label")).to_have_count(3)  # step-20, step-40, final
    expect(page.locator("#ev-ckpts")).to_contain_text("step-20")
    boxes = page.locator("#ev-ckpts input[type=checkbox]")
    for i in range(3):  # exactly the two step checkpoints
        if boxes.nth(i).is_checked() != (i < 2):
            boxes.nth(i).click()
    _fill(page, "ev-steps", "2")
    _fill(page, "ev-seeds", "0 1")
    page.locator("#ev-compare").click()
    expect(page.locator("#ev-status")).to_contain_text("finished", timeout=300_000)
    expect(page.locator("#ev-grid img")).to_be_visible()
    compare = json.loads(next((root / "runs" / "browser" / "eval").glob("compare-*/compare.json")).read_text())
    assert [r["label"] for r in compare["rows"]] == ["step-20", "step-40"]
    assert compare["seeds"] == [0, 1] and compare["settings"]["steps"] == 2
    page.screenshot(path=str(SHOTS / "evaluation.png"), full_page=True)


def _pick(page: Any, elem_id: str, option: str) -> None:
    """Choose `option` from a dropdown's list (as a user does: open it, click the entry)."""
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def test_training_tab_trains_an_edit_dataset_and_the_dataset_tab_shows_its_references(app: dict[str, Any]) -> None:
    from playwright.sync_api import expect

    page, root = app["page"], app["root"]
    _tab(page, "Training")
    _pick(page, "tr-dataset", "builtin:edit")  # offered next to builtin:sample
    expect(page.locator("#tr-data")).to_contain_text("12 items, all with references (8 with 1, 4 with 2)")
    out = root / "runs" / "edit"
    _fill(page, "tr-output", str(out))
    for name, value in {"max-steps": "10", "every-n-steps": "5", "checkpoint-every": "10", "log-every": "2"}.items():
        _fill(page, f"tr-{name}", value)
    _fill(page, "tr-extra", "")
    page.locator("#tr-start").click()
    expect(page.locator("#tr-message")).to_contain_text("started train job")
    job_id = page.locator("#tr-message").inner_text().split()[3].rstrip(":")
    # This job's own line: the page showed the earlier run's "finished" until the new job was attached.
    expect(page.locator("#tr-status")).to_contain_text(f"train job {job_id}: finished", timeout=300_000)
    expect(page.locator("#train-progress-text")).to_contain_text("step 10 of 10 (100%)")
    import yaml

    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["data"]["dataset"] == "builtin:edit"
    link = page.locator("#tr-lora a").first
    expect(link).to_be_visible()
    from safetensors.torch import load

    body = page.request.get(link.get_attribute("href")).body()
    assert body == (out / "lora.safetensors").read_bytes() and load(body)
    page.screenshot(path=str(SHOTS / "training-edit.png"), full_page=True)
    # A reload finds the edit run again, its dataset included.
    page.reload()
    _tab(page, "Training")
    expect(page.locator("#tr-dataset input").first).to_have_value("builtin:edit")
    expect(page.locator("#tr-data")).to_contain_text("all with references")

    _tab(page, "Dataset")
    _pick(page, "ds-path", "builtin:edit")
    _fill(page, "ds-min-res", "64")
    page.locator("#ds-check").click()
    expect(page.locator("#ds-status")).to_contain_text("training reads 12 items, all with references")
    expect(page.locator("#ds-gallery img")).to_have_count(12)  # one picture per item: references -> target
    gallery = page.locator("#ds-gallery")
    expect(gallery).to_contain_text("000.png: make the circle")
    expect(gallery).to_contain_text(
        "002.png: paint the triangle in the colour of the second image — 2 references: 002_ref0.png, 002_ref1.png"
    )
    page.screenshot(path=str(SHOTS / "dataset-edit.png"), full_page=True)


def test_optimization_tab_refuses_an_output_outside_the_roots(app: dict[str, Any]) -> None:
    from playwright.sync_api import expect

    page = app["page"]
    _tab(page, "Optimization")
    _fill(page, "op-output", "/tmp/not-allowed-sweep")
    page.locator("#op-start").click()
    expect(page.locator("#op-message")).to_contain_text("output: /tmp/not-allowed-sweep is outside the folders")
    assert not Path("/tmp/not-allowed-sweep").exists()
    _fill(page, "op-output", str(app["root"] / "sweeps" / "refused"))
    _fill(page, "op-extra", "--space /etc/passwd")
    page.locator("#op-start").click()
    expect(page.locator("#op-message")).to_contain_text("more flags: --space is set by the form's fields")
    _fill(page, "op-extra", "")
    page.screenshot(path=str(SHOTS / "optimization.png"), full_page=True)  # the sweep test replaces it


@pytest.mark.cluster
def test_optimization_tab_runs_a_sweep_and_offers_the_best_config(app: dict[str, Any]) -> None:
    from playwright.sync_api import expect

    page, root = app["page"], app["root"]
    _tab(page, "Optimization")
    out = root / "sweeps" / "browser"
    _fill(page, "op-output", str(out))
    _fill(page, "op-trials", "2")
    _fill(page, "op-steps", "10")
    _fill(page, "op-concurrent", "1")
    expect(page.locator("#op-gpus input")).to_have_value("0")  # no GPU here: the form says so
    _fill(page, "op-extra", "--report-every 5 --grace-steps 10 --search-seed 3 --cpus-per-trial 1")
    page.locator("#op-start").click()
    expect(page.locator("#op-message")).to_contain_text("started tune job")
    expect(page.locator("#op-status")).to_contain_text("running")
    expect(page.locator("#op-table")).to_contain_text("val_loss", timeout=300_000)  # trials appear as they run
    expect(page.locator("#op-status")).to_contain_text("finished", timeout=600_000)
    expect(page.locator("#op-status")).to_contain_text("2 of 2 trials started, 2 ended")
    results = json.loads((out / "optimization_results.json").read_text())
    assert results["trials"]["completed"] == 2  # search seed 3 draws two valid trials
    expect(page.locator("#op-status")).to_contain_text(f"best so far: trial {results['best_trial']}")
    link = page.locator("#op-best a").first
    expect(link).to_be_visible()
    text = page.request.get(link.get_attribute("href")).text()
    assert text == (out / "best_config.yaml").read_text()
    from flux2_lora.cli import parse_train

    config = out / "downloaded.yaml"
    config.write_text(text)
    recipe, _ = parse_train(["--config", str(config)])
    assert recipe.training.max_steps == 10
    expect(page.locator("#op-plots img").first).to_be_visible()
    page.screenshot(path=str(SHOTS / "optimization.png"), full_page=True)
