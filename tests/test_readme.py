"""The README's install and test commands are the ones CI runs, and its usage example runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_block(section: str, language: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)
    assert len(blocks) == 1, f"README section {section!r} should hold exactly one {language} block"
    return blocks[0].strip()


def test_ci_runs_the_readme_commands():
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for section in ("Install and run the demo", "Run the tests"):
        command = readme_block(section, "bash")
        assert command in ci_lines, f"{command!r} (README: {section}) is not a line of .ci/run"


def test_the_usage_example_runs():
    namespace = {}
    exec(compile(readme_block("Use it", "python"), "README.md (Use it)", "exec"), namespace)
    assert namespace["x"].shape == (2, 16, 768)
    assert namespace["embedding"].tok_emb is namespace["model"].tok_emb  # shared, not copied
    pretrained, model = namespace["pretrained"], namespace["model"]
    assert pretrained.tok_emb.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    assert pretrained.pos_emb.weight.requires_grad
