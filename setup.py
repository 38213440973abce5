"""Builds the planner's compiled search engine; everything else is declared in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and the
planner runs its pure-Python reference search (same plans, slower; see
``flashcp_planner.strategies.flashcp.NATIVE_AVAILABLE``).
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

engine = Extension(
    "flashcp_planner.strategies._engine",
    ["planner_service/flashcp_planner/strategies/_engine.pyx"],
    # No FMA contraction or fast-math: plans must be byte-identical to the Python reference on any machine.
    extra_compile_args=["-O2", "-ffp-contract=off", "-fno-fast-math"],
)

extensions = cythonize(
    [engine],
    language_level=3,
    compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": False},
)
for extension in extensions:
    extension.optional = True  # a failed compile leaves the Python search (cythonize drops this flag)

setup(ext_modules=extensions)
