"""Device-side MQTT sync: durable outbox → sync service → thin paho transport."""
