"""One error hierarchy for the whole package.

Every class also subclasses the matching built-in exception, so callers that
catch ``ValueError`` or ``FileNotFoundError`` keep working. Each class carries
its exit code (``exit_code``), which the command line returns: ``2`` for bad
input, ``1`` for a check that ran and failed.
"""

from __future__ import annotations

import warnings


class EraseProError(Exception):
    """Base class of every error raised on purpose by erasepro_hub."""

    exit_code = 2


# --------------------------------------------------------------------------- bad input (exit 2)
class ManifestError(EraseProError, ValueError):
    """A manifest is malformed; the message names the field path and the fix."""

    def __init__(self, message: str, *, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        #: ``[(field.path, problem), ...]`` as reported by validation.
        self.problems = problems or []


class BaseModelError(EraseProError, FileNotFoundError):
    """The base model named in a manifest cannot be found or is not a supported pipeline."""


class UnsupportedModelError(EraseProError, ValueError):
    """The base model exists but its architecture is not one erasepro_hub can edit."""


class PromptError(EraseProError, ValueError):
    """Prompts cannot be tokenised into the positions the token policy needs."""


class OutputExistsError(EraseProError, FileExistsError):
    """The output folder exists and ``--overwrite`` was not given."""


class InvalidRefError(EraseProError, ValueError):
    """A Hub repository id or revision is malformed (whitespace, control characters, backticks, ...)."""


class OutputBusyError(EraseProError, BlockingIOError):
    """Another process is writing the same output folder right now."""


class UnsafePathError(EraseProError, ValueError):
    """A path would escape the folder it must stay in."""


class AdapterFormatError(EraseProError, ValueError):
    """An adapter file is missing, truncated, or not in the expected format."""


class BaseMismatchError(AdapterFormatError):
    """An adapter was made for other base weights than the ones it is applied to."""


class HubError(EraseProError, RuntimeError):
    """A Hub operation failed; the message says whether retrying can help.

    Exit code 1 for failures of the Hub or the connection (retrying can help), 2 for
    what the user must change (a missing repository or revision, a bad token).
    """

    exit_code = 1

    def __init__(self, message: str, *, bad_input: bool = False):
        super().__init__(message)
        if bad_input:
            self.exit_code = 2


# --------------------------------------------------------------------------- failed checks (exit 1)
class VerificationError(EraseProError, AssertionError):
    """A verification ran and found a difference (tampered file, edited manifest, drift)."""

    exit_code = 1


class CapacityError(EraseProError, ArithmeticError):
    """Under ``strict``, the zero-residual constraints could not all be met."""

    exit_code = 1


# --------------------------------------------------------------------------- warnings
class EraseProWarning(UserWarning):
    """Base class of erasepro_hub warnings."""


class CapacityWarning(EraseProWarning):
    """The constraints were dependent or beyond a site's capacity; a least-squares answer was used."""


def warn(message: str, category: type[Warning] = EraseProWarning, *, depth: int = 1) -> None:
    """Emit a warning attributed to the caller of the library function (``depth`` frames above ``warn``'s caller)."""
    warnings.warn(message, category, stacklevel=2 + depth)


__all__ = [
    "AdapterFormatError",
    "BaseMismatchError",
    "BaseModelError",
    "CapacityError",
    "CapacityWarning",
    "EraseProError",
    "EraseProWarning",
    "HubError",
    "InvalidRefError",
    "ManifestError",
    "OutputBusyError",
    "OutputExistsError",
    "PromptError",
    "UnsafePathError",
    "UnsupportedModelError",
    "VerificationError",
]
