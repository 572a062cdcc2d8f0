"""The packaged recipes and sweeps: found by name, whatever way the project was installed.

    tips train recipe=tiny_cpu            # this folder's tiny_cpu.yaml
    tips train recipe=./my_recipe.yaml    # a file of your own (may say ``base: ...``)
    tips tune sweep=loss_weights          # sweeps/loss_weights.yaml

The YAML files ship inside the ``orchestrator`` package (``package-data`` in
pyproject.toml), so a wheel or a plain ``pip install .`` finds them as an editable install
does. ``tips recipes`` lists them with the first line of each header.
"""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent
SWEEPS_DIR = RECIPES_DIR / "sweeps"
DEFAULT_RECIPE = "tiny_cpu"
_PREFIXES = ("orchestrator/recipes/", "recipes/")


def _lookup(value: str, folder: Path, prefixes: tuple[str, ...]) -> Path:
    path = Path(value).expanduser()
    if path.is_file():
        return path.resolve()
    name = value
    for prefix in prefixes:  # `recipe=recipes/tiny_cpu.yaml` as older docs wrote it
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    for candidate in (folder / name, folder / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return path  # the caller reports it as not found, with the list of known names


def find_recipe(value: str | None) -> Path:
    """``recipe=`` as a path, else a packaged recipe by name (``tiny_cpu`` or ``tiny_cpu.yaml``);
    None gives the default. A name that matches nothing comes back as given."""
    return _lookup(value or DEFAULT_RECIPE, RECIPES_DIR, _PREFIXES)


def find_sweep(value: str) -> Path:
    """``sweep=`` as a path, else a packaged sweep by name (``loss_weights``)."""
    return _lookup(value, SWEEPS_DIR, tuple(p + "sweeps/" for p in _PREFIXES) + ("sweeps/",))


def _first_line(path: Path) -> str:
    """The header's first line without its ``# name:`` lead."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            head, sep, rest = text.partition(":")
            return rest.strip() if sep and head.strip() == path.stem else text
    return ""


def list_recipes() -> list[tuple[str, str]]:
    """``(name, first header line)`` of each packaged recipe, sorted by name."""
    return [(p.stem, _first_line(p)) for p in sorted(RECIPES_DIR.glob("*.yaml"))]


def list_sweeps() -> list[tuple[str, str]]:
    """``(name, first header line)`` of each packaged sweep, sorted by name."""
    return [(p.stem, _first_line(p)) for p in sorted(SWEEPS_DIR.glob("*.yaml"))]
