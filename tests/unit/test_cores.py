"""node.cores: the node's CPU threads split among the jobs that run at once in its process."""

from __future__ import annotations

import threading

import torch

from node.cores import CoreShare


def test_jobs_share_the_threads_and_take_them_back_at_their_next_phase():
    cores = CoreShare(4)
    main_threads = torch.get_num_threads()
    a_started, b_started, b_done, a_checked = (threading.Event() for _ in range(4))
    seen: dict[str, list[int]] = {"a": [], "b": []}

    def job_a() -> None:
        with cores.job() as n:
            seen["a"].append(n)  # alone: every thread
            a_started.set()
            b_started.wait(10)
            seen["a"].append(cores.apply())  # a phase while B runs: half
            seen["a"].append(torch.get_num_threads())
            a_checked.set()
            b_done.wait(10)
            seen["a"].append(cores.apply())  # B gone: all of them again
            seen["a"].append(torch.get_num_threads())

    def job_b() -> None:
        a_started.wait(10)
        with cores.job() as n:
            seen["b"] += [n, torch.get_num_threads()]
            b_started.set()
            a_checked.wait(10)
        b_done.set()

    threads = [threading.Thread(target=job_a), threading.Thread(target=job_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"a": [4, 2, 2, 4, 4], "b": [2, 2]}, seen
    assert cores.running == 0
    # Each thread's count is its own: the jobs' threads never changed this one's OpenMP team.
    assert torch.get_num_threads() == main_threads


def test_never_below_one_thread():
    cores = CoreShare(1)
    with cores.job(), cores.job() as n:
        assert n == 1 and cores.fair() == 1
    assert CoreShare(3).fair() == 3 and CoreShare(0).total == 1
