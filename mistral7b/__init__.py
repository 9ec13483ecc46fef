"""mistral7b: the Mistral 7B paper's system (GQA, sliding-window attention, rolling-buffer cache,
chunked pre-fill) as a Python package.

    import mistral7b
    llm = mistral7b.load("path/to/model")
    print(llm.generate("The capital of France is", max_tokens=16, temperature=0).text)
"""

from mistral7b.config import ModelConfig
from mistral7b.errors import (
    ConfigError,
    ContextLengthError,
    InvalidArgumentError,
    LoadError,
    Mistral7BError,
    TokenizerError,
)
from mistral7b.generate import GenerationResult, StreamPiece
from mistral7b.llm import LLM, load
from mistral7b.sampling import InvalidSamplingParam, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "ConfigError",
    "ContextLengthError",
    "GenerationResult",
    "InvalidArgumentError",
    "InvalidSamplingParam",
    "LoadError",
    "Mistral7BError",
    "ModelConfig",
    "SamplingParams",
    "StreamPiece",
    "TokenizerError",
    "load",
]
