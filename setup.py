"""Builds the compiled core ``xdsfast._core``; all metadata lives in pyproject.toml.

``XDSFAST_NO_EXTENSIONS=1`` at build time skips the extension and yields a
pure-Python package (the twin then serves at run time).
"""

import os
import sys

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("XDSFAST_NO_EXTENSIONS"):
    if os.environ.get("CIBUILDWHEEL"):  # a release wheel must carry the compiled core
        sys.exit("xdsfast: refusing to build a pure-Python wheel under cibuildwheel")
else:
    from Cython.Build import cythonize

    ext_modules = cythonize(
        # -g0: no debug info in the shipped module (a third of its size otherwise)
        [
            Extension(name, [f"src/xdsfast/{name[8:]}.pyx"], extra_compile_args=["-O3", "-g0"])
            # the peeker; the HTTP/2 engine's per-read path; the relay's per-message path
            for name in ("xdsfast._core", "xdsfast._h2", "xdsfast._route", "xdsfast._dnstable")
        ],
        compiler_directives={"language_level": "3", "embedsignature": True},
    )

setup(ext_modules=ext_modules)
