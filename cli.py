"""
What every command-line entry point shares: flags made from dataclasses, progress lines for long
jobs, errors a user can fix printed as one line, and the choices about the machine it runs on
(CPUs, device, precision, torch.compile, the allocator), each made once, in the entry point.

Layer 0 (stdlib and torch, no project imports), so every other file may use it: train_all.py,
tinychat.py, serve.py and bench.py build their flags and pick the machine's settings with it,
data.py prints its download and tokenize progress with it, and bpe.py (which imports nothing of
the project) is handed `Progress` by its caller.

Design:
- a config is a dataclass whose every field has a type, a default and a trailing comment;
  add_config_args turns each field into one typed --flag whose help is that comment, so the
  dataclass stays the only place a default is declared (STYLE.md section 6); a bool flag takes
  on/off, true/false, yes/no or 1/0 (parse_bool)
- flags default to None, meaning "not given": config_from_args then layers defaults, a preset's
  changes and the flags actually given, in that order
- Progress prints a whole line every few seconds ("tokenize | 12.3/61.2 MB | 2.0 MB/s | 6 s |
  eta 24 s"): a log file and CI read it as well as a terminal does
- run_main is the one place an entry point decides which errors are the user's: ValueError,
  FileNotFoundError and the other OSErrors (disk, network, permissions) are what the project
  raises for things a user controls (STYLE.md section 8), each with a message saying what to do;
  they print as one line. Every other exception is a bug and keeps its traceback.
- the machine: bf16 where the hardware multiplies it natively (pick_precision), torch.compile
  where a probe shows it works (pick_compile), glibc told to keep freed memory for the next
  training step (keep_freed_memory), a server's threads (set_server_threads); each returns
  what the banner prints

Left out on purpose:
- subcommands, config files and environment variables as config (STYLE.md section 6)
- redrawing one progress line in place with \\r: the same output must read well in a file

References:
- argparse: https://docs.python.org/3/library/argparse.html
- dataclasses: https://docs.python.org/3/library/dataclasses.html
"""
import argparse
import ctypes
import dataclasses
import inspect
import os
import platform
import re
import sys
import time

import torch

# seconds between progress lines: readable in a log file, alive in a terminal
PROGRESS_EVERY_S = 3.0
# the user errors run_main prints as one line (STYLE.md section 8); OSError covers
# FileNotFoundError, PermissionError, ConnectionError (downloads) and a full disk
USER_ERRORS = (ValueError, OSError)


# --- dataclass configs on the command line ---

def parse_bool(text: str) -> bool:
    """A flag's bool: on/true/yes/1 or off/false/no/0. (argparse's type=bool calls bool(text),
    which is True for any text that is not empty, "false" included.)"""
    value = {"on": True, "true": True, "yes": True, "1": True,
             "off": False, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not on/off (also true/false, yes/no, 1/0)")
    return value


def add_config_args(parser, cls, prefix: str = "", short: dict | None = None):
    """Add one typed --[prefix-]field flag per field of dataclass cls; its help is the field's
    comment.

    short: extra one-letter flags by field name, e.g. {"temperature": "-t"}.
    """
    # the comments are read from the source: `name: type = default  # comment`
    helps = {}
    for klass in reversed(cls.__mro__[:-1]):  # base classes first, so a subclass's own comment wins
        source = inspect.getsource(klass)
        helps.update(re.findall(r"^\s+(\w+): [\w |]+ = [^#\n]*#\s*(.*)$", source, re.M))
    group = parser.add_argument_group(f"{prefix or 'general'} ({cls.__name__})", cls.__doc__)
    for f in dataclasses.fields(cls):
        # `int | None` -> int. NOTE: default None means "not given", so a preset can still
        # fill it in
        kind = next(t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None))
        # "%" doubled: argparse %-formats help texts
        text = f"{helps.get(f.name, '')} (default: {f.default})".replace("%", "%%")
        flag = "--" + "-".join(filter(None, [prefix, f.name])).replace("_", "-")
        flags = [short[f.name], flag] if short and f.name in short else [flag]
        group.add_argument(*flags, type=parse_bool if kind is bool else kind, default=None,
                           dest=f"{prefix}.{f.name}", metavar=kind.__name__.upper(), help=text)


def config_from_args(args, cls, prefix: str = "", preset: dict | None = None):
    """An instance of cls: its defaults, overridden by `preset`, overridden by the flags given."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {}
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if section == prefix and name in names and value is not None:
            given[name] = value
    return cls(**{**(preset or {}), **given})


# --- progress lines ---

class Progress:
    """Prints 'label | done/total unit | rate unit/s | elapsed s | eta s' at most every few seconds.

    `scale` divides the counts for printing (1e6 with unit "MB" turns bytes into MB); total 0 or
    None means unknown (no eta). Call update(done) as often as you like, update(done, True) once
    at the end for the closing line.
    """

    def __init__(self, label: str, total: float | None, unit: str, scale: float = 1.0):
        self.label = label
        self.total = total
        self.unit = unit
        self.scale = scale
        self.t0 = time.time()
        self.last = self.t0

    def _count(self, x: float) -> str:
        return f"{x / self.scale:,.1f}" if self.scale != 1 else f"{x:,.0f}"

    def update(self, done: float, is_final: bool = False):
        now = time.time()
        if not is_final and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)  # units per second since the start
        of_total = f"/{self._count(self.total)}" if self.total else ""
        line = (f"{self.label} | {self._count(done)}{of_total} {self.unit} | "
                f"{self._count(rate)} {self.unit}/s | {now - self.t0:.0f} s")
        if self.total and not is_final:
            line += f" | eta {(self.total - done) / max(rate, 1e-9):.0f} s"
        print(line, flush=True)


# --- the machine ---

def usable_cpus() -> int:
    """The CPUs this process may run on: fewer than the machine's under taskset or a container
    limit."""
    # NOTE: os.cpu_count() counts the machine's CPUs; a process pinned to one of them that starts
    # a thread or worker per counted CPU runs them all on that one, each slower than alone.
    # sched_getaffinity is Linux-only; elsewhere the machine's count is the best guess.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def pick_device(name: str | None = None) -> torch.device:
    """The one device picker: `name` if given ("cpu", "cuda", "mps"), else cuda when present,
    else cpu."""
    # mps (Apple GPUs) only when asked: nanochat found it slower than the CPU for some ops
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = {"cpu": True,
                 "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if name not in available:
        raise ValueError(f"unknown device {name!r}; use one of {sorted(available)}")
    if not available[name]:
        raise ValueError(f"device {name!r} is not available on this machine; use --device cpu")
    return torch.device(name)


def pick_precision(device: torch.device) -> str:
    """The one precision policy: "bf16" (autocast matmuls, fp32 weights) or "fp32"."""
    # bf16 keeps fp32's exponent range (so no loss scaling) with an 8-bit mantissa; matmuls
    # accumulate in fp32. GPUs with bf16 units and CPUs with the AVX-512 BF16 or AMX instructions
    # multiply bf16 2-3x faster than fp32: measured on a 2-core AVX-512 BF16 Xeon, one thread,
    # a (4096 x 384) @ (384 x 32768) matmul ran 105 GFLOP/s in bf16 vs 36-75 in fp32, and a whole
    # depth-6 training step 1.4x faster; loss curves of fp32 and bf16 runs stayed within
    # seed noise (numbers in the README). CPUs without those instructions emulate bf16, which is
    # slower than fp32, so they keep fp32. mps stays fp32 too: its bf16 support varies by OS.
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and os.path.exists("/proc/cpuinfo"):  # Linux; elsewhere fp32
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        if "avx512_bf16" in flags or "amx_bf16" in flags:
            return "bf16"
    return "fp32"


def pick_compile(device: torch.device, choice: str = "auto") -> tuple[bool, str]:
    """The one compile policy: (use torch.compile?, why, for the banner); choice auto, on or off."""
    # torch.compile writes C++ on a CPU (it needs a C++ compiler with OpenMP and Python's headers)
    # and Triton on a GPU. "auto" checks that the only reliable way, by compiling a tiny function:
    # a few seconds, mostly imports and CPU checks that the model's compile does anyway.
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, got {choice!r}")
    if choice != "auto" or device.type == "mps":  # mps: inductor's coverage is still partial
        return choice == "on", f"compile {choice}" if choice != "auto" else "eager on mps"
    try:
        torch.compile(lambda x: torch.tanh(x) + 1, dynamic=False)(torch.ones(8, device=device))
    # RuntimeError: torch's BackendCompilerFailed (no compiler, no Triton) or an unsupported Python
    except (RuntimeError, OSError) as e:
        return False, f"eager: torch.compile fails here ({str(e).strip().splitlines()[0][:100]})"
    return True, "compiled: torch.compile works here (--compile off for eager)"


def keep_freed_memory(device: torch.device) -> str:
    """Make glibc keep the memory a CPU training step (or a server's answer) frees for the next
    one; a line for the banner or the log."""
    # glibc's malloc gives a block above M_MMAP_THRESHOLD (128 KB, rising up to 32 MB) its own mmap,
    # unmaps it when freed, and trims the heap's free top past M_TRIM_THRESHOLD. A step frees
    # hundreds of MB and asks for them again, so the kernel maps and zeroes them anew, a page fault
    # per 4 KB: at the --cpu preset 750,000 faults, 1.4 s of kernel time in a 4.3 s step. Every
    # block in the heap (M_MMAP_MAX 0), no trim below 2 GB free and one heap for all threads
    # (M_ARENA_MAX 1, less fragmentation) end it; the price: peak RSS 1.42 GB instead of 1.24.
    if device.type != "cpu" or platform.libc_ver()[0] != "glibc":
        return "allocator: default"
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # mallopt's codes, glibc's malloc.h
    settings = ((M_TRIM_THRESHOLD, 2**31 - 1), (M_MMAP_MAX, 0), (M_ARENA_MAX, 1))
    is_set = [libc.mallopt(param, value) for param, value in settings]  # 1 = accepted
    assert all(is_set), f"glibc refused a mallopt setting: {list(zip(settings, is_set))}"
    return "allocator: freed memory kept for the next step (glibc mallopt)"


def set_server_threads(device: torch.device) -> str:
    """For a server on a CPU: torch computes on every usable CPU (on a GPU the count is left as
    it is); a line for the log."""
    # One answer at a time, at batch 1: a token is a few vector-times-matrix products, bound by
    # memory and Python more than by arithmetic, and whether a second thread pays depends on the
    # CPU. Measured on 2 cores (bench.py serve, the --cpu shape / nanochat's d6): on an AMD EPYC
    # one thread decoded as fast as two, and through the API reached 0.93 of direct generate()
    # against 0.84-0.93 with two; on an Intel Xeon with AMX the server decoded 400-440 / 117 tok/s
    # through the API on one thread and 490 / 203 on two. Leaving a core free costs the Intel
    # 15-40%, using both costs the AMD about 5%: every usable CPU, as training does.
    if device.type == "cpu":
        torch.set_num_threads(usable_cpus())
    return f"threads: {torch.get_num_threads()}"


# --- errors a user can fix ---

def run_main(main, prog: str, on_interrupt: str = "stopped"):
    """Call main(); a user error (USER_ERRORS) or Ctrl-C ends the program with one line on stderr.

    Used only under `if __name__ == "__main__":`, so tests that call main() directly still see
    the exception itself. on_interrupt is what Ctrl-C prints after "prog: ".
    """
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(f"\n{prog}: {on_interrupt}")
    except USER_ERRORS as e:
        # NOTE: str(e) only: the chained causes ("raise ... from e") are already summed up in it
        sys.exit(f"{prog}: error: {e}")
