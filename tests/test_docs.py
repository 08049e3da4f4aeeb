"""The docs: a README a newcomer reads to the end, an MkDocs site that builds with --strict (broken links
fail), a configuration reference that is default.yaml's, every public name documented."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import deadwatch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README_MAX_LINES = 250


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_config", DOCS / "gen_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short_and_starts_with_install():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move reference material to docs/"
    text = "\n".join(lines)
    assert "pip install deadwatch" in text
    assert "make test" in text and "make demo" in text


def test_configuration_page_is_generated_from_default_yaml():
    gen = load_generator()
    text = (ROOT / "deadwatch" / "default.yaml").read_text(encoding="utf-8")
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert page == gen.render(text), "docs/configuration.md is stale: run python docs/gen_config.py"
    # every key and sub-key of the defaults is on the page, with its default value
    defaults = yaml.safe_load(text)
    documented = {key: yaml.safe_load(block) for key, _, block in gen.blocks(text)}
    assert documented == {key: {key: value} for key, value in defaults.items()}
    for key in defaults:
        assert f"## `{key}`" in page


def test_every_public_name_is_documented():
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#+ `(?:deadwatch\.)?([\w.]+)", api, flags=re.M))
    missing = [name for name in deadwatch.__all__ if name not in headings]
    assert not missing, f"docs/api.md has no heading for {missing}"


def test_mkdocs_nav_lists_every_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = set()

    def walk(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            walk(value) if isinstance(value, list) else listed.add(value)

    walk(config["nav"])
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert listed == pages


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()


def test_ci_builds_the_docs_and_runs_the_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make docs" in ci
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^docs:.*\n(\t.*\n)*\t.*mkdocs build --strict", makefile, flags=re.M)
