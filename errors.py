"""Expected failures, how every entry point reports them, and the credential scrubbing every message passes through.

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

# --------------------------------------------------------------------------- scrubbing

_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{12,}\b|\bhf_[A-Za-z0-9]{30,}\b|\bgh[pousr]_[A-Za-z0-9]{36,}\b")
_USERINFO = re.compile(r"(://)[^/@\s]+@")
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD")
SECRET_ENV += ("MLFLOW_TRACKING_TOKEN", "HF_TOKEN")


def scrub(text: str) -> str:
    """Remove anything credential-like: the values of the secret env vars in use, AWS access-key ids, Hugging Face
    and GitHub tokens, user:password@ in URLs. Every message, report and file a run writes passes through here."""
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return _USERINFO.sub(r"\1***@", _KEY_ID.sub("***", text))


# --------------------------------------------------------------------------- expected failures


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
