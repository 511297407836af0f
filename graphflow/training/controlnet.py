"""Train a ControlNet on a frozen SD1.5-family base model: `train_controlnet(config)`.

Following diffusers' examples/controlnet/train_controlnet.py: the VAE, UNet and text encoder are loaded frozen; the
ControlNet starts as a copy of the UNet's encoder (`ControlNetModel.from_unet`, zero output convolutions); each
micro-batch encodes the targets to latents, adds noise at random timesteps, encodes the prompts, runs the ControlNet
on the control images and the UNet with its residuals, and takes the MSE against the noise (or the velocity, when
the scheduler's prediction_type says v_prediction). AdamW steps the ControlNet only. Accelerate provides mixed
precision and gradient accumulation.

Reproducible by construction: the examples, latent samples, noise and timesteps of each micro-batch come from
generators seeded by (seed, micro-batch number), so a run resumed from a checkpoint computes the same losses as
one that never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphflow.training.base_model import FrozenBase, load_frozen_base, locate_base_model, weight_dtype
from graphflow.training.checkpoints import (
    CONTROLNET,
    STATE_FILE,
    OutputLock,
    TrainingState,
    checkpoints,
    files_outside,
    load_optimizer_state,
    read_state,
    save_checkpoint,
    write_directory,
)
from graphflow.training.config import TrainConfig, TrainingError
from graphflow.training.dataset import Batch, ControlTemplate, TrainingSamples, read_triples

if TYPE_CHECKING:
    import torch

    from graphflow.paths import PathPolicy

_WHO = "train-controlnet"  # the progress bar's name


@dataclass(frozen=True)
class StepReport:
    """One optimizer step done, for progress displays and callers' own logs."""

    step: int
    steps: int
    loss: float
    learning_rate: float
    seconds: float
    samples_per_second: float


@dataclass
class TrainResult:
    """What a training run did. `losses` has one mean loss per optimizer step from step 1 (a resumed run's earlier
    ones come from its checkpoint); throughput counts this run's training steps only, not checkpoints or
    validation."""

    steps: int
    losses: list[float]
    samples_per_second: float
    seconds_per_step: float
    controlnet: Path
    checkpoints: list[Path] = field(default_factory=list)
    validation_images: list[Path] = field(default_factory=list)
    resumed_from: Path | None = None


def train_controlnet(config: TrainConfig, on_step: Callable[[StepReport], None] | None = None) -> TrainResult:
    """Train a ControlNet as `config` says; `on_step` is called after every optimizer step (raise to stop)."""
    config.check()
    paths = config.path_policy()
    lock = OutputLock(paths.output_root)
    try:
        return _Trainer(config, paths).run(on_step)
    finally:
        lock.release()


class _Trainer:
    def __init__(self, config: TrainConfig, paths: PathPolicy) -> None:
        import torch

        self.config = config
        self.paths = paths
        self.out = paths.output_root
        source = locate_base_model(config.base_model, paths)
        self.resume_from = _resume_point(config, paths)
        self.state = read_state(self.resume_from) if self.resume_from else None
        if self.state is not None:
            _check_resumable(config, self.state, self.resume_from)
        self.accelerator = _accelerator(config)
        self.device = self.accelerator.device
        self.samples = _samples(config, paths, self.device.type)  # before the models load: data errors come first
        self.validation = None
        if config.validate_every:
            from graphflow.training.validation import ValidationRenderer

            self.validation = ValidationRenderer(config, paths, self.samples, self.device.type)
        self.frozen: FrozenBase = load_frozen_base(source)
        controlnet = _controlnet(config, self.frozen.unet, self.resume_from)  # from the float32 UNet, as diffusers
        self.frozen.place(self.device, weight_dtype(config.mixed_precision))
        optimizer = torch.optim.AdamW(controlnet.parameters(), lr=config.learning_rate, betas=config.adam_betas,
                                      weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
        self.controlnet, self.optimizer = self.accelerator.prepare(controlnet, optimizer)
        if self.state is not None and self.resume_from is not None:
            self._restore(self.state, self.resume_from)
        self._orders: dict[int, list[int]] = {}

    def _restore(self, state: TrainingState, checkpoint: Path) -> None:
        """The optimizer's moments (and the fp16 loss scale) from `checkpoint`; its settings stay the config's."""
        self.optimizer.load_state_dict(load_optimizer_state(checkpoint, state, self.optimizer))
        if self.accelerator.scaler is not None and state.scaler:
            try:
                self.accelerator.scaler.load_state_dict(state.scaler)
            except (KeyError, RuntimeError) as error:
                raise TrainingError(f"cannot resume from {checkpoint}: its loss scaler state is not usable "
                                    f"({error!r})") from None

    def run(self, on_step: Callable[[StepReport], None] | None) -> TrainResult:
        from tqdm.auto import tqdm

        config = self.config
        start = self.state.step if self.state else 0
        losses = list(self.state.losses) if self.state else []
        result = TrainResult(config.steps, losses, 0.0, 0.0, self.out / CONTROLNET, resumed_from=self.resume_from)
        samples_per_step = config.batch_size * config.gradient_accumulation_steps
        busy = 0.0
        self.controlnet.train()
        with tqdm(total=config.steps, initial=start, desc=_WHO, unit="step", disable=not config.progress) as bar:
            for step in range(start + 1, config.steps + 1):
                began = time.perf_counter()
                rate = self._set_learning_rate(step)
                loss = self._step(step)
                seconds = time.perf_counter() - began
                busy += seconds
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                self._after_step(step, losses, result)
                if on_step is not None:
                    on_step(StepReport(step, config.steps, loss, rate, seconds, samples_per_step / seconds))
        done = config.steps - start
        if done:
            result.seconds_per_step = busy / done
            result.samples_per_second = done * samples_per_step / busy
        result.controlnet = write_directory(self.out, CONTROLNET, self._unwrapped().save_pretrained)
        return result

    def _set_learning_rate(self, step: int) -> float:
        warmup = self.config.warmup_steps
        rate = self.config.learning_rate * (min(1.0, step / warmup) if warmup else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        return rate

    def _step(self, step: int) -> float:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; their mean loss."""
        accumulation = self.config.gradient_accumulation_steps
        total = 0.0
        for micro in range(accumulation):
            number = (step - 1) * accumulation + micro
            generator = _generator(self.config.seed, 0, number)
            batch = self.samples.batch(self._indices(number))
            with self.accelerator.accumulate(self.controlnet):
                loss = self._loss(batch, generator)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients and self.config.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(self.controlnet.parameters(), self.config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach().item()
        if not math.isfinite(total):
            raise TrainingError(f"the loss is {total} at step {step}: training diverged; lower the learning rate "
                                "(or use bf16 instead of fp16), then resume from the last checkpoint")
        return total / accumulation

    def _indices(self, number: int) -> list[int]:
        """The examples of micro-batch `number`: each epoch goes through the dataset in its own shuffled order."""
        import torch

        size, count = self.config.batch_size, len(self.samples)
        indices = []
        for position in range(number * size, (number + 1) * size):
            epoch = position // count
            if epoch not in self._orders:
                self._orders = {epoch: torch.randperm(count, generator=_generator(self.config.seed, 1, epoch)).tolist()}
            indices.append(self._orders[epoch][position % count])
        return indices

    def _loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        frozen, device = self.frozen, self.device
        latents = frozen.latents(batch.targets, generator)
        text = frozen.encode_prompts(batch.prompts)
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        timesteps = torch.randint(0, frozen.scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator).to(device)
        noisy = frozen.scheduler.add_noise(latents, noise, timesteps)
        down, middle = self.controlnet(noisy, timesteps, encoder_hidden_states=text,
                                       controlnet_cond=batch.controls.to(device, frozen.dtype), return_dict=False)
        prediction = frozen.unet(noisy, timesteps, encoder_hidden_states=text,
                                 down_block_additional_residuals=[residual.to(frozen.dtype) for residual in down],
                                 mid_block_additional_residual=middle.to(frozen.dtype), return_dict=False)[0]
        return F.mse_loss(prediction.float(), frozen.target(latents, noise, timesteps).float())

    def _after_step(self, step: int, losses: list[float], result: TrainResult) -> None:
        """Checkpoint every `checkpoint_every` steps, at every validated step and at the last one; validate."""
        config = self.config
        validate = bool(config.validate_every) and (step % config.validate_every == 0 or step == config.steps)
        if not (validate or step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0)):
            return
        scaler = self.accelerator.scaler
        state = TrainingState(step, list(losses), config.fixed_for_resume(), {},
                              scaler.state_dict() if scaler is not None else None, config.to_json())
        folder = save_checkpoint(self.out, step, self._unwrapped(), self.optimizer, state, config.keep_checkpoints)
        result.checkpoints = [path for path in [*result.checkpoints, folder] if path.exists()]
        if validate and self.validation is not None:
            result.validation_images.extend(self.validation.render(step, folder / CONTROLNET))

    def _unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.controlnet)


def _resume_point(config: TrainConfig, paths: PathPolicy) -> Path | None:
    """The checkpoint to continue from: the latest one with `resume=True` (None if there is none yet), or the one
    given (inside the output or an input directory); refuses to start afresh over checkpoints of another run."""
    out = paths.output_root
    found = checkpoints(out)
    if config.resume is True and not found:
        return None
    if config.resume is not False:
        checkpoint = found[max(found)] if config.resume is True else Path(config.resume).resolve()
        outside = files_outside(checkpoint, (out, *paths.input_roots))
        if outside:
            raise TrainingError(f"cannot resume from {checkpoint}: {', '.join(map(str, outside))} leads outside the "
                                f"output directory {out} and the input directories")
        if not (checkpoint / STATE_FILE).is_file():
            raise TrainingError(f"cannot resume from {checkpoint}: it is not a training checkpoint folder")
        return checkpoint
    if found:
        raise TrainingError(f"{out} already holds checkpoints ({', '.join(path.name for path in found.values())}); "
                            "resume to continue that run, or choose another output folder")
    return None


def _check_resumable(config: TrainConfig, state: TrainingState, checkpoint: Path | None) -> None:
    fixed = config.fixed_for_resume()
    changed = [f"{name} {state.fixed.get(name)!r} -> {value!r}" for name, value in fixed.items()
               if state.fixed.get(name) != value]
    if changed:
        raise TrainingError(f"cannot resume from {checkpoint}: these settings differ from the run that wrote it: "
                            f"{'; '.join(changed)} (they decide which samples and noise each step sees)")
    if state.step > config.steps:
        raise TrainingError(f"cannot resume from {checkpoint}: it is at step {state.step}, past steps={config.steps}")


def _accelerator(config: TrainConfig) -> Any:
    import torch
    from accelerate import Accelerator

    if config.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device cuda was asked for, but PyTorch sees no CUDA GPU; use device cpu or auto")
    try:
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.device == "cpu",
                                  gradient_accumulation_steps=config.gradient_accumulation_steps)
    except ValueError as error:  # accelerate keeps one mixed-precision setting per process
        raise TrainingError(f"accelerate refused the settings: {error}") from error
    if accelerator.num_processes > 1:
        raise TrainingError("train-controlnet runs in one process on one device; `accelerate launch` with several "
                            "processes is not supported")
    return accelerator


def _controlnet(config: TrainConfig, unet: Any, checkpoint: Path | None) -> Any:
    """The ControlNet to train, in float32: the checkpoint's, or a copy of the UNet's encoder."""
    import torch
    from diffusers import ControlNetModel

    from graphflow.models.loading import quiet_progress

    if checkpoint is not None:
        from safetensors import SafetensorError

        try:
            with quiet_progress():
                return ControlNetModel.from_pretrained(checkpoint / CONTROLNET, use_safetensors=True)
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # missing, damaged or mismatched files
            raise TrainingError(f"cannot resume from {checkpoint}: its ControlNet does not load: {error}") from None
    extra = {} if config.conditioning_channels is None else \
        {"conditioning_embedding_out_channels": tuple(config.conditioning_channels)}
    # building a model draws from torch's global generator: put it back, and give the random part its own seed
    with quiet_progress(), torch.random.fork_rng(devices=[]):
        controlnet = ControlNetModel.from_unet(unet, **extra)
    _initialise_control_encoder(controlnet.controlnet_cond_embedding, config.seed)
    return controlnet


def _initialise_control_encoder(encoder: Any, seed: int) -> None:
    """Initialise the control-image encoder as torch does by default (the only part `from_unet` neither copies from
    the UNet nor zeroes), from a generator of `seed`."""
    import torch

    generator = _generator(seed, 2, 0)
    with torch.no_grad():
        for conv in [encoder.conv_in, *encoder.blocks]:
            torch.nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(conv.weight[0].numel())
            torch.nn.init.uniform_(conv.bias, -bound, bound, generator=generator)


def _samples(config: TrainConfig, paths: PathPolicy, device: str) -> TrainingSamples:
    """The dataset's examples, their control images made by the control template if there is one."""
    from graphflow.engine import Engine
    from graphflow.models.manager import ModelManager

    template = None
    if config.control_template is not None:
        # the template's models (a depth estimator, say) are this run's own, let go with it
        engine = Engine(input_dirs=list(paths.input_roots), output_dir=paths.output_root,
                        disk_cache=config.cache_dir, models=ModelManager(), options={"device": device})
        template = ControlTemplate(config.control_template, config.control_params, engine)
    triples = read_triples(config.data, paths, with_controls=template is None)
    if template is not None:
        template.check(triples[0].target)
    return TrainingSamples(triples, config.resolution, template)


def _generator(seed: int, stream: int, number: int) -> torch.Generator:
    """A CPU generator for item `number` of random stream `stream` (0: noise, 1: example order, 2: initial weights)
    of run `seed`."""
    import numpy as np
    import torch

    state = np.random.SeedSequence([seed, stream, number]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
