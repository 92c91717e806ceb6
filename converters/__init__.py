"""Converters: check → prune → quantize → export per target → validate → release."""
