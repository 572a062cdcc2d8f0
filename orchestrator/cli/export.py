"""`tips export --checkpoint URI --out DIR`: a checkpoint in the one-file-per-part layout.

    tips export --checkpoint runs/tips_g14/checkpoint_00050000 --out g14_50k
    tips export --checkpoint s3://bucket/runs/tips_g14 --out g14_latest   # newest complete

A sharded checkpoint (``train.checkpoint_format=sharded``: each rank's DCP shards, any world
size) is read whole in this one process and written as the full layout
(orchestrator/train/state.py): ``model.pt`` (the objective's state dict: student, teacher,
loss centres, temperature), ``optim.pt`` (``optimizer.state_dict()`` with integer parameter
ids), ``train_state.json`` and ``config.yaml``. The result is what ``tips eval checkpoint=``,
``tips_model.checkpoints.load_state_dict`` and ``run.resume_from`` take. A checkpoint that is
already in the full layout is copied as it is. The host needs memory for the whole state.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail, setup_logging

PROG = "tips export"
SUMMARY = "write a (sharded) checkpoint as one model.pt + optim.pt, for eval and other tools"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=f"{SUMMARY}. A run directory exports its newest complete checkpoint.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a checkpoint_<step> directory or a run directory"
    )
    parser.add_argument("--out", required=True, help="the directory to write (local)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def export_checkpoint(source: str, out: Path) -> Path:
    """Write checkpoint ``source`` (local or s3://, sharded or full) to ``out`` in the full
    layout; returns ``out``.

    Raises:
        CheckpointError: ``source`` is not a complete checkpoint (the file is named).
    """
    from orchestrator.storage import exists, read_text
    from orchestrator.train.checkpoint import is_sharded, read_full_state
    from orchestrator.train.parallel import names_to_ids
    from orchestrator.train.state import (
        CHECKPOINT_FILES,
        CheckpointError,
        checkpoint_problem,
        list_checkpoints,
        newest_checkpoint,
    )
    from tips_model.checkpoints import save_state_dict

    if not exists(source):
        raise CheckpointError(f"{source}: no such checkpoint or run directory")
    if list_checkpoints(source):
        found = newest_checkpoint(source)
        if found is None:
            raise CheckpointError(f"{source}: no complete checkpoint in this run directory")
        source = found
    problem = checkpoint_problem(source)
    if problem is not None:
        raise CheckpointError(f"{source}: {problem}")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "train_state.json"):
        (out / name).write_text(read_text(f"{source.rstrip('/')}/{name}"))
    if is_sharded(source):
        full = read_full_state(source)
        save_state_dict(full["model"], out / "model.pt")
        save_state_dict(names_to_ids(full["optim"]), out / "optim.pt")
    else:
        from orchestrator.storage import read_bytes

        for name in CHECKPOINT_FILES:
            if name.endswith(".pt"):
                (out / name).write_bytes(read_bytes(f"{source.rstrip('/')}/{name}"))
    return out


def main(argv: list[str]) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (argparse printed why)
        return EXIT_OK if e.code == 0 else EXIT_USAGE
    setup_logging(args.verbose)
    from orchestrator.train.state import CheckpointError

    try:
        out = export_checkpoint(args.checkpoint, Path(args.out))
    except (CheckpointError, OSError) as e:
        return fail(PROG, str(e).splitlines()[0], EXIT_FAILED)
    print(f"wrote {out}/model.pt, optim.pt, train_state.json, config.yaml", file=sys.stdout)
    return EXIT_OK
