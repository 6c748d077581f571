"""README.md stays a short start that works: its Python quick start runs as written (every ```python
block, in order, in one namespace, in a fresh interpreter), every docs/ page it links exists, and it
stays short. The guides in docs/ are held to the same: their examples run and their links resolve."""
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
MAX_LINES = 160


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def python_blocks(text: str):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def run_python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_quick_start_runs():
    blocks = python_blocks(read(README))
    assert len(blocks) >= 3, "README.md has lost its Python quick start"
    # One script, the blocks separated by markers, so a traceback names the block it came from.
    script = "\n".join(f"# ---- README.md python block {i + 1} ----\n{b}" for i, b in enumerate(blocks))
    result = run_python(script)
    assert result.returncode == 0, f"README.md's quick start failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def test_readme_links_to_docs_exist():
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)]*)?\)", read(README))
    assert links, "README.md links no docs/ page"
    missing = sorted({link for link in links if not os.path.isfile(os.path.join(ROOT, link))})
    assert not missing, f"README.md links to missing docs: {missing}"


def test_readme_stays_short():
    lines = read(README).splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines (at most {MAX_LINES}): move detail to docs/"


def test_docs_examples_run():
    """Each guide's ```python blocks, in order, in a namespace of their own (one interpreter for all)."""
    pages = {os.path.relpath(p, ROOT): python_blocks(read(p)) for p in DOCS}
    pages = {p: "\n".join(b) for p, b in pages.items() if b}
    assert pages, "no guide in docs/ has a Python example"
    script = ("import traceback\nfailed = []\n"
              + "".join(f"try:\n    exec(compile({code!r}, {page!r}, 'exec'), {{'__name__': '__doc_example__'}})\n"
                        f"except Exception:\n    failed.append({page!r}); traceback.print_exc()\n"
                        for page, code in pages.items())
              + "raise SystemExit(f'failed: {failed}' if failed else 0)\n")
    result = run_python(script)
    assert result.returncode == 0, f"docs examples failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def test_docs_links_resolve():
    missing = []
    for page in DOCS:
        for link in re.findall(r"\]\(([^)#\s:]+\.md)(?:#[^)]*)?\)", read(page)):
            if not os.path.isfile(os.path.join(os.path.dirname(page), link)):
                missing.append(f"{os.path.relpath(page, ROOT)} -> {link}")
    assert not missing, f"links to missing pages: {missing}"
