"""The README is a short front door; the reference material lives in docs/. Every relative link resolves.

Fast and torch-free: reads Markdown and Python files as text only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
README_MAX_BYTES = 15 * 1024

SETUP_COMMANDS = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[all]" && '
    "edgessl pretrain --backbone mobilenetv3_small",
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[all]" && ruff check . && '
    'python -m pytest -q -x -m "not slow" -n 2 && python -m pytest -q -m slow -n 2 --durations=15',
)

# Files whose citations of docs/ the docs change was not allowed to edit (fixed separately).

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`\n]*`+")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def markdown_files() -> list[Path]:
    files = [README, REPO / "benchmarks" / "README.md", REPO / "export" / "README.md"]
    files += sorted((REPO / "docs").glob("*.md"))
    files += sorted((REPO / "examples").glob("*.md"))
    return [f for f in files if f.is_file()]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower-case, punctuation except '-' and '_' dropped,
    spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def links(path: Path) -> list[str]:
    found = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        found += LINK.findall(INLINE_CODE.sub("", line))
    return found


def test_github_slug_rules():
    assert github_slug("Bad input: a clear message, never a traceback, nothing lost") == (
        "bad-input-a-clear-message-never-a-traceback-nothing-lost"
    )
    assert github_slug("Every switch of `edgessl pretrain`") == "every-switch-of-edgessl-pretrain"
    assert github_slug("Several edge sizes from one pretraining: `--widths`, `slim`, `prune`") == (
        "several-edge-sizes-from-one-pretraining---widths-slim-prune"
    )
    assert github_slug("End-to-end walkthrough (`examples/walkthrough.sh`)") == (
        "end-to-end-walkthrough-exampleswalkthroughsh"
    )


def test_readme_is_a_short_front_door():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes; move reference material to docs/ (limit {README_MAX_BYTES})"
    )


def test_readme_keeps_the_two_setup_commands():
    text = README.read_text(encoding="utf-8")
    for command in SETUP_COMMANDS:
        assert command in text.splitlines(), f"README.md lost the set-up command line: {command}"


def test_ci_runs_the_readme_test_command():
    """.ci/run runs the README's test command, step by step: lint, the fast tier, the slow tier."""
    steps = SETUP_COMMANDS[1].split(' && pip install -e ".[all]" && ')[1].split(" && ")
    ci = [line.split("#")[0].strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert [line for line in ci if line in steps] == steps


def test_readme_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in text, f"README.md's Documentation section does not link docs/{page.name}"


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(md: Path):
    broken = []
    for target in links(md):
        if re.match(r"^(https?:|mailto:)", target, re.I):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (md.parent / file_part).resolve() if file_part else md
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
            continue
        if anchor and dest.suffix.lower() == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"broken links in {md.relative_to(REPO)}:\n" + "\n".join(broken)


def cited_docs() -> list[tuple[str, int, str]]:
    """(file, line, path) for every docs/... path mentioned in the package's Python files."""
    cites = []
    for py in sorted((REPO / "edgessl").rglob("*.py")):
        for no, line in enumerate(py.read_text(encoding="utf-8").splitlines(), 1):
            for m in re.finditer(r"(?<![\w/.])docs/[\w./-]*[\w]", line):
                cites.append((py.relative_to(REPO).as_posix(), no, m.group(0)))
    return cites


def test_package_cites_existing_docs():
    missing = [c for c in cited_docs() if not (REPO / c[2]).exists()]
    assert not missing, "the package cites docs that do not exist: " + ", ".join(f"{f}:{n} {p}" for f, n, p in missing)


def test_every_pretrain_switch_is_in_the_method_docs_table():
    """docs/method.md "Every switch of `edgessl pretrain`" lists each flag (--momentum, --sd-alpha, --seed,
    --checkpoint-every and --cache-max had been left out)."""
    from edgessl.config import PretrainConfig
    from edgessl.options import flag_name, specs

    text = (REPO / "docs" / "method.md").read_text()
    section = text[text.index("## Every switch of `edgessl pretrain`"):]
    section = section[:section.index("\n## ", 1)]
    missing = [spec.flag or flag_name(f.name) for f, spec in specs(PretrainConfig)
               if f"`{spec.flag or flag_name(f.name)}`" not in section]
    assert not missing, missing


def test_every_eval_and_finetune_flag_is_in_the_evaluation_docs():
    from edgessl.options import EvalOptions, FinetuneOptions, flag_name, specs

    text = (REPO / "docs" / "evaluation.md").read_text()
    for cls in (EvalOptions, FinetuneOptions):
        missing = [spec.flag or flag_name(f.name) for f, spec in specs(cls)
                   if f"`{spec.flag or flag_name(f.name)}`" not in text]
        assert not missing, (cls.__name__, missing)

