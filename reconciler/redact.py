"""Removing secrets from text before it is logged, stored in the ledger or printed."""

from collections.abc import Iterable

MASK = "**********"


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
