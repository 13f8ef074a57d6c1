"""xlaserve: export."""
