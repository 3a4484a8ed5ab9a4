"""Shared platform pieces: the settings object, the command line, the local Kafka broker, the demo."""
