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


class TooLargeError(WireError):
    """A message above the size cap (``--max-message-bytes``): refused on arrival before anything in it
    is unpacked or hashed, and refused before it is published."""

    reason = Reason.TOO_LARGE


class DecodeError(WireError):
    """The bytes are not a well-formed fedq envelope of a known version and kind."""

    reason = Reason.UNDECODABLE


class UnknownSignerError(WireError):
    """The envelope names a signer whose public key is not trusted."""

    reason = Reason.UNKNOWN_SIGNER


class BadSignatureError(WireError):
    """The signature does not verify, or the payload does not match its sha256."""

    reason = Reason.BAD_SIGNATURE


class WrongRoleError(WireError):
    """A trusted key signed a kind of message its role may not send (a worker's key announcing a version)."""

    reason = Reason.WRONG_ROLE


class WrongWorkerError(WireError):
    """A worker's key signed a message that speaks for another worker id."""

    reason = Reason.WRONG_WORKER


class UnknownTaskError(WireError):
    """An update answers no task the coordinator signed (or one of another job or incarnation)."""

    reason = Reason.UNKNOWN_TASK


class UnsignedVersionError(WireError):
    """A stored version's manifest has no valid signature by a key allowed to make it."""

    reason = Reason.UNSIGNED_VERSION


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


class CorruptVersionError(StoreError):
    """A stored manifest that cannot be read as one, or names another version or job than its key:
    whoever wrote it did not make it, so it is refused like an unsigned one."""


class AppError(FedqError):
    """The user's app (``module:object``) cannot be loaded or misbehaves."""

    exit_code = 2
