"""Where a fixed-Σσᶻ model's constraint acts: a per-site profile of a trained run.

Run from the repository root on a run directory or checkpoint of a model with
`model.total_sz` (e.g. `experiment=heisenberg`):

    .venv/bin/python benchmarks/heisenberg_sites.py RUN_DIR [--samples 4096] [--grad-samples 48]

For every site i in the autoregressive (raster) order it prints a markdown table of

- **forced**: the fraction of configurations in which the sector leaves site i one choice
  (its conditional is 1 and ln ψ_i has no gradient);
- **rms grad**: the root-mean-square over configurations of ‖∂ ln ψ_i(x_i)/∂θ‖, one backward
  pass per site and configuration (`--grad-samples` configurations);
- **entropy**: the mean entropy of the conditional |ψ_i(·)|², in nats.

The configurations are exact samples of the trained state; for a symmetrized model, the
images g·x that the wrapped network evaluates (sample-major), since those are its inputs.
float64, one thread.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from naqs_cli import build, store  # noqa: E402
from naqs_cli.errors import CheckpointError  # noqa: E402
from naqs_cli.models import unwrap  # noqa: E402
from naqs_cli.models.constraints import allowed_states, count_up_before  # noqa: E402


@dataclass(frozen=True)
class SiteProfile:
    """Per-site statistics, each (N,) float64 in raster order."""

    forced: torch.Tensor
    rms_grad: torch.Tensor
    entropy: torch.Tensor


def site_profile(network: torch.nn.Module, x: torch.Tensor, n_grad: int) -> SiteProfile:
    """Profile an autoregressive network with a fixed sector on configurations x.

    Args:
        network: an `AutoregressiveWaveFunction` with `total_sz` (the unsymmetrized network).
        x: (B, N) int8 configurations in its sector.
        n_grad: how many of them enter the gradient norms (one backward pass per site each).

    Raises:
        ValueError: the network has no fixed sector.
    """
    if network.n_up is None:
        raise ValueError("the model has no fixed sector (model.total_sz=null): nothing is forced")
    n_sites = network.n_sites
    site = torch.arange(n_sites)
    allowed = allowed_states(count_up_before(x), site, n_sites, network.n_up)
    forced = (allowed.sum(dim=-1) == 1).double().mean(dim=0)
    with torch.no_grad():
        prob = torch.exp(2 * network.conditionals(x).real)
        entropy = -(prob * torch.log(prob.clamp(min=1e-300))).sum(dim=-1).mean(dim=0) + 0.0
    params = [p for p in network.parameters() if p.requires_grad]
    squares = torch.zeros(n_sites, dtype=torch.float64)
    chosen = x[:n_grad]
    for b in range(chosen.shape[0]):
        one = chosen[b : b + 1]
        site_log = network.site_log_psi(*network.raw_outputs(one), one).real[0]
        for i in range(n_sites):
            grads = torch.autograd.grad(site_log[i], params, retain_graph=True, allow_unused=True)
            squares[i] += sum(float((g.double() ** 2).sum()) for g in grads if g is not None)
    rms = (squares / max(1, chosen.shape[0])).sqrt()
    return SiteProfile(forced=forced, rms_grad=rms, entropy=entropy)


def format_profile(profile: SiteProfile) -> str:
    """The profile as a markdown table."""
    lines = ["| site | forced | rms grad | entropy (nats) |", "|---|---|---|---|"]
    for i in range(profile.forced.shape[0]):
        lines.append(
            f"| {i} | {profile.forced[i]:.3f} | {profile.rms_grad[i]:.3g}"
            f" | {profile.entropy[i]:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run directory or checkpoint file")
    parser.add_argument("--samples", type=int, default=4096, help="exact samples (default 4096)")
    parser.add_argument(
        "--grad-samples", type=int, default=48, help="configurations in the gradient norms"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        state = store.load_checkpoint(args.checkpoint)
    except CheckpointError as err:
        parser.error(str(err))
    cfg = OmegaConf.create(state["config"])
    lattice = build.build_lattice(cfg)
    model = build.build_model(cfg, lattice, "cpu", torch.float64)
    network = unwrap(model)
    network.load_state_dict(state["model"])
    if network.n_up is None:
        parser.error("the run has model.total_sz=null: no sector, nothing is forced")
    x, _ = model.sample(args.samples, torch.Generator().manual_seed(args.seed))
    if network is not model:  # what the wrapped network evaluates: every image g·x
        x = model.transformed(x).reshape(-1, lattice.n_sites)
    print(f"{args.checkpoint}: step {state['step']}, {x.shape[0]} configurations")
    print(format_profile(site_profile(network, x, args.grad_samples)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
