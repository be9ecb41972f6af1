"""CPU time and resident memory of processes, from Linux ``/proc`` (parsers are pure)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "CLOCK_TICKS",
    "parse_cpu_ticks",
    "parse_listening_inodes",
    "parse_rss_bytes",
    "process_cpu_seconds",
    "process_listens_on",
    "process_rss_bytes",
    "self_cpu_seconds",
]

CLOCK_TICKS: int = os.sysconf("SC_CLK_TCK")


def parse_cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks, all threads) from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may hold spaces or parentheses itself,
    so fields are counted from the last ``)``: utime and stime are fields 14 and 15.
    """
    rest = stat[stat.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): field k is rest[k - 3].
    return int(rest[11]) + int(rest[12])


def parse_rss_bytes(status: str) -> int:
    """VmRSS in bytes from the text of ``/proc/<pid>/status``."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            if unit != "kB":  # pragma: no cover - the kernel always says kB
                raise ValueError(f"unexpected VmRSS unit {unit!r}")
            return int(value) * 1024
    raise ValueError("no VmRSS line (a kernel thread or a zombie?)")


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) that process ``pid`` has used so far."""
    return parse_cpu_ticks(Path(f"/proc/{pid}/stat").read_text()) / CLOCK_TICKS


def process_rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes."""
    return parse_rss_bytes(Path(f"/proc/{pid}/status").read_text())


def self_cpu_seconds() -> float:
    """CPU seconds this process has used (finer than clock ticks)."""
    times = os.times()
    return times.user + times.system


def parse_listening_inodes(proc_net_tcp: str, port: int) -> set[int]:
    """Socket inodes listening on ``port``, from the text of ``/proc/net/tcp`` or ``tcp6``.

    Each line after the header is ``sl local_address rem_address st ... inode``; the local
    address ends in ``:PORT`` in hex, and state ``0A`` is LISTEN.
    """
    inodes: set[int] = set()
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != "0A":
            continue
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            inodes.add(int(fields[9]))
    return inodes


def process_listens_on(pid: int, ports: list[int]) -> bool | None:
    """Whether process ``pid`` holds a socket listening on one of ``ports`` (None: unknown,
    e.g. another user's process)."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            text = Path(table).read_text()
        except OSError:
            continue
        for port in ports:
            inodes |= parse_listening_inodes(text, port)
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            return True
    return False
