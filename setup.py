"""The folders components/, pipelines/ and conf/ install as kubellama.components, kubellama.pipelines and
kubellama.conf (metadata and dependencies are in pyproject.toml). Nothing else goes into site-packages: a package
named `components` or `conf` there would clash with other distributions and shadow or be shadowed by them."""
from setuptools import find_namespace_packages, setup

TOP = ("components", "pipelines", "conf")
setup(
    packages=[f"kubellama.{p}" for p in find_namespace_packages(include=[f"{t}*" for t in TOP])],
    package_dir={f"kubellama.{t}": t for t in TOP},
)
