"""prompt_jax: prompt tuning (Lester et al., 2021) on a frozen T5, in JAX/Flax."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent


def _package_files(root: str, pattern: str) -> list[str]:
    base = HERE / root
    return sorted(str(p.relative_to(base)) for p in base.rglob(pattern))


# Versions are the ones the test suite runs against (CI installs exactly these).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "gin-config==0.5.0",
    "seqio==0.0.20",
    # tensorflow-text pins the matching `tensorflow` (CPU-only unless its
    # `and-cuda` extra is asked for); a separate tensorflow-cpu would install TF twice.
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    "transformers==5.23.0",
    "safetensors==0.8.0",
    "tensorstore==0.1.86",
    "msgpack==1.2.4",
    "numpy>=2.0,<3",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    # `prompt-jax serve`
    "fastapi==0.142.2",
    "uvicorn==0.54.0",
]

TEST_REQUIRES = [
    "pytest>=8",
    # The CPU build; an unpinned torch pulls a multi-GB CUDA build.
    "torch==2.13.0",
    "peft==0.21.2",
    "ruff==0.17.6",
    "httpx==0.28.1",  # tests/test_serve.py talks to the server over HTTP
]

setup(
    name="prompt_jax",
    version="0.1.0",
    description=__doc__,
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["prompt_jax", "prompt_jax.*"])
    + ["prompt_jax.tasks", "prompt_jax.gin_configs"],
    package_dir={
        "prompt_jax.tasks": "tasks",
        "prompt_jax.gin_configs": "gin_configs",
    },
    package_data={
        "prompt_jax.gin_configs": _package_files("gin_configs", "*.gin"),
        "prompt_jax": ["demo_data/**/*"],
    },
    include_package_data=False,
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    entry_points={"console_scripts": ["prompt-jax=prompt_jax.cli:main"]},
)
