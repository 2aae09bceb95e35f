"""The README's install and test commands are the ones CI runs, its usage example runs, and the
links of the README and of docs/ resolve."""

import functools
import re
from pathlib import Path

from shared_data import REPO_ROOT


def readme_block(section: str, language: str) -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)
    assert len(blocks) == 1, f"README section {section!r} should hold exactly one {language} block"
    return blocks[0].strip()


def test_ci_runs_the_readme_commands():
    ci_lines = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
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


# The README and the pages under docs/ link each other's sections; a renamed heading or a moved
# page breaks such a link without a word, so each one is resolved here as GitHub resolves it.
MARKDOWN_FILES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (hyphens and
    underscores kept), spaces turned into hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache  # a page is linked many times
def anchors_of(path: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2... for repeated headings."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", prose_of(path), flags=re.M):
        anchor = github_anchor(heading)
        anchors.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
        seen[anchor] = seen.get(anchor, 0) + 1
    return anchors


def prose_of(path: Path) -> str:
    """The file without its fenced code blocks, whose '#' lines are comments and whose
    `kernel[grid](...)` looks like a link."""
    return re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_markdown_links_resolve():
    broken = []
    for page in MARKDOWN_FILES:
        prose = re.sub(r"`[^`]*`", "", prose_of(page))  # inline code: `x[i](j)` is no link either
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):  # https:, mailto: (not checked offline)
                continue
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and anchor not in anchors_of(linked):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_github_anchor():
    """GitHub's rule (its docs on section links) on headings of the kinds these pages have."""
    assert github_anchor("CPU (this project's machine)") == "cpu-this-projects-machine"
    assert github_anchor("In graphs: `fusedemb::range_checked`") == "in-graphs-fusedembrange_checked"
    assert (
        github_anchor("torch.export, torch.jit.trace and other tracers")
        == "torchexport-torchjittrace-and-other-tracers"
    )
