"""Kafka helpers: a real single-node local broker for demos and integration tests."""
