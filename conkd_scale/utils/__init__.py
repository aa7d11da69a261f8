"""Small shared helpers: clear errors, atomic file writes, rank-0 logging."""
