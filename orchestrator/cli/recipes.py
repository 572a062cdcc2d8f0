"""`tips recipes [--paths]`: the packaged recipes and sweeps, with the first line of each header."""

from __future__ import annotations

from orchestrator.cli.common import EXIT_OK, EXIT_USAGE, fail, recipes_table

PROG = "tips recipes"
SUMMARY = "list the packaged recipes and sweeps"


def usage() -> str:
    return f"""usage: tips recipes [--paths] [-h]

{SUMMARY}. Use one by name: tips train recipe=NAME, tips tune sweep=NAME;
copy one to start your own (a recipe may say `base: <file>` to inherit one level).

  --paths     print where each file is
  -h, --help  this text"""


def main(argv: list[str]) -> int:
    from orchestrator.recipes import RECIPES_DIR, SWEEPS_DIR, list_recipes, list_sweeps

    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return EXIT_OK
    unknown = [a for a in argv if a != "--paths"]
    if unknown:
        return fail(PROG, f"unknown argument(s) {unknown}; see {PROG} --help", EXIT_USAGE)
    if "--paths" in argv:
        for name, _ in list_recipes():
            print(RECIPES_DIR / f"{name}.yaml")
        for name, _ in list_sweeps():
            print(SWEEPS_DIR / f"{name}.yaml")
        return EXIT_OK
    print("recipes (tips train recipe=NAME):")
    print(recipes_table())
    print("\nsweeps (tips tune sweep=NAME):")
    print(recipes_table(sweeps=True))
    return EXIT_OK
