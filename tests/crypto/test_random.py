"""The nonce pool: every value fresh, across threads and across fork."""

from __future__ import annotations

import os
import threading

import pytest

from keygrants.crypto import nonce_bytes, random_bytes


def test_values_are_never_repeated_across_threads_and_pool_refills() -> None:
    seen: list[bytes] = []
    lock = threading.Lock()

    def draw() -> None:
        mine = [nonce_bytes(12) for _ in range(2000)]  # several 4 KiB refills per thread
        with lock:
            seen.extend(mine)

    threads = [threading.Thread(target=draw) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 16000 and len(set(seen)) == 16000
    assert all(len(v) == 12 for v in seen)


def test_a_forked_child_never_gets_the_parents_next_bytes() -> None:
    nonce_bytes(16)  # the pool now holds unread bytes the child must not reuse
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        os.write(write, nonce_bytes(16))
        os._exit(0)
    os.close(write)
    child = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 16 and child != nonce_bytes(16)


@pytest.mark.parametrize("n", [-1, 65])
def test_sizes_outside_the_pool_are_refused(n: int) -> None:
    with pytest.raises(ValueError):
        nonce_bytes(n)
    assert len(random_bytes(65)) == 65 and nonce_bytes(0) == b""
