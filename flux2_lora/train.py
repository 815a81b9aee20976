"""The training loop, top to bottom: setup -> cache -> LoRA -> fit (step, log, validate, checkpoint) -> export.

The step is `Trainer._fit()`: each pass of its `while` loop takes one micro-batch, draws its noise, sigmas, flips,
caption dropout and references (`draws.draw_batch`), runs the flow-matching loss (`_flow_loss`: position ids from
`_position_ids`, one forward per reference layout), backward and, once per optimizer step, clips and steps
(`_step_unless`: the update is skipped on a NaN/inf) and moves the EMA of the LoRA (training.ema_decay), then logs,
validates (`validation_loss`, `validate_and_sample`) and checkpoints. `setup()` above it builds everything the
loop reads (model, LoRA, optimizer, data plan, callbacks); `run()` at the bottom is setup + fit.

Everything random in the loop comes from the seed: the data order from (seed, epoch), and each sample's caption
dropout, flip, sigma and noise from (seed, data pass, sample key), so a killed run resumes to the same weights
as an uninterrupted one, and the number of processes does not change the draws.

What is not the loop lives elsewhere (none of these modules imports this one):
  - `draws.py`             every random draw of a sample (flip, caption dropout, sigma, noise, references);
  - `distributed.py`       the multi-process strategy (DDP, FSDP2, DeepSpeed ZeRO-2/3), applied in one place
                           (`make_accelerator`), and the sharded-state helpers;
  - `ema.py`               the EMA of the LoRA's weights (`LoraEMA`: update, gather, swap in for validation);
  - `train_validation.py`  the validation loss and the sample images of each validation (with the EMA: use_ema);
  - `optim.py`             the optimizer and lr schedule (`make_optimizer`, `skips_on_device`, `make_lr_scheduler`);
  - `train_checkpoint.py`  what a checkpoint holds and how a resume is checked and restored (`save_checkpoint`,
                           `export_lora`, `check_resume`, `check_state`, `restore`, `TrainState`, `DATA_ORDER`);
                           the files themselves are `checkpoint.py`;
  - `run_files.py`         the run folder: its lock and recipe.yaml (`lock_output`, `prepare_output`),
                           metrics.jsonl and the TensorBoard / W&B trackers (`log_metrics`, `log_images`,
                           `init_trackers`), and a disk full or read-only folder told in one line (`storage_error`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import interop, train_checkpoint, train_validation
from .callbacks import EarlyStopping, NanGuard, SignalStop, StopVote, TrainingError, WallClock
from .config import Recipe, validate
from .data.cache import prompt_embeddings
from .data.folder import DataError
from .data.mix import DataMix, prepare_mix
from .data.stream import (
    CachedSamples,
    GlobalBatches,
    RankBatchSampler,
    collate,
    describe,
    division_line,
    division_record,
    num_workers,
)
from .distributed import (
    check_quantize_strategy,
    is_sharded,
    load_frozen_transformer,
    make_accelerator,
    place_for_prepare,
    plain_loading,
    sharded_load_line,
    shards_at_load,
    strategy_applied,
    whole,
)
from .draws import Refs, draw_batch
from .ema import LoraEMA
from .evaluate.callback import TrainingQuality
from .flow import base_target, flow_loss, latent_ids, pack_references, reference_ids, text_ids
from .model import (
    DTYPES,
    ModelError,
    ModelSource,
    adapter_kind,
    add_adapter,
    compile_blocks,
    count_parameters,
    enable_checkpointing,
    encoder_dtype,
    quiet_libraries,
    resolve_model,
)
from .optim import make_lr_scheduler, make_optimizer, skips_on_device
from .plots import loss_plot, progress_sheet
from .quant import check_fp8_compute, check_quantize
from .run_files import init_trackers, lock_output, log_metrics, prepare_output, role_metrics, storage_error
from .swap import BlockSwapper, attach_block_swap
from .train_checkpoint import TrainState

log = logging.getLogger("flux2_lora")


class Trainer:
    """Holds what the loop needs; `fit()` is the loop."""

    def __init__(self, recipe: Recipe, resume: str | None = None):
        validate(recipe)
        self.recipe = recipe
        self.out = Path(recipe.output.dir).expanduser()
        self.resume = resume
        t = recipe.training
        on_gpu = torch.cuda.is_available()
        mp: str = t.mixed_precision
        if mp == "auto":
            mp = {"bf16": "bf16", "fp16": "fp16"}.get(recipe.model.dtype, "no") if on_gpu else "no"
        trackers = (["tensorboard"] if recipe.logging.tensorboard else []) + (["wandb"] if recipe.logging.wandb else [])
        # The multi-process strategy (DDP, FSDP2, ZeRO) is chosen and applied here, in one place.
        self.accelerator, self.strategy = make_accelerator(recipe, mp, trackers, str(self.out))
        self.is_main = self.accelerator.is_main_process
        # One optimizer step trains one global batch of this many samples, however many processes share it.
        self.global_batch = t.batch_size * self.accelerator.num_processes * t.gradient_accumulation
        self.device = self.accelerator.device
        self.pin = self.device.type == "cuda"  # pinned host batches: asynchronous copies to the GPU
        # Called with (step, validation loss) after every validation, e.g. by `flux2-lora tune` to report to Ray.
        self.on_validation: list[Callable[[int, float], None]] = []

    # --------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        # From here a signal names the stage it interrupted; from fit() on it stops the loop with a checkpoint.
        self.signals = SignalStop()
        try:
            self._setup()
        except BaseException:
            self.signals.restore()
            raise

    def _setup(self) -> None:
        r, acc = self.recipe, self.accelerator
        quiet_libraries()
        set_seed(r.training.seed)
        if self.is_main:
            self._lock = lock_output(self.out)
            prepare_output(self.out, r, self.resume)
        acc.wait_for_everyone()
        self.src: ModelSource = resolve_model(r.model)
        # A quantization, fp8 compute or block swap that cannot run here stops now, before the cache stage.
        check_quantize(r.model.quantize, self.device)
        check_fp8_compute(r.model.fp8_compute, self.device)
        check_quantize_strategy(r, self.strategy)
        self.signals.stage = "the resume check"
        self._resume_path: Path | None = train_checkpoint.check_resume(self)
        if r.model.blocks_to_swap and acc.num_processes > 1:
            raise ModelError("model.blocks_to_swap: works with one training process only in this version (set it to 0)")
        self._print(f"model {self.src.name} (FLUX.2 {self.src.family}, text layers {list(self.src.text_layers)})")
        lo = r.lora
        # --init-lora: read and check the LoRA against the model and the recipe now, before the cache stage runs.
        init = interop.check_init_lora(lo.init_from, self.src, lo.rank, lo.alpha, lo.targets) if lo.init_from else None
        # CLIP score / overfitting of the samples at each validation, when enabled (loaded now: a problem stops early).
        self.quality = TrainingQuality.from_recipe(r, self.device) if self.is_main else None
        # Cache stage: text encoder and VAE run once (or a matching cache is reused), then are freed
        # before the transformer loads. Training reads only the cached shards.
        # Under DeepSpeed, models load as plain modules (see distributed.plain_loading).
        with plain_loading(acc):
            self.signals.stage = "the cache stage"
            self.data = self._prepare_cache()
            self.index = self.data.index  # the first cache: sample-prompt embeddings, the empty prompt
            text_dtype = encoder_dtype(r.model.dtype, self.device)
            if self.is_main:
                prompt_embeddings(
                    self.index, r.validation.prompt_texts(), self.device, text_dtype, r.model.force_cpu_loading,
                    r.model.text_encoder_device,
                )  # fmt: skip
            acc.wait_for_everyone()
            self.sample_embeds = prompt_embeddings(self.index, r.validation.prompt_texts(), self.device, text_dtype)
            self.empty_embeds = self.index.extra()["empty"]
            self.val_samples = self.data.val_samples()
            if len(self.data.entries) == 1:
                self._print(
                    f"data  {r.data.dataset}: {self.index.num_train} training, {len(self.val_samples)} validation "
                    f"samples (cache {self.index.root})"
                )
            else:
                for line in self.data.describe():
                    self._print(f"data  {line}")
                self._print(f"data  {len(self.val_samples)} validation samples")

            self.signals.stage = "loading the transformer"
            # Transformer + LoRA.
            # Straight onto the device, or (force_cpu_loading) into host memory first and moved after the LoRA is added;
            # under fsdp / zero3 sharded, so that no device ever holds it whole (see distributed.load_frozen_transformer).
            host = r.model.force_cpu_loading and r.model.quantize == "none"
            self.transformer = load_frozen_transformer(
                acc,
                self.strategy,
                self.src,
                DTYPES[r.model.dtype],
                shard_base=r.distributed.shard_base,
                fp8_compute=r.model.fp8_compute,
                device=None if host else self.device,
                quantize=r.model.quantize,
                keep_on_host=r.model.blocks_to_swap,
            )
        # The LoRA's initial weights come from the seed alone, whatever the cache stage did with the global RNG
        # (building a cache and reusing one must give the same run).
        torch.manual_seed(r.training.seed)
        self.lora_config = add_adapter(self.transformer, r.lora)  # lora.type: lora, dora, lokr or loha (PEFT)
        if init is not None:  # start from the LoRA's weights (its update exactly, at the recipe's alpha)
            self._print(interop.apply_init_lora(self.transformer, init, lo.rank, lo.alpha, lo.targets))
        if r.model.gradient_checkpointing:
            enable_checkpointing(self.transformer, r.model.gradient_checkpointing_every)
        if r.model.compile:
            compile_blocks(self.transformer)
        trainable, total = count_parameters(self.transformer)
        self._print(
            f"lora  {adapter_kind(r.lora)} rank {r.lora.rank}, alpha {r.lora.alpha or r.lora.rank}, targets {r.lora.targets}: "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)"
        )
        self.swapper: BlockSwapper | None = None
        if r.model.blocks_to_swap:  # the swapped blocks' frozen weights stay in host memory; the rest goes over
            self.swapper = attach_block_swap(self.transformer, r.model.blocks_to_swap, self.device)
            self._print(f"swap  {r.model.blocks_to_swap} blocks' frozen weights in host memory, copied in per block")
        else:
            place_for_prepare(self.transformer, acc, self.strategy, r.distributed.shard_base)
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(params, r)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, r)
        placement = [False, True] if self.swapper is not None else None  # accelerate must not move swapped blocks
        self.model, self.optimizer = acc.prepare(self.transformer, self.optimizer, device_placement=placement)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]  # not the frozen base, every step
        # training.ema_decay: an fp32 EMA of the LoRA (of this process's shards), from the weights training starts at.
        self.ema = LoraEMA(acc.unwrap_model(self.model), r.training.ema_decay) if r.training.ema_decay else None
        if self.ema is not None:
            self._print(self.ema.describe(r.training.max_steps))
        self._sharded = self.strategy in ("fsdp", "zero3")  # every process takes part in every forward
        self._base_forward = r.data.prior_target == "base" and self.data.has_regularisation
        if acc.num_processes > 1:
            tensors = list(self.model.parameters())
            sharded = sum(is_sharded(p) for p in tensors)
            self._print(
                f"dist  {self.strategy} over {acc.num_processes} processes"
                + (f": {sharded} of {len(tensors)} parameter tensors sharded (DTensor)" if sharded else "")
            )
            if shards_at_load(self.strategy, r.distributed.shard_base, acc.num_processes, strategy_applied(acc)):
                self._print(sharded_load_line(acc, self.strategy, self.model))

        # Data: global batches of batch x processes x accumulation, one bucket each, whatever the process count;
        # this rank reads only its slice of each (random access into the cached shards, see data/stream.py).
        t = r.training
        world = acc.num_processes
        self.plan = GlobalBatches(self.data, self.global_batch, t.seed)
        if self.plan.num_samples == 0:
            raise DataError(f"data.dataset: {r.data.dataset} has no training samples after the holdout")
        # data.num_workers, with `auto` sized to the machine (the data order does not depend on it)
        self.num_workers = num_workers(r.data.num_workers, self.device.type, acc.num_processes)
        self._print(describe(self.plan, t.batch_size, world, t.gradient_accumulation))
        self.guidance = (
            torch.full((1,), r.training.guidance_scale, device=self.device)
            if self.transformer.config.guidance_embeds
            else None
        )
        self.state = TrainState()
        self._start_step = 0  # the step this process started (or resumed) at
        self._printed_division: list[int] | None = None  # the last per-rank sample counts printed
        self.callbacks: dict[str, Any] = {
            "early_stopping": EarlyStopping(r.callbacks.early_stopping_patience, r.callbacks.early_stopping_min_delta),
            "wall_clock": WallClock(r.callbacks.max_wall_time_minutes),
            "nan_guard": NanGuard(r.callbacks.nan_max_consecutive),
        }
        self.vote = StopVote(acc, self.device)
        self.interrupted = False  # stopped by a signal: checkpointed, to be resumed
        self._ids: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        if self._resume_path is not None:
            self.signals.stage = "resuming from a checkpoint"
            train_checkpoint.restore(self, self._resume_path)
        if self.is_main:
            init_trackers(acc, r, self.out)
        self.metrics_file = self.out / "metrics.jsonl"

    def _prepare_cache(self) -> DataMix:
        """The cached shards of every source at every resolution (data/mix.py `prepare_mix`)."""
        r = self.recipe
        text_dtype = encoder_dtype(r.model.dtype, self.device)
        return prepare_mix(
            r, self.src, self.out / "cache", self.device, text_dtype, self.is_main, self.accelerator.wait_for_everyone
        )

    def _batches(self) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches from the current optimizer step on, epoch after epoch (never a skipped read)."""
        acc = self.accelerator
        sampler = RankBatchSampler(
            self.plan, acc.process_index, acc.num_processes, self.recipe.training.gradient_accumulation,
            start=self.state.step,
        )  # fmt: skip
        loader = DataLoader(
            CachedSamples(self.data, self.recipe.training.seed),
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=self.pin,
            # Its own generator: each iter() of a DataLoader draws a worker seed, which must not come from
            # torch's global RNG (LoRA dropout uses that one).
            generator=torch.Generator().manual_seed(self.recipe.training.seed),
        )
        yield from loader

    def _log_division(self, epoch: int, trained: int, by_source: list[int], complete: bool) -> None:
        """Every rank's count of samples trained in the epoch (and, with several sources, every source's), in
        metrics.jsonl; printed for the first epoch, when the counts change and for an unfinished last epoch (a
        collective: every rank calls it at the same step)."""
        mine = torch.tensor([[trained, *by_source]], device=self.device)
        gathered = self.accelerator.gather(mine).view(-1, 1 + len(by_source)).tolist()
        record = division_record(self.state.step, epoch, gathered, complete)
        self._log(record)
        start, per_epoch = self._start_step, self.plan.steps_per_epoch
        since_resume = start // per_epoch == epoch and start % per_epoch != 0
        counts = record["samples_per_rank"]
        if counts == self._printed_division and complete and not since_resume:
            return
        self._printed_division = counts if complete and not since_resume else None
        self._print(division_line(record, self.plan.epoch_samples, since_resume))

    # ----------------------------------------------------------------------------------------- fit
    def fit(self) -> Path | None:
        """Train to training.max_steps; returns the final LoRA (None: stopped by a signal, checkpointed)."""
        self.signals.arm()
        self._bar: Any = None
        try:
            return self._fit()
        finally:
            if self._bar is not None:
                self._bar.close()  # a message after an error starts on a line of its own
            self.signals.restore()

    def _fit(self) -> Path | None:
        r, acc = self.recipe, self.accelerator
        t = r.training
        accum = t.gradient_accumulation
        self.model.train()  # from_pretrained returns eval mode; LoRA dropout needs train mode
        if self.state.step == 0:
            self.validate_and_sample()
        self._bar = bar = tqdm(
            total=t.max_steps,
            initial=self.state.step,
            desc="train",
            unit="step",
            disable=not self.is_main,
            dynamic_ncols=True,
        )
        loss_sum = torch.zeros((), device=self.device)  # summed over the logging window, on the device
        step_loss = torch.zeros((), device=self.device)  # summed over one optimizer step's micro-batches
        loss_count = torch.zeros((), device=self.device)  # finite optimizer steps in the logging window
        # With regularisation sources: the plain loss of each role's samples (training, regularisation), summed
        # with their counts over the logging window.
        role_loss, role_count = torch.zeros(2, device=self.device), torch.zeros(2, device=self.device)
        self._bad: list[torch.Tensor] = []  # per-step "update skipped" flags not yet read by the host
        self._nan_stop = False  # the NaN guard stopped the run
        last_log, last_log_step = time.perf_counter(), self.state.step
        # The data position is the optimizer step: this rank's micro-batches start there (see data/stream.py).
        self._start_step = self.state.step
        self._printed_division = None
        epoch, epoch_trained = self.state.step // self.plan.steps_per_epoch, 0
        by_source = [0] * len(self.data.sources)  # samples trained in the epoch, per source
        batches = self._batches()
        stop_reason = ""
        while self.state.step < t.max_steps and not stop_reason:
            batch = next(batches)
            epoch_trained += batch["trained"]
            for source, w in zip(batch["sources"], batch["weights"].tolist(), strict=True):
                by_source[source] += w > 0
            latents, embeds, sigmas, noise, refs, mask = draw_batch(batch, r.data, t, self.empty_embeds, self.pin)
            with acc.accumulate(self.model):
                # ---- the step: flow-matching loss on the LoRA, backward, clip, update ----
                reg = batch["regularisation"]
                per_sample = self._flow_loss(self.model, latents, embeds, sigmas, noise, refs, reg, mask)
                # Weighted so that the gradient, averaged over processes, is the global batch's mean (stream.py);
                # a zero weight (an empty slot of a short global batch) adds nothing. Regularisation samples
                # count data.prior_loss_weight times.
                weights = batch["weights"].to(self.device, non_blocking=True)
                if self.data.has_regularisation:
                    weights = weights * torch.where(reg, r.data.prior_loss_weight, 1.0).to(self.device)
                    roles = reg.long().to(self.device)
                    trained = (batch["weights"] > 0).float().to(self.device)
                    role_loss.index_add_(0, roles, per_sample.detach().float() * trained)
                    role_count.index_add_(0, roles, trained)
                loss = (per_sample * weights).sum()
                acc.backward(loss)
                step_loss += loss.detach()
                if acc.sync_gradients:
                    max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
                    if self.strategy.startswith("zero"):
                        # DeepSpeed clipped and stepped inside acc.backward: the guard can count, not skip.
                        grad_norm = torch.as_tensor(float(self.model.get_global_grad_norm() or 0.0), device=self.device)
                        bad = ~(torch.isfinite(grad_norm) & torch.isfinite(acc.reduce(step_loss)))
                    else:
                        grad_norm = whole(acc.clip_grad_norm_(self.trainable, max_norm))
                        # Skip the update on a NaN/inf loss or gradient, decided on the device (reduced over
                        # processes so that all take the same decision); the host reads it when it logs.
                        bad = ~(torch.isfinite(grad_norm) & torch.isfinite(acc.reduce(step_loss)))
                        self._step_unless(bad)
                        self.optimizer.zero_grad(set_to_none=True)
            if not acc.sync_gradients:
                continue
            # ---- one optimizer step is done: schedule, guard, log, validate, checkpoint ----
            self.lr_scheduler.step()
            self.state.step += 1
            step = self.state.step
            bar.update(1)
            good = (~bad).float()
            loss_sum += good * step_loss.nan_to_num(0.0, 0.0, 0.0) / accum
            loss_count = loss_count + good
            step_loss.zero_()
            self._bad.append(bad)
            if self.ema is not None:  # moves by 0 where the update was skipped (`bad`, read on the device)
                self.ema.update(bad)
            logging_now = step % r.logging.log_every == 0 or step == t.max_steps
            checkpoint_now = bool(r.output.checkpoint_every) and step % r.output.checkpoint_every == 0
            if logging_now or checkpoint_now:
                stop_reason = self._check_nonfinite(step)
            if logging_now:
                now = time.perf_counter()
                mean_loss = acc.reduce(loss_sum / loss_count.clamp(min=1), reduction="mean").item()
                lr = self.lr_scheduler.get_last_lr()[0]
                roles = role_metrics(acc, role_loss, role_count) if self.data.has_regularisation else {}
                self._log(
                    {
                        "step": step,
                        "loss": mean_loss,
                        **roles,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "epoch": epoch,
                        "steps_per_s": (step - last_log_step) / max(now - last_log, 1e-9),
                    }
                )
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                loss_sum.zero_()
                loss_count.zero_()
                last_log, last_log_step = now, step
            if step % self.plan.steps_per_epoch == 0:  # an epoch is done: how its samples were divided
                self._log_division(epoch, epoch_trained, by_source, complete=True)
                epoch, epoch_trained, by_source = epoch + 1, 0, [0] * len(by_source)
            if r.validation.every_n_steps and step % r.validation.every_n_steps == 0 and step < t.max_steps:
                val = self.validate_and_sample()
                stop_reason = stop_reason or self.callbacks["early_stopping"].update(val, step)
            # Time limit or a scheduler's signal on any process: every process stops at the same step.
            reason, self.interrupted = self.vote.update(
                self.signals.update(step), self.callbacks["wall_clock"].update(step)
            )
            stop_reason = stop_reason or reason
            if step == t.max_steps or stop_reason:
                break
            if checkpoint_now:
                self.save_checkpoint()
        bar.close()
        if self.state.step % self.plan.steps_per_epoch:  # the same on every rank: a collective is safe
            self._log_division(epoch, epoch_trained, by_source, complete=False)
        stop_reason = stop_reason or self._check_nonfinite(self.state.step)
        if stop_reason:
            self._print(f"stopped at step {self.state.step}: {stop_reason}")
        if self._nan_stop:  # no final LoRA from a run the NaN guard stopped; its last finite state is checkpointed
            self.save_checkpoint()
            raise TrainingError(
                f"training stopped at step {self.state.step}: {stop_reason}; no final LoRA was written, checkpoint "
                f"{self.out / 'checkpoints' / f'step-{self.state.step}'} holds the last finite weights "
                "(continue from it with --resume latest once the recipe is changed)"
            )
        if self.interrupted:
            # Preempted or near a time limit: checkpoint only; the run is not finished, so no final LoRA.
            self.save_checkpoint()
            acc.end_training()
            self._print(f"checkpointed at step {self.state.step}; continue with --resume latest")
            return None
        if self.state.step == t.max_steps:
            self.validate_and_sample()
        self.save_checkpoint()
        final = self.export(self.out / ckpt.LORA_FILE)
        if self.is_main:
            loss_plot(self.out / "metrics.jsonl", self.out / "loss.png")
            progress_sheet(self.out / "samples", self.out / "samples" / "progress.png")
        acc.end_training()
        self._print(f"saved {final}")
        return final

    def _step_unless(self, bad: torch.Tensor) -> None:
        """optimizer.step() unless `bad` (a 0-d bool on the device): without a host sync where the optimizer allows."""
        inner: Any = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        if skips_on_device(inner):
            inner.found_inf = bad.float()  # fused AdamW skips the step (and its step count) where this is 1
            self.optimizer.step()
        elif not bool(bad):  # e.g. bitsandbytes' 8-bit AdamW: one host sync per step
            self.optimizer.step()

    def _check_nonfinite(self, step: int) -> str:
        """Read the pending skip flags (one host sync), report skipped steps, and apply the NaN guard."""
        flags = torch.stack(self._bad).tolist() if self._bad else []
        first = step - len(flags) + 1
        self._bad = []
        reason = ""
        for i, bad in enumerate(flags):
            if bad:
                self._print(f"step {first + i}: non-finite loss or gradient, update skipped")
            reason = reason or self.callbacks["nan_guard"].update(not bad, first + i)
        self._nan_stop = self._nan_stop or bool(reason)
        return reason

    def _flow_loss(
        self,
        model: Any,
        latents: torch.Tensor,
        embeds: torch.Tensor,
        sigmas: torch.Tensor,
        noise: torch.Tensor,
        refs: list[Refs],
        regularisation: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample flow-matching losses (B,) of a micro-batch (with a loss mask: each its mean over the mask).

        With data.prior_target: base, a regularisation sample's target is the base model's prediction (the LoRA
        off) for the same noisy input, instead of noise - latents.

        Samples whose references differ in number or size (after reference dropout and max_references) go through
        the transformer in separate forwards, one per reference layout: each sample's loss is the one it has alone."""
        layouts: dict[tuple[tuple[int, int], ...], list[int]] = {}
        for j, r in enumerate(refs):
            layouts.setdefault(tuple((int(x.shape[-2]), int(x.shape[-1])) for x in r), []).append(j)
        parts, order = [], []
        for shapes, js in layouts.items():
            pick = slice(None) if len(js) == len(refs) else torch.tensor(js)
            lat, emb = latents[pick], embeds[pick]
            packed = (
                pack_references([torch.stack([refs[j][n] for j in js]) for n in range(len(shapes))]) if shapes else None
            )
            img_ids, txt_ids = self._position_ids(lat, emb, shapes)
            args = (
                lat.to(self.device, non_blocking=True),
                emb.to(self.device, non_blocking=True),
                sigmas[pick].to(self.device, non_blocking=True),
                noise[pick].to(self.device, non_blocking=True),
                img_ids,
                txt_ids,
                self.guidance.expand(len(js)) if self.guidance is not None else None,
            )
            references = packed.to(self.device, non_blocking=True) if packed is not None else None
            target = None
            # Sharded (fsdp, zero3): every process runs every forward, so all take the base forward, needed or not.
            if regularisation is not None and self._base_forward and (self._sharded or regularisation.any()):
                base = self.accelerator.unwrap_model(self.model)
                target = base_target(base, *args, references, regularisation[pick].to(self.device))
            parts.append(
                flow_loss(
                    model,
                    *args,
                    self.recipe.training.loss_weighting,
                    reduce=False,
                    references=references,
                    target=target,
                    mask=mask[pick].to(self.device, non_blocking=True) if mask is not None else None,
                )  # fmt: skip
            )
            order += js
        per_sample = parts[0] if len(parts) == 1 else torch.cat(parts)
        if len(parts) > 1:  # back to the batch's order
            per_sample = per_sample[torch.argsort(torch.tensor(order)).to(per_sample.device)]
        return per_sample

    def _position_ids(
        self, latents: torch.Tensor, embeds: torch.Tensor, references: tuple[tuple[int, int], ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ids (the target's grid, then each reference's at time 10, 20, ...) and text ids, built once per
        (batch, grid, reference grids) and kept on the device."""
        b, _, h, w = latents.shape
        key = (b, h, w, references)
        if key not in self._ids:
            img = latent_ids(b, h, w, self.device)
            if references:
                img = torch.cat([img, reference_ids(list(references), b, self.device)], dim=1)
            self._ids[key] = (img, text_ids(b, embeds.shape[1], self.device))
        return self._ids[key]

    # ---------------------------------------------------------------------- validation (train_validation.py)
    def validation_loss(self) -> float:
        return train_validation.validation_loss(self)

    def validate_and_sample(self) -> float:
        return train_validation.validate_and_sample(self)

    # --------------------------------------------------------------- checkpoint and export (train_checkpoint.py)
    def save_checkpoint(self) -> None:
        train_checkpoint.save_checkpoint(self)

    def export(self, path: Path) -> Path:
        return train_checkpoint.export_lora(self, path)

    # ------------------------------------------------------------------------------------- logging
    def _print(self, msg: str) -> None:
        if self.is_main:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def _log(self, rec: dict[str, Any]) -> None:
        if self.is_main:
            log_metrics(self.accelerator, self.out, rec)


def train(recipe: Recipe, resume: str | None = None) -> Path | None:
    """Run a whole training job; returns the path of the final LoRA (None: stopped by a signal, checkpointed)."""
    return run(Trainer(recipe, resume))


def run(trainer: Trainer) -> Path | None:
    """`trainer.setup()` then `fit()`, with a storage failure (disk full, read-only) turned into one line."""
    try:
        trainer.setup()
        return trainer.fit()
    except Exception as e:
        one_line = storage_error(e, trainer.out)
        if one_line is None:
            raise
        raise one_line from None


__all__ = ["Trainer", "run", "train"]
