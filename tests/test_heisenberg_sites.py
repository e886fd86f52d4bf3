"""benchmarks/heisenberg_sites.py: the per-site profile of a fixed-Σσᶻ model, checked by hand
on the 2×2 sector Σσᶻ = 0 (six configurations)."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import ROOT

from naqs_cli.basis import enumerate_basis
from naqs_cli.lattice import SquareLattice
from naqs_cli.models import PixelCNN

sys.path.insert(0, str(ROOT / "benchmarks"))

import heisenberg_sites  # noqa: E402


def sector_model() -> tuple[PixelCNN, torch.Tensor]:
    torch.manual_seed(0)
    model = PixelCNN(lattice=SquareLattice(2, 2), layers=2, channels=3, total_sz=0).double()
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.5)
    basis = enumerate_basis(4)
    return model, basis[basis.sum(dim=1) == 2]


def test_forced_sites_gradients_and_entropies_by_hand():
    model, sector = sector_model()
    profile = heisenberg_sites.site_profile(model, sector, n_grad=6)
    # Site 3 is always forced; site 2 when sites 0 and 1 agree (↑↑↓↓, ↓↓↑↑: 2 of 6).
    torch.testing.assert_close(
        profile.forced, torch.tensor([0, 0, 1 / 3, 1], dtype=torch.float64), rtol=0, atol=1e-15
    )
    assert profile.rms_grad[3] == 0 and profile.entropy[3] == 0
    assert (profile.rms_grad[:3] > 0).all()
    # Site 0 decides among two choices: its entropy is that of its conditional (no history).
    p_up = torch.exp(2 * model.conditionals(sector[:1]).real)[0, 0, 1]
    h0 = -(p_up * torch.log(p_up) + (1 - p_up) * torch.log(1 - p_up))
    assert profile.entropy[0].item() == pytest.approx(h0.item(), rel=1e-12)
    table = heisenberg_sites.format_profile(profile)
    assert table.splitlines()[5] == f"| 3 | 1.000 | 0 | {0:.3f} |"


def test_a_model_without_a_sector_is_refused():
    model = PixelCNN(lattice=SquareLattice(2, 2), layers=1, channels=2).double()
    with pytest.raises(ValueError, match="no fixed sector"):
        heisenberg_sites.site_profile(model, enumerate_basis(4), n_grad=1)


def test_a_missing_checkpoint_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        heisenberg_sites.main([str(tmp_path / "nosuch")])
    assert exit_info.value.code == 2
    assert "nosuch" in capsys.readouterr().err.splitlines()[-1]
