"""One exception type for problems the user can fix (bad input, bad flags, bad files).

Command-line entry points catch `UserError` and print its message as one line with a non-zero exit
code instead of a traceback; everything else is a bug and keeps its traceback.
"""
import sys
from contextlib import contextmanager


class UserError(Exception):
    """A problem with the user's input: the message says what, where and how to fix it."""


@contextmanager
def exit_on_user_error(prog: str):
    try:
        yield
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
