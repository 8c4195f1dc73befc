"""Guard chain (placeholder)."""
