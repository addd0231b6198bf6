"""The documentation is checked like code: the worked example of docs/callbacks.md trains, and links resolve."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CALLBACKS_DOC = REPO_ROOT / "docs" / "callbacks.md"
LINKED_DOCS = [REPO_ROOT / "README.md", REPO_ROOT / "benchmarks" / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]

# a fenced block right after a marker comment: `<!-- file: NAME -->` (a piece of file NAME) or `<!-- command -->`
MARKED_BLOCK = re.compile(r"<!-- (file: (?P<file>\S+)|command) -->\n```[\w-]*\n(?P<body>.*?)\n```", re.DOTALL)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def worked_example() -> tuple[dict[str, str], list[str]]:
    """The files the example's marked code blocks make up (in page order) and its marked commands."""
    files: dict[str, list[str]] = {}
    commands: list[str] = []
    for match in MARKED_BLOCK.finditer(CALLBACKS_DOC.read_text()):
        if match["file"] is None:
            commands.append(match["body"])
        else:
            files.setdefault(match["file"], []).append(match["body"])
    return {name: "\n\n\n".join(pieces) + "\n" for name, pieces in files.items()}, commands


def test_the_worked_example_trains_and_logs_its_metric(tmp_path: Path) -> None:
    files, commands = worked_example()
    assert set(files) == {"mytask.py", "sine.yaml"}
    assert len(commands) == 1 and "noether-train sine.yaml" in commands[0]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    # the command as the page gives it, shortened to one epoch, with this environment's console scripts
    command = f"{commands[0].strip()} trainer.max_epochs=1"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)  # the page sets what it needs
    result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    run_dir = tmp_path / result.stdout.strip().splitlines()[-1]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    worst = [row["loss/worst_batch/total"] for row in rows if "loss/worst_batch/total" in row]
    assert len(worst) == 1 and math.isfinite(worst[0]) and worst[0] > 0
    # the worst micro-batch is at least as bad as the epoch's mean training loss
    assert worst[0] >= next(row["loss/online/total"] for row in rows if "loss/online/total" in row)
    assert any("loss/val/total" in row for row in rows)


def test_the_other_example_of_the_page_imports(tmp_path: Path) -> None:
    """WeightMeanCallback is not in the example's config, but it is part of mytask.py: it must at least import."""
    files, _ = worked_example()
    path = tmp_path / "mytask.py"
    path.write_text(files["mytask.py"])
    name = "docs_callbacks_mytask"  # its own name: the subprocess of the test above imports `mytask`
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a config finds the class it configures through its module
    try:
        spec.loader.exec_module(module)
        config = module.WeightMeanCallbackConfig(every_n_epochs=1)
        assert type(config).configured_class() is module.WeightMeanCallback
    finally:
        del sys.modules[name]


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings (lower case, punctuation dropped, spaces to hyphens)."""
    markdown = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    headings = re.findall(r"^#{1,6} +(.+?) *$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_relative_links_point_at_existing_files_and_headings(doc: Path) -> None:
    text = doc.read_text()
    broken = []
    for target in LINK.findall(re.sub(r"```.*?```", "", text, flags=re.DOTALL)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        linked = (doc.parent / path_part).resolve() if path_part else doc
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"broken links in {doc.relative_to(REPO_ROOT)}: {broken}"


def test_the_readme_links_the_docs() -> None:
    readme = REPO_ROOT / "README.md"
    targets = {target.partition("#")[0] for target in LINK.findall(readme.read_text())}
    assert {"docs/callbacks.md", "docs/checkpoints.md", "benchmarks/README.md"} <= targets
