"""The source distribution holds what a build from it needs: pip builds a wheel from an sdist,
and setuptools packs only what setup.py names (a header the extension includes but setup.py
does not list is left out, and the compile from the sdist fails)."""

import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]


def test_sdist_ships_the_extension_sources_headers_and_every_module(tmp_path):
    # egg_info's metadata goes to tmp_path too, so the checkout is left as it was.
    command = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "--dist-dir",
               str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:  # names are fusedemb-<version>/<path in the checkout>
        shipped = {PurePosixPath(*PurePosixPath(name).parts[1:]).as_posix() for name in tar.getnames()}
    needed = {path.relative_to(ROOT).as_posix() for path in (*ROOT.glob("csrc/*"), *ROOT.glob("fusedemb/**/*.py"))}
    assert needed <= shipped, f"missing from the sdist: {sorted(needed - shipped)}"
