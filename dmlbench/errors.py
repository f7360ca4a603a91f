"""Exceptions with one clear sentence for the user.

Every error a user can cause derives from :class:`DmlbenchError`; the CLI prints its message (one
sentence saying what is wrong and what to do) and exits with status 2, without a traceback.
"""

from __future__ import annotations


class DmlbenchError(Exception):
    """A problem the user can fix; ``str(err)`` is shown to them as is.

    ``exit_code`` is the command's exit status when it ends with this error (2: bad input).
    """

    exit_code = 2


class ConfigError(DmlbenchError, ValueError):
    """An invalid configuration value, name or file."""


class UnknownNameError(ConfigError, KeyError):
    """A name that is not in a registry (method, dataset, backbone, ...)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DatasetError(DmlbenchError):
    """A dataset is missing, malformed or cannot form the requested batches."""


class CheckpointError(DmlbenchError):
    """A checkpoint cannot be read or belongs to another run."""


class Diverged(DmlbenchError):
    """Training produced a non-finite loss; ``step`` says where."""

    def __init__(self, step: int, value: float, terms: dict[str, float] | None = None):
        self.step = step
        self.value = value
        self.terms = dict(terms or {})
        detail = ", ".join(f"{k}={v:.4g}" for k, v in self.terms.items())
        super().__init__(
            f"training diverged at step {step}: loss is {value}"
            + (f" ({detail})" if detail else "")
            + "; lower the learning rate or the method's scales, or enable gradient clipping."
        )


def close_matches(name: str, valid: list[str]) -> list[str]:
    """Names in ``valid`` that look like ``name`` (for 'did you mean' hints)."""
    import difflib

    found = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    tokens = set(name.lower().replace("-", "_").split("_"))
    found += [v for v in valid if v not in found and v.lower() in tokens]
    return found[:3]


class SweepInterrupted(DmlbenchError):
    """The driver was interrupted (Ctrl-C); the experiment state is saved and the sweep can be resumed."""

    exit_code = 130  # the shell's code for a command ended by SIGINT


class ClusterError(DmlbenchError):
    """The Ray cluster cannot be joined (address, token, version); nothing was started."""


class SweepIncomplete(DmlbenchError):
    """The sweep ran, but some cell produced no complete trial (its rows say why)."""

    exit_code = 1


class JobFailed(DmlbenchError):
    """A submitted Ray Job ended FAILED or STOPPED."""

    exit_code = 1
