"""Keep secrets out of every file, log line and tracked config the job writes.

Redaction works two ways: by key name (a config key whose name says secret, token, password or key)
and by value (the current values of the secret environment variables, wherever they appear).
"""

import logging
import os
import re
from typing import Any

REDACTED = "***redacted***"

# Environment variables whose values are always secret.
SECRET_ENV_NAMES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "WANDB_API_KEY")

# A name is secret when one of its "_"/"."/"-" separated words is one of these. `latent_dim` and
# `monkey` stay visible; `api_key`, `AWS_SECRET_ACCESS_KEY` and `db.password` do not.
_SECRET_WORDS = {"secret", "secrets", "token", "tokens", "password", "passwd", "key", "keys", "apikey", "credential",
                 "credentials"}
_WORD_SPLIT = re.compile(r"[_.\-\s]+")

# Values shorter than this are not searched for: a 3-character "secret" would redact ordinary words.
_MIN_SECRET_LENGTH = 6


def is_secret_name(name: str) -> bool:
    """Return whether a config key or environment variable name marks its value as secret."""
    words = {word.lower() for word in _WORD_SPLIT.split(name) if word}
    return bool(words & _SECRET_WORDS)


def secret_values() -> list[str]:
    """Return the values of secret environment variables set in this process, longest first."""
    values = {
        value
        for name, value in os.environ.items()
        if (name in SECRET_ENV_NAMES or is_secret_name(name)) and len(value) >= _MIN_SECRET_LENGTH
    }
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, values: list[str] | None = None) -> str:
    """Replace every occurrence of a secret value in `text`."""
    for value in values if values is not None else secret_values():
        text = text.replace(value, REDACTED)
    return text


def redact(data: Any, values: list[str] | None = None) -> Any:
    """Return a copy of nested dicts/lists with secret-named keys and secret values replaced."""
    values = values if values is not None else secret_values()
    if isinstance(data, dict):
        return {
            key: REDACTED if is_secret_name(str(key)) and value is not None else redact(value, values)
            for key, value in data.items()
        }
    if isinstance(data, (list, tuple)):
        return type(data)(redact(item, values) for item in data)
    if isinstance(data, str):
        return redact_text(data, values)
    return data


class RedactingFilter(logging.Filter):
    """A logging filter that removes secret values from each record's formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        values = secret_values()
        if values:
            message = record.getMessage()
            redacted = redact_text(message, values)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True
