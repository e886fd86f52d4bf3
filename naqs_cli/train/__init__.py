"""Training: the loop and what surrounds it.

- `schedule`: stages and learning-rate schedules, on steps or on a time budget;
- `checkpoint`: what a checkpoint holds, saving, restoring, rolling back;
- `signals`: SIGINT/SIGTERM become a stop after the current step;
- `resume`: the resume command, the new-run guard, weights from another run;
- `callbacks`: history rows, checkpoints and the progress bar around each step;
- `loop`: the `Trainer` and its loop;
- `final`: the evaluation of the trained state and the run's summary.
"""
