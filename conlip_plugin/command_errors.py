"""How every command stops on bad input: one message naming the problem and the fix, never a traceback."""
from typing import NoReturn

SHOWN = 5  # offending items named in an error message


def fail(message: str) -> NoReturn:
    """Stop with a message naming the problem and the fix (exit status 1)."""
    raise SystemExit(f"error: {message}")


def listing(items: list) -> str:
    """The first few items and how many more: error messages stay readable for a million bad files."""
    shown = ", ".join(str(i) for i in items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")
