"""`python -m bench` lists the benchmarks; `python -m bench NAME [args]` runs one (NAME --help: its options)."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# In the order bench/README.md lists them.
BENCHES = ("distill_methods", "label_efficiency", "label_suggestions", "reference_setting", "adapt_small_n", "subdistill_steps",
           "quantization", "ood", "xai_spurious", "faults", "student_search")


def summary(name: str) -> str:
    """The first line of a bench's docstring, read without importing it (imports pull in torch)."""
    doc = ast.get_docstring(ast.parse((HERE / f"{name}.py").read_text())) or ""
    return doc.partition("\n")[0].removeprefix("Benchmark: ")


def usage() -> str:
    width = max(map(len, BENCHES))
    lines = ["usage: python -m bench NAME [args]    (python -m bench NAME --help: its options)", "", "benchmarks:"]
    lines += [f"  {name:<{width}}  {summary(name)}" for name in BENCHES]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        print(f"unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    importlib.import_module(f"bench.{name}").main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
