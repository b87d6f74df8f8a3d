"""What every script shares at its command line, and nothing else: no model code, no torch.

The project's files import downward only:
    cli; prompts, losses, offline; sample; search, uce; erase; literal, toy; evaluate, bench
    (each layer imports only from those before it; tests/test_layers.py checks for circles)
"""
import csv
import os
import sys


class UsageError(Exception):
    """Bad input: the scripts print its message as one line on stderr and exit 2."""


def run_cli(main, argv=None):
    """Call `main`, turning a UsageError into one line on stderr and exit code 2."""
    try:
        main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def one_line_errors(parser):
    """argparse's errors (unknown choice, missing flag) as a UsageError: one line, no usage dump."""
    def error(message):
        raise UsageError(message)
    parser.error = error
    return parser


def default_device():
    import torch  # here, not at the top: prompts.py and evaluate.py's CSV commands need no torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def read_csv(path, need=("prompt",)):
    """A prompt file's rows as dicts; a missing file, no rows or a missing column: UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"CSV {path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UsageError(f"CSV {path} has no data rows")
    missing = [c for c in need if c not in rows[0]]
    if missing:
        raise UsageError(f"CSV {path} lacks column(s) {', '.join(missing)}")
    return rows


def write_csv(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
