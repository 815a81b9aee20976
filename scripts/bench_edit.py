"""Does an editing LoRA learn to use its reference images? flux2-lora with and without references, and diffusers'
own img2img trainers, scored by one loss computed with the FLUX.2 pipelines' own functions.

    python scripts/bench_edit.py [--families dev klein] [--steps 300] [--seeds 0 1 2] [--json OUT]
        [--upstream-dir DIR --upstream-pythonpath DIR] [--workdir DIR]

The task: `make_edit_dataset` (flux2_lora/data/sample.py) at 128 px, seeded and fixed: each item's reference
NNN_ref0.png is a scene (a shape and a distractor square on a background), its target NNN.png the same scene with the
shape recoloured, its caption the instruction ("make the circle red"); every third item has a second reference, a
colour swatch, and its caption names no colour; every fourth is 192x128. Position, background and distractor are
only in the references, so a LoRA that ignores them cannot do the task. Training set: --count items (data seed 0);
evaluation set: --eval-count other scenes (data seed 1), never trained on.

The base models: tiny FLUX.2-dev and klein pipelines (`make_tiny_pipeline`, 2 heads x 32, 2 double + 2 single
blocks) whose random transformer is first fully fine-tuned for --pretrain-steps as a text-to-image model (no
references) on a third set of scenes (data seed 2, the targets and their captions), so that the base denoises these
images as a real base does and knows nothing of references. On the random transformer itself (--pretrain-steps 0)
LoRAs did not learn to use references within this budget: after 200 flux2-lora steps with references the held-out
loss was the same with every item's references swapped for another's (0.8899 and 0.8896, 12 evaluation items), and
so after 1500 steps of a plain PEFT loop (0.6996 and 0.6997).

The measure, for each evaluation item, with the family's pipeline (Flux2Pipeline / Flux2KleinPipeline) and only its
own functions: the references go through `__call__`'s step 4 (`_resize_to_target_area` above 1024^2, sides floored
to multiples of 16, `image_processor.preprocess(resize_mode="crop")`) and `prepare_image_latents`; the target
(the size of the first reference, the pipeline's default) through `image_processor.preprocess`,
`_encode_vae_image`, `_pack_latents` and `_prepare_latent_ids`; the instruction through `encode_prompt`. Fixed noise
per item and sigmas 0.1, 0.2, ..., 0.9: x_t = (1 - sigma) x0 + sigma noise, the transformer on cat(x_t tokens,
reference tokens) with cat(latent ids, reference ids), timestep sigma (the pipeline's t / 1000), guidance 3.5 for
dev (what the trainers train with) and none for klein (as Flux2KleinPipeline), the prediction cut to the target's
tokens; loss = MSE against noise - x0, averaged over sigmas and items. Every LoRA is evaluated with all of each
item's references, loaded with `pipe.load_lora_weights(path)` as its trainer wrote it and unloaded after (the base
loss is checked to come back). The control: the same loss with each item given the references of the item 12 on
(another scene of the same size and number of references); a LoRA that reads its references gets worse there.

Trainers, the same steps, learning rate (constant, no warmup), rank 16 = alpha, targets attention+single (upstream's
default), batch 1, AdamW (weight decay 1e-4, clip 1.0), uniform sigmas, guidance 3.5 (dev), fp32, seed:
  flux2-lora                   the dataset folder as written (references beside each target)
  flux2-lora, ref0 only        the same without the *_ref1.png swatches: what diffusers' trainer is given
  flux2-lora, no references    the same without any *_ref*.png: the same targets and captions, text-to-image
  diffusers img2img (ref0)     examples/dreambooth/train_dreambooth_lora_flux2_img2img.py (klein:
                               train_dreambooth_lora_flux2_klein_img2img.py): one condition image per sample, ref0;
                               the data as a `datasets` imagefolder (metadata.jsonl: file_name, cond_file_name,
                               prompt), --use_aspect_ratio_buckets at --size (its match of our buckets),
                               --cache_latents, --skip_final_inference.
The upstream scripts are not part of this repository: pass the folder that holds your copies (--upstream-dir). They
import torchvision and read the data with `datasets`; --upstream-pythonpath is put first on PYTHONPATH for them only
(e.g. a `pip install --target DIR datasets` folder). Without --upstream-dir the diffusers rows are left out.

Output: one row per family and trainer, the medians over --seeds of the held-out loss before (the base) and after
training and its change, the change on the items with two references, and the swapped control; every run in --json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

UPSTREAM = {"dev": "train_dreambooth_lora_flux2_img2img.py", "klein": "train_dreambooth_lora_flux2_klein_img2img.py"}
SIGMAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
GUIDANCE = 3.5  # FLUX.2-dev's distilled guidance, what both trainers train with (klein has none)
MAX_SEQ = 64


def run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Wall seconds of one whole process; exits with the log's tail when it fails."""
    t = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        sys.exit(f"bench_edit: command failed ({log}):\n  {' '.join(cmd)}\n" + log.read_text()[-3000:])
    return time.perf_counter() - t


def ours(model: Path, data: Path, out: Path, a: argparse.Namespace, seed: int) -> list[str]:
    return [
        sys.executable, "-m", "flux2_lora", "train", "--model", str(model), "--dataset", str(data),
        "--data.holdout", "0", "--data.resolution", str(a.size), "--data.num_workers", "0",
        "--steps", str(a.steps), "--rank", str(a.rank), "--lora.alpha", str(a.rank),
        "--lora.targets", "attention+single", "--training.batch_size", "1", "--lr", str(a.lr),
        "--training.lr_scheduler", "constant", "--training.warmup_steps", "0", "--training.seed", str(seed),
        "--training.guidance_scale", str(GUIDANCE), "--dtype", "fp32", "--model.max_sequence_length", str(MAX_SEQ),
        "--model.gradient_checkpointing", "false", "--validation.every_n_steps", "0", "--validation.prompts", "[]",
        "--output.checkpoint_every", "0", "--logging.tensorboard", "false", "--logging.log_every", "50",
        "--output", str(out),
    ]  # fmt: skip


def upstream(script: Path, model: Path, data: Path, out: Path, a: argparse.Namespace, seed: int) -> list[str]:
    return [
        sys.executable, str(script), "--pretrained_model_name_or_path", str(model), "--dataset_name", str(data),
        "--image_column", "image", "--cond_image_column", "cond", "--caption_column", "prompt",
        "--output_dir", str(out), "--resolution", str(a.size), "--use_aspect_ratio_buckets", "--center_crop",
        "--train_batch_size", "1", "--max_train_steps", str(a.steps), "--rank", str(a.rank),
        "--lora_alpha", str(a.rank), "--learning_rate", str(a.lr), "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0", "--guidance_scale", str(GUIDANCE), "--max_sequence_length", str(MAX_SEQ),
        "--cache_latents", "--mixed_precision", "no", "--seed", str(seed), "--checkpointing_steps", "1000000",
        "--dataloader_num_workers", "0", "--skip_final_inference", "--report_to", "tensorboard",
    ]  # fmt: skip


def build_data(work: Path, a: argparse.Namespace) -> dict[str, Path]:
    """The training set as written, without its swatches, without any references, as diffusers' imagefolder; the
    evaluation set; the base's text-to-image set. Folders already in the workdir are reused."""
    from flux2_lora.data.sample import make_edit_dataset

    train = work / "data-train"
    if not (train / "000.txt").exists():
        make_edit_dataset(train, count=a.count, size=a.size, seed=0)
    evaluation = work / "data-eval"
    if not (evaluation / "000.txt").exists():
        make_edit_dataset(evaluation, count=a.eval_count, size=a.size, seed=1)
    norefs = work / "data-train-norefs"
    if not norefs.exists():
        shutil.copytree(train, norefs, ignore=shutil.ignore_patterns("*_ref*.png"))
    ref0 = work / "data-train-ref0"
    if not ref0.exists():
        shutil.copytree(train, ref0, ignore=shutil.ignore_patterns("*_ref1.png"))
    pretrain = work / "data-pretrain"
    if not (pretrain / "000.txt").exists():  # other scenes again (data seed 2), trained on as text-to-image
        make_edit_dataset(pretrain, count=2 * a.count, size=a.size, seed=2)
    up = work / "data-train-upstream"
    if not (up / "metadata.jsonl").exists():
        (up / "target").mkdir(parents=True, exist_ok=True)
        (up / "cond").mkdir(exist_ok=True)
        rows = []
        for txt in sorted(train.glob("[0-9][0-9][0-9].txt")):
            shutil.copy(train / f"{txt.stem}.png", up / "target" / f"{txt.stem}.png")
            shutil.copy(train / f"{txt.stem}_ref0.png", up / "cond" / f"{txt.stem}.png")
            rows.append(
                {
                    "file_name": f"target/{txt.stem}.png",
                    "cond_file_name": f"cond/{txt.stem}.png",
                    "prompt": txt.read_text().strip(),
                }
            )
        (up / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"train": train, "norefs": norefs, "upstream": up, "eval": evaluation, "pretrain": pretrain, "ref0": ref0}


def load_items(folder: Path) -> list[tuple[Any, list[Any], str]]:
    """(target, [references], instruction) per item of an editing folder, as PIL images."""
    from PIL import Image

    items = []
    for txt in sorted(folder.glob("[0-9][0-9][0-9].txt")):
        refs = [Image.open(p).convert("RGB") for p in sorted(folder.glob(f"{txt.stem}_ref*.png"))]
        items.append((Image.open(folder / f"{txt.stem}.png").convert("RGB"), refs, txt.read_text().strip()))
    return items


class PipelineLoss:
    """The fixed-seed editing loss of a FLUX.2 pipeline's transformer, from the pipeline's own functions."""

    def __init__(self, model: Path, family: str, items: list[tuple[Any, list[Any], str]], seed: int = 1234):
        from diffusers import Flux2KleinPipeline, Flux2Pipeline

        cls = Flux2KleinPipeline if family == "klein" else Flux2Pipeline
        self.pipe = pipe = cls.from_pretrained(str(model), torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        self.family = family
        self.inputs = []
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for target, refs, prompt in items:
                cond = []
                for img in refs:  # Flux2Pipeline.__call__, step 4 "process images"
                    w, h = img.size
                    if w * h > 1024 * 1024:
                        img = pipe.image_processor._resize_to_target_area(img, 1024 * 1024)
                        w, h = img.size
                    m = pipe.vae_scale_factor * 2
                    cond.append(
                        pipe.image_processor.preprocess(img, height=h // m * m, width=w // m * m, resize_mode="crop")
                    )
                height, width = cond[0].shape[-2:]  # the pipeline's default output size: the first reference's
                pixels = pipe.image_processor.preprocess(target, height=height, width=width, resize_mode="crop")
                x0 = pipe._encode_vae_image(pixels, generator=None)
                ids = pipe._prepare_latent_ids(x0)
                ref_tokens, ref_ids = pipe.prepare_image_latents(
                    images=cond, batch_size=1, generator=None, device=torch.device("cpu"), dtype=torch.float32
                )
                embeds, text_ids = pipe.encode_prompt(prompt=prompt, max_sequence_length=MAX_SEQ)
                noise = torch.randn(x0.shape, generator=gen)
                self.inputs.append((x0, noise, ids, ref_tokens, ref_ids, embeds, text_ids, len(refs)))

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        """Mean loss over all items and sigmas, and over the items with two references."""
        pipe, n = self.pipe, len(SIGMAS)
        sig = torch.tensor(SIGMAS)
        per_item, kinds = [], []
        for x0, noise, ids, ref_tokens, ref_ids, embeds, text_ids, nrefs in self.inputs:
            s = sig.view(-1, 1, 1, 1)
            noisy = pipe._pack_latents((1 - s) * x0 + s * noise)  # (n, tokens, C): one row per sigma
            hidden = torch.cat([noisy, ref_tokens.expand(n, -1, -1)], dim=1)
            img_ids = torch.cat([ids, ref_ids], dim=1).expand(n, -1, -1)
            guidance = torch.full((n,), GUIDANCE) if self.family == "dev" else None
            pred = pipe.transformer(
                hidden_states=hidden,
                timestep=sig,  # = the pipeline's timestep / 1000
                guidance=guidance,
                encoder_hidden_states=embeds.expand(n, -1, -1),
                txt_ids=text_ids.expand(n, -1, -1),
                img_ids=img_ids,
                return_dict=False,
            )[0][:, : noisy.shape[1]]
            target = pipe._pack_latents(noise - x0).expand(n, -1, -1)
            per_item.append(torch.nn.functional.mse_loss(pred, target).item())
            kinds.append(nrefs)
        two = [v for v, k in zip(per_item, kinds, strict=True) if k > 1]
        return {"all": statistics.fmean(per_item), "two_refs": statistics.fmean(two) if two else float("nan")}

    def step_loss(self, item: int, sigma: torch.Tensor, noise: torch.Tensor, refs: bool) -> torch.Tensor:
        """The same loss for one item at one sigma with gradients (for pretraining the base), with or without refs."""
        x0, _, ids, ref_tokens, ref_ids, embeds, text_ids, _ = self.inputs[item]
        pipe = self.pipe
        noisy = pipe._pack_latents((1 - sigma) * x0 + sigma * noise)
        hidden = torch.cat([noisy, ref_tokens], dim=1) if refs else noisy
        img_ids = torch.cat([ids, ref_ids], dim=1) if refs else ids
        pred = pipe.transformer(
            hidden_states=hidden,
            timestep=sigma.view(1),
            guidance=torch.full((1,), GUIDANCE) if self.family == "dev" else None,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0][:, : noisy.shape[1]]
        return torch.nn.functional.mse_loss(pred, pipe._pack_latents(noise - x0))

    def with_lora(self, path: Path) -> dict[str, float]:
        self.pipe.load_lora_weights(str(path))
        try:
            return self()
        finally:
            self.pipe.unload_lora_weights()


def pretrain_base(model: Path, family: str, folder: Path, steps: int, lr: float = 1e-3, seed: int = 0) -> None:
    """Full fine-tuning of the tiny random transformer as a text-to-image model (no references) on other scenes,
    written back into the model folder: the base then denoises these images, as a real base model does, and knows
    nothing of references. (On the random transformer, 1500 LoRA steps with references did not learn to use them.)"""
    import random

    loss = PipelineLoss(model, family, load_items(folder))
    transformer = loss.pipe.transformer
    transformer.requires_grad_(True)
    transformer.train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=1e-4)
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    for _ in range(steps):
        item = rng.randrange(len(loss.inputs))
        sigma = torch.rand(1, generator=gen)
        noise = torch.randn(loss.inputs[item][0].shape, generator=gen)
        value = loss.step_loss(item, sigma, noise, refs=False)
        opt.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
    transformer.eval()
    transformer.save_pretrained(model / "transformer", safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=["dev", "klein"], choices=["dev", "klein"])
    ap.add_argument("--steps", type=int, default=300, help="LoRA training steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (medians over them)")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--count", type=int, default=24, help="training items")
    ap.add_argument("--eval-count", type=int, default=24, help="evaluation items, a multiple of 12 (other scenes)")
    ap.add_argument("--size", type=int, default=128, help="item side in pixels (every fourth item is 1.5x wide)")
    ap.add_argument("--pretrain-steps", type=int, default=1000, help="text-to-image steps that make the base")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--double-blocks", type=int, default=2)
    ap.add_argument("--single-blocks", type=int, default=2)
    ap.add_argument("--upstream-dir", type=str, default=None, help="folder holding diffusers' img2img trainers")
    ap.add_argument("--upstream-pythonpath", type=str, default=None, help="prepended to PYTHONPATH for upstream")
    ap.add_argument("--workdir", type=str, default=None, help="keep models, data, runs and logs here")
    ap.add_argument("--json", type=str, default=None, help="write the table and every run here")
    args = ap.parse_args()
    if args.eval_count % 12 or args.eval_count < 24:
        ap.error("--eval-count: a multiple of 12, at least 24 (the swapped control pairs items 12 apart)")
    scripts = {}
    if args.upstream_dir:
        for family in args.families:
            scripts[family] = Path(args.upstream_dir).resolve() / UPSTREAM[family]
            if not scripts[family].exists():
                ap.error(f"--upstream-dir: no {UPSTREAM[family]} there")

    from flux2_lora.model import make_tiny_pipeline, quiet_libraries

    quiet_libraries()
    torch.manual_seed(0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_edit-"))
    work.mkdir(parents=True, exist_ok=True)
    data = build_data(work, args)
    eval_items = load_items(data["eval"])
    # The control: each item with the references of the item 12 further on (same size, same number of references).
    swapped = [(t, eval_items[(i + 12) % len(eval_items)][1], p) for i, (t, _, p) in enumerate(eval_items)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLUX2_LORA_HOME": str(work / "home"), "PYTHONUNBUFFERED": "1"}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    up_env = {**env, "HF_DATASETS_CACHE": str(work / "datasets-cache")}
    if args.upstream_pythonpath:
        up_env["PYTHONPATH"] = os.pathsep.join(p for p in (args.upstream_pythonpath, env.get("PYTHONPATH")) if p)

    runs: list[dict[str, Any]] = []
    bases: dict[str, dict[str, float]] = {}
    for family in args.families:
        model = work / f"model-{family}"
        marker = model / "bench_edit_base.json"
        if not marker.exists():
            t = time.perf_counter()
            make_tiny_pipeline(
                model,
                family,
                double_blocks=args.double_blocks,
                single_blocks=args.single_blocks,
                heads=args.heads,
                head_dim=args.head_dim,
            )
            pretrain_base(model, family, data["pretrain"], args.pretrain_steps)
            marker.write_text(json.dumps({"pretrain_steps": args.pretrain_steps}) + "\n")
            print(
                f"{family}: base pretrained ({args.pretrain_steps} text-to-image steps, {time.perf_counter() - t:.0f} s)"
            )
        loss, control = PipelineLoss(model, family, eval_items), PipelineLoss(model, family, swapped)
        base = loss() | {"swapped": control()["all"]}
        bases[family] = base
        print(f"{family}: base loss {base['all']:.4f} (references swapped {base['swapped']:.4f})", flush=True)
        trainers: dict[str, Any] = {
            "flux2-lora": lambda out, s, m=model: ours(m, data["train"], out, args, s),
            "flux2-lora, ref0 only": lambda out, s, m=model: ours(m, data["ref0"], out, args, s),
            "flux2-lora, no references": lambda out, s, m=model: ours(m, data["norefs"], out, args, s),
        }
        if family in scripts:
            trainers["diffusers img2img (ref0 only)"] = lambda out, s, m=model, sc=scripts[family]: upstream(
                sc, m, data["upstream"], out, args, s
            )
        for seed in args.seeds:
            for name, cmd in trainers.items():
                tag = f"{family}-{name.split(' (')[0].replace(', ', '-').replace(' ', '_')}-{seed}"
                out = work / f"run-{tag}"
                shutil.rmtree(out, ignore_errors=True)
                diffusers = name.startswith("diffusers")
                wall = run(cmd(out, seed), up_env if diffusers else env, work / f"log-{tag}.txt")
                lora = out / ("pytorch_lora_weights.safetensors" if diffusers else "lora.safetensors")
                after = loss.with_lora(lora) | {"swapped": control.with_lora(lora)["all"]}
                if abs(loss()["all"] - base["all"]) > 1e-6 * base["all"]:
                    sys.exit(f"bench_edit: the base loss did not come back after unloading {lora}")
                runs.append(
                    {"family": family, "trainer": name, "seed": seed, "wall_s": round(wall, 1), "lora": str(lora)}
                    | {f"before_{k}": v for k, v in base.items()}
                    | {f"after_{k}": v for k, v in after.items()}
                )
                print(
                    f"  {name:30s} seed {seed}: {base['all']:.4f} -> {after['all']:.4f} "
                    f"({100 * (after['all'] / base['all'] - 1):+.1f}%), references swapped {after['swapped']:.4f}, "
                    f"{wall:.0f} s",
                    flush=True,
                )

    table = []
    for family in args.families:
        for name in dict.fromkeys(r["trainer"] for r in runs if r["family"] == family):
            rs = [r for r in runs if r["family"] == family and r["trainer"] == name]
            row = {"family": family, "trainer": name, "seeds": [r["seed"] for r in rs]}
            for k in ("all", "two_refs", "swapped"):
                before, after = rs[0][f"before_{k}"], statistics.median(r[f"after_{k}"] for r in rs)
                row |= {f"before_{k}": before, f"after_{k}": after, f"change_{k}_pct": 100 * (after / before - 1)}
            table.append(row)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(
        f"\n{device}; {args.steps} steps, lr {args.lr}, rank {args.rank}, {args.count} training and "
        f"{args.eval_count} evaluation items at {args.size} px; medians over seeds {args.seeds}; workdir {work}"
    )
    print(
        "| model | trainer | held-out loss before | after | change | items with 2 references: change "
        "| references swapped: before | after |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for t in table:
        print(
            f"| tiny {t['family']} | {t['trainer']} | {t['before_all']:.4f} | {t['after_all']:.4f} "
            f"| {t['change_all_pct']:+.1f}% | {t['change_two_refs_pct']:+.1f}% | {t['before_swapped']:.4f} "
            f"| {t['after_swapped']:.4f} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": device, "args": vars(args), "table": table, "runs": runs}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
