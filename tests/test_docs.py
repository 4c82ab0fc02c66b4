"""The documents a newcomer reads stay true to the tree: the README's Layout, design.md's sections."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
DESIGN = (REPO / "docs" / "design.md").read_text()


def layout_section() -> str:
    return README.split("## Layout", 1)[1].split("\n## ", 1)[0]


def test_the_readme_layout_names_every_module():
    layout = layout_section()
    for path in sorted((REPO / "pretrain").rglob("*.py")):
        if path.name == "__init__.py" and path.parent.name == "pretrain":
            continue  # the empty package marker
        folder = path.parent.relative_to(REPO / "pretrain")
        assert path.name in layout, f"README Layout does not list {path.relative_to(REPO)}"
        if folder != Path("."):
            assert f"{folder}/" in layout, f"README Layout does not list pretrain/{folder}/"


def test_every_design_reference_names_a_section_of_docs_design_md():
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", DESIGN, flags=re.MULTILINE)}
    assert sections == set(range(1, max(sections) + 1))
    cited = []
    for path in [*(REPO / "pretrain").rglob("*.py"), *(REPO / "tests").glob("*.py")]:
        text = path.read_text()
        for match in re.finditer(r"DESIGN sections? (\d+)(?: and (\d+))?|design\.md §(\d+)(?: and §(\d+))?", text):
            cited += [(path.name, int(n)) for n in match.groups() if n]
    assert cited
    missing = [(name, n) for name, n in cited if n not in sections]
    assert not missing, f"references to sections docs/design.md does not have: {missing}"
