"""Run every CPU suite in one go and put the latest tables into ``bench/README.md``.

    .venv/bin/python bench/run_all.py [--threads 2] [--reuse-peers]
                                      [--skip brain,synthetic,robustness,alignment,contrast,large,scaling]
    .venv/bin/python bench/run_all.py --readme-only      # only re-assemble the README from bench/results

The README's "Latest results" section (between the two marker lines) is rebuilt from the markdown
files in ``bench/results`` (each carries its date, machine and commit).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
BEGIN, END = "<!-- latest results: begin (bench/run_all.py) -->", "<!-- latest results: end -->"
SUITES = {
    "brain": ["brain_pair.py", "--methods", "samir:balanced,samir:accurate,demons,elastix,ants-mi", "--cache-check"],
    "synthetic": ["synthetic.py", "accuracy"],
    "robustness": ["synthetic.py", "robustness", "--methods", "samir:balanced,samir:balanced+hm,demons,elastix,ants-mi"],
    "alignment": ["alignment.py"],
    "contrast": ["contrast.py"],
    "large": ["large_deformation.py"],
    "scaling": ["scaling.py"],
}
RESULT_FILES = ("brain_pair.md", "synthetic_accuracy.md", "robustness.md", "alignment.md", "contrast.md",
                "large_deformation.md", "scaling.md")


def assemble_readme() -> None:
    readme = BENCH / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no results markers")
    parts = [(RESULTS / name).read_text().strip() for name in RESULT_FILES if (RESULTS / name).exists()]
    parts += [p.read_text().strip() for p in sorted(RESULTS.glob("gpu_*.md")) if "quick" not in p.name]
    body = "\n\n".join(parts).replace("](", "](results/").replace("](results/http", "](http")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{BEGIN}\n\n{body}\n\n{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip", default="")
    parser.add_argument("--readme-only", action="store_true")
    parser.add_argument("--reuse-peers", action="store_true",
                        help="every suite but scaling: reuse peers' outputs of an earlier run for identical inputs")
    args = parser.parse_args(argv)
    if not args.readme_only:
        skip = set(filter(None, args.skip.split(",")))
        for name, command in SUITES.items():
            if name in skip:
                continue
            print(f"=== suite {name} ===", flush=True)
            reuse = ["--reuse-peers"] if args.reuse_peers and name != "scaling" else []
            subprocess.run([sys.executable, str(BENCH / command[0]), *command[1:], "--threads", str(args.threads), *reuse],
                           check=True)
    assemble_readme()
    return 0


if __name__ == "__main__":
    sys.exit(main())
