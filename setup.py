"""Build of the `fanout` Cython extension (the hot path).

pip passes no build flags, so switches come from the environment:
  FANOUT_ANNOTATE=1      write Cython's HTML annotation next to each .pyx
  FANOUT_CYTHON_TRACE=1  compile with line tracing (coverage/profiling; slow)
A failed compile fails the install: there is no silent pure-Python fallback.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

TRACE = os.environ.get("FANOUT_CYTHON_TRACE") == "1"

directives = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "embedsignature": True,
    "initializedcheck": False,
}
macros = []
if TRACE:
    directives.update(linetrace=True, binding=True)
    macros.append(("CYTHON_TRACE_NOGIL", "1"))

MODULES = ["_frame", "_ring", "_writer", "_ws", "_msgs"]
extensions = [
    Extension(
        f"fanout.{name}",
        [f"fanout/{name}.pyx"],
        define_macros=macros,
        extra_compile_args=["-O2"],
    )
    for name in MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=os.environ.get("FANOUT_ANNOTATE") == "1",
    ),
)
