"""The serving engine: continuous batching over one model, without any HTTP (server/ adds it)."""

from mistral7b.engine.engine import (
    Engine,
    EngineClosedError,
    EngineOutput,
    EngineStats,
    QueueFullError,
)

__all__ = ["Engine", "EngineClosedError", "EngineOutput", "EngineStats", "QueueFullError"]
