"""mmada-jax: a JAX/TPU training stack for MMaDA, the multimodal masked diffusion language model."""

__version__ = "0.1.0"
