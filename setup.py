"""Packaging. Plain `pip install .` installs pure Python; the C++ ops then build lazily on first
use (fastdae/_ext.py). Set FASTDAE_BUILD_EXT=1 (with --no-build-isolation, torch installed) to
build them ahead of time into fastdae._C: with the same portable flags as the JIT build
(fastdae/_ext.py: ISA_FLAGS), so the library runs on any x86-64 CPU and its hot loops still use
AVX2 / AVX-512 / AMX where the CPU has them (csrc/cpu_dispatch.h)."""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildPyWithSources(build_py):
    """Ship csrc/*.cpp and *.h inside the package (fastdae/_csrc) so a non-editable install can JIT-build."""

    def run(self) -> None:
        super().run()
        dst = Path(self.build_lib) / "fastdae" / "_csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for src in [*(ROOT / "csrc").glob("*.cpp"), *(ROOT / "csrc").glob("*.h")]:
            shutil.copy2(src, dst / src.name)


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("FASTDAE_BUILD_EXT") == "1":
    import platform

    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # the same as fastdae/_ext.py's ISA_FLAGS (setup.py cannot import the package before it is built)
    isa = ["-march=x86-64", "-mtune=generic"] if platform.machine() in ("x86_64", "AMD64") else []

    ext_modules.append(
        CppExtension(
            "fastdae._C",
            sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")),
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast", *isa],
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
