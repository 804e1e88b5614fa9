"""qop optimizers (filled in below)."""
