"""Size limits, named once and quoted in every error message that enforces them."""

#: Largest lattice for `sampler=fullsum` (all 2^N states held at once).
FULLSUM_MAX_SITES = 16
#: Largest lattice for exact diagonalization.
ED_MAX_SITES = 24
#: Past this many sites ED uses a matrix-free `LinearOperator` instead of a sparse matrix.
ED_SPARSE_MAX_SITES = 20
