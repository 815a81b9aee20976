"""Checkpoints: pickle-free round trip, atomic `latest`, retention, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flux2_lora import checkpoint as ckpt
from flux2_lora.distributed import optimizer_state, trainable_state


def _model_and_optimizer(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # a frozen tensor is not checkpointed
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, keep: int = 3) -> Path:
    return ckpt.save_checkpoint(
        root,
        step,
        trainable_state(model),
        optimizer_state(opt),
        {"step": step, "x": [1, 2]},
        {"generator": torch.Generator().manual_seed(5).get_state()},
        export_lora=lambda p: p.write_bytes(b"lora"),
        keep_last=keep,
    )


def test_round_trip_restores_weights_and_optimizer_exactly(tmp_path: Path) -> None:
    model, opt = _model_and_optimizer(0)
    path = _save(tmp_path, 3, model, opt)
    fresh, fresh_opt = _model_and_optimizer(1)
    state, rng = ckpt.load_checkpoint(path, fresh, fresh_opt)
    assert state == {"step": 3, "x": [1, 2]}
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a, b), n
    sa, sb = opt.state_dict(), fresh_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for idx in sa["state"]:
        for k, v in sa["state"][idx].items():
            assert torch.equal(v, sb["state"][idx][k]) if torch.is_tensor(v) else v == sb["state"][idx][k]
    g = torch.Generator()
    g.set_state(rng["generator"])
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(5)))
    # Only safetensors and JSON in the folder.
    assert sorted(p.suffix for p in path.iterdir()) == [
        ".json",
        ".json",
        ".safetensors",
        ".safetensors",
        ".safetensors",
        ".safetensors",
    ]


def test_latest_pointer_retention_and_interrupted_writes(tmp_path: Path) -> None:
    model, opt = _model_and_optimizer()
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, model, opt, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-6", "step-8"]
    assert ckpt.resolve_resume("latest", tmp_path)[0] == tmp_path / "step-8"

    # A write that dies half way (here: the LoRA export raises) leaves `latest` on the previous checkpoint
    # and no temporary folder.
    def boom(p: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.save_checkpoint(
            tmp_path, 10, trainable_state(model), optimizer_state(opt), {"step": 10}, {}, export_lora=boom, keep_last=2
        )
    assert not (tmp_path / ".tmp-step-10").exists()
    assert ckpt.resolve_resume("latest", tmp_path)[0] == tmp_path / "step-8"
    # A kill leaves the temporary folder; the next good save cleans the debris.
    (tmp_path / ".tmp-step-10").mkdir()
    _save(tmp_path, 12, model, opt, keep=2)
    assert not (tmp_path / ".tmp-step-10").exists()
    # A missing or garbled pointer falls back to the newest complete checkpoint.
    (tmp_path / "latest").write_text("step-999\n")
    assert ckpt.resolve_resume("latest", tmp_path)[0] == tmp_path / "step-12"
    assert ckpt.resolve_resume("latest", tmp_path / "nothing-here")[0] is None


def test_bad_resume_targets_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint folder"):
        ckpt.resolve_resume(str(tmp_path), tmp_path)
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 1, model, opt)
    (path / "optimizer.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="optimizer.json is missing"):
        ckpt.load_checkpoint(path, model, opt)
    path = _save(tmp_path, 2, model, opt)
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 5))
    other[0].weight.requires_grad_(False)
    with pytest.raises(ckpt.CheckpointError, match="shape"):
        ckpt.load_checkpoint(path, other, torch.optim.AdamW(other.parameters()))
    json.loads((path / "state.json").read_text())
