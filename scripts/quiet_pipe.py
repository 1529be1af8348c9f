"""Runs a script's `main` so that a reader that stops early (`script.py | head`) ends it
quietly, with exit status 1 and no BrokenPipeError traceback; the script's own `finally`
clauses (temporary folders) run on the way out."""
import os
import sys


def run(main):
    try:
        main()
        sys.stdout.flush()  # a pipe's last output goes now, where the handler below sees it
    except BrokenPipeError:
        # Point stdout at /dev/null so that Python's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
