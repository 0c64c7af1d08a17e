"""LatentR³ in JAX: reinforced latent reasoning for LLM-based recommendation."""

__version__ = "0.1.0"
