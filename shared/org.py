"""A worker's ``org`` label (``--org``): the check its sender makes and its receivers repeat. Pure."""

from __future__ import annotations

from shared.errors import ConfigError

ORG_MAX = 64


def check_org(org: str) -> str:
    """``--org`` as given, stripped; ``ConfigError`` for a label a table cannot show (control
    characters, or more than ``ORG_MAX`` characters)."""
    org = org.strip()
    if len(org) > ORG_MAX or not org.isprintable():
        raise ConfigError(f"--org must be at most {ORG_MAX} printable characters, not {org!r}")
    return org


def received_org(org: object) -> str:
    """An org as a message carried it: checked as ``check_org`` does; one that fails is dropped ("")."""
    if not isinstance(org, str):
        return ""
    try:
        return check_org(org)
    except ConfigError:
        return ""
