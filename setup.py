"""The one compiled extension (ckptrepo/_elements.c, the codec's per-element loops); all
other metadata is in pyproject.toml. Optional: where it cannot be built (no C compiler), the
install goes on and the codec runs its numpy forms of the same loops, slower."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ckptrepo._elements",
            ["ckptrepo/_elements.c"],
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,
        )
    ]
)
