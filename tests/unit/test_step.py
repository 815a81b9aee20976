"""The lean step's pieces: on-device update skipping, data workers sized to the machine, compiled blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flux2_lora.data.stream import auto_workers
from flux2_lora.train import skips_on_device


def test_a_non_finite_step_is_skipped_on_the_device_without_touching_the_state() -> None:
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    assert skips_on_device(opt)
    p.grad = torch.ones(4)
    opt.step()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    opt.found_inf = torch.tensor(1.0)  # type: ignore[attr-defined]  # what the loop sets from the device flag
    p.grad = torch.full((4,), float("nan"))
    opt.step()
    assert torch.equal(p.detach(), before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())  # step count and moments too
    opt.found_inf = torch.tensor(0.0)  # type: ignore[attr-defined]
    p.grad = torch.ones(4)
    opt.step()
    assert float(opt.state[p]["step"]) == 2.0
    assert not skips_on_device(torch.optim.SGD([p], lr=0.1))


def test_auto_workers() -> None:
    assert auto_workers("cpu") == 0  # the CPU step needs every core
    n = auto_workers("cuda", 1)
    assert 1 <= n <= 4
    assert auto_workers("cuda", 64) == 1  # at least one, even when processes outnumber cores


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_and_gradients(tmp_path: Path) -> None:
    from diffusers import Flux2Transformer2DModel

    from flux2_lora.flow import flow_loss, latent_ids, text_ids
    from flux2_lora.model import add_lora, compile_blocks, make_tiny_pipeline

    path = make_tiny_pipeline(tmp_path / "m", "dev", double_blocks=1, single_blocks=1)

    def run(compiled: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = Flux2Transformer2DModel.from_pretrained(path / "transformer")
        model.requires_grad_(False)
        add_lora(model, 4, 4, 0.0, "attention+single", "gaussian", False)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-zero B, so the LoRA path shows in the output and every gradient
                torch.nn.init.normal_(p, std=0.1)
        if compiled:
            assert compile_blocks(model) == 2
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, model.config.in_channels, 4, 4, generator=g)
        embeds = torch.randn(1, 8, model.config.joint_attention_dim, generator=g)
        loss = flow_loss(model, x, embeds, torch.tensor([0.5]), torch.randn(x.shape, generator=g),
                         latent_ids(1, 4, 4, "cpu"), text_ids(1, 8, "cpu"), torch.tensor([4.0]))  # fmt: skip
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    eager, compiled = run(False), run(True)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    assert eager[1].keys() == compiled[1].keys()
    for name, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
