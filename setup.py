"""Which folders the wheel carries (everything else is in pyproject.toml): domain/ and worker/, and the
top-level migrations/ folder as the package ``foundry_migrations``, so an installed Foundry can migrate."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["domain", "domain.*", "worker", "worker.*"]), "foundry_migrations"],
    package_dir={"foundry_migrations": "migrations"},
)
