"""Packages of the distribution (the metadata is in pyproject.toml): ``attnlab``, ``kernels_pallas``, and the
repository's ``experiments/`` shipped as ``attnlab.experiments`` (its gin files, folders included), so that an
installed attnlab finds ``experiments/*.gin`` from any directory."""

from setuptools import find_namespace_packages, setup

EXPERIMENTS = ["attnlab.experiments", *(f"attnlab.experiments.{p}" for p in find_namespace_packages("experiments"))]

setup(
    packages=[*find_namespace_packages(include=["attnlab*", "kernels_pallas*"]), *EXPERIMENTS],
    package_dir={"attnlab.experiments": "experiments"},
    package_data={p: ["*.gin"] for p in EXPERIMENTS},
)
