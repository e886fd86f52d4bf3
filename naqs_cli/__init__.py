"""naqs: neural autoregressive quantum states (Sharir et al., PRL 124, 020503, 2020)."""

from pathlib import Path

__version__ = "0.1.0"

#: The Hydra config directory, found by an absolute path from the package (top-level `conf/`).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

from naqs_cli import allocator  # noqa: E402,F401  (malloc thresholds: see its docstring)
