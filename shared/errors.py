"""One rooted exception tree for fedq, split by layer.

Errors that reach the command line carry an exit code (see ``fedq.cli``).
"""

from __future__ import annotations

from shared.reasons import Reason


class FedqError(Exception):
    """Root of every error fedq raises on purpose."""

    exit_code = 1


class ConfigError(FedqError):
    """A setting, flag or file given by the user is invalid."""

    exit_code = 2


class WireError(FedqError):
    """Bytes from the network could not be turned into a trusted message.

    ``reason`` is a short machine-readable tag that ends up in the dead-letter
    header; ``raw`` keeps the offending bytes for inspection.
    """

    reason: Reason = Reason.UNDECODABLE

    def __init__(self, message: str, raw: bytes = b"") -> None:
        super().__init__(message)
        self.raw = raw


class DecodeError(WireError):
    """The bytes are not a well-formed fedq envelope of a known version and kind."""

    reason = Reason.UNDECODABLE


class UnknownSignerError(WireError):
    """The envelope names a signer whose public key is not trusted."""

    reason = Reason.UNKNOWN_SIGNER


class BadSignatureError(WireError):
    """The signature does not verify, or the payload does not match its sha256."""

    reason = Reason.BAD_SIGNATURE


class ScreeningError(FedqError):
    """A well-formed, correctly signed update that must not touch the model."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class BrokerError(FedqError):
    """The broker refused something we asked, or is unreachable."""

    exit_code = 3


class TopologyConflictError(BrokerError):
    """An existing queue or exchange was declared with different arguments."""


class ServiceFailure(FedqError):
    """A service cannot go on (its store or broker failed under it): it stops, and the message
    it was handling stays unsettled for a restart or a standby to take."""

    exit_code = 5


class StoreError(FedqError):
    """The model store is missing an object or holds a corrupt one."""

    exit_code = 4


class AppError(FedqError):
    """The user's app (``module:object``) cannot be loaded or misbehaves."""

    exit_code = 2
