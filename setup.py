"""Build meshgate's compiled hot paths.

Every ``fastpath/*.pyx`` is compiled, and every ``fastpath/_*_py.py`` that has a
``fastpath/_*_c.pxd`` beside it is compiled again as ``_*_c`` (aiohttp's
reader_py/reader_c pattern: logic written once, typed by the .pxd).
``MESHGATE_NO_EXTENSIONS=1`` builds nothing and the pure-Python twins are used.
``MESHGATE_CYTHON_TRACE=1`` turns on line tracing and writes annotated HTML.
"""

import os
import platform
import shutil
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
FASTPATH = HERE / "fastpath"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _copy_if_changed(source: Path, target: Path) -> None:
    # An unchanged timestamp lets Cython skip regenerating C that is already current.
    if not target.exists() or target.read_bytes() != source.read_bytes():
        shutil.copyfile(source, target)


def _extension_sources() -> list[tuple[str, str]]:
    """(module name, source path) of every compiled fastpath module."""
    sources = [(f"fastpath.{p.stem}", str(p.relative_to(HERE))) for p in FASTPATH.glob("*.pyx")]
    staging = HERE / "build" / "cython_src" / "fastpath"
    for pxd in FASTPATH.glob("_*_c.pxd"):
        twin = pxd.with_name(pxd.stem[: -len("_c")] + "_py.py")
        if not twin.exists():
            continue
        # Cython types a .py through the .pxd of the same name beside it; staging the
        # pair outside fastpath/ keeps an uncompiled copy from shadowing the extension.
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "__init__.py").touch()
        _copy_if_changed(twin, staging / f"{pxd.stem}.py")
        _copy_if_changed(pxd, staging / pxd.name)
        sources.append((f"fastpath.{pxd.stem}", str((staging / f"{pxd.stem}.py").relative_to(HERE))))
    return sources


def _extensions() -> list:
    if _flag("MESHGATE_NO_EXTENSIONS") or platform.python_implementation() != "CPython":
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    trace = _flag("MESHGATE_CYTHON_TRACE")
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if trace else []
    exts = [
        Extension(name, [src], define_macros=macros, extra_compile_args=["-O3"])
        for name, src in _extension_sources()
    ]
    return cythonize(
        exts,
        language_level=3,
        annotate=trace,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "linetrace": trace,
            "embedsignature": True,
        },
    )


setup(ext_modules=_extensions())
