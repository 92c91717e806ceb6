"""The device daemon: serves models locally, keeps them in sync, reports telemetry."""
