"""Build of the compiled decoder; the package metadata lives in pyproject.toml.

``pipeline._avrocol`` is plain C against CPython's API (no third-party C library), so
``pip install .`` needs only a C compiler.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("pipeline._avrocol", ["pipeline/_avrocol.c"], extra_compile_args=["-O2"]),
    ],
)
