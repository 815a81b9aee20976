"""The web app's parts without a browser: allowed folders, jobs (start, conflict, stop, reattach), what a run and a
sweep folder look like to the page, and the safety rules of `flux2-lora ui`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flux2_lora.cli import main
from flux2_lora.ui import jobs as jobs_mod
from flux2_lora.ui.app import is_loopback, read_auth
from flux2_lora.ui.jobs import JobManager
from flux2_lora.ui.paths import Roots, UiError
from flux2_lora.ui.views import (
    checkpoints,
    dataset_entries,
    recipe_value,
    reference_summary,
    run_view,
    sweep_view,
    thumbnails,
)


def test_paths_must_stay_inside_the_allowed_roots(tmp_path: Path) -> None:
    a, b, outside = tmp_path / "a", tmp_path / "b", tmp_path / "outside"
    for d in (a, b, outside):
        d.mkdir()
    (a / "data").mkdir()
    roots = Roots.of([a, b])
    assert roots.resolve("data", "dataset") == str(a / "data")  # relative: inside the first root
    assert roots.resolve(str(b), "dataset") == str(b)
    assert roots.resolve(str(a / "new" / "run"), "output", must_exist=False) == str(a / "new" / "run")
    with pytest.raises(UiError, match=r"dataset: .*outside the folders this app may use"):
        roots.resolve(str(outside), "dataset")
    with pytest.raises(UiError, match="outside"):
        roots.resolve(str(a / ".." / "outside"), "dataset")
    (a / "link").symlink_to(outside)  # a link inside a root that leads out is outside
    with pytest.raises(UiError, match="outside"):
        roots.resolve(str(a / "link"), "dataset")
    with pytest.raises(UiError, match="does not exist"):
        roots.resolve(str(a / "missing"), "dataset")
    with pytest.raises(UiError, match="dataset: required"):
        roots.resolve("  ", "dataset")
    assert roots.resolve("builtin:sample", "dataset", allow_builtin=True) == "builtin:sample"
    with pytest.raises(UiError, match="not a built-in name"):
        roots.resolve("builtin:nothing", "dataset", allow_builtin=True)
    with pytest.raises(UiError, match="--root"):
        Roots.of([tmp_path / "nope"])


def test_pickers_list_only_folders_inside_the_roots(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "root"
    (root / "set1").mkdir(parents=True)
    (root / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(root / "set1" / "a.png")
    Image.new("RGB", (8, 8)).save(root / ".hidden" / "b.png")
    run = root / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    (run / "recipe.yaml").write_text("")
    roots = Roots.of([root])
    assert roots.folders_with("images") == [str(root / "set1")]
    assert roots.folders_with("run") == [str(run)]


def _edit_folder(root: Path) -> Path:
    """a.png with two references beside it, b.png plain, c.png with one in references/ and no caption."""
    from PIL import Image

    (root / "references").mkdir(parents=True)
    for name, size in (("a.png", (40, 20)), ("a_ref0.png", (20, 20)), ("a_ref1.png", (20, 40)), ("b.png", (20, 20)),
                       ("c.png", (30, 30)), ("references/c_ref0.png", (30, 30))):  # fmt: skip
        Image.new("RGB", size, (200, 30, 30)).save(root / name)
    (root / "a.txt").write_text("make the square blue\n")
    (root / "b.txt").write_text("a plain picture\n")
    return root


def test_dataset_view_lists_each_target_with_its_references(tmp_path: Path) -> None:
    from PIL import Image

    root = _edit_folder(tmp_path / "edit")
    entries, refused = dataset_entries(root)
    assert refused is None  # a missing caption is shown, not refused (validate reports it)
    assert [(e.image.name, e.caption, [r.name for r in e.references]) for e in entries] == [
        ("a.png", "make the square blue", ["a_ref0.png", "a_ref1.png"]),
        ("b.png", "a plain picture", []),
        ("c.png", "", ["c_ref0.png"]),
    ]
    assert reference_summary(entries) == "3 items, 2 with references (1 with 1, 1 with 2)"
    assert reference_summary(entries[:1]) == "1 item, 1 with references (2 each)"
    assert reference_summary(entries[1:2]) == "1 item, none with references"

    tiles = tmp_path / "tiles"
    shown = thumbnails(root, tile_dir=tiles)
    assert [caption for _, caption in shown] == [
        "a.png: make the square blue — 2 references: a_ref0.png, a_ref1.png",
        "b.png: a plain picture",
        "c.png: (no caption) — 1 reference: references/c_ref0.png",
    ]
    # An item with references is drawn as one picture (references, arrow, target); a plain one is the file itself.
    a_tile, b_pic, c_tile = (Path(p) for p, _ in shown)
    assert a_tile.parent == tiles and c_tile.parent == tiles and b_pic == root / "b.png"
    with Image.open(a_tile) as im:
        assert im.height == 192 and im.width > 2 * 192  # two rows of references, then the 2:1 target at full height
    assert thumbnails(root, tile_dir=tiles)[0][0] == str(a_tile)  # drawn once
    assert sorted(p.name for p in tiles.iterdir()) == sorted([a_tile.name, c_tile.name])
    # A folder the browser may not read (a built-in dataset): every item is drawn inside the tile folder.
    assert all(Path(p).parent == tiles for p, _ in thumbnails(root, tile_dir=tiles, copy_plain=True))
    assert [p for p, _ in thumbnails(root)] == [str(root / n) for n in ("a.png", "b.png", "c.png")]

    # A folder training refuses (a reference without its target, and no caption of its own): every image is listed
    # on its own, with the refusal's line.
    Image.new("RGB", (8, 8)).save(root / "d_ref0.png")
    entries, refused = dataset_entries(root)
    assert refused is not None and "d_ref0.png: a reference image without its target" in refused
    assert [e.image.name for e in entries] == ["a.png", "a_ref0.png", "a_ref1.png", "b.png", "c.png", "d_ref0.png",
                                               "c_ref0.png"]  # fmt: skip
    assert not any(e.references for e in entries) and entries[0].caption == "make the square blue"


def test_the_pickers_offer_the_built_in_datasets(tmp_path: Path, home: Path) -> None:
    from flux2_lora.ui.app import _data_facts

    roots = Roots.of([tmp_path])
    folder, builtin = roots.dataset("builtin:edit")
    assert builtin and folder == home / "data" / "edit"
    assert _data_facts(folder) == (
        "training reads 12 items, all with references (8 with 1, 4 with 2): an editing dataset "
        "(each caption is the instruction, the image the result)"
    )
    assert _data_facts(roots.dataset("builtin:sample")[0]) == "training reads 12 items, none with references"
    assert roots.resolve("builtin:edit", "data.dataset", allow_builtin=True) == "builtin:edit"
    with pytest.raises(UiError, match="builtin:tiny-dev is not a built-in dataset"):
        roots.dataset("builtin:tiny-dev")
    with pytest.raises(UiError, match="outside the folders"):
        roots.dataset(str(home))
    own = _edit_folder(tmp_path / "mine")
    assert roots.dataset(str(own)) == (own, False)
    assert _data_facts(own).startswith("training reads 3 items, 2 with references (1 with 1, 1 with 2)")
    (own / "d_ref0.png").write_bytes((own / "b.png").read_bytes())
    assert _data_facts(own).startswith("**Training would refuse this folder:** ")


@pytest.fixture
def sleeper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs run a small Python program instead of the CLI: it writes a line, then waits (SIGTERM ends it)."""
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
        "print('working', flush=True)\n"
        "time.sleep(60 if sys.argv[1] != 'fail' else 0)\n"
        "sys.exit(0 if sys.argv[1] != 'fail' else 'flux2-lora: error: training.lr: must be > 0')\n"
    )
    monkeypatch.setattr(jobs_mod, "command", lambda kind, args: [sys.executable, "-c", code, *args])


def test_jobs_stop_fail_and_one_job_per_output_folder(tmp_path: Path, sleeper: None) -> None:
    manager = JobManager(tmp_path / "state")
    out = tmp_path / "run"
    job = manager.start("train", ["wait"], str(out))
    try:
        assert manager.get(job.id).running
        with pytest.raises(UiError, match=f"is being written by train job {job.id}"):
            manager.start("eval", ["wait"], str(out))
        other = manager.start("train", ["wait"], str(tmp_path / "run2"))  # another folder is fine
        manager.stop(other.id)
        assert manager.wait(other.id, 20).state == "stopped"  # SIGTERM: the trainer checkpoints and exits 75
        time.sleep(0.5)
        assert "working" in manager.get(job.id).log_tail()
    finally:
        manager.stop(job.id)
    assert manager.wait(job.id, 20).state == "stopped"
    failed = manager.start("train", ["fail"], str(out))  # the folder is free again
    done = manager.wait(failed.id, 20)
    assert done.state == "failed" and done.returncode == 1
    assert done.error_line() == "flux2-lora: error: training.lr: must be > 0"
    assert [j.id for j in manager.all("train")] == [job.id, other.id, failed.id]


def test_a_new_app_finds_a_running_job_and_tells_a_reused_pid(tmp_path: Path, sleeper: None) -> None:
    first = JobManager(tmp_path / "state")
    job = first.start("train", ["wait"], str(tmp_path / "run"))
    again = JobManager(tmp_path / "state")  # a restarted app: no process handle, only the record
    found = again.latest("train")
    assert found is not None and found.id == job.id and found.running
    os.kill(job.pid, signal.SIGKILL)
    first.wait(job.id, 20)  # reaps the child (the first app is its parent)
    assert again.get(job.id).state in ("ended", "failed")
    # A record whose pid now belongs to another process (start time differs) is not taken for the job.
    record = json.loads((tmp_path / "state" / "jobs" / f"{job.id}.json").read_text())
    record.update(state="running", pid=os.getpid(), returncode=None)
    (tmp_path / "state" / "jobs" / f"{job.id}.json").write_text(json.dumps(record))
    assert again.get(job.id).state == "ended"


def test_a_training_run_outside_the_app_blocks_its_folder(tmp_path: Path, sleeper: None) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.lockf(f.fileno(), fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(out / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(UiError, match="in use by a training run outside this app"):
            JobManager(tmp_path / "state").start("train", ["wait"], str(out))
    finally:
        holder.kill()
        holder.wait()
    job = JobManager(tmp_path / "state").start("train", ["fail"], str(out))  # the lock died with its process
    assert job.pid > 0


def _metrics(path: Path, records: list[dict[str, float]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_run_view_reads_progress_eta_plot_and_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    (out / "recipe.yaml").write_text("training:\n  max_steps: 100\n")
    _metrics(out / "metrics.jsonl", [
        {"step": 0, "val_loss": 1.5},
        {"step": 10, "loss": 1.4, "steps_per_s": 2.0},
        {"step": 20, "loss": 1.2, "steps_per_s": 4.0},
        {"step": 20, "val_loss": 1.3},
    ])  # fmt: skip
    for step in (20, 10, 5):
        (out / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (out / "checkpoints" / f"step-{step}" / "lora.safetensors").write_bytes(b"x")
    (out / "checkpoints" / "step-5" / "lora.safetensors").unlink()  # an unfinished checkpoint is not listed
    v = run_view(out, tmp_path / "plots")
    assert (v.step, v.max_steps, v.loss, v.val_loss) == (20, 100, 1.2, 1.3)
    assert v.eta_s == pytest.approx(80 / 4.0)
    assert v.progress_text("running") == "step 20 of 100 (20%), loss 1.2000, val_loss 1.3000, 4.00 steps/s, ETA 0:00:20"
    assert "ETA" not in v.progress_text("finished")
    assert v.loss_png is not None and Path(v.loss_png).stat().st_size > 0
    assert v.lora is None
    assert recipe_value(out, "training.max_steps") == 100 and recipe_value(out, "data.dataset") is None
    assert [Path(p).parent.name for p in v.checkpoints] == ["step-10", "step-20"]
    (out / "lora.safetensors").write_bytes(b"x")
    assert checkpoints(out)[-1] == str(out / "lora.safetensors")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 30, "lo')  # a line being written is skipped, not an error
    assert run_view(out).step == 20


def test_sweep_view_lists_live_trials_then_the_final_summary(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    space = [{"name": "training.lr", "type": "float"}, {"name": "lora.rank", "type": "int"}]
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"trials": 3, "max_steps": 20, "space": space}))
    for tid, lr, val, done in (("t1", 0.01, 0.9, True), ("t2", 0.001, 0.7, False)):
        d = out / "trials" / tid
        d.mkdir(parents=True)
        (d / "recipe.yaml").write_text(f"training:\n  lr: {lr}\nlora:\n  rank: 8\n")
        _metrics(d / "metrics.jsonl", [{"step": 10, "val_loss": val}])
        if done:
            (d / "lora.safetensors").write_bytes(b"x")
        time.sleep(0.01)
    v = sweep_view(out)
    assert v.headers == ["trial", "lr", "rank", "step", "val_loss", "state"]
    assert v.rows == [["t1", 0.01, 8, 10, 0.9, "completed"], ["t2", 0.001, 8, 10, 0.7, "running"]]
    assert v.best == ("t1", 0.9)  # a running trial's lower value is not a result yet
    assert v.summary() == "2 of 3 trials started, 1 ended; best so far: trial t1, val_loss 0.90000"
    (out / "trials_data.json").write_text(json.dumps([{"trial_id": "t2", "state": "pruned"}]))
    (out / "optimization_results.json").write_text(json.dumps({"best_trial": "t1", "best_value": 0.9}))
    (out / "best_config.yaml").write_text("model: {}\n")
    v = sweep_view(out)
    assert v.finished and v.rows[1][-1] == "pruned" and v.best_config == str(out / "best_config.yaml")


def test_public_bind_needs_auth_and_auth_must_be_well_formed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    for argv in (["--host", "0.0.0.0"], ["--share", "true"]):
        assert main(["ui", *argv, "--root", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "add --auth USER:PASSWORD" in err and len(err.strip().splitlines()) == 1, err
    assert main(["ui", "--host", "0.0.0.0", "--auth", "nopassword"]) == 2
    assert "expected USER:PASSWORD" in capsys.readouterr().err
    assert main(["ui", "--root", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    f = tmp_path / "users"
    f.write_text("# team\nana:s3cret\nbo:pw\n")
    assert read_auth(None, str(f)) == [("ana", "s3cret"), ("bo", "pw")]


def test_recipe_flags_cannot_point_outside_the_roots(tmp_path: Path, tiny_dev: Path) -> None:
    from flux2_lora.cli import parse_train
    from flux2_lora.ui.app import _check_recipe_paths

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "x.safetensors").write_bytes(b"")  # the recipe checks existence; the roots check comes on top
    roots = Roots.of([root])
    ok, _ = parse_train(["--preset", "tiny", "--output.dir", str(root / "run")])
    _check_recipe_paths(ok, roots)
    for flags, field in ((["--output.dir", str(outside / "run")], "output.dir"),
                         (["--data.dataset", str(outside)], "data.dataset"),
                         (["--lora.init_from", str(outside / "x.safetensors")], "lora.init_from")):  # fmt: skip
        recipe, _ = parse_train(["--preset", "tiny", "--output.dir", str(root / "run"), *flags], need_data=False)
        with pytest.raises(UiError, match=f"{field}: .*outside the folders"):
            _check_recipe_paths(recipe, roots)


def _masked_sources(root: Path) -> Path:
    """subject/ (3 grey 64x32 images, 0.png masked beside it: left half black), reg/ (2 images), masks/ (a mask
    folder for reg/1.png), and recipe.yaml listing subject (x2, two resolutions, holdout 1) and reg (regularisation,
    its masks in masks/)."""
    import yaml
    from PIL import Image

    for name, n in (("subject", 3), ("reg", 2)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (64, 32), (200, 200, 200)).save(root / name / f"{i}.png")
            (root / name / f"{i}.txt").write_text(f"{name} {i}\n")
    half = Image.new("L", (64, 32), 255)
    half.paste(0, (0, 0, 32, 32))
    half.save(root / "subject" / "0.mask.png")
    (root / "masks").mkdir()
    half.save(root / "masks" / "1.png")
    sources = [
        {"path": str(root / "subject"), "repeats": 2, "resolutions": [256, 512], "holdout": 1},
        {"path": str(root / "reg"), "role": "regularisation", "mask_dir": str(root / "masks")},
    ]
    (root / "recipe.yaml").write_text(yaml.safe_dump({"data": {"datasets": sources}}))
    return root / "recipe.yaml"


def test_mask_overlay_tints_what_the_mask_leaves_out() -> None:
    import numpy as np
    from PIL import Image

    from flux2_lora.ui.views import MASK_ALPHA, MASK_TINT, mask_overlay

    image = Image.new("RGB", (6, 2), (200, 200, 200))
    weights = np.array([[0.0, 0.0, 0.5, 0.5, 1.0, 1.0]] * 2, dtype=np.float32)
    out = np.asarray(mask_overlay(image, Image.fromarray(weights, "F")), dtype=np.float32)
    full = [200 * (1 - MASK_ALPHA) + t * MASK_ALPHA for t in MASK_TINT]  # black: tinted at MASK_ALPHA
    half = [200 * (1 - MASK_ALPHA / 2) + t * MASK_ALPHA / 2 for t in MASK_TINT]  # grey: in proportion
    assert np.allclose(out[0, 0], full, atol=1) and np.allclose(out[0, 2], half, atol=1)
    assert out[0, 5].tolist() == [200, 200, 200]  # white: untouched
    # A full-size mask over a thumbnail is resized to it.
    small = mask_overlay(Image.new("RGB", (3, 1), (200, 200, 200)), Image.fromarray(weights.repeat(4, 0), "F"))
    (r0, g0, _), (r2, g2, _) = small.getpixel((0, 0)), small.getpixel((2, 0))
    assert small.size == (3, 1) and r0 > g0 + 100 and abs(r2 - 200) < 10 and abs(g2 - 200) < 10


def test_sources_view_lists_a_recipes_sources_with_counts_and_masked_thumbnails(tmp_path: Path) -> None:
    from PIL import Image

    from flux2_lora.errors import RecipeError
    from flux2_lora.recipe import parse_recipe
    from flux2_lora.ui.sources_view import (
        HEADERS,
        read_sources,
        recipe_argv,
        sources_gallery,
        sources_summary,
        sources_table,
    )

    recipe_file = _masked_sources(tmp_path / "root")
    roots = Roots.of([tmp_path / "root"])
    argv = recipe_argv("", "recipe.yaml", roots)  # relative: inside the first root
    assert argv == ["--config", str(recipe_file)]
    views = read_sources(parse_recipe(argv, need_data=True)[0], roots)
    headers, rows = sources_table(views)
    assert headers == HEADERS
    root = tmp_path / "root"
    # subject: (3 - 1 held out) x 2 repeats x 2 resolutions = 8; reg: 2 x 1 x 1 (never held out) = 2.
    assert rows == [
        ["data.datasets[0]", str(root / "subject"), "train", 2, "256, 512", 3, 1, 8, 80.0, ""],
        ["data.datasets[1]", str(root / "reg"), "regularisation", 1, "1024", 2, 1, 2, 20.0, ""],
    ]
    summary = sources_summary(views, "recipe.yaml")
    assert summary.startswith("**recipe.yaml**: 2 sources (1 train, 1 regularisation): 5 images, 2 masked, ")
    assert "1. `data.datasets[0]` subject (train): 3 images, 1 masked, 8 samples per epoch (80%)" in summary
    assert "2. `data.datasets[1]` reg (regularisation): 2 images, 1 masked, 2 samples per epoch (20%)" in summary

    tiles = tmp_path / "tiles"
    shown = sources_gallery(views, tiles)
    assert [c for _, c in shown] == [
        "[1] 0.png: subject 0 — mask: 0.mask.png (red: not trained)",
        "[1] 1.png: subject 1",
        "[1] 2.png: subject 2",
        "[2] 0.png: reg 0",
        "[2] 1.png: reg 1 — mask: ../masks/1.png (red: not trained)",
    ]
    masked = Path(shown[0][0])
    assert masked.parent == tiles and Path(shown[1][0]) == root / "subject" / "1.png"  # unmasked: the file itself
    with Image.open(masked) as im:
        left, right = im.convert("RGB").getpixel((10, im.height // 2)), im.getpixel((im.width - 10, im.height // 2))
    assert left[0] > left[1] + 100 and right == (200, 200, 200)  # the ignored half is red, the trained half as is

    # A plain folder's thumbnails take the mask folder too.
    plain = thumbnails(root / "reg", tile_dir=tiles, mask_dir=root / "masks")
    assert Path(plain[1][0]).parent == tiles and "mask: " in plain[1][1]

    # A source outside the roots is listed, not read; a recipe mistake is one line.
    outside = _masked_sources(tmp_path / "elsewhere")
    only = Roots.of([root, tmp_path / "elsewhere" / "reg"])  # the recipe file may be read, subject/ may not
    views = read_sources(parse_recipe(["--config", str(outside)], need_data=True)[0], only)
    _, rows = sources_table(views)
    assert rows[0][5:9] == ["-", "-", "-", "-"] and "outside the folders this app may use" in rows[0][9]
    assert "data.datasets[1].mask_dir" in rows[1][9]  # its mask folder lies outside too
    (root / "bad.yaml").write_text("data:\n  datasets:\n    - path: missing\n")
    with pytest.raises(RecipeError, match=r"^data\.datasets\[0\]\.path: missing does not exist$"):
        parse_recipe(recipe_argv("", "bad.yaml", roots), need_data=True)
    with pytest.raises(UiError, match="recipe file: required"):
        recipe_argv("", " ", roots)


def test_recipe_sources_and_mask_folders_cannot_lie_outside_the_roots(tmp_path: Path) -> None:
    from flux2_lora.recipe import parse_recipe
    from flux2_lora.ui.app import _check_recipe_paths

    root = tmp_path / "root"
    recipe_file = _masked_sources(root)
    (root / "runs").mkdir()
    recipe, _ = parse_recipe(["--config", str(recipe_file), "--output.dir", str(root / "runs" / "a")])
    _check_recipe_paths(recipe, Roots.of([root]))
    with pytest.raises(UiError, match=r"data\.datasets\[1\]\.mask_dir: .*outside the folders"):
        _check_recipe_paths(recipe, Roots.of([root / "runs", root / "subject", root / "reg"]))
    with pytest.raises(UiError, match=r"data\.datasets\[0\]\.path: .*outside the folders"):
        _check_recipe_paths(recipe, Roots.of([root / "runs", root / "reg", root / "masks"]))
