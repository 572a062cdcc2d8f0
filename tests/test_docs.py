"""The repository is self-contained: references point into docs/, and they resolve.

* No file may cite the notes that were kept outside the repository (the Ray notes, the TIPS
  notes, the first design and style documents): their facts now live in ``docs/``.
* Every ``docs/<file>.md, "<Heading>"`` reference (the form the code uses; the comma is
  optional and the heading may start on the next comment line) names an existing file and
  one of its headings, or the first words of one (``"Sizing"`` for ``## Sizing min/max
  workers``). The ``docs/<file>.md#anchor`` form, if used, must name a GitHub-style anchor of
  one of the file's headings; a bare ``docs/<file>.md`` must name an existing file.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 2_000_000

# Spelled in pieces so that this file does not match itself.
FORBIDDEN = re.compile(
    "|".join(["RAY" + "_NOTES", "TIPS" + "_NOTES", r"\bDESIGN\.md", r"\bSTYLE\.md"])
)
# Between the file and its quoted heading: a comma and/or spaces, and at most one line break
# (followed by a comment leader), so that a closing string quote is never read as a heading.
_GAP = r"(?:,[ \t]*|[ \t]+)(?:\n[ \t]*(?:#|\*|//)?[ \t]*)?|,?\n[ \t]*(?:#|\*|//)?[ \t]*"
REFERENCE = re.compile(
    r"docs/(?P<file>[A-Za-z0-9_.-]+\.md)"
    r"(?:#(?P<anchor>[A-Za-z0-9_-]+)"
    rf"|(?:{_GAP})\"(?P<heading>[^\"\n]+)\")?"
)
SPLIT = re.compile(r"docs/[A-Za-z0-9_.-]+\.md(?:,[ \t]*|[ \t]+)\"[^\"\n]*\n")  # heading broken
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _skipped(rel: str) -> bool:
    first = rel.split("/", 1)[0]
    return first.startswith(".venv") or first == ".git"


def repo_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (so build outputs such as *.egg-info are
    left out), or every file under the root when git is not available."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        ).stdout.decode()
        rels = sorted({r for r in out.split("\0") if r})
    except (OSError, subprocess.CalledProcessError):
        rels = sorted(
            str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and "/." not in str(p)
        )
    files = []
    for rel in rels:
        path = ROOT / rel
        if _skipped(rel) or not path.is_file() or path.stat().st_size > MAX_BYTES:
            continue
        files.append(path)
    return files


def headings(md: Path) -> list[str]:
    text = FENCE.sub("", md.read_text(encoding="utf-8"))
    return [h.strip() for h in HEADING.findall(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def heading_matches(ref: str, found: list[str]) -> bool:
    ref = ref.strip()
    return any(h == ref or h.startswith((ref + " ", ref + ":")) for h in found)


def test_no_references_to_notes_outside_the_repository() -> None:
    hits = []
    for path in repo_files():
        text = path.read_bytes().decode("utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not hits, "references to notes outside the repository:\n" + "\n".join(hits)


def test_docs_references_resolve() -> None:
    docs = ROOT / "docs"
    cache: dict[str, list[str]] = {}
    bad = []
    count = 0
    for path in repo_files():
        text = path.read_bytes().decode("utf-8", errors="replace")
        for m in REFERENCE.finditer(text):
            count += 1
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
            target = docs / m["file"]
            if not target.is_file():
                bad.append(f"{where}: docs/{m['file']} does not exist")
                continue
            found = cache.setdefault(m["file"], headings(target))
            if SPLIT.match(text, m.start()):
                bad.append(f"{where}: a heading split over two lines (keep it on one line)")
            if m["heading"] and not heading_matches(m["heading"], found):
                bad.append(f'{where}: docs/{m["file"]} has no heading "{m["heading"]}"')
            if m["anchor"] and m["anchor"] not in {slug(h) for h in found}:
                bad.append(f"{where}: docs/{m['file']} has no anchor #{m['anchor']}")
    assert count > 0, "no docs/ references found: is the pattern still right?"
    assert not bad, "unresolved docs/ references:\n" + "\n".join(bad)


def test_heading_matching() -> None:
    found = ["Input pixels", "Self-distillation at small scale (measured here)"]
    assert heading_matches("Input pixels", found)
    assert heading_matches("Self-distillation at small scale", found)
    assert not heading_matches("Input pix", found)
    assert slug("Self-distillation: what the code computes") == (
        "self-distillation-what-the-code-computes"
    )
    text = (
        '# see docs/method.md, "Input pixels"; docs/ray.md,\n'
        '# "PBT relay" and docs/method.md#loss-weights'
    )
    refs = [(m["file"], m["heading"], m["anchor"]) for m in REFERENCE.finditer(text)]
    assert refs == [
        ("method.md", "Input pixels", None),
        ("ray.md", "PBT relay", None),
        ("method.md", None, "loss-weights"),
    ]
    # a closing string quote after the path is not the start of a heading
    assert REFERENCE.match('docs/clusters.md"]\n')["heading"] is None
    assert not SPLIT.match('docs/clusters.md"]\n')
    method = "docs/" + "method.md"  # built so that this file's own scan does not see it
    assert SPLIT.match(f'{method}, "Loss\n# weights"')
