"""Build hook for the optional compiled build (issue 14): mypyc compiles the hot modules.

Pure Python is the default and the reference: `pip install .` or `pip install -e .` builds
no extension, and this file then only hands the metadata in pyproject.toml to setuptools.
With RTSERVE_COMPILE=1 the modules in COMPILED are compiled by mypyc (the way mypy builds
its own wheels) into C extensions that replace them in the installed package; every other
module stays Python. docs/compiled.md says what is compiled, what is not and why.

    RTSERVE_COMPILE=1 pip install .          # build isolation fetches mypy for the build
    make compiled                            # .venv-compiled, what `make test` runs twice

RTSERVE_MYPYC_OPT sets the C optimisation level (default 3, as mypy's own build).
"""

from __future__ import annotations

import importlib.util
import os

from setuptools import setup

#: The modules the per-request path runs, in src/rtserve. Not here, and why: docs/compiled.md.
COMPILED = [
    "parser", "head_cache", "body", "arrival", "parser_rules", "framing", "connection",
    "timers", "loop", "reader", "writer", "completions", "admission", "handoff", "request",
    "response", "worker", "pool", "metrics", "wsgi", "wsgi_environ", "prefixes", "tlsio",
]

#: What the compiled build needs besides setuptools (mypyc ships inside mypy).
BUILD_NEEDS = ["mypy>=1.10"]


def compiled_extensions() -> list:
    """The mypyc extensions of COMPILED (C generated into build/, compiled by build_ext)."""
    from mypyc.build import mypycify

    return mypycify(
        [f"src/rtserve/{name}.py" for name in COMPILED],
        opt_level=os.environ.get("RTSERVE_MYPYC_OPT", "3"),
    )


if os.environ.get("RTSERVE_COMPILE") != "1":
    setup()  # pure Python: everything comes from pyproject.toml
elif importlib.util.find_spec("mypyc") is None:
    # An isolated build environment (pip's default) holds setuptools only. Asked for its
    # build requirements, setuptools' backend runs this file and hands setup_requires to
    # pip, which installs them and runs the build proper (this file again, with mypyc).
    setup(setup_requires=BUILD_NEEDS)
else:
    setup(ext_modules=compiled_extensions())
