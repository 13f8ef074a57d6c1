"""xlaserve: sharding."""
