"""Message engines: where sequenced messages come from (standalone memory, or Kafka)."""

from ..records import Record
from .base import Engine, EngineUnavailable, UnknownTopic

__all__ = ["Engine", "EngineUnavailable", "Record", "UnknownTopic"]
