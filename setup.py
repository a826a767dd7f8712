"""Builds the compiled core ``xdsfast._core``; all metadata lives in pyproject.toml.

``XDSFAST_NO_EXTENSIONS=1`` at build time skips the extension and yields a
pure-Python package (the twin then serves at run time).
"""

import os

from setuptools import Extension, setup

ext_modules = []
if not os.environ.get("XDSFAST_NO_EXTENSIONS"):
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [Extension("xdsfast._core", ["src/xdsfast/_core.pyx"], extra_compile_args=["-O3"])],
        compiler_directives={"language_level": "3", "embedsignature": True},
    )

setup(ext_modules=ext_modules)
