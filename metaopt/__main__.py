"""``metaopt`` command line. ``metaopt demo`` runs the core demo."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metaopt", description="Hypergradients through training, for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="hypergradient table and a short moons distillation")
    demo.add_argument("--outer-steps", type=int, default=30, help="distillation steps after the table")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.outer_steps < 0:
            parser.error(f"--outer-steps must be >= 0, got {args.outer_steps}")
        from .demo import main as demo_main

        demo_main(outer_steps=args.outer_steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
