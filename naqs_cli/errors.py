"""The one exception family of naqs: every error a user can cause or a run can end with.

Each class carries the process exit code; `cli.py` catches `NaqsError` once and prints its
message as one line (``naqs <command>: error: ...``), without a traceback.

=====  =====================================================================
code   meaning
=====  =====================================================================
1      an input/output failure (`OSError`, reported by the CLI itself)
2      a user mistake: config, command line, checkpoint (`ConfigError`, ...)
3      training diverged through every rollback (`TrainingDivergedError`)
130    SIGINT stopped a run after saving (`InterruptedRunError`; 143 SIGTERM)
=====  =====================================================================
"""

from __future__ import annotations


class NaqsError(Exception):
    """Base of every naqs error; `exit_code` is what the process exits with."""

    exit_code = 1


class ConfigError(NaqsError, ValueError):
    """A user mistake in the composed configuration (one line naming key, value, fix)."""

    exit_code = 2


class UserError(NaqsError):
    """A mistake on the command line itself (arguments, flags, launcher)."""

    exit_code = 2


class CheckpointError(NaqsError, ValueError):
    """A checkpoint that is missing, unreadable, of another format or incompatible."""

    exit_code = 2


class TrainingDivergedError(NaqsError, RuntimeError):
    """Non-finite energies or gradients persisted through every rollback."""

    exit_code = 3


class InterruptedRunError(NaqsError):
    """SIGINT/SIGTERM stopped training; the message says the step reached and how to resume.

    Attributes:
        exit_code: 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PeerFailedError(NaqsError, RuntimeError):
    """Another torchrun rank failed (rank 0 reports why); this rank stops with its code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def first_line(err: BaseException) -> str:
    """Return the first line of an error message (at most 200 characters), for one-line reports."""
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
