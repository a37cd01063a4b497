"""Expected failures and how every entry point reports them.

A bad config, a missing or corrupt input, a storage or tokenizer problem is not a bug: its error class derives
from `UserError`, and `main()` prints it as one line, `error: <message>`, and exits 2 (or the class's
`exit_code`). Anything else is a bug and keeps its traceback. WMTP_DEBUG=1 shows tracebacks for both.

    if __name__ == "__main__":
        sys.exit(errors.main(run, sys.argv[1:]))
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable


class UserError(Exception):
    """An expected failure whose message says what is wrong, where (file, line, key) and what to do."""

    exit_code = 2


def one_line(message: str) -> str:
    """Join a multi-line message (e.g. a list of places tried) into one line."""
    parts = [re.sub(r"^-\s+", "", line.strip()) for line in message.strip().splitlines() if line.strip()]
    out = parts[0] if parts else ""
    for p in parts[1:]:
        out += (" " if out.endswith(":") else "; ") + p
    return out


def report(e: UserError) -> int:
    """Print `error: <message>` (credentials scrubbed; the rank first under torchrun) and return the exit code."""
    from s3cache import scrub

    rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(f"{prefix}error: {scrub(one_line(str(e)))}", file=sys.stderr, flush=True)
    return e.exit_code


def main(run: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run an entry point's `run(argv)`; expected failures become one line and their exit code."""
    try:
        return run(argv)
    except UserError as e:
        if os.environ.get("WMTP_DEBUG", "") not in ("", "0"):
            raise
        return report(e)
