"""Defaults of the token layer that callers above it name (the CLI's options) without loading any model."""

from pathlib import Path

DEFAULT_TOKENS_DIR = Path("custom_tokens")  # the token store, relative to where the engine runs
