"""Build script: the package mapping and the native extension.

DCCSIGN_BUILD_NATIVE=1  the native extension is mandatory (a failed build is an error; CI sets it)
DCCSIGN_BUILD_NATIVE=0  skip it (pure-Python reference only)
unset                   try it, and fall back to the reference if it cannot be built
"""

import os

from setuptools import setup
from setuptools.extension import Extension

mode = os.environ.get("DCCSIGN_BUILD_NATIVE", "")
ext_modules = []
if mode != "0":
    ext_modules = [
        Extension(
            "dccsign.native._native",
            sources=["native/_native.pyx", "native/src/dcccore.c", "native/src/keydcore.c",
                     "native/src/noncepool.c",
                     "native/src/walker.c"],
            include_dirs=["native/src"],
            libraries=["crypto", "z", "deflate"],
            extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
            optional=(mode != "1"),
        )
    ]
    if ext_modules:
        from Cython.Build import cythonize

        ext_modules = cythonize(
            ext_modules,
            language_level=3,
            compiler_directives={"embedsignature": True, "boundscheck": False,
                                 "wraparound": False, "initializedcheck": False},
        )

setup(
    packages=["dccsign", "dccsign.native", "dccsign.protocol", "dccsign.testing"],
    package_dir={"dccsign": "engine", "dccsign.native": "native", "dccsign.protocol": "protocol"},
    package_data={"dccsign": ["data/*.json", "py.typed"]},
    ext_modules=ext_modules,
)
