"""Direct (cached) sampling against the exact |Ψ|²: G-tests with negative controls.

Power of the G-test: for a perturbation P' = P(1 + ε s)/Z with balanced signs s = ±1, the
statistic computed against P' on n samples of P is noncentral χ² with k − 1 degrees of freedom
and noncentrality λ ≈ n ε². On 3×3 (k ≈ 512 bins) with n = 2^16 a 1 % perturbation gives λ ≈ 6.6,
far below the statistic's own spread √(2k) ≈ 32: it cannot be resolved there (that would take
~4·10^6 samples). So the 2^16-sample tests reject a 10 % perturbation (λ ≈ 650), and the 1 %
perturbation is rejected on 2×2 (k = 16) with 2^20 samples (λ ≈ 105: G ≈ 120 ± 21 against the
p = 10⁻³ threshold 37.7).
"""

from __future__ import annotations

import pytest
import torch

from naqs_cli.basis import basis_index, enumerate_basis
from naqs_cli.lattice import SquareLattice
from naqs_cli.models import DenseNAQS, PixelCNN, SymmetrizedWaveFunction

N_SAMPLES = 2**16
THRESHOLD = 1e-3  # accept the true |Ψ|² when p > THRESHOLD, reject the controls when p < it


def g_test(x: torch.Tensor, prob: torch.Tensor) -> float:
    """Return the p-value of the G-test of the samples x against the distribution prob.

    Bins with an expected count below 5 are pooled into one (together with the next smallest
    bin if the pool itself stays below 5).

    Args:
        x: (n, N) int8 samples.
        prob: (2^N,) float64 probabilities in basis order.
    """
    from scipy.stats import chi2

    counts = torch.bincount(basis_index(x), minlength=prob.numel()).double()
    expected = counts.sum() * prob
    order = torch.argsort(expected)
    counts, expected = counts[order], expected[order]
    n_pooled = int((expected < 5).sum())
    while 0 < n_pooled < expected.numel() and expected[:n_pooled].sum() < 5:
        n_pooled += 1
    if n_pooled > 0:
        counts = torch.cat([counts[:n_pooled].sum().view(1), counts[n_pooled:]])
        expected = torch.cat([expected[:n_pooled].sum().view(1), expected[n_pooled:]])
    if ((counts > 0) & (expected == 0)).any():
        return 0.0
    seen = counts > 0
    statistic = 2 * (counts[seen] * torch.log(counts[seen] / expected[seen])).sum().item()
    return float(chi2.sf(statistic, expected.numel() - 1))


def perturbed(prob: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Return prob·(1 + ε s)/Z with signs alternating down the sorted probabilities.

    Alternating by rank balances the signs in probability mass, so the noncentrality of the
    G-test against it is the largest possible for this ε, n ε².
    """
    signs = torch.ones_like(prob)
    signs[torch.argsort(prob, descending=True)[1::2]] = -1
    new = prob * (1 + epsilon * signs)
    return new / new.sum()


def sharpened(model, head: torch.nn.Module, probabilities) -> torch.Tensor:
    """Scale the output layer until max/min |Ψ|² over the support exceeds 100; return |Ψ|².

    Args:
        model: the float64 wave function to sharpen in place.
        head: its output layer (weights and bias scaled together).
        probabilities: callable returning |Ψ|² over the basis.
    """
    for _ in range(40):
        prob = probabilities()
        support = prob[prob > 0]
        if support.max() / support.min() > 100:
            return prob
        with torch.no_grad():
            for parameter in head.parameters():
                parameter.mul_(1.5)
    raise AssertionError("could not sharpen the model")


def random_model(cls, lattice: SquareLattice, seed: int, **kwargs):
    torch.manual_seed(seed)
    model = cls(lattice=lattice, **kwargs).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.add_(0.3 * noise)
    return model


def exact_probabilities(model, n_sites: int):
    basis = enumerate_basis(n_sites)

    def probabilities() -> torch.Tensor:
        with torch.no_grad():
            return torch.exp(2 * model.log_psi(basis).real)

    return probabilities


def uniform_samples(support: torch.Tensor, n_samples: int, seed: int) -> torch.Tensor:
    """Uniform samples over the configurations where `support` is True."""
    states = enumerate_basis(int(support.numel()).bit_length() - 1)[support]
    generator = torch.Generator().manual_seed(seed)
    return states[torch.randint(len(states), (n_samples,), generator=generator)]


def check_sampler(wave_function, prob: torch.Tensor, n_samples: int, epsilon: float) -> None:
    """The sampler passes the G-test; a uniform sampler and an ε-perturbed |Ψ|² fail it."""
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-10)
    support = prob > 0
    assert prob[support].max() / prob[support].min() > 100
    x, log_psi = wave_function.sample(n_samples, torch.Generator().manual_seed(2024))
    torch.testing.assert_close(torch.exp(2 * log_psi.real), prob[basis_index(x)], rtol=1e-9, atol=0)
    assert g_test(x, prob) > THRESHOLD
    assert g_test(uniform_samples(support, n_samples, seed=99), prob) < THRESHOLD
    assert g_test(x, perturbed(prob, epsilon)) < THRESHOLD


def test_pixelcnn_samples_match_born_probabilities():
    lattice = SquareLattice(3, 3)
    model = random_model(PixelCNN, lattice, seed=11, channels=4, layers=3)
    prob = sharpened(model, model.head, exact_probabilities(model, lattice.n_sites))
    check_sampler(model, prob, N_SAMPLES, epsilon=0.1)


def test_pixelcnn_samples_match_born_probabilities_with_total_sz():
    lattice = SquareLattice(4, 3)
    model = random_model(PixelCNN, lattice, seed=12, channels=4, layers=2, total_sz=0)
    prob = sharpened(model, model.head, exact_probabilities(model, lattice.n_sites))
    assert (prob > 0).sum() == 924  # C(12, 6): the Σσᶻ = 0 sector
    check_sampler(model, prob, N_SAMPLES, epsilon=0.1)


def test_symmetrized_samples_match_born_probabilities():
    # The wrapper evaluates Ψ |G| = 16 times per sample: a MADE base keeps that cheap; the
    # PixelCNN sampler it would wrap is tested above.
    lattice = SquareLattice(3, 3)
    model = random_model(DenseNAQS, lattice, seed=13, hidden=16)
    wrapped = SymmetrizedWaveFunction(model, symmetry="lattice_spin_flip")
    prob = sharpened(model, model.output, exact_probabilities(wrapped, lattice.n_sites))
    check_sampler(wrapped, prob, N_SAMPLES, epsilon=0.1)


def test_one_percent_perturbation_is_resolved():
    lattice = SquareLattice(2, 2)
    model = random_model(PixelCNN, lattice, seed=14, channels=2, layers=1)
    prob = sharpened(model, model.head, exact_probabilities(model, lattice.n_sites))
    check_sampler(model, prob, 2**20, epsilon=0.01)
