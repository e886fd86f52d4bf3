"""The end of a training run: evaluate the final state, write it, plot, summarize.

The final evaluation is not counted in `train.time_budget`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from naqs_cli import distributed
from naqs_cli.evaluate import FINAL_CHUNK_SIZE, evaluate_model, format_table
from naqs_cli.models import unwrap
from naqs_cli.reference import find_reference, relative_error
from naqs_cli.results import TaskResult

if TYPE_CHECKING:
    from naqs_cli.train.loop import Trainer

log = logging.getLogger("naqs_cli.train")


def finish(trainer: Trainer) -> TaskResult:
    """Evaluate the final state (every rank draws its share), then write and plot (rank 0)."""
    setup, settings, out_dir = trainer.setup, trainer.settings, trainer.out_dir
    values: dict[str, Any] = {}
    model = trainer.model
    if settings.final_symmetry:
        model = setup.new_model(settings.final_symmetry)
        unwrap(model).load_state_dict(unwrap(trainer.model).state_dict())
    if settings.final_samples > 0:
        values = evaluate_model(
            model,
            setup.hamiltonian,
            setup.final_sampler(),
            settings.final_samples,
            FINAL_CHUNK_SIZE,
        )
    describe = setup.hamiltonian.describe()
    title = (
        f"naqs train: {describe}, {setup.model_kind}, {trainer.step} steps"
        + (" (time budget spent)" if trainer.stopped == "time_budget" else "")
        + f", final evaluation on {values.get('n_samples', 0)} samples"
    )
    if not distributed.is_main():
        return TaskResult(title, out_dir, values)
    reference = find_reference(setup.hamiltonian, setup.literature, settings.exact_reference)
    if values:
        final = dict(values)
        final["relative_error"] = relative_error(values["energy"], reference)
        attrs = {"steps": trainer.step, "symmetry": settings.final_symmetry or "as trained"}
        if reference is not None:
            final["reference_energy"] = reference.energy
            attrs["reference_source"] = reference.source
        with trainer.catcher.critical():
            trainer.history.write_group("final", final, attrs)
    from naqs_cli import plots

    try:
        plots.training_plot(
            out_dir / "history.h5",
            out_dir / "training.png",
            reference.energy if reference else None,
            title=f"{describe}, {setup.model_kind}"
            + (f" (reference: {reference.source})" if reference else ""),
        )
    except Exception as err:  # a plot must never lose a finished run
        log.warning("could not draw training.png: %s", err)
    summary = format_table(values, reference, title) if values else title
    summary += f"\n  outputs: {out_dir}"
    log.info("\n%s", summary)
    return TaskResult(summary, out_dir, values)
