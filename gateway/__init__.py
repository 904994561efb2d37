"""Kafka-native WebSocket gateway: subjects over WebSocket, Kafka (or memory) underneath."""

__version__ = "0.1.0"
