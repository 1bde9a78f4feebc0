"""jedi_jax: JeDi (Joint-Image Diffusion, Zeng et al., CVPR 2024) in JAX/Flax."""

__version__ = "0.1.0"
