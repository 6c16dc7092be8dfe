"""Broker clients and process lifecycle: MQTT and Redis clients, heartbeats, result recording,
embedded brokers for replay and tests."""
