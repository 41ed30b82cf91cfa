"""The ``fedbench`` console entry point: Ctrl-C at any moment of start-up ends quietly.

The script that installers generate imports its target before calling it, so a target in
``fedbench.cli.main`` could not catch an interrupt that lands while that module (and what it
imports) loads. This module imports nothing at its top but ``sys``; it loads the CLI inside the
``try``.
"""

from __future__ import annotations

import sys

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C


def console_main() -> int:
    try:
        from fedbench.cli.main import main

        return main()
    except KeyboardInterrupt:
        print("fedbench: interrupted while starting; nothing was run", file=sys.stderr)
        return INTERRUPTED_EXIT


if __name__ == "__main__":
    sys.exit(console_main())
