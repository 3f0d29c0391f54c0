"""The `deepspeed` launcher's hostfile, checked before anything starts (launch/multinode.sh runs this).

One node per line, `HOST slots=N` (N processes on that node); `#` starts a comment. DeepSpeed's own parser
(`deepspeed.launcher.runner._parse_hostfile`) accepts `slots=0`, trailing text after the count
(`slots=8gpus` reads as 8) and, when the file is missing, quietly falls back to this machine alone. A bad
hostfile here is one line naming the file and line instead, before ssh or any rank starts.

    python -m megatron_lite.hostfile HOSTFILE      # prints: FIRST_HOST NODES TOTAL_SLOTS
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from megatron_lite.errors import UserError, exit_on_user_error

_LINE = re.compile(r"(?P<host>\S+)\s+slots=(?P<slots>\d+)")


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """{host: slots} in file order; UserError (file, line, what is wrong, how to fix) for a bad hostfile."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"hostfile {path}: cannot be read ({getattr(e, 'strerror', None) or e}); pass a text "
                        f"file with one 'HOST slots=N' line per node") from None
    pool: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"hostfile {path} line {n}"
        m = _LINE.fullmatch(line)
        if m is None:
            first = line.split()[0]
            what = f"{first!r} names no slots" if line == first else f"{line!r} is not 'HOST slots=N'"
            raise UserError(f"{where}: {what}; write '{first} slots=N' (N processes on that node)")
        host, slots = m["host"], int(m["slots"])
        if slots < 1:
            raise UserError(f"{where}: {host} has slots={slots}; every node needs at least one slot (process)")
        if host in pool:
            raise UserError(f"{where}: {host} is listed twice; give each node one line with its total slots")
        pool[host] = slots
    if not pool:
        raise UserError(f"hostfile {path} names no node; write one 'HOST slots=N' line per node")
    return pool


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m megatron_lite.hostfile",
        description="Check a deepspeed hostfile ('HOST slots=N' per line) and print its first host (the "
                    "default master address), its number of nodes and its total slots (the world size).")
    p.add_argument("hostfile", help="path of the hostfile")
    a = p.parse_args(argv)
    with exit_on_user_error(p.prog):
        pool = parse_hostfile(a.hostfile)
        print(next(iter(pool)), len(pool), sum(pool.values()))


if __name__ == "__main__":
    main()
