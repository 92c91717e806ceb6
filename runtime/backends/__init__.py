"""Runtime backends, one module each, registered lazily by name."""
