from setuptools import find_packages, setup

setup(
    name="clusjax",
    version="0.1.0",
    description="Clus (clustering swap prediction) image-text pre-training in JAX/Flax",
    packages=find_packages(include=["clusjax", "clusjax.*"]),
    python_requires=">=3.10",
    extras_require={"tpu": ["jax[tpu]==0.10.2"]},
)
