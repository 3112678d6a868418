"""
Tests of sandbox.py: a passing program passes, and every runaway program (an infinite loop, a
memory bomb, a fork bomb, a child outliving its parent, a flood of output, a huge file) ends in a
clean failed result without leaving a process behind. Run as root, as CI runs them, they also
check that the program runs as an unprivileged user, where the process limit holds.
"""
import os
import sys

from sandbox import run_program

# every test program starts by printing its session id: the sandbox starts one session per run,
# so any process of that session still in /proc afterwards (a zombie included) was left behind
PRELUDE = "import os, resource, sys, time\nprint(os.getsid(0), flush=True)\n"


def run(body, **limits):
    """run_program(PRELUDE + body) -> (result, processes of its session still in /proc)."""
    result = run_program(PRELUDE + body, **limits)
    first = result["output"].split("\n", 1)[0]
    assert first.isdigit(), f"the program did not start (output {result['output'][:300]!r})"
    return result, session_processes(int(first))


def session_processes(sid):
    """[(pid, state)] of every process whose session id is sid; [] where there is no /proc."""
    if not sys.platform.startswith("linux"):
        return []
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                # after "pid (command)": state, ppid, process group, session, ...
                fields = f.read().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):  # the process ended meanwhile
            continue
        if int(fields[3]) == sid:
            found.append((int(name), fields[0]))
    return found


def test_sandbox_passing_program_passes():
    """A program that exits 0 passes, with its output returned."""
    result, left = run("print('hello from the sandbox')\n")
    reason = result["reason"]
    assert result["passed"] and not result["timed_out"], f"a correct program failed: {reason}"
    assert "hello from the sandbox" in result["output"], f"output lost: {result['output']!r}"
    assert reason == "passed" and left == [], f"{reason}, left {left}"


def test_sandbox_failing_program_reports_its_error():
    """A failing assert fails, and the reason is the traceback's last line."""
    result, _ = run("assert 1 + 1 == 3, 'arithmetic'\n")
    assert not result["passed"], "a failing program passed: the exit code is not checked"
    assert "AssertionError: arithmetic" in result["reason"], f"lost the error: {result['reason']}"


def test_sandbox_runs_unprivileged_and_limited():
    """The program runs in a temp dir, not as root, under the limits asked for, without stdin."""
    body = ("limit = lambda name: resource.getrlimit(getattr(resource, name))[0]\n"
            "print(os.getuid(), limit('RLIMIT_NPROC'), limit('RLIMIT_AS'), limit('RLIMIT_FSIZE'),\n"
            "      os.getcwd(), sys.stdin.read() == '')\n")
    result, _ = run(body, max_processes=8, max_memory_mb=200, max_file_mb=3)
    uid, nproc, address_space, file_size, cwd, has_no_stdin = result["output"].split()[1:]
    if os.geteuid() == 0:
        assert uid != "0", "the program ran as root, where the process limit does not hold"
    limits = (int(nproc), int(address_space), int(file_size))
    assert limits == (8, 200 << 20, 3 << 20), f"limits not applied: {limits}"
    assert "tinychat-sandbox-" in cwd and not os.path.exists(cwd), f"cwd {cwd} was not removed"
    assert has_no_stdin == "True", "stdin is not empty"


def test_sandbox_infinite_loop_times_out():
    """A loop that ignores SIGTERM is stopped at the timeout and killed with its process group."""
    body = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass\n"
    result, left = run(body, timeout=1.0)
    assert result["timed_out"] and not result["passed"], f"a loop ended as {result['reason']!r}"
    assert left == [], f"processes left behind: {left}"


def test_sandbox_memory_bomb_fails_cleanly():
    """Allocating without end hits the address-space limit: a MemoryError, not a swapping box."""
    body = "hoard = []\nwhile True:\n    hoard.append(bytearray(1 << 20))\n"
    result, left = run(body, max_memory_mb=128, timeout=5.0)
    reason = result["reason"]
    assert not result["passed"] and "MemoryError" in reason, f"{reason!r}: RLIMIT_AS not applied?"
    assert left == [], f"processes left behind: {left}"


def test_sandbox_fork_bomb_is_contained():
    """A fork bomb stays within the process limit and is killed whole at the timeout."""
    # NOTE: the bomb runs only once the limit is known to hold: not root (Linux exempts root from
    # RLIMIT_NPROC) and a small limit. The bomb checks it again itself before forking.
    guard = "assert os.getuid() != 0 and 0 < resource.getrlimit(resource.RLIMIT_NPROC)[0] <= 16\n"
    probe, _ = run(guard)
    assert probe["passed"], f"no process limit ({probe['reason']}): the fork bomb was not run"
    bomb = guard + "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result, left = run(bomb, timeout=1.0, max_processes=16)
    assert result["timed_out"] and not result["passed"], f"bomb ended as {result['reason']!r}"
    assert left == [], f"fork bomb processes left behind: {left}"


def test_sandbox_child_outliving_its_parent_is_killed():
    """A child still sleeping when the program exits is killed at once, and the run fails."""
    result, left = run("if os.fork() == 0:\n    time.sleep(60)\nprint('parent exits')\n")
    reason = result["reason"]
    assert not result["timed_out"], "the run waited for the orphan, not for the program"
    assert not result["passed"] and "left running: 1" in reason, f"reason {reason!r}"
    assert left == [], f"the orphan was left behind: {left}"


def test_sandbox_output_flood_is_capped():
    """Endless printing is cut at max_output bytes and stopped."""
    result, left = run("while True:\n    print('x' * 1000)\n", max_output=5000)
    reason = result["reason"]
    assert len(result["output"].encode()) == 5000, f"kept {len(result['output'])} chars, cap 5000"
    assert not result["passed"] and "output over 5000 bytes" in reason, f"reason {reason!r}"
    assert left == [], f"processes left behind: {left}"


def test_sandbox_huge_file_hits_the_file_size_limit():
    """Writing a file without end fails at the file-size limit."""
    body = "with open('big.bin', 'wb') as f:\n    while True:\n        f.write(bytes(1 << 20))\n"
    result, left = run(body, max_file_mb=2)
    reason = result["reason"]
    assert not result["passed"] and "File too large" in reason, f"reason {reason!r}"
    assert left == [], f"processes left behind: {left}"
