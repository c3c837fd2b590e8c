"""Gateway unit tests."""
