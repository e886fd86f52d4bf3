"""Direct sampling versus Markov chains, as in the paper's Figs. 2 and 3.

- `sampling`: `naqs compare sampling CHECKPOINT`: direct samples vs chains started in one
  mode, from a trained model (`compare_sampling.h5`, `compare_sampling.png`);
- `training`: `naqs compare training`: training driven by direct sampling vs by MCMC at
  several k under equal wall time, each run an ordinary training run (`compare_training.h5`,
  `compare_training.png`, `runs/<name>/`).

`tasks.compare_sampling` and `tasks.compare_training` delegate here; both are plain functions
`(cfg, out_dir) -> TaskResult`.
"""

from naqs_cli.compare.sampling import compare_sampling, principal_components, sampling_verdict
from naqs_cli.compare.training import compare_training

__all__ = ["compare_sampling", "compare_training", "principal_components", "sampling_verdict"]
