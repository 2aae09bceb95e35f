"""The README's install and test commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_command(section: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", body, flags=re.S)
    assert len(blocks) == 1, f"README section {section!r} should hold exactly one bash block"
    return blocks[0].strip()


def test_ci_runs_the_readme_commands():
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for section in ("Install and run the demo", "Run the tests"):
        command = readme_command(section)
        assert command in ci_lines, f"{command!r} (README: {section}) is not a line of .ci/run"
