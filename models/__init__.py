"""xlaserve: models."""
