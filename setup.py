"""jedi_jax: JeDi (Joint-Image Diffusion, CVPR 2024) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="jedi_jax",
    version="0.1.0",
    description="Finetuning-free personalized text-to-image generation (JeDi) in JAX/Flax",
    packages=find_packages(include=["jedi_jax", "jedi_jax.*"]),
    package_data={"jedi_jax": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=[
        # Tested with jax 0.10.2, flax 0.12.8, optax 0.2.8, orbax 0.12.8 (what this project's package
        # index serves, so CI installs exactly these), and on a GPU with jax 0.11.2 + flax 0.12.10;
        # flax 0.12.8 does not import under jax 0.11: with jax 0.11 take flax >= 0.12.10 (pip's
        # newest-first choice does). The bounds keep to minor versions whose NNX / orbax APIs we use.
        "jax>=0.10,<0.12",
        "flax>=0.12.8,<0.14",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "ml_collections>=1.1",
        "transformers>=5.0,<6",  # tokenizer only: transformers v5 has no Flax models
        "safetensors>=0.5",
        "array_record>=0.8",
        "numpy",
        "scipy",  # t and normal quantiles of MiniBench's bootstrap CIs (also a jax requirement)
        "pillow",
        "tqdm",
        "matplotlib",
        "tensorboardX",
    ],
    extras_require={
        # PyTorch references for the parity tests. torch==2.13.0: this project's index serves its CPU
        # wheel (2.13.0+cpu); from public PyPI on Linux it is the CUDA build (works, several GB more).
        # setuptools: tests/test_packaging.py builds the wheel without build isolation.
        "test": ["torch==2.13.0", "diffusers==0.42.1", "pytest", "pytest-xdist", "nbclient", "ipykernel",
                 "setuptools", "tensorflow-datasets>=4.9", "importlib_resources"],
        # Building the TFDS dataset uses tensorflow-datasets (our builder hands it encoded PNGs, so no
        # TensorFlow is imported); reading array_record needs neither (jedi_jax.data.set_source).
        "data": ["tensorflow-datasets>=4.9", "importlib_resources"],
    },
)
