"""Process trees from /proc (Linux): what a crash test kills, what a watchdog watches."""

from __future__ import annotations

import os


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone. The name field may hold spaces and parentheses:
    the fields are split after its last ')'."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    st = proc_stat(pid)
    return st is not None and st[0] != "Z"


def tree(root: int) -> set[int]:
    """``root`` and every process under it (empty but for ``root`` where /proc is absent)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if d.isdigit() and (st := proc_stat(int(d))) is not None:
            kids.setdefault(st[1], []).append(int(d))
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += kids.get(pid, [])
    return seen


def cmdline(pid: int) -> str:
    """The process's command line ('' when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
