"""What every ``tips`` verb shares: argument splitting, ``--help``, exit codes, logging.

Exit codes, the same for every verb:
    0    done (``--help`` included)
    1    the run failed after it started (the line says why; a log file holds the rest)
    2    usage or configuration error, refused before anything started
    130  interrupted (Ctrl-C); what was saved is said in the line
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass, field

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

HELP_FLAGS = ("-h", "--help")
VERBOSE_FLAGS = ("-v", "--verbose")


class UsageError(Exception):
    """A bad command line: printed as ``tips <verb>: <message>``, exit 2."""


@dataclass
class Args:
    """A ``key=value`` command line split up: ``named`` holds the verb's own keys
    (``recipe=``, ``sweep=``), ``overrides`` the config keys, ``flags`` the ``--flags``."""

    named: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)
    help: bool = False
    verbose: bool = False


def split_args(
    argv: list[str], prog: str, named: tuple[str, ...] = (), flags: tuple[str, ...] = ()
) -> Args:
    """Split ``argv`` of a ``key=value`` verb. ``--help``/``-h`` and ``--verbose``/``-v`` are
    known to every verb.

    Raises:
        UsageError: an unknown ``--flag`` or a bare word that is not ``key=value``.
    """
    out = Args()
    for arg in argv:
        if arg in HELP_FLAGS:
            out.help = True
        elif arg in VERBOSE_FLAGS:
            out.verbose = True
        elif arg.startswith("-"):
            if arg not in flags:
                known = ", ".join([*flags, "--verbose", "--help"])
                raise UsageError(f"unknown flag {arg!r}; {prog} takes {known}")
            out.flags.add(arg)
        elif "=" not in arg or arg.startswith("="):
            raise UsageError(f"arguments are key=value, got {arg!r} (see {prog} --help)")
        else:
            key, _, value = arg.partition("=")
            if key in named:
                out.named[key] = value
            else:
                out.overrides.append(arg)
    return out


def setup_logging(verbose: bool = False) -> None:
    """Our log lines carry a level; Ray's own per-report lines are hidden unless ``-v``."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, force=True)
    if not verbose:
        for name in ("ray", "ray.train", "ray.tune", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Ray's noisiest module-level loggers log at INFO once per report
        logging.getLogger("ray.train.v2").setLevel(logging.WARNING)


def config_sections() -> str:
    """The ``key=value`` sections of a run config, with their keys, for ``--help``."""
    from orchestrator import config as config_lib

    lines = []
    for f in dataclasses.fields(config_lib.TipsConfig):
        if f.name == "objective":
            names = ", ".join(sorted(config_lib.objective_configs()))
            lines.append(f"  {'objective':<9} name ({names}) and that objective's weights")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        keys = [g.name for g in dataclasses.fields(default)] if default is not None else []
        lines.append(_wrap(f"  {f.name:<9} ", ", ".join(keys)))
    return "\n".join(lines)


def recipes_table(sweeps: bool = False) -> str:
    from orchestrator.recipes import list_recipes, list_sweeps

    rows = list_sweeps() if sweeps else list_recipes()
    width = max((len(n) for n, _ in rows), default=0)
    return "\n".join(f"  {name:<{width}}  {line}" for name, line in rows)


def _wrap(lead: str, text: str, width: int = 96) -> str:
    out, line = [], lead
    for word in text.split(" "):
        if len(line) + len(word) + 1 > width and line.strip():
            out.append(line.rstrip())
            line = " " * len(lead)
        line += word + " "
    out.append(line.rstrip())
    return "\n".join(out)


def fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return code
