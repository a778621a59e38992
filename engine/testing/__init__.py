"""Helpers for testing dccsign and systems built on it (like ``trio.testing``): nothing here
runs in the engine."""
