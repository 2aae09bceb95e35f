"""Build fusedemb and its C++ CPU extension `fusedemb._C`.

Install with `pip install --no-build-isolation -e .`: the extension must be compiled against
the torch it will run with, so it is never built in an isolated build environment.
"""

import sys
from pathlib import Path

from setuptools import find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as error:  # pip shows this at the end of its build output
    raise ImportError(
        "fusedemb's C++ extension is compiled against the torch it will run with: install torch first "
        "(python -m pip install torch==2.13.0; README.md), then python -m pip install --no-build-isolation -e ."
    ) from error

ROOT = Path(__file__).parent

# at::parallel_for is serial unless the extension itself is compiled with OpenMP. GCC and
# clang on Linux take -fopenmp; MSVC spells it /openmp; Apple's clang has no OpenMP of its own
# (the extension then builds serial rather than not at all).
if sys.platform == "win32":
    compile_args, link_args = ["/O2", "/openmp"], []
elif sys.platform == "darwin":
    compile_args, link_args = ["-O3"], []
else:
    compile_args, link_args = ["-O3", "-fopenmp"], ["-fopenmp"]
extension = CppExtension(
    name="fusedemb._C",
    sources=sorted(str(path.relative_to(ROOT)) for path in (ROOT / "csrc").glob("*.cpp")),
    # The headers the sources include: a change to them rebuilds the extension. (MANIFEST.in
    # ships them in the sdist: setuptools 65.5 packs the sources only, 84 depends too.)
    depends=sorted(str(path.relative_to(ROOT)) for path in (ROOT / "csrc").glob("*.h")),
    extra_compile_args={"cxx": compile_args},
    extra_link_args=link_args,
)

setup(
    name="fusedemb",
    version="0.1.0",
    description="Fused token + position embedding (gather + add in one pass) with Triton and C++ kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fusedemb", "fusedemb.*"]),
    python_requires=">=3.10",
    # Ranges that torch 2.13.0 (the CPU build on our machines) satisfies, so pip installs no other torch.
    # The floors are the oldest releases tested: torch 2.11 with triton 3.6, on a GPU and (with
    # numpy 2.3, see README.md) on CPU. Older ones fail the tests: before torch 2.10 the range
    # check cannot read ids under torch.func's transforms, before triton 3.4 the interpreter
    # miscomputes or rejects the sort's kernels.
    # Triton ships wheels for Linux only; elsewhere fusedemb runs its C++ kernels and the reference.
    install_requires=["torch>=2.11", "triton>=3.6; platform_system == 'Linux'", "tiktoken>=0.7", "numpy"],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "pytest-benchmark>=4", "vermin>=1.6"],
        "bench": ["matplotlib>=3.7", "tqdm>=4.60"],
    },
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    entry_points={"console_scripts": ["fusedemb-bench = fusedemb.bench.cli:main", "fusedemb-demo = fusedemb.demo:main"]},
)
