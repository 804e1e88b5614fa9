"""qop.nn (see StableEmbedding)."""
