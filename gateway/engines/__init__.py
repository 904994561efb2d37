"""Message engines: where sequenced messages come from (standalone memory, or Kafka)."""

from .base import Engine, EngineUnavailable, Record, UnknownTopic

__all__ = ["Engine", "EngineUnavailable", "Record", "UnknownTopic"]
