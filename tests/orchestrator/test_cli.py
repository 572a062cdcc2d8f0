"""One command-line tree: every verb and sub-verb answers --help with exit 0, usage and
config errors exit 2 without starting anything, and recipes are found by name."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.cli import VERBS, main
from orchestrator.recipes import RECIPES_DIR, find_recipe, find_sweep, list_recipes

HELP = [
    ["--help"],
    ["help"],
    ["help", "train"],
    *[[verb, "--help"] for verb in VERBS],
    *[["data", sub, "--help"] for sub in ("synth", "pack", "inspect")],
    ["cluster", "--help"],
    ["cluster", "local", "--help"],
    *[["cluster", "local", sub, "--help"] for sub in ("up", "add", "preempt", "stop")],
]


@pytest.mark.parametrize("argv", HELP, ids=" ".join)
def test_every_verb_and_sub_verb_answers_help(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage:" in out, out


def test_train_help_lists_the_config_sections_and_the_packaged_recipes(capsys):
    assert main(["train", "-h"]) == 0
    out = capsys.readouterr().out
    for section in ("model", "data", "augment", "optim", "teacher", "train", "scaling", "run"):
        assert f"\n  {section:<9} " in out, section
    assert "global_batch_size" in out and "caption_ratios" in out
    for name, _ in list_recipes():
        assert f"  {name} " in out, name


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "usage: tips <verb>"),
        (["fly"], "unknown verb 'fly'"),
        (["train", "--fast"], "unknown flag '--fast'"),
        (["train", "recipe=tiny_cpu", "total_steps"], "arguments are key=value"),
        (["train", "recipe=tiny_cpu", "train.total_stepz=3"], "train.total_stepz"),
        (["train", "recipe=no_such_recipe"], "no_such_recipe"),
        (["tune", "--dry-run"], "give sweep=NAME"),
        (["eval", "checkpoint=x", "batch_size=many"], "key 'batch_size'"),
        (["eval", "checkpoint=x", "nonsense=1"], "unknown key 'nonsense'"),
        (["data", "synth"], "--out"),
        (["cluster", "remote"], "unknown cluster kind 'remote'"),
        (["recipes", "--all"], "unknown argument"),
    ],
)
def test_usage_and_config_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    text = captured.err + captured.out
    assert message in text, text
    assert "Traceback" not in text


def test_recipes_are_found_by_name_path_or_the_old_spelling(tmp_path):
    assert find_recipe("tiny_cpu") == RECIPES_DIR / "tiny_cpu.yaml"
    assert find_recipe("tiny_cpu.yaml") == RECIPES_DIR / "tiny_cpu.yaml"
    assert find_recipe("recipes/tiny_cpu.yaml") == RECIPES_DIR / "tiny_cpu.yaml"
    assert find_recipe(None) == RECIPES_DIR / "tiny_cpu.yaml"
    own = tmp_path / "tiny_cpu.yaml"  # a file of one's own wins over the packaged name
    own.write_text("base: x\n")
    assert find_recipe(str(own)) == own
    assert find_sweep("loss_weights") == RECIPES_DIR / "sweeps" / "loss_weights.yaml"


def test_python_dash_m_orchestrator_is_the_same_tree():
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "recipes"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "tiny_cpu" in proc.stdout and "loss_weights" in proc.stdout


def test_a_reader_that_leaves_early_is_not_an_error():
    """`tips recipes | head -1`: a closed pipe ends the listing quietly, exit 0 (`true`
    exits before the listing is written, so every write meets a closed pipe)."""
    proc = subprocess.run(
        f"{sys.executable} -m orchestrator recipes | true; "
        "echo ${PIPESTATUS[0]}",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.stdout.strip() == "0" and "BrokenPipeError" not in proc.stderr, proc.stderr
