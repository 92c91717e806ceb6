"""Multimodal timestamp alignment."""
