"""Errors a user can cause. Each message names the file, the field or the value, and the fix.

The CLI prints these as one line and exits with status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class Mistral7BError(Exception):
    """Base class of every error caused by user input (paths, files, options, requests)."""


class ConfigError(Mistral7BError):
    """A model configuration (params.json, config.json, GGUF metadata) we cannot run."""


class LoadError(Mistral7BError):
    """A checkpoint that is missing, corrupt, truncated, or does not match its configuration."""


class TokenizerError(Mistral7BError):
    """No tokenizer, or a tokenizer that cannot do what was asked."""


class ContextLengthError(Mistral7BError):
    """A sequence that would run past what the model (or its cache) can attend to."""


class InvalidArgumentError(Mistral7BError, ValueError):
    """An option or request field out of range."""
