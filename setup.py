"""Only the compiled core lives here (pyproject.toml has everything else): setuptools' own
`[tool.setuptools.ext-modules]` table is still experimental and warns on every install.

`optional=True`: where there is no compiler the build skips it, and the raw TCP engine runs the
pure-Python epoll set and pump that `src/portway/stream/_fastpath.c` mirrors.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "portway.stream._fastpath",
            sources=["src/portway/stream/_fastpath.c"],
            optional=True,
        )
    ]
)
