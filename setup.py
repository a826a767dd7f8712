"""Builds the four compiled cores; all metadata lives in pyproject.toml.

``xdsfast._core`` (the wire peeker), ``xdsfast.engines.fast._h2`` (the fast engine's
per-read path), ``xdsfast._route`` (the relay's per-message path) and ``xdsfast._dnstable``
(the DNS proxy's name table).  Each has a pure-Python twin (``<module>_py``), which serves
where the compiled one is missing.  ``XDSFAST_NO_EXTENSIONS=1`` at build time skips them
all and yields a pure-Python package.
"""

import os
import sys

from setuptools import Extension, setup

# Each compiled core: its module and its source.
CORES = [
    ("xdsfast._core", "src/xdsfast/_core.pyx"),
    ("xdsfast.engines.fast._h2", "src/xdsfast/engines/fast/_h2.pyx"),
    ("xdsfast._route", "src/xdsfast/_route.pyx"),
    ("xdsfast._dnstable", "src/xdsfast/_dnstable.pyx"),
]
# -g0: no debug info in the shipped modules (a third of their size otherwise)
FLAGS = ["-O3", "-g0"]

ext_modules = []
if os.environ.get("XDSFAST_NO_EXTENSIONS"):
    if os.environ.get("CIBUILDWHEEL"):  # a release wheel must carry the compiled cores
        sys.exit("xdsfast: refusing to build a pure-Python wheel under cibuildwheel")
else:
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [Extension(name, [source], extra_compile_args=FLAGS) for name, source in CORES],
        compiler_directives={"language_level": "3", "embedsignature": True},
    )

setup(ext_modules=ext_modules)
