"""The kernel every fnplane component shares, at the bottom of the layers: the messages that
cross NATS and the records kept in Redis, the NATS conversations, the bus, telemetry, the
typed configuration, the Redis store and process supervision. It imports nothing of ours."""
