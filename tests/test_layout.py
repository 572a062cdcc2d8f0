"""The layout rules of tools/check_layout.py hold for the tree, and the checker finds what it
is meant to find (a cycle hidden in a function, a long function, tips_model importing Ray)."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_layout", ROOT / "tools" / "check_layout.py")
check_layout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_layout)


def test_the_tree_has_no_cycle_no_long_function_and_a_pure_tips_model():
    assert check_layout.check_imports() == []
    assert check_layout.check_function_lengths() == []


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path, monkeypatch):
    pkg = tmp_path / "orchestrator"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from orchestrator.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from orchestrator import a\n    return a\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from orchestrator.a import f\n"
    )
    (tmp_path / "tips_model").mkdir()
    (tmp_path / "tips_model" / "__init__.py").write_text("import ray\n")
    monkeypatch.setattr(check_layout, "ROOT", tmp_path)
    problems = check_layout.check_imports()
    assert "import cycle: orchestrator.a <-> orchestrator.b" in problems
    assert not any("orchestrator.c" in p for p in problems)  # TYPE_CHECKING is exempt
    assert any("tips_model imports ray" in p for p in problems)


def test_a_long_function_is_found_and_its_docstring_is_not_counted(tmp_path, monkeypatch):
    pkg = tmp_path / "orchestrator"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(79))
    doc = '    """' + "\n".join(["doc"] * 20) + '"""\n'
    (pkg / "m.py").write_text(f"def ok():\n{doc}{body}\n\n\ndef long():\n{body}\n    y = 1\n")
    (tmp_path / "tips_model").mkdir()
    monkeypatch.setattr(check_layout, "ROOT", tmp_path)
    problems = check_layout.check_function_lengths()
    assert len(problems) == 1 and "long has 81 lines" in problems[0], problems
    assert textwrap.dedent(problems[0]).startswith("orchestrator/m.py:")
