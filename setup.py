"""Builds generate caspo.protos from protos/ (see caspo/protogen.py); everything else is in pyproject.toml."""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self):
        from caspo.protogen import generate

        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
