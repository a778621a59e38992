"""Build script: the package mapping and the native extension.

DCCSIGN_BUILD_NATIVE=1  the native extension is mandatory (a failed build is an error; CI sets it)
DCCSIGN_BUILD_NATIVE=0  skip it (pure-Python reference only)
unset                   try it, and fall back to the reference if it cannot be built
"""

import glob
import os

from setuptools import setup
from setuptools.extension import Extension

mode = os.environ.get("DCCSIGN_BUILD_NATIVE", "")
ext_modules = []
if mode != "0":
    ext_modules = [
        Extension(
            "dccsign.native._native",
            # Every C file of native/src: each part of the native core brings its own.
            sources=["native/_native.pyx", *sorted(glob.glob("native/src/*.c"))],
            # Headers hold static inline helpers: a header-only change must rebuild too.
            depends=sorted(glob.glob("native/src/*.h")),
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
            compiler_directives={
                "embedsignature": True,
                "boundscheck": False,
                "wraparound": False,
                "initializedcheck": False,
            },
        )

# The engine's rooms are folders of engine/; the native core, the protocol and the benchmark
# drivers live in folders of their own (see README, Layout).
ENGINE_ROOMS = ["server", "keyd", "keys", "dcc", "audit", "cli", "testing"]

setup(
    packages=[
        "dccsign",
        *(f"dccsign.{room}" for room in ENGINE_ROOMS),
        "dccsign.native",
        "dccsign.protocol",
        "dccsign.protocol.clients",
        "dccsign.protocol.wire",
        "dccsign.bench",
    ],
    package_dir={
        "dccsign": "engine",
        "dccsign.native": "native",
        "dccsign.protocol": "protocol",
        "dccsign.bench": "bench/drivers",
    },
    package_data={
        "dccsign": ["py.typed"],
        "dccsign.dcc": ["data/*.json"],
        "dccsign.server": ["sharedstate.lua"],
        "dccsign.native": ["_native.pyi"],
    },
    ext_modules=ext_modules,
)
