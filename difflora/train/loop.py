"""The accelerate training loop shared by the lae and dit stages (DiT train.py's flat loop).

A stage supplies a model, a `loss(model, indices, generator)` over training items and an
`evaluate(model)` on held-out items; the loop owns AdamW, warm-up + cosine schedule, EMA,
gradient accumulation, mixed precision, logging, checkpoints, signals and NaN checks.

Exact resume: the items and the noise of optimizer step s depend only on (seed, s, micro-batch,
process), never on what ran before, and the checkpoint holds every other state. So on CPU a
run stopped at step k and resumed logs the same losses as one that never stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from torch import nn

from ..diffusion import make_ema
from ..errors import DiffLoRAError
from ..safetensors_io import remove_stale_temps
from .checkpoint import list_checkpoints, latest_checkpoint, restore, save_checkpoint
from .config import LoopConfig
from .logs import CsvLog, plot_loss_curve

log = logging.getLogger("difflora.train")

# Options that may change between a run and its resume without changing what is computed.
RESUMABLE_CHANGES = {"resume", "progress", "ckpt_every", "keep_checkpoints", "eval_every", "log_every",
                     "loras", "run", "lae", "out"}


class TrainingDiverged(DiffLoRAError):
    """The loss became NaN or infinite."""


class Stage(Protocol):
    name: str
    model: nn.Module
    num_train: int

    def loss(self, model: nn.Module, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    def checkpoint_extras(self) -> tuple[dict, dict]: ...

    def resume_inputs(self) -> dict: ...


@dataclass
class LoopResult:
    status: str            # "finished" or "interrupted"
    step: int
    checkpoint: Path | None


def make_accelerator(mixed_precision: str = "auto") -> Accelerator:
    """'auto' -> bf16 on GPUs that support it, else fp16; fp32 ('no') on CPU.

    Several processes without CUDA (`accelerate launch --multi_gpu --num_processes N` on a CPU
    machine) need cpu=True, or accelerate treats each process as a lone run."""
    if mixed_precision == "auto":
        if not torch.cuda.is_available():
            mixed_precision = "no"
        else:
            mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def step_seed(seed: int, *parts) -> int:
    """A 63-bit seed from (seed, parts...): independent streams without carried RNG state."""
    digest = hashlib.sha256(repr((int(seed), *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def stream_indices(n: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Items [start, start + count) of the endless stream of per-epoch permutations of range(n)."""
    out, pos = [], start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, "epoch", epoch)))
        take = min(n - offset, count - len(out))
        out += perm[offset:offset + take].tolist()
        pos += take
    return torch.tensor(out, dtype=torch.long)


class StopRequest:
    """SIGTERM / Ctrl-C set a flag the loop reads between steps (a second Ctrl-C stops at once)."""

    def __init__(self):
        self.flag, self._old = False, {}

    def _handler(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True
        log.warning("%s received: finishing this step, writing a checkpoint, then stopping.",
                    signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_resume_config(saved: dict, current: dict, run: Path) -> None:
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise DiffLoRAError(f"{run} was started with other options ({diffs}); resume with the same options, "
                            "or start a new run in another --run folder.")


# What each entry of a stage's resume_inputs() means, for the sentence that refuses a resume.
INPUT_NAMES = {"normalizer": "the training LoRAs' contents changed (their normalization statistics differ)",
               "lae_sha256": "the --lae file changed (the LAE was retrained or replaced)",
               "encoders": "the encoders of the identity embeddings changed"}


def tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """A few float64 moments of each tensor: equal (to rounding) for a refit on the same data,
    different for other data. Compared with a tolerance, since thread counts change the last bits;
    no signed sum, which can cancel to near 0 and make rounding look like a change."""
    out = {}
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float64).abs()
        out[name] = [float(t.sum()), float((t * t).sum()), float(t.max()) if t.numel() else 0.0, float(t.numel())]
    return out


def _same(a, b) -> bool:
    """Equal JSON values, floats to a relative 1e-6."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
    if numbers and (isinstance(a, float) or isinstance(b, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


def _identities_change(saved: dict, current: dict) -> str:
    old, new = set(saved["train"]) | set(saved["val"]), set(current["train"]) | set(current["val"])
    moved = sorted(n for n in old & new if (n in saved["val"]) != (n in current["val"]))
    parts = [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
             for names, what in ((sorted(new - old), "added"), (sorted(old - new), "removed"),
                                 (moved, "moved between training and validation")) if names]
    return "the identity LoRAs changed: " + ", ".join(parts or ["their order changed"])


def check_resume_inputs(saved: dict | None, current: dict, run: Path) -> None:
    """Refuse a resume whose data differ from the run's start: it would go on, silently, on other data."""
    if saved is None:  # a checkpoint from before inputs were recorded
        log.warning("%s: its checkpoint does not record the data it was started on; resuming unchecked.", run)
        return
    current = json.loads(json.dumps(current))  # as the checkpoint stores it (tuples become lists)
    changed = [_identities_change(saved[k], current[k]) if k == "identities" else INPUT_NAMES.get(k, f"{k} changed")
               for k in sorted(set(saved) | set(current)) if not _same(saved.get(k), current.get(k))]
    if changed:
        raise DiffLoRAError(f"{run} cannot be resumed: since it started, {'; '.join(changed)}. Resume with the "
                            "inputs it was started on, or start a new run in another --run folder.")


def run_loop(stage: Stage, cfg: LoopConfig, accelerator: Accelerator,
             on_step: Callable[[int], None] | None = None) -> LoopResult:
    run = Path(cfg.run)
    config = cfg.to_dict()
    found = list_checkpoints(run)
    if found and not cfg.resume:
        raise DiffLoRAError(f"{run} already holds a run (checkpoint at step {found[-1][0]}): pass --resume to "
                            "continue it, or choose another --run folder.")
    if accelerator.is_main_process:  # a process killed mid-write (SIGKILL) left its temp file
        for stale in remove_stale_temps(run / "checkpoints") + remove_stale_temps(run):
            log.info("Removed %s, left by an interrupted write.", stale)
    model = stage.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.steps)
    ema = make_ema(model, decay=cfg.ema_decay)
    start, last_ckpt, window = 1, None, []
    metrics_log = CsvLog(run / "metrics.csv", ["step", "loss", "lr", "samples_per_s", "seconds"])
    if found:
        ckpt = latest_checkpoint(run)
        check_resume_config(ckpt.meta["config"], config, run)
        check_resume_inputs(ckpt.meta.get("inputs"), stage.resume_inputs(), run)
        restore(ckpt, model, optimizer, scheduler, ema)
        start, last_ckpt = ckpt.step + 1, ckpt.path
        window = list(ckpt.meta.get("loss_window", []))  # a --log-every window cut by the stop goes on
        log.info("Resuming %s from %s (step %d).", stage.name, ckpt.path, ckpt.step)
        if accelerator.is_main_process:
            metrics_log.truncate_after(ckpt.step)
            CsvLog(run / "eval.csv", ["step"]).truncate_after(ckpt.step)
    elif cfg.resume:
        log.info("Nothing to resume in %s: starting %s from step 1.", run, stage.name)
    ema.to(accelerator.device)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    params = list(model.parameters())

    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = cfg.batch_size * cfg.grad_accum * world
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start - 1, desc=stage.name, dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_local_main_process))
    t_log, stop = time.perf_counter(), StopRequest()
    t_start = time.perf_counter()
    status = "finished"
    with stop:
        for step in range(start, cfg.steps + 1):
            wrapped.train()
            total, nonfinite = torch.zeros((), device=accelerator.device), 0.0
            for micro in range(cfg.grad_accum):
                pos = ((step - 1) * cfg.grad_accum + micro) * cfg.batch_size * world + rank * cfg.batch_size
                idx = stream_indices(stage.num_train, cfg.seed, pos, cfg.batch_size)
                gen = torch.Generator().manual_seed(step_seed(cfg.seed, "noise", step, micro, rank))
                sync = micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(wrapped):
                    with accelerator.autocast():
                        loss = stage.loss(wrapped, idx, gen)
                    nonfinite += float(not torch.isfinite(loss.detach()))
                    accelerator.backward(loss / cfg.grad_accum)
                total += loss.detach().float() / cfg.grad_accum
            # One collective a step: mean loss, any NaN, any stop request, across processes.
            flags = accelerator.reduce(torch.stack([total, torch.tensor(nonfinite, device=total.device),
                                                    torch.tensor(float(stop.flag), device=total.device)]), "sum")
            if flags[1] > 0:
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                raise TrainingDiverged(
                    f"{stage.name}: the loss became NaN or infinite at step {step} (lr {scheduler.get_last_lr()[0]:.3g}). "
                    f"Stopped without saving; {where}. Lower --lr, raise --warmup-steps or --max-grad-norm, or "
                    "check the data, then continue with --resume.")
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(params)
            window.append(float(flags[0]) / world)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                row = {"step": step, "loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
                       "samples_per_s": len(window) * per_step / max(now - t_log, 1e-9), "seconds": now - t_start}
                bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.2e}")
                if accelerator.is_main_process:
                    metrics_log.append(row)
                window, t_log = [], now
            stopping = flags[2] > 0
            if step % cfg.eval_every == 0 or step == cfg.steps:
                evaluate(stage, model, ema, params, accelerator, run, step)
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
                last_ckpt = checkpoint(stage, model, optimizer, scheduler, ema, config, cfg, accelerator, step,
                                       window)
            if on_step is not None:
                on_step(step)
            if stopping:
                status = "interrupted"
                break
    bar.close()
    final_step = step if cfg.steps >= start else start - 1
    if status == "interrupted":
        log.warning("%s stopped at step %d; checkpoint %s. Continue with --resume.", stage.name, final_step, last_ckpt)
    return LoopResult(status, final_step, last_ckpt)


def evaluate(stage, model, ema, params, accelerator, run: Path, step: int) -> None:
    """Validation with the EMA weights, on the main process; the others wait."""
    if accelerator.is_main_process:
        ema.store(params)
        ema.copy_to(params)
        model.eval()
        try:
            with torch.no_grad(), accelerator.autocast():
                metrics = stage.evaluate(model)
        finally:
            ema.restore(params)
        log.info("%s step %d: %s", stage.name, step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        CsvLog(run / "eval.csv", ["step", *metrics]).append({"step": step, **metrics})
        plot_loss_curve(run / "metrics.csv", run / "eval.csv", run / "loss_curve.png", stage.name)
    accelerator.wait_for_everyone()


def checkpoint(stage, model, optimizer, scheduler, ema, config, cfg, accelerator, step, window) -> Path:
    path = Path(cfg.run) / "checkpoints" / f"step_{step:08d}.safetensors"
    if accelerator.is_main_process:
        tensors, meta = stage.checkpoint_extras()
        path = save_checkpoint(cfg.run, step, model, optimizer, scheduler, ema, config, tensors,
                               {"stage": stage.name, "loss_window": window, "inputs": stage.resume_inputs(), **meta},
                               keep=cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return path
