"""Builds kiban's one C extension, the prefix-key kernel of cache_aware, when it can.

Everything else is in pyproject.toml. Without a C compiler or Debian's ``libxxhash-dev``
the build warns and kiban installs without the kernel: kiban.gateway.prefix_scan then
runs the same code in Python (scripts/bootstrap.sh and the Dockerfile install both).
"""

from __future__ import annotations

import sys

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# xxh3 is inlined from xxhash.h (SSE2 on x86-64): the kernel links no library
KERNEL = Extension("kiban.gateway._prefix_scan", ["src/kiban/gateway/_prefix_scan.pyx"])


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing: the kernel has a Python fallback."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # no compiler at all
            self._skip(error)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as error:  # a compile error
            self._skip(error)

    @staticmethod
    def _skip(error: Exception) -> None:
        print(
            f"kiban: the C kernel of cache_aware was not built ({error}); the Python "
            "fallback runs instead (install a C compiler and libxxhash-dev, then reinstall)",
            file=sys.stderr,
        )


setup(
    ext_modules=cythonize([KERNEL], compiler_directives={"language_level": "3"}),
    cmdclass={"build_ext": OptionalBuildExt},
)
