"""Kafka-native WebSocket gateway: subjects over WebSocket, Kafka (or memory) underneath."""

#: The one place the version is written: pyproject.toml reads it (dynamic version), `--version`,
#: /healthz and /metrics report it. Bump it with a CHANGELOG.md entry.
__version__ = "0.1.0"
