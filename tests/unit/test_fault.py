"""trainer/fault's parts that need no process group: fault.inject's grammar, the restart line and its
record, where the watchdog finds the main thread, and its one-line summary. The watchdog and straggler
warnings on real ranks: tests/e2e/test_fault_tolerance.py; in-job restarts: test_resume.py and tests/slurm."""

import threading

import pytest

from trainer.errors import ConfigError
from trainer.fault.inject import Fault, check_faults, parse_fault
from trainer.fault.restarts import note_step, restart_line
from trainer.fault.watchdog import HangWatchdog, main_thread_place


def test_fault_grammar():
    assert parse_fault("hang:rank=1:step=7") == Fault("hang", rank=1, step=7)
    assert parse_fault("crash:rank=0:step=3:restart=1") == Fault("crash", rank=0, step=3, restart=1)
    assert parse_fault("slow:rank=2:factor=2.5") == Fault("slow", rank=2, factor=2.5)
    for bad, says in [("hang:rank=1", "hang takes rank, step"), ("hang:rank=1:step=0", "step >= 1"),
                      ("slow:rank=1:factor=x", "factor a number"), ("hang:rank=1:step=2:when=3", "hang takes rank, step"),
                      ("hang:rank", "each part after the kind is key=value")]:
        with pytest.raises(ConfigError, match=says):
            parse_fault(bad)


def test_injection_needs_the_debug_flag_and_a_step_that_comes(monkeypatch):
    monkeypatch.delenv("TESSERA_DEBUG_FAULTS", raising=False)
    assert check_faults([], steps=10) == []
    with pytest.raises(ConfigError, match="TESSERA_DEBUG_FAULTS=1"):
        check_faults(["hang:rank=0:step=2"], steps=10)
    monkeypatch.setenv("TESSERA_DEBUG_FAULTS", "1")
    with pytest.raises(ConfigError, match="step 20 is past training.steps=10"):
        check_faults(["crash:rank=0:step=20"], steps=10)


def test_a_restart_says_what_it_cost(tmp_path, monkeypatch):
    note_step(tmp_path, 17)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert restart_line(tmp_path, 10) is None  # a first start says nothing
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    line, record = restart_line(tmp_path, 10)
    assert line == ("restart: in-job restart 2 of at most 3; resumed from step 10; the last run reached step 17, so "
                    "steps 11-17 are trained again (7 lost)")
    assert record == {"restart": 2, "steps_lost": 7, "reached": 17}
    assert "started again from step 0 (no checkpoint was committed)" in restart_line(tmp_path, 0)[0]


def test_the_watchdog_finds_the_main_thread_and_sums_up(tmp_path):
    found = []
    helper = threading.Thread(target=lambda: found.append(main_thread_place()))
    helper.start()
    helper.join()
    waiting, place = found[0]
    assert not waiting and place.startswith("test_the_watchdog_finds_the_main_thread_and_sums_up (tests/unit/test_fault.py:")

    dog = HangWatchdog(30, tmp_path, rank=0, world_size=12, device_type="cpu")
    answers = {r: "waiting|all_reduce (x.py:1)" for r in range(11) if r != 5}
    answers[5] = "busy|injected_hang (trainer/fault/inject.py:80)"
    line = dog._summary(7, 31.2, answers, tmp_path / "hangs" / "step-7")
    assert line == (f"hang: no step completed for 31 s (fault.hang_timeout_s=30) at step 7; ranks not in a collective "
                    f"(the others wait for them): 5 in injected_hang (trainer/fault/inject.py:80); waiting in a "
                    f"collective: 0, 1, 2, 3, 4, 6, 7, 8 and 2 more; no answer (dead or frozen): 11; stacks under "
                    f"{tmp_path / 'hangs' / 'step-7'}; exiting with code 124")
