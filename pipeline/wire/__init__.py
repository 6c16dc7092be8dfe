"""The wire format: versioned msgpack messages (`messages`) and every MQTT topic and Redis key (`names`)."""
