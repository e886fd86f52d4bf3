"""Evaluating a trained state: observables from many samples, tables, checkpoint loading.

`evaluate_model` is shared by the end of `naqs train`, by `naqs evaluate` and by the
comparisons; `load_trained` is the one way a checkpoint becomes a model (with the same checks
for every command that reads one).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from naqs_cli import distributed, store
from naqs_cli.build import TrainingSetup
from naqs_cli.errors import CheckpointError
from naqs_cli.models import unwrap
from naqs_cli.reference import Reference, find_reference, relative_error
from naqs_cli.samplers import Samples, cat_chain_major, cat_samples
from naqs_cli.vmc import LocalEnergy, batch_local_energy, estimate_observables

log = logging.getLogger(__name__)

#: Samples per network pass of a final evaluation.
FINAL_CHUNK_SIZE = 4096


def evaluate_model(
    model: torch.nn.Module,
    hamiltonian,
    sampler,
    n_samples: int,
    chunk_size: int,
) -> dict[str, float]:
    """Estimate every observable of `model` with `n_samples` samples, drawn in chunks.

    Markov-chain chunks are joined chain by chain (`cat_samples`), so τ, R̂ and the error bars
    are those of the chains, not of the chunks. On several ranks (a collective: every rank
    calls it with its own sampler) each rank draws its share of the `n_samples` and the
    statistics are those of all of them.

    Returns the per-site observables of `vmc.estimate_observables` plus `n_samples`.
    """
    if getattr(sampler, "basis", None) is not None:  # fullsum: one exact pass
        batch = sampler.sample(model)
        e_loc = batch_local_energy(model, hamiltonian, batch)
        values = estimate_observables(batch, e_loc, hamiltonian)
        values["n_samples"] = int(sampler.basis.shape[0])
        return values
    batches: list[Samples] = []
    energies: list[LocalEnergy] = []
    start, stop = distributed.split(n_samples)
    remaining = stop - start
    while remaining > 0:
        size = min(remaining, chunk_size)
        batch = sampler.sample(model, size)
        batches.append(batch)
        energies.append(batch_local_energy(model, hamiltonian, batch, chunk_size=chunk_size))
        remaining -= size
    if not batches:  # more ranks than samples: this rank contributes none
        x = torch.zeros(0, hamiltonian.n_sites, dtype=torch.int8, device=sampler.generator.device)
        empty = torch.zeros(0, dtype=torch.complex128, device=x.device)
        batches.append(Samples(x=x, log_psi=empty))
        energies.append(LocalEnergy(empty, empty))
    batch = cat_samples(batches)
    n_chains = batches[0].n_chains
    e_loc = LocalEnergy(
        cat_chain_major([e.total for e in energies], n_chains),
        cat_chain_major([e.off_diagonal for e in energies], n_chains),
    )
    values = estimate_observables(batch, e_loc, hamiltonian)
    values["n_samples"] = sum(distributed.all_gather_object(batch.n_samples))
    return values


def format_table(values: dict[str, float], reference: Reference | None, title: str) -> str:
    """Return a one-screen table of observables with errors and the relative energy error."""
    lines = [title]
    names = [n for n in values if not n.endswith("_err") and n not in ("n_samples", "tau")]
    for name in names:
        value = values[name]
        err = values.get(f"{name}_err")
        text = f"{value: .8f}" if isinstance(value, float) else f"{value}"
        if err is not None and math.isfinite(err):
            text += f" ± {err:.1e}"
        lines.append(f"  {name:<24}{text}")
    if reference is not None:
        rel = relative_error(values["energy"], reference)
        lines.append(f"  {'reference energy':<24}{reference.energy: .8f}  ({reference.source})")
        lines.append(f"  {'relative error':<24}{rel: .3e}")
    return "\n".join(lines)


@dataclass
class Trained:
    """A checkpoint turned back into a model, with the run it came from.

    Attributes:
        path: the checkpoint file.
        step: its step.
        setup: the run's objects rebuilt from its (possibly overridden) config; the model
            holds the checkpoint's weights, in eval mode.
    """

    path: Path
    step: int
    setup: TrainingSetup

    @property
    def model(self) -> torch.nn.Module:
        """The trained wave function."""
        return self.setup.state.model

    def reference(self) -> Reference | None:
        """Return the run's reference energy (exact when computable, else the literature)."""
        settings = self.setup.settings
        return find_reference(
            self.setup.hamiltonian, self.setup.literature, settings.exact_reference
        )


def load_trained(setup: TrainingSetup, path: Path, state: dict[str, Any]) -> Trained:
    """Load a checkpoint's weights into the model of its own (rebuilt) config.

    Raises:
        CheckpointError: the weights do not fit the model.
    """
    try:
        unwrap(setup.state.model).load_state_dict(state["model"])
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        first = lines[0][:200] if lines else type(err).__name__
        raise CheckpointError(
            f"{path}: its weights do not fit the model of its own config ({first})"
        ) from None
    setup.state.model.eval()
    return Trained(path=path, step=int(state["step"]), setup=setup)


def write_evaluation(
    trained: Trained, values: dict[str, float], out_dir: Path, sampler_kind: str, symmetry: str
) -> tuple[Path, dict[str, float], Reference | None]:
    """Write `evaluation.h5` (observables, relative error, run attributes); return it.

    Returns:
        (the file, the values written, the reference).
    """
    reference = trained.reference()
    out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(values)
    result["relative_error"] = relative_error(values["energy"], reference)
    attrs = trained.setup.run_attrs()
    attrs.update(checkpoint=str(trained.path), step=trained.step, sampler=sampler_kind)
    attrs["symmetry"] = symmetry
    if reference is not None:
        result["reference_energy"] = reference.energy
        attrs["reference_source"] = reference.source
    h5 = out_dir / "evaluation.h5"
    store.write_group(h5, "evaluation", result)
    store.write_attrs(h5, attrs)
    return h5, result, reference
