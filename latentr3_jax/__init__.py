"""LatentR³ in JAX: reinforced latent reasoning for LLM-based recommendation."""

__version__ = "0.1.0"


def __getattr__(name):
    # `from latentr3_jax import Recommender` without importing JAX for everything else
    # (the command line's --help and --version stay instant)
    if name in ("Recommender", "Recommendation"):
        from latentr3_jax import recommend   # start-up cost: JAX and the model, on first use
        return getattr(recommend, name)
    raise AttributeError(f"module 'latentr3_jax' has no attribute {name!r}")
