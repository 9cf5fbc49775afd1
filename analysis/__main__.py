"""``python -m analysis report --study NAME [...]``: the same command as
``python -m study report`` (``analysis.command``), for a machine with only the analysis."""
from __future__ import annotations

import argparse
import logging
import sys

from analysis.command import add_report_arguments, run_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis")
    sub = parser.add_subparsers(dest="command", required=True)
    add_report_arguments(sub.add_parser("report", help="tables + figures of a study under "
                                                      "reports/<study>"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_report(args)
    except (ValueError, FileNotFoundError) as err:  # bad option / study not found
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
