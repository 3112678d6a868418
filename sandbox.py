"""
Runs a Python program in a separate, limited process: the code execution of the HumanEval eval.

Layer 0: stdlib only, no project imports. evals.py hands run_program each generated program (the
model's function followed by the task's tests) and counts it as passed when it exits 0. It
returns a small dict: passed, timed_out, output (stdout and stderr merged, capped) and a reason.

Design:
- a fresh interpreter, never exec() in ours: in a new session, in a new temporary directory
  removed afterwards, with a minimal environment (PATH, HOME, TMPDIR, a fixed hash seed, so set
  order is the same every run) and stdin from /dev/null
- the child's first program is a small supervisor, _supervise, whose source is sent with -c. It
  adopts every orphaned descendant (Linux's PR_SET_CHILD_SUBREAPER), forks the program, sets the
  limits between that fork and exec, waits, then kills and reaps whatever is left, so nothing
  outlives a run, not even a zombie (the init of some containers never reaps them)
- limits (setrlimit): address space, CPU seconds, processes, file size, open files, no core
  files. They are set inside the child after it started, not through Popen's preexec_fn, which
  can deadlock when the parent has threads, as a process running torch does
- NOTE: Linux does not apply the process limit to root, so a fork bomb run as root would reach
  the whole machine. As root the child therefore runs as `nobody` (Popen's user/group switch it
  between fork and exec), in a directory handed to nobody. An interpreter nobody cannot reach
  (pyenv's under /root, for one) is replaced by the system's python3
- the program gets a process group of its own: the supervisor kills it with one os.killpg
  (atomic: no member can fork once it is sent), then any process that left the group
- a wall-clock timeout: the parent asks the supervisor to stop (SIGTERM), and kills it if it is
  not gone GRACE_S later; output is read as it arrives, and a program that prints more than
  max_output bytes is stopped the same way

Left out on purpose (it limits accidents; it is NOT a security boundary against a determined
attacker, and untrusted code belongs in a container or a VM):
- no network isolation: the program may open sockets and reach whatever the machine reaches
- no filesystem isolation beyond Unix permissions: it reads what its user may read and writes
  world-writable places such as /tmp (its limit is per file, not on the disk it fills)
- a program can kill its own supervisor, or leave the session (setsid) and then outlive it; the
  process limit is per user, so it counts every process of nobody (or yours) on the machine
- POSIX only; on macOS (no subreaper, no /proc) the program's group is killed but its leftover
  processes are not counted, and RLIMIT_AS is not enforced
- as root, the program may run under the system's python3, another version than ours

References:
- nanochat execution.py and OpenAI's human-eval execution.py: https://github.com/karpathy/nanochat
- setrlimit(2): https://man7.org/linux/man-pages/man2/setrlimit.2.html
- PR_SET_CHILD_SUBREAPER in prctl(2): https://man7.org/linux/man-pages/man2/prctl.2.html
"""
import inspect
import json
import math
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRACE_S = 1.0         # seconds the supervisor gets to stop after SIGTERM before it is killed
READ_CHUNK = 1 << 16  # bytes read from the output pipe at a time (the Linux pipe buffer is 64 KiB)
# interpreters nobody may run when ours sits in a private directory; Debian, Ubuntu, Fedora, Alpine
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")


def _exec_program(settings: dict):
    """In the program's freshly forked process: its own process group, the limits, then exec.
    Never returns: whatever fails, the process exits 127 with the reason on stderr."""
    import os
    import resource
    import sys

    try:
        os.close(settings["status_fd"])  # so that only the supervisor can report
        os.setpgid(0, 0)  # group id = pid: the supervisor kills it and all its children at once
        for name, value in settings["limits"].items():
            limit = getattr(resource, name)
            hard = resource.getrlimit(limit)[1]
            # soft = hard, so the program cannot raise a limit back up; except CPU, which gets
            # 1 s of slack: SIGXCPU at the soft limit, SIGKILL at the hard one
            wanted = (value, value + (name == "RLIMIT_CPU"))
            resource.setrlimit(limit, tuple(
                v if hard == resource.RLIM_INFINITY else min(v, hard) for v in wanted))
        os.execv(sys.executable, [sys.executable, "-s", settings["program"]])
    except BaseException as e:  # say why the program could not start (the finally hides it)
        os.write(2, f"sandbox: could not start the program: {e!r}\n".encode())
    finally:
        os._exit(127)


def _supervise(settings: dict):
    """Inside the child: run settings["program"] under settings["limits"], kill and reap every
    process it leaves, and write {"code", "leftover"} as JSON to the pipe settings["status_fd"].

    code is the program's exit code, or minus the signal that killed it, or None when it was
    stopped (SIGTERM from the parent means: stop now); leftover counts the processes other than
    the program still there when it ended. This function's source and _exec_program's run with
    `python -c` (neither is ever called in the parent), so they import what they need themselves.

    Plan: 1) adopt orphans; 2) fork the program (_exec_program); 3) wait for it; 4) kill its
    group at once, then kill and reap the rest.
    """
    import ctypes
    import json
    import os
    import signal
    import sys
    import time

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    signal.signal(signal.SIGTERM, stop)
    # 1) 36 = PR_SET_CHILD_SUBREAPER: a descendant whose parent dies becomes our child, not init's
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
    # 2) the program
    pid = os.fork()
    if pid == 0:
        _exec_program(settings)
    # 3) wait for the program, reaping the orphans that die meanwhile, but not the program itself
    #    (WNOWAIT): while its zombie exists its pid, the id of its group, cannot be reused, so
    #    step 4 kills that group and nothing else. The parent sends SIGTERM at most once, and
    #    once it is ignored, cleaning up cannot be interrupted.
    has_ended = False
    try:
        while not has_ended:
            ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT).si_pid
            has_ended = ended == pid
            if not has_ended:
                os.waitpid(ended, 0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except Stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # 4) SIGKILL to a whole group is atomic: none of its processes can fork after it. Then the
    #    stragglers that left the group: our children, whose own children become ours as they die
    os.kill(pid, signal.SIGKILL)  # in case it was stopped before it made its group
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # it never made its group
        pass
    code, others = None, set()
    children_file = f"/proc/self/task/{os.getpid()}/children"
    while True:
        if os.path.exists(children_file):  # Linux; it lists zombies too, unharmed by a SIGKILL
            with open(children_file) as f:
                for child in {int(c) for c in f.read().split()} - {pid}:
                    os.kill(child, signal.SIGKILL)
        try:
            done, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # no child left
            break
        if done == 0:
            time.sleep(0.001)
        elif done == pid:
            code = os.waitstatus_to_exitcode(status) if has_ended else None
        else:
            others.add(done)
    report = {"code": code, "leftover": len(others)}
    os.write(settings["status_fd"], json.dumps(report).encode())


def _others_may_run(path: str) -> bool:
    """Whether a user other than the owner may run `path`: every directory above it searchable
    by 'others' and the file itself executable by them (stat's S_IXOTH bit)."""
    path = Path(os.path.realpath(path))
    return path.exists() and all(os.stat(p).st_mode & stat.S_IXOTH for p in [path, *path.parents])


def _interpreter(is_root: bool) -> str:
    """The Python the child runs: ours, unless we are root and nobody cannot reach it."""
    if not is_root:
        return sys.executable
    for path in (sys.executable, *SYSTEM_PYTHONS):
        if _others_may_run(path):
            return os.path.realpath(path)
    raise FileNotFoundError(f"running as root, the sandbox runs programs as the user nobody, "
                            f"who cannot run {sys.executable} (in a private directory), and "
                            f"there is no system python3 in {SYSTEM_PYTHONS}: install one (e.g. "
                            f"apt-get install python3), or run as a normal user")


def run_program(program: str, timeout: float = 5.0, max_memory_mb: int = 256,
                max_processes: int = 16, max_file_mb: int = 16, max_output: int = 65536) -> dict:
    """Run the Python source `program` in a fresh limited process, for about `timeout` seconds at
    most (2 * GRACE_S more if it resists). Returns {"passed", "timed_out", "output", "reason"}:
    passed when it exited 0 within its limits and left no process running; output is its stdout
    and stderr merged, at most max_output bytes, decoded as UTF-8. max_processes counts every
    process of the user the program runs as, on the whole machine (that is how Linux counts).

    Plan: 1) a temporary directory holding the program; 2) start the supervisor; 3) read the
    output until it ends, stopping the run at the timeout or the output cap; 4) wait for the
    supervisor and read its status (also on Ctrl-C: nothing may outlive the run); 5) the reason.
    """
    if os.name != "posix":
        raise OSError("the code sandbox needs a POSIX system (Linux or macOS): HumanEval cannot "
                      "run here")
    limits = {"RLIMIT_AS": max_memory_mb << 20, "RLIMIT_CPU": math.ceil(timeout),
              "RLIMIT_NPROC": max_processes, "RLIMIT_FSIZE": max_file_mb << 20,
              "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}  # 64 files: a test program needs a handful
    # 1) the program's own directory, which is also its working directory
    folder = tempfile.mkdtemp(prefix="tinychat-sandbox-")
    try:
        proc, status_read = _start(folder, program, limits)  # 2)
        try:
            output, stopped = _read_output(proc, timeout, max_output)  # 3)
        finally:
            status = _finish(proc, status_read)  # 4)
    finally:
        shutil.rmtree(folder)
    # 5) why it failed, in a few words: the last line of a traceback says it best
    code, leftover = status.get("code"), status.get("leftover", 0)
    text = output.decode("utf-8", errors="replace")
    last_line = text.strip().splitlines()[-1] if text.strip() else ""
    if stopped == "timeout":
        reason = f"timed out after {timeout} s"
    elif stopped:
        reason = f"output over {max_output} bytes"
    elif code is None:
        reason = f"the supervisor ended without a status (exit code {proc.returncode})"
    elif code < 0:
        is_cpu = -code == signal.SIGXCPU
        reason = f"killed by {signal.Signals(-code).name}" + (" (CPU time limit)" if is_cpu else "")
    elif code > 0:
        reason = f"exit code {code}: {last_line}"
    else:
        reason = f"processes left running: {leftover}" if leftover else "passed"
    return {"passed": reason == "passed", "timed_out": stopped == "timeout", "output": text,
            "reason": reason}


def _start(folder: str, program: str, limits: dict) -> tuple:
    """Write program.py into folder and start the supervisor on it, as nobody when we are root.
    Returns (the Popen, the read end of the status pipe)."""
    path = os.path.join(folder, "program.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(program)
    is_root = os.geteuid() == 0
    user = {}
    if is_root:
        import pwd  # NOTE: imported here, not at the top: the module does not exist on Windows
        nobody = pwd.getpwnam("nobody")
        user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    status_read, status_write = os.pipe()
    settings = {"program": path, "limits": limits, "status_fd": status_write}
    source = inspect.getsource(_exec_program) + inspect.getsource(_supervise)
    code = f"{source}\n_supervise({settings!r})\n"
    env = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0"}
    try:
        proc = subprocess.Popen([_interpreter(is_root), "-s", "-c", code], cwd=folder, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                pass_fds=(status_write,), **user)
    except BaseException:
        os.close(status_read)
        raise
    finally:
        os.close(status_write)  # the child has its copy; ours would keep the pipe from ever ending
    return proc, status_read


def _read_output(proc, timeout: float, max_output: int) -> tuple:
    """(output bytes, None or why the run was stopped: "timeout" or "output") of a running
    supervisor. Reads until every process has closed the pipe; at the timeout or past the cap it
    asks the supervisor to stop, and gives up GRACE_S later if the pipe is still open."""
    fd = proc.stdout.fileno()
    chunks, size, stopped = [], 0, None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        is_ready = left > 0 and bool(select.select([fd], [], [], left)[0])
        if is_ready:
            data = os.read(fd, READ_CHUNK)
            if not data:  # end of file: every process holding the pipe has exited
                break
            kept = data[:max_output - size]  # past the cap the rest is read and dropped
            chunks.append(kept)
            size += len(kept)
            if len(kept) == len(data) or stopped:
                continue
        elif left > 0:
            continue
        elif stopped:  # asked to stop GRACE_S ago, and the pipe is still open: _finish kills it
            break
        # the output went over the cap, or the time is up: ask the supervisor to stop
        stopped = "output" if is_ready else "timeout"
        os.kill(proc.pid, signal.SIGTERM)  # not proc.send_signal, which reaps an exited process
        deadline = time.monotonic() + GRACE_S
    return b"".join(chunks), stopped


def _finish(proc, status_read: int) -> dict:
    """Stop the supervisor (a no-op when it is done), give it GRACE_S to exit, then kill its group,
    reap it and return its status: {} when it died without writing one."""
    os.kill(proc.pid, signal.SIGTERM)  # ignored while it cleans up, harmless to its zombie
    deadline = time.monotonic() + GRACE_S
    # NOTE: WNOWAIT leaves the exited supervisor a zombie: its pid, which is also its group's id,
    # cannot be reused by an unrelated process before the killpg below
    while (os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
           and time.monotonic() < deadline):
        time.sleep(0.005)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the supervisor, if it is stuck
    except ProcessLookupError:  # the group is already empty (macOS does not count a zombie)
        pass
    proc.wait()
    proc.stdout.close()
    report = os.read(status_read, READ_CHUNK)  # the writer is gone, so this never blocks
    os.close(status_read)
    return json.loads(report) if proc.returncode == 0 and report else {}
