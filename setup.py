"""Installs the `mmada_jax` package and the `mmada-jax` console script."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.0",
    "flax>=0.12.0",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.12.0",
    "ml-collections>=1.0.0",
    "absl-py>=2.0",
    "numpy>=2.0",
    "ml-dtypes>=0.5",
    "safetensors>=0.4",
    "einops>=0.8",
    "tqdm>=4.60",
    "psutil>=5.9",
    "scipy>=1.10",
    # data: text tokenizers, grain pipelines, ArrayRecord / tensorflow-datasets (no TensorFlow needed), images, Parquet
    "tokenizers>=0.20",
    "grain>=0.2.12",
    "array-record>=0.7",
    "tensorflow-datasets>=4.9.8",
    "pillow>=10.0",
    "pyarrow>=15.0",
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
]

EXTRAS = {
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "ruff>=0.17,<0.18"],  # ruff: the lint step of .ci/run (pyproject.toml)
    # Cloud TPU VMs: the TPU build of jaxlib (libtpu). Also enables AOT compilation for TPU topologies on a CPU host.
    "tpu": ["jax[tpu]>=0.10.0"],
    "gpu": ["jax[cuda12]>=0.10.0"],
}

setup(
    name="mmada-jax",
    version="0.1.0",
    description="JAX/TPU training stack for MMaDA, the multimodal masked diffusion language model",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mmada_jax", "mmada_jax.*"]),
    python_requires=">=3.11",  # jax, flax, orbax-checkpoint and grain need 3.11
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mmada-jax=mmada_jax.cli:main"]},
)
