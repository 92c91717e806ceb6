"""On-device runtime: backends, EdgeModel, resource monitor, precision policy, sync, alignment."""
