from __future__ import annotations

import os
import socket

import pytest

from client.bench.procfs import (
    parse_cpu_ticks,
    parse_listening_inodes,
    parse_rss_bytes,
    process_cpu_seconds,
    process_listens_on,
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


_PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0BBC 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1
   1: 0100007F:0BBC 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1
   2: 00000000:0BBD 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1
"""


def test_listening_sockets_by_port() -> None:
    # Port 3004 is 0x0BBC; the established connection on it (state 01) is not a listener.
    assert parse_listening_inodes(_PROC_NET_TCP, 3004) == {4242}
    assert parse_listening_inodes(_PROC_NET_TCP, 3005) == {4444}
    assert parse_listening_inodes(_PROC_NET_TCP, 3006) == set()


def test_a_process_is_known_by_its_listening_socket() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        assert process_listens_on(os.getpid(), [port]) is False
        listener.listen()
        assert process_listens_on(os.getpid(), [port]) is True
