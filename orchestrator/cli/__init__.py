"""`tips <verb> ...`, the one command-line tree (== ``python -m orchestrator <verb> ...``).

    train    train a recipe                         key=value config    cli/train.py
    tune     a Ray Tune sweep over a recipe         key=value config    cli/tune.py
    eval     the evaluation suite                   key=value settings  cli/eval.py
    export   a sharded checkpoint as one model.pt   --flags             cli/export.py
    data     synth | pack | ingest | caption | regions | inspect   (--flags)  cli/data.py
    cluster  local up | add | preempt | ...         --flags (a tool)    cli/cluster.py
    recipes  the packaged recipes and sweeps                            cli/recipes.py

Verbs that start runs take ``key=value`` merged by OmegaConf onto a typed schema
(orchestrator/config.py); tools take ``--flags``. Every verb and sub-verb answers ``--help``
(exit 0); exit codes are the same everywhere (orchestrator/cli/common.py). A verb's module is
imported only when it runs, so ``tips --help`` starts no Ray and no torch.
"""

from __future__ import annotations

import importlib
import os
import sys

from orchestrator.cli.common import EXIT_OK, EXIT_USAGE

VERBS = {
    "train": "orchestrator.cli.train",
    "tune": "orchestrator.cli.tune",
    "eval": "orchestrator.cli.eval",
    "export": "orchestrator.cli.export",
    "data": "orchestrator.cli.data",
    "cluster": "orchestrator.cli.cluster",
    "recipes": "orchestrator.cli.recipes",
}


def usage() -> str:
    lines = ["usage: tips <verb> [args] [-h]", "", "verbs:"]
    for verb, module in VERBS.items():
        lines.append(f"  {verb:<8} {importlib.import_module(module).SUMMARY}")
    lines += [
        "",
        "tips <verb> --help shows a verb's arguments, config sections and recipes.",
        "quick start: tips data synth --out demo_data/synth --n 1024 && \\",
        "             tips train recipe=tiny_cpu data.train_uri=demo_data/synth/train",
        "exit codes: 0 done, 1 a run failed, 2 usage or config error, 130 interrupted",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `tips recipes | head -1`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return EXIT_OK if argv else EXIT_USAGE
    verb, rest = argv[0], argv[1:]
    if verb == "help":  # `tips help train` == `tips train --help`
        if not rest:
            print(usage())
            return EXIT_OK
        verb, rest = rest[0], ["--help"]
    if verb not in VERBS:
        print(f"tips: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    return importlib.import_module(VERBS[verb]).main(rest)
