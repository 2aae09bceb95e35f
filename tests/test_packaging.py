"""What setup.py promises: the source distribution holds what a build from it needs (pip builds a
wheel from an sdist, and setuptools packs only what setup.py names: a header the extension
includes but setup.py does not list is left out, and the compile from the sdist fails); the
code runs on the oldest Python that python_requires admits; and the commands it installs run the
mains they are named for."""

import importlib
import importlib.metadata
import re
import subprocess
import sys
import tarfile
from pathlib import PurePosixPath

import pytest
from shared_data import REPO_ROOT


def test_sdist_ships_the_extension_sources_headers_and_every_module(tmp_path):
    # egg_info's metadata goes to tmp_path too, so the checkout is left as it was.
    command = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "--dist-dir",
               str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:  # names are fusedemb-<version>/<path in the checkout>
        shipped = {PurePosixPath(*PurePosixPath(name).parts[1:]).as_posix() for name in tar.getnames()}
    sources = (*REPO_ROOT.glob("csrc/*"), *REPO_ROOT.glob("fusedemb/**/*.py"))
    needed = {path.relative_to(REPO_ROOT).as_posix() for path in sources}
    assert needed <= shipped, f"missing from the sdist: {sorted(needed - shipped)}"


def test_the_code_needs_no_python_newer_than_python_requires():
    """CI runs one Python, newer than the oldest that setup.py admits: vermin reads the sources for
    what later Pythons added (a module, a function, a keyword argument, syntax), such as the
    weights of statistics.fmean (3.11) that examples/train_gpt.py once passed."""
    oldest = re.search(r'python_requires=">=(\d+\.\d+)"', (REPO_ROOT / "setup.py").read_text()).group(1)
    paths = [str(REPO_ROOT / name) for name in ("fusedemb", "examples", "tests", "benchmarks", "setup.py")]
    vermin = "import sys, vermin; sys.argv[0] = 'vermin'; sys.exit(vermin.main())"
    options = ["--no-tips", "--violations", "--eval-annotations", f"--target={oldest}-"]
    result = subprocess.run([sys.executable, "-c", vermin, *options, *paths], capture_output=True, text=True,
                            timeout=300, check=False)  # fmt: skip
    report = result.stdout[-3000:] + result.stderr[-1000:]
    assert result.returncode == 0, f"needs a Python newer than {oldest}:\n{report}"


@pytest.mark.parametrize(("name", "module", "function"), [("fusedemb-bench", "fusedemb.bench.cli", "main"),
                                                         ("fusedemb-demo", "fusedemb.demo", "main")])  # fmt: skip
def test_console_scripts_point_at_the_mains(name, module, function):
    """README: the bench and the demo are installed as commands, each running its main (checked
    in the installed metadata, where pip put setup.py's entry points)."""
    try:
        scripts = importlib.metadata.distribution("fusedemb").entry_points.select(group="console_scripts")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fusedemb is not installed (only on the path)")
    (entry_point,) = [entry for entry in scripts if entry.name == name]
    assert entry_point.load() is getattr(importlib.import_module(module), function)
