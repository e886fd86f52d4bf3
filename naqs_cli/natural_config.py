"""The config checks of `optim=sr|minsr` (called by `validation._validate_optim`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig

from naqs_cli.build import build_lattice, build_model, target_kind
from naqs_cli.errors import ConfigError
from naqs_cli.natural import MINSR_FULLSUM_MAX_SITES, SOLVERS


def _refuse(key: str, value: Any, allowed: str) -> None:
    shown = "null" if value is None else str(value)
    raise ConfigError(f"{key}={shown}: {allowed}")


def _number(key: str, value: Any, low: float, high: float = math.inf, closed: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or value > high or (not closed and value == low):
        bounds = f"{'>=' if closed else '>'} {low:g}" + (
            f" and <= {high:g}" if high < math.inf else ""
        )
        _refuse(key, value, f"must be a finite number {bounds}")


def check_config(cfg: DictConfig, training: bool = True) -> None:
    """Check every key of `optim=sr|minsr` against the rest of a train config.

    With `training` false (a stored config rebuilt for evaluation) the sampler may be one the
    rule could not train with (MinSR with a large full sum).

    Raises:
        ConfigError: one line naming the key, its value and what is allowed.
    """
    optim, kind = cfg.optim, target_kind(cfg.optim)
    _number("optim.diag_shift", optim.diag_shift, 0.0)
    _number("optim.diag_shift_rel", optim.diag_shift_rel, 0.0)
    if optim.solver not in SOLVERS:
        _refuse("optim.solver", optim.solver, "allowed: " + " | ".join(SOLVERS))
    if optim.rcond is not None:
        _number("optim.rcond", optim.rcond, 0.0, 1.0, closed=False)
        if optim.solver != "eigh":
            _refuse("optim.rcond", optim.rcond, "a pseudo-inverse needs optim.solver=eigh")
    if optim.diag_shift == 0 and (optim.rcond is None or optim.diag_shift_rel > 0):
        _refuse(
            "optim.diag_shift",
            0,
            "must be > 0 (0 only for a pure pseudo-inverse: optim.rcond set, diag_shift_rel=0)",
        )
    if optim.diag_shift_final is not None:
        _number("optim.diag_shift_final", optim.diag_shift_final, 0.0, closed=False)
        if optim.diag_shift == 0:
            _refuse("optim.diag_shift_final", optim.diag_shift_final, "needs optim.diag_shift > 0")
    _number("optim.spring", optim.spring, 0.0, 0.999)
    if optim.max_infidelity is not None:
        _number("optim.max_infidelity", optim.max_infidelity, 0.0, 1.0, closed=False)
    lattice = build_lattice(cfg)
    n_sites = lattice.n_sites
    if (
        training
        and kind == "minsr"
        and target_kind(cfg.sampler) == "fullsum"
        and n_sites > MINSR_FULLSUM_MAX_SITES
    ):
        _refuse(
            "sampler",
            "fullsum",
            f"optim=minsr solves a system of 2·2^N rows, so N <= {MINSR_FULLSUM_MAX_SITES};"
            f" {lattice.describe()} has N = {n_sites}: use sampler=direct or optim=adam (optim=sr"
            " for models within optim.max_params)",
        )
    if kind == "sr":
        limit = optim.max_params
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            _refuse("optim.max_params", limit, "must be an integer >= 1")
        model = build_model(cfg, lattice, "cpu", torch.float32)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if n_params > limit:
            _refuse(
                "optim",
                "sr",
                f"the model has {n_params} trainable parameters, more than optim.max_params ="
                f" {limit} (SR solves a dense P × P system); use optim=minsr",
            )
