"""CPU ranks pick their intra-op threads from the cores they may use, the ranks beside them and the
cores other work keeps busy; OMP_NUM_THREADS wins."""

import os
import subprocess
import sys
import time

from parallel.cpu_threads import busy_cores, cpu_threads, usable_cores


def test_omp_num_threads_wins_and_ranks_share_the_cores():
    assert cpu_threads({"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")
    cores, _ = usable_cores()
    assert 1 <= cores <= os.cpu_count()
    threads, why = cpu_threads({"LOCAL_WORLD_SIZE": "2"})
    assert threads == max(1, cores // 2) and "/ 2 ranks on this host" in why


def test_a_busy_core_is_left_to_the_work_that_keeps_it_busy():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert busy_cores(os.sched_getaffinity(0)) > 0.7
        threads, why = cpu_threads({})
        if usable_cores()[0] > 1:
            assert threads < usable_cores()[0] and "busy with other work at start-up" in why
    finally:
        spinner.kill()
