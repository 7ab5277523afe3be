"""Package discovery for the split layout: posttrain/ -> posttrain, operator/ -> posttrain.operator,
trainer/ -> posttrain.trainer. Everything else lives in pyproject.toml."""

from setuptools import find_packages, setup

ROOTS = {"posttrain": "posttrain", "posttrain.operator": "operator", "posttrain.trainer": "trainer"}


def _packages() -> list[str]:
    found = []
    for name, folder in ROOTS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


setup(packages=_packages(), package_dir=ROOTS)
