"""The one exception tree of edge-sdk.

Every error the SDK raises on purpose is an :class:`EdgeSDKError`; third-party exceptions are
translated into one of these at the boundary where they occur, so callers catch one family and
the CLI turns any of them into a single clear line.
"""

from __future__ import annotations


class EdgeSDKError(Exception):
    """Base class of every error edge-sdk raises on purpose."""


class ConfigError(EdgeSDKError):
    """A configuration value, device profile or command-line option is invalid."""


class ModelError(EdgeSDKError):
    """A model file is missing, corrupt, unsafe or uses something we cannot handle."""


class ConversionError(EdgeSDKError):
    """A conversion step failed on a valid model: a one-line message, and the tool's full output in ``log``."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


class ToolchainError(EdgeSDKError):
    """An isolated converter toolchain is missing, broken, failed or timed out."""


class IntegrityError(EdgeSDKError):
    """A release, manifest, signature, chunk or artifact does not check."""


class MissingDependencyError(EdgeSDKError):
    """An optional package is not installed; the message names the extra to install."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed: "
            f"pip install 'edge-sdk[{extra}]'"
        )


class BackendError(EdgeSDKError):
    """A runtime backend could not load or run an artifact."""


class InputError(EdgeSDKError):
    """Inference inputs do not match the model's signature."""


class AlignError(EdgeSDKError):
    """Timestamp streams given to the aligner are invalid."""


class SyncError(EdgeSDKError):
    """Device/cloud synchronisation failed (broker, payload, storage)."""


class OutboxFullError(SyncError):
    """The telemetry outbox is at its quota and its policy is ``reject``."""
