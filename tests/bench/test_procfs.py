from __future__ import annotations

import os

import pytest

from client.bench.procfs import (
    parse_cpu_ticks,
    parse_rss_bytes,
    process_cpu_seconds,
    process_rss_bytes,
    self_cpu_seconds,
)


def test_cpu_ticks_survive_a_command_name_with_spaces_and_parentheses() -> None:
    fields = " ".join(str(n) for n in range(3, 53))  # field k holds k from field 3 on
    stat = f"1234 (bro ker) (x)) S {fields[2:]}"
    # utime is field 14, stime field 15 (after the state "S", numbers start at field 4)
    assert parse_cpu_ticks(stat) == 14 + 15


def test_rss_from_status() -> None:
    status = "Name:\tnode\nVmPeak:\t  10 kB\nVmRSS:\t   2048 kB\nThreads:\t7\n"
    assert parse_rss_bytes(status) == 2048 * 1024
    with pytest.raises(ValueError, match="VmRSS"):
        parse_rss_bytes("Name:\tkthreadd\n")


def test_this_process_reads_itself() -> None:
    assert process_cpu_seconds(os.getpid()) >= 0
    assert process_rss_bytes(os.getpid()) > 1024 * 1024
    assert self_cpu_seconds() > 0
