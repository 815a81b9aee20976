"""Interop hard to break: export never replaces a file or model folder without --overwrite, bad output paths and
failed writes are one line and leave no temporary file behind, every LoRA reader refuses NaN/inf tensors and
non-finite alphas, and `ui --share` is a bare flag."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flux2_lora import interop
from flux2_lora.cli import main
from flux2_lora.interop import LoraFileError
from tests.support.loras import make_random_lora


@pytest.fixture(scope="module")
def lora_path(tmp_path_factory: pytest.TempPathFactory, tiny_dev: Path) -> Path:
    return make_random_lora(tiny_dev, tmp_path_factory.mktemp("lora") / "lora.safetensors")


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI, expect exit 2 and a single `flux2-lora: error:` line on stderr; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("flux2-lora: error: "), err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders an export could leave: ours (.x.tmp, .tmp-x, .old-x) and safetensors' (.tmpXXXX)."""
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp"))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def export(lora: Path, out: Path, *extra: str) -> list[str]:
    return ["export", "--lora", str(lora), "--format", "kohya", "--output", str(out), *extra]


def merge(lora: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["export", "--merge", "--lora", str(lora), "--model", str(model), "--output", str(out), *extra]


# ---------------------------------------------------------------------------------------------
# export: --overwrite, bad paths, failed writes
# ---------------------------------------------------------------------------------------------


def test_export_never_replaces_a_file_without_overwrite(
    lora_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious bytes")
    msg = one_line_error(capsys, export(lora_path, out))
    assert msg == f"flux2-lora: error: --output: {out} exists; pass --overwrite to replace it"
    assert out.read_bytes() == b"precious bytes" and leftovers(tmp_path) == []
    assert main(export(lora_path, out, "--overwrite")) == 0
    assert interop.load_lora(out).format == "kohya" and leftovers(tmp_path) == []
    capsys.readouterr()
    before = out.read_bytes()
    one_line_error(capsys, export(lora_path, out, "--overwrite=false"))
    assert out.read_bytes() == before
    assert main(export(lora_path, out, "--overwrite", "true")) == 0


def test_export_output_that_is_a_folder_or_under_a_file_is_one_line(
    lora_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "lora.safetensors"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    for extra in ((), ("--overwrite",)):
        msg = one_line_error(capsys, export(lora_path, folder, *extra))
        assert f"--output: {folder} is a folder; pass a file path" in msg
    assert tree(folder) == {"keep.txt": b"mine"} and leftovers(tmp_path) == []
    a_file = tmp_path / "file.safetensors"
    a_file.write_bytes(b"x")
    msg = one_line_error(capsys, export(lora_path, a_file / "x.safetensors"))
    assert f"--output: {a_file / 'x.safetensors'}: {a_file} is a file, not a folder" in msg
    msg = one_line_error(capsys, export(lora_path, a_file / "deeper" / "x.safetensors", "--overwrite"))
    assert f"{a_file} is a file, not a folder" in msg
    assert a_file.read_bytes() == b"x" and leftovers(tmp_path) == []


def test_export_creates_a_missing_parent_folder(lora_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "sub" / "k.safetensors"
    assert main(export(lora_path, out)) == 0
    assert interop.load_lora(out).format == "kohya" and leftovers(tmp_path) == []


def _failing_save(exc: BaseException):  # noqa: ANN202 - a stand-in for safetensors.torch.save_file
    def save(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
        Path(filename).write_bytes(b"half a file")  # what a disk that fills up mid-write leaves
        raise exc

    return save


@pytest.mark.parametrize(
    "exc,reason",
    [
        (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), "No space"),
        (OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
    ],
)
def test_a_failed_export_is_one_line_and_leaves_nothing_behind(
    exc: BaseException,
    reason: str,
    lora_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = tmp_path / "old.safetensors"
    old.write_bytes(b"the old export")
    monkeypatch.setattr("safetensors.torch.save_file", _failing_save(exc))
    msg = one_line_error(capsys, export(lora_path, old, "--overwrite"))
    assert msg.startswith(f"flux2-lora: error: --output: cannot write {old}: ") and reason in msg, msg
    assert old.read_bytes() == b"the old export" and leftovers(tmp_path) == []
    new = tmp_path / "made" / "for" / "it.safetensors"
    msg = one_line_error(capsys, export(lora_path, new))
    assert f"cannot write {new}: " in msg and reason in msg
    assert not (tmp_path / "made").exists()  # the folders it created for the file are gone again


def test_an_export_that_fails_for_any_reason_leaves_no_tmp(
    lora_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lora = interop.load_lora(lora_path)
    for exc in (RuntimeError("bug"), KeyboardInterrupt()):
        monkeypatch.setattr("safetensors.torch.save_file", _failing_save(exc))
        with pytest.raises(type(exc)):
            interop.write_lora(lora, tmp_path / "x.safetensors", "comfyui")
        assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# export --merge: the output folder
# ---------------------------------------------------------------------------------------------


def _fake_merged(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    (folder / interop.MERGE_INFO).write_text('{"scale": 0.5}\n')
    (folder / "model_index.json").write_text("{}\n")
    return tree(folder)


def test_merge_never_replaces_a_folder_without_overwrite(
    lora_path: Path, tiny_dev: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    before = _fake_merged(out)
    msg = one_line_error(capsys, merge(lora_path, tiny_dev, out))
    assert msg == f"flux2-lora: error: --output: {out} exists (a merged model); pass --overwrite to replace it"
    assert tree(out) == before
    # A folder export --merge did not write is never deleted, not even with --overwrite.
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "a.png").write_bytes(b"png")
    for extra in ((), ("--overwrite",)):
        msg = one_line_error(capsys, merge(lora_path, tiny_dev, mine, *extra))
        assert f"--output: {mine} exists and is not a merged model (no merged_lora.json)" in msg
    assert tree(mine) == {"a.png": b"png"}
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"x")
    msg = one_line_error(capsys, merge(lora_path, tiny_dev, a_file, "--overwrite"))
    assert f"--output: {a_file} is a file; --merge writes a model folder" in msg
    msg = one_line_error(capsys, merge(lora_path, tiny_dev, a_file / "m"))
    assert f"{a_file} is a file, not a folder" in msg
    # Nor the base model's folder, nor the folder holding the LoRA.
    msg = one_line_error(capsys, merge(lora_path, tiny_dev, tiny_dev / "merged"))
    assert "overlaps the base model folder" in msg
    (lora_path.parent / interop.MERGE_INFO).write_text("{}\n")
    try:
        msg = one_line_error(capsys, merge(lora_path, tiny_dev, lora_path.parent, "--overwrite"))
        assert f"holds the LoRA {lora_path}" in msg
    finally:
        (lora_path.parent / interop.MERGE_INFO).unlink()
    assert a_file.read_bytes() == b"x" and leftovers(tmp_path) == []


def test_merge_with_overwrite_replaces_a_merged_model_and_a_failure_keeps_the_old_one(
    lora_path: Path,
    tiny_dev: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "merged"
    before = _fake_merged(out)

    def full(src: Path, dst: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    with monkeypatch.context() as m:
        m.setattr("flux2_lora.interop.merge._link_or_copy", full)
        msg = one_line_error(capsys, merge(lora_path, tiny_dev, out, "--overwrite"))
    assert msg == f"flux2-lora: error: --output: cannot write the merged model {out}: No space left on device"
    assert tree(out) == before and leftovers(tmp_path) == []
    assert main(merge(lora_path, tiny_dev, out, "--overwrite")) == 0
    assert json.loads((out / interop.MERGE_INFO).read_text())["scale"] == 1.0
    assert (out / "transformer").is_dir() and (out / "model_index.json").read_text() != "{}\n"
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Non-finite tensors and alphas: every reader refuses them
# ---------------------------------------------------------------------------------------------


def _rewrite(src: Path, dst: Path, key: str | None = None, values: int = 3, **metadata: str) -> str:
    """A copy of `src` with `values` entries of one tensor set to NaN/inf (the first lora_A: `key` None) and
    header fields changed; returns the tensor's key."""
    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if values:
        key = key or sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
        flat = tensors[key].flatten().clone()
        flat[:values] = torch.tensor(([float("nan"), float("inf"), float("-inf")] * values)[:values])
        tensors[key] = flat.reshape(tensors[key].shape)
    save_file(tensors, str(dst), metadata={**header, **metadata})
    return key or ""


def test_every_reader_refuses_nan_and_inf_tensors(
    lora_path: Path, tiny_dev: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flux2_lora.config import ModelArgs
    from flux2_lora.evaluate.generate import resolve_lora
    from flux2_lora.model import resolve_model

    bad = tmp_path / "bad.safetensors"
    key = _rewrite(lora_path, bad)
    why = f"{bad}: tensor {key} has 3 non-finite values (NaN/inf); this LoRA is broken, use an earlier checkpoint"
    assert one_line_error(capsys, ["lora", "inspect", str(bad)]) == f"flux2-lora: error: FILE: {why}"
    assert one_line_error(capsys, export(bad, tmp_path / "k.safetensors")) == f"flux2-lora: error: --lora: {why}"
    assert one_line_error(capsys, merge(bad, tiny_dev, tmp_path / "m")) == f"flux2-lora: error: --lora: {why}"
    assert one_line_error(capsys, ["eval", "compare", str(bad)]) == f"flux2-lora: error: CKPT: {why}"
    with pytest.raises(LoraFileError) as e:
        resolve_lora(bad, "--checkpoint")
    assert str(e.value) == f"--checkpoint: {why}"
    src = resolve_model(ModelArgs(name_or_path=str(tiny_dev)))
    with pytest.raises(LoraFileError) as e:  # train --init-lora
        interop.check_init_lora(str(bad), src, 4, None, "all-linear")
    assert str(e.value) == f"lora.init_from: {why}"
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]
    # One bad value in a bf16 file, in an up factor, is found as well.
    lora = interop.load_lora(lora_path)
    bf16 = interop.write_lora(lora, tmp_path / "bf16.safetensors", "diffusers", torch.bfloat16)
    up = sorted(k for k in load_keys(bf16) if k.endswith("lora_B.weight"))[-1]
    _rewrite(bf16, bf16, up, values=1)
    with pytest.raises(LoraFileError, match=f"tensor {up} has 1 non-finite values"):
        interop.load_lora(bf16)


def load_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_non_finite_alphas_are_refused(lora_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flux2_lora.evaluate.generate import resolve_lora

    lora = interop.load_lora(lora_path)
    # kohya: the alpha is a tensor.
    kohya = interop.write_lora(lora, tmp_path / "k.safetensors", "kohya")
    alpha_key = sorted(k for k in load_keys(kohya) if k.endswith(".alpha"))[0]
    _rewrite(kohya, kohya, alpha_key, values=1)
    msg = one_line_error(capsys, ["lora", "inspect", str(kohya)])
    assert f"tensor {alpha_key} has 1 non-finite values (NaN/inf)" in msg
    # diffusers: the alpha is in the LoraConfig header that loaders compute the scale from.
    with safe_open(str(lora_path), framework="pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    for value, expect in (
        (float("nan"), "lora_alpha is nan, not a finite number"),
        ("abc", "lora_alpha is not a number (got 'abc')"),
    ):
        bad = tmp_path / "d.safetensors"
        _rewrite(
            lora_path, bad, values=0, lora_adapter_metadata=json.dumps({**config, "transformer.lora_alpha": value})
        )
        msg = one_line_error(capsys, ["export", "--lora", str(bad), "--output", str(tmp_path / "o.safetensors")])
        assert f"--lora: {bad}: lora_adapter_metadata {expect}" in msg, msg
        with pytest.raises(LoraFileError, match="lora_adapter_metadata"):
            resolve_lora(bad)
    pattern = json.dumps({**config, "transformer.alpha_pattern": {"to_q": float("inf")}})
    _rewrite(lora_path, bad, values=0, lora_adapter_metadata=pattern)
    with pytest.raises(LoraFileError, match=r"alpha_pattern\[to_q\] is inf, not a finite number"):
        interop.load_lora(bad)
    _rewrite(lora_path, bad, values=0, **{"flux2_lora.alpha": "Infinity"})
    with pytest.raises(LoraFileError, match="metadata flux2_lora.alpha is Infinity, not a finite number"):
        interop.load_lora(bad)
    assert not (tmp_path / "o.safetensors").exists() and leftovers(tmp_path) == []


def test_finite_files_still_read(lora_path: Path, tmp_path: Path) -> None:
    """The checks pass the training output and its exports, integer tensors and a rank-less alpha header."""
    lora = interop.load_lora(lora_path)
    for fmt in interop.EXPORT_FORMATS:
        assert interop.load_lora(interop.write_lora(lora, tmp_path / f"{fmt}.safetensors", fmt)).format == fmt
    interop.check_finite({"steps": torch.tensor([1, 2]), "w": torch.zeros(2, dtype=torch.float16)}, "f")
    interop.check_alpha_metadata({"flux2_lora.alpha": "null", "ss_network_alpha": "8"}, "f")


# ---------------------------------------------------------------------------------------------
# ui --share
# ---------------------------------------------------------------------------------------------


def test_ui_share_is_a_bare_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No --auth: refused before any server starts, which shows how --share was read.
    for argv in (["--share"], ["--share", "--root", str(tmp_path)], ["--share", "true"], ["--share=true"]):
        msg = one_line_error(capsys, ["ui", *argv, "--root", str(tmp_path)])
        assert "--host 127.0.0.1 --share: anyone who can reach the app" in msg, (argv, msg)
    msg = one_line_error(capsys, ["ui", "--share", "false", "--host", "0.0.0.0", "--root", str(tmp_path)])
    assert "--host 0.0.0.0: anyone" in msg and "--share" not in msg
    msg = one_line_error(capsys, ["ui", "--share", "maybe", "--root", str(tmp_path)])
    assert msg == "flux2-lora: error: share: must be a bool (got maybe)"
    with pytest.raises(SystemExit) as e:
        main(["ui", "--help"])
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "[--share [{true,false}]]" in help_text and "a bare --share means true" in help_text


def test_an_export_that_would_overflow_its_dtype_is_not_written(tmp_path: Path) -> None:
    from flux2_lora.interop import LoraFile, LoraModule, write_lora

    big = LoraModule(torch.ones(2, 4), torch.full((4, 2), 1e6), 2.0)
    lora = LoraFile(format="diffusers", modules={"transformer_blocks.0.attn.to_q": big})
    out = tmp_path / "f16.safetensors"
    with pytest.raises(LoraFileError, match=r"--output: .*f16.safetensors: tensor .* non-finite values"):
        write_lora(lora, out, "diffusers", dtype=torch.float16)
    assert not out.exists() and not list(tmp_path.iterdir())
