from setuptools import find_packages, setup

setup(
    name="latentr3_jax",
    version="0.1.0",
    description="LatentR³ (reinforced latent reasoning for LLM-based recommendation) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["latentr3_jax", "latentr3_jax.*"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "transformers>=5.24,<6",
        "tensorflow-datasets>=4.9.10,<5",
        "array_record>=0.8.6,<0.9",
        "importlib_resources>=7.1",
        "ml-collections>=1.1,<2",
        "einops>=0.8.2,<0.9",
        "safetensors>=0.8,<0.9",
        "tokenizers>=0.23.3,<0.24",
        "gguf>=0.19,<1",
        "numpy>=2.4,<3",
        "tqdm>=4.70",
        "matplotlib>=3.11,<4",
    ],
    extras_require={
        "test": ["pytest>=9.2,<10", "pytest-xdist>=3.8,<4", "hypothesis>=6.170,<7",
                 "torch==2.13.0", "accelerate>=1.15,<2", "tensorboard>=2.18,<3"],
    },
    entry_points={"console_scripts": ["latentr3=latentr3_jax.cli:main"]},
)
