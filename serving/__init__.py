"""xlaserve: serving."""
