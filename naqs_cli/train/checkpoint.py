"""A training run's checkpoint: what it holds, writing it, restoring it, rolling back to it.

Checkpoint keys (a `torch.save` dict of tensors and plain values; `store` adds a digest):

==================  =================================================================
format_version      `store.CHECKPOINT_FORMAT_VERSION`
naqs_version        the writer's version
config              the resolved run config (a plain dict)
model               the autoregressive network's `state_dict` (inside any symmetrization)
optimizer           the update rule's state (Adam/SGD: the torch optimizer's state_dict)
scheduler           {lr_scale, rollbacks, failed_at}: rollback bookkeeping
sampler, rng        per rank, in rank order: sampler state, torch CPU RNG state
world_size          ranks that wrote it
step                steps done
best_energy         best smoothed energy so far (best.pt)
recent_energies     the energies the smoothing window holds
elapsed             training seconds so far (the clock of `train.time_budget`)
==================  =================================================================
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import naqs_cli
from naqs_cli import distributed, store
from naqs_cli.errors import CheckpointError, TrainingDivergedError, first_line
from naqs_cli.models import unwrap

if TYPE_CHECKING:
    from naqs_cli.train.loop import Trainer

log = logging.getLogger(__name__)

#: Resuming on another number of ranks reseeds the samplers with seed + this × step (+ 1000·rank).
RESEED_PER_STEP = 1_000_003


def checkpoint_world_size(state: dict) -> int:
    """Return the number of ranks that wrote a checkpoint (older files: one per sampler state)."""
    return int(state.get("world_size", len(state.get("sampler", [None])) or 1))


def resume_world_note(saved: int, now: int) -> str | None:
    """Return what resuming on `now` ranks a run checkpointed on `saved` ranks does (None if
    the numbers agree)."""
    if saved == now:
        return None
    return (
        f"the checkpoint was written by {saved} rank(s) and training continues on {now}: model,"
        " optimizer and schedule continue exactly, but the samplers' random streams restart from"
        f" seed + {RESEED_PER_STEP}·step (Markov chains are shared out anew), so the samples"
        f" differ from those {saved} rank(s) would have drawn"
    )


def training_state(
    trainer: Trainer, streams: Sequence[tuple[dict, torch.Tensor]] | None = None
) -> dict[str, Any]:
    """Return the checkpoint of a trainer's state.

    Args:
        streams: every rank's (sampler state, torch RNG state), in rank order (default: this
            process's only).
    """
    streams = streams or [stream_state(trainer)]
    return {
        "format_version": store.CHECKPOINT_FORMAT_VERSION,
        "naqs_version": naqs_cli.__version__,
        "config": trainer.setup.config,
        "model": unwrap(trainer.model).state_dict(),
        "optimizer": trainer.rule.state_dict(),
        "scheduler": {
            "lr_scale": trainer.lr_scale,
            "rollbacks": trainer.rollbacks,
            "failed_at": trainer.failed_at,
        },
        "sampler": [sampler for sampler, _ in streams],
        "step": trainer.step,
        "rng": [rng for _, rng in streams],
        "world_size": len(streams),
        "best_energy": trainer.best_energy,
        "recent_energies": list(trainer.recent),
        "elapsed": trainer.elapsed,
    }


def stream_state(trainer: Trainer) -> tuple[dict, torch.Tensor]:
    """Return this rank's (sampler state, torch RNG state)."""
    return trainer.state.sampler.state_dict(), torch.get_rng_state()


def restore(trainer: Trainer, state: dict, path: Path, rollback: bool = False) -> None:
    """Load a checkpoint's state; a rollback keeps the sampler, RNG, clock and best.

    Raises:
        CheckpointError: the state does not fit this run.
    """
    try:
        unwrap(trainer.model).load_state_dict(state["model"])
        trainer.rule.load_state_dict(state["optimizer"])
        if not rollback:
            _restore_streams(trainer, state)
            trainer.best_energy = float(state["best_energy"])
            trainer.elapsed = float(state.get("elapsed", 0.0))
            scheduler = state["scheduler"]
            trainer.lr_scale = float(scheduler["lr_scale"])
            trainer.rollbacks = int(scheduler.get("rollbacks", 0))
            trainer.failed_at = int(scheduler.get("failed_at", -1))
        trainer.step = int(state["step"])
        trainer.recent = [float(e) for e in state.get("recent_energies", [])]
        trainer.params_check = None
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: cannot restore the training state from it ({first_line(err)})"
        ) from None


def _restore_streams(trainer: Trainer, state: dict) -> None:
    """Restore each rank's sampler and torch RNG; on another number of ranks, reseed.

    The same number of ranks continues every random stream exactly. Another number continues
    the model, optimizer and schedule exactly, but the samplers are rebuilt with
    seed + RESEED_PER_STEP·step (+ 1000·rank) and the Markov chains of all ranks are shared
    out anew (see `resume_world_note`).
    """
    samplers, rngs = list(state["sampler"]), list(state["rng"])
    saved = checkpoint_world_size(state)
    rank, world = trainer.runtime.rank, trainer.runtime.world_size
    if saved == world and len(samplers) == len(rngs) == saved:
        trainer.state.sampler.load_state_dict(samplers[rank])
        torch.set_rng_state(rngs[rank].cpu())
        return
    seed = trainer.runtime.seed + RESEED_PER_STEP * int(state["step"])
    trainer.state.sampler = trainer.setup.new_sampler(seed)
    torch.manual_seed(seed + 1000 * rank)
    chains = [s.get("x") for s in samplers if isinstance(s, dict)]
    if chains and all(torch.is_tensor(c) for c in chains):
        every = torch.cat(chains)  # rank-major: the chains in their original order
        if every.shape[0] % world == 0:
            n = every.shape[0] // world
            own = trainer.state.sampler.state_dict()
            own["x"] = every[rank * n : (rank + 1) * n]
            own["needs_burn_in"] = any(bool(s.get("needs_burn_in")) for s in samplers)
            trainer.state.sampler.load_state_dict(own)
    if distributed.is_main():  # the CLI says so on stderr; here for train.log
        log.info("%s", resume_world_note(saved, world))


def recall_best(trainer: Trainer) -> None:
    """Take the best energy from best.pt when it is newer than last.pt's (a killed run)."""
    best = trainer.ckpt_dir / "best.pt"
    if not best.is_file():
        return
    try:
        energy = float(store.load_checkpoint(best)["best_energy"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return
    if math.isfinite(energy):
        trainer.best_energy = min(trainer.best_energy, energy)


def state_problems(trainer: Trainer) -> list[str]:
    """Return the names of non-finite parameters or optimizer state (empty if none)."""
    return store.non_finite_tensors(
        {"model": unwrap(trainer.model).state_dict(), "optimizer": trainer.rule.state_dict()}
    )


def save(trainer: Trainer, name: str = "last.pt") -> bool:
    """Write a checkpoint unless the state holds NaN/inf; return whether it was written.

    Every rank calls it: the ranks' sampler and RNG states are gathered into rank 0's file.

    Raises:
        OSError: the write failed (the previous file is kept); the message says how to
            resume. Other ranks raise `PeerFailedError`.
    """
    streams = distributed.gather_object(stream_state(trainer))
    problems = distributed.on_main(lambda: state_problems(trainer))
    if problems:
        if distributed.is_main():
            log.error(
                "step %d: refusing to write %s: non-finite values in %s",
                trainer.step,
                name,
                ", ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""),
            )
        return False
    if name == "last.pt" and trainer.step > trainer.failed_at:
        trainer.rollbacks = 0  # a good state past the last failure: a new incident starts over
    distributed.on_main(lambda: _write(trainer, name, streams), share_result=False)
    if name == "last.pt":
        trainer.saved_step = trainer.step
    return True


def _write(trainer: Trainer, name: str, streams: Sequence[tuple[dict, torch.Tensor]]) -> None:
    from naqs_cli.train.resume import resume_command

    try:
        with trainer.catcher.critical():
            store.save_checkpoint(trainer.ckpt_dir / name, training_state(trainer, streams))
    except OSError as err:
        kept = (
            f"the previous checkpoint (step {trainer.saved_step}) is kept"
            if trainer.saved_step is not None
            else "no checkpoint was written"
        )
        resume = (
            f"; then resume with: {resume_command(trainer.out_dir)}"
            if trainer.saved_step is not None
            else ""
        )
        raise OSError(err.errno, f"{err.strerror}; {kept}{resume}") from err


def rollback(trainer: Trainer, reason: str) -> None:
    """Return to checkpoints/last.pt with the learning rate halved (optimizer included).

    Raises:
        TrainingDivergedError: more than `train.max_rollbacks` rollbacks without progress, or
            no checkpoint to return to.
    """
    settings = trainer.settings
    trainer.rollbacks += 1
    trainer.failed_at = max(trainer.failed_at, trainer.step)
    path = trainer.ckpt_dir / "last.pt"
    if trainer.rollbacks > settings.max_rollbacks or trainer.saved_step is None:
        raise TrainingDivergedError(
            f"training diverged at step {trainer.step} ({reason}) after"
            f" {trainer.rollbacks - 1} rollbacks with the learning rate halved each time"
            f" (train.max_rollbacks={settings.max_rollbacks}); the last good checkpoint"
            f" is {path} (step {trainer.saved_step}): lower optim.lr (now {settings.lr})"
            " or set optim.grad_clip and start again, e.g. with train.init_from="
            f"{path}"
        )
    state = store.load_checkpoint(path, map_location=trainer.runtime.device)
    restore(trainer, state, path, rollback=True)
    trainer.lr_scale *= 0.5

    def truncate() -> int:
        with trainer.catcher.critical():
            return trainer.history.truncate_from(trainer.step)

    kept = distributed.on_main(truncate) or 0
    log.warning(
        "%s: rolled back to step %d (%d history rows kept), learning rate halved"
        " (scale %.3g, rollback %d of at most %d)",
        reason,
        trainer.step,
        kept,
        trainer.lr_scale,
        trainer.rollbacks,
        settings.max_rollbacks,
    )
