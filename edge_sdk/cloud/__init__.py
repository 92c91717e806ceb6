"""Cloud side: publish releases, write desired state, ingest telemetry."""
