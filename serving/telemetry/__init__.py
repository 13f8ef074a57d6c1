"""What the server reports about itself: Prometheus metrics, structured logs, and the count of
compiles outside warm-up (which must stay zero)."""
