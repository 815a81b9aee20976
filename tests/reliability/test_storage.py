"""A full disk and a read-only output folder: one line each, and the last checkpoint intact.

The test mounts a small tmpfs of its own and unmounts it at the end; where mounting is not allowed (not root, no
CAP_SYS_ADMIN) it is skipped.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from flux2_lora import checkpoint as ckpt
from tests.reliability.conftest import error_line, train


def _mount(path: Path, options: str) -> bool:
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 700 KiB tmpfs: room for the run's files and about two tiny checkpoints."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None or not _mount(mnt, "size=700k"):
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_stops_with_one_line_and_the_last_checkpoint_intact(small_disk: Path, cache: Path) -> None:
    out = small_disk / "run"
    args = ["--steps", "40", "--output.checkpoint_every", "2", "--output.keep_last", "10"]
    res = train(out, *args, dataset=cache)
    assert res.returncode == 2
    line = error_line(res)
    root = out / "checkpoints"
    good = ckpt.list_checkpoints(root)
    assert good, "the disk filled before the first checkpoint; make the tmpfs bigger"
    last = good[-1]
    assert line == (
        f"flux2-lora: error: cannot write checkpoint {root / f'step-{int(last.name[5:]) + 2}'}: No space left on "
        f"device; the last checkpoint, {last}, is intact; free some space and continue with --resume latest"
    )
    assert all(ckpt.check_checkpoint(c) is None for c in good)
    assert (root / "latest").read_text().strip() == last.name
    assert not list(root.glob(".tmp-*")) and not list(out.glob(".*.tmp"))
    # With space again, the run continues from that checkpoint and finishes.
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    res = train(out, *args, "--resume", "latest", dataset=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {last}" in res.stdout
    assert (out / "lora.safetensors").is_file()


def test_a_read_only_output_stops_with_one_line(small_disk: Path, cache: Path) -> None:
    out = small_disk / "run"
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    res = train(out, "--steps", "4", "--output.checkpoint_every", "2", dataset=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    res = train(out, "--steps", "8", "--output.checkpoint_every", "2", "--resume", "latest", dataset=cache)
    assert res.returncode == 2
    assert error_line(res) == (
        f"flux2-lora: error: {out / '.lock'}: Read-only file system; the last checkpoint, {out / 'checkpoints' / 'step-4'}, "
        "is intact; make the output folder writable (or choose another --output) and continue with --resume latest"
    )
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
