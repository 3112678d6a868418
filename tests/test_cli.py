"""
Tests of cli.py: flags from dataclasses, errors a user can fix printed as one line with no
traceback by every entry point run as a real subprocess (what a user sees on stderr), the compile
choice and the allocator setting.
"""
import argparse
import contextlib
import io
import os
import platform
import subprocess
import sys
import tempfile
import unittest
from dataclasses import dataclass

import torch

import cli
from cli import add_config_args, config_from_args, pick_compile
from tests.fixtures import ROOT, make_mirror, prepared_run_dir, tiny_argv


@dataclass
class _Knobs:
    """The knobs of the flag tests."""
    depth: int = 4               # transformer blocks
    lr: float | None = None      # learning rate; None = automatic
    use_chats: bool = True       # train on chats too


def test_cli_flags_from_dataclass():
    """Each field gets a typed --flag (plus a short one if asked) whose help is its comment; flags
    beat presets beat defaults, and a flag not given leaves the default."""
    parser = argparse.ArgumentParser()
    add_config_args(parser, _Knobs, "x", short={"depth": "-d"})
    help_text = " ".join(parser.format_help().split())
    assert "--x-depth" in help_text and "transformer blocks (default: 4)" in help_text, help_text
    knobs = config_from_args(parser.parse_args(["-d", "7"]), _Knobs, "x", {"depth": 5, "lr": 0.1})
    assert knobs == _Knobs(depth=7, lr=0.1), f"flag should beat the preset: {knobs}"
    knobs = config_from_args(parser.parse_args(["--x-lr", "0.5"]), _Knobs, "x")
    assert knobs == _Knobs(depth=4, lr=0.5) and isinstance(knobs.lr, float), \
        f"typed flag lost: {knobs}"
    # a bool flag reads its text: type=bool would make "false" True (any non-empty text is)
    for text, value in (("false", False), ("Off", False), ("0", False), ("yes", True)):
        knobs = config_from_args(parser.parse_args(["--x-use-chats", text]), _Knobs, "x")
        assert knobs.use_chats is value, f"--x-use-chats {text} gave {knobs.use_chats}"
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            parser.parse_args(["--x-use-chats", "maybe"])
            raise AssertionError("--x-use-chats maybe was accepted")
        except SystemExit as e:
            assert e.code == 2 and "is not on/off" in err.getvalue(), err.getvalue()


def _run(*args, cwd=ROOT):
    """Run `python <args>` from the project folder; returns (exit code, stderr)."""
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    return done.returncode, done.stderr


def _assert_one_clean_line(rc, stderr, *expected):
    assert rc != 0, f"a user error must exit non-zero, got 0 (stderr {stderr!r})"
    assert "Traceback" not in stderr, f"a user error printed a traceback:\n{stderr}"
    for text in expected:
        assert text in stderr, f"{text!r} missing from the error message:\n{stderr}"


def test_cli_user_errors_are_one_line_without_traceback():
    """A damaged mirror file, a missing model, a foreign tokenizer, a stale run dir, a bad flag
    value and a bad flag each end with a clear message on stderr and a non-zero exit."""
    with tempfile.TemporaryDirectory() as tmp:
        # a truncated shard in the mirror: the download phase names the file and the mirror
        mirror = make_mirror(os.path.join(tmp, "mirror"))
        shard = os.path.join(mirror, "huggingface.co", "datasets", "karpathy",
                             "climbmix-400b-shuffle", "resolve", "main", "shard_00000.parquet")
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
        run_dir = os.path.join(tmp, "run")
        rc, err = _run("train_all.py", *tiny_argv(run_dir, mirror), "--only", "download")
        _assert_one_clean_line(rc, err, "train_all: error:", "shard_00000.parquet", "mirror")
        # no trained model, then a tokenizer file from somewhere else
        rc, err = _run("tinychat.py", "--run-dir", run_dir, "hi")
        _assert_one_clean_line(rc, err, "tinychat: error:", "python train_all.py")
        os.makedirs(os.path.join(run_dir, "sft"), exist_ok=True)
        with open(os.path.join(run_dir, "sft", "meta.json"), "w") as f:
            f.write("{}")
        with open(os.path.join(run_dir, "tokenizer.bin"), "w") as f:
            f.write("some other tokenizer\n")
        rc, err = _run("tinychat.py", "--run-dir", run_dir, "hi")
        _assert_one_clean_line(rc, err, "tinychat: error:", "delete")
        # a finished phase made with other settings
        _, mirror, prepared = prepared_run_dir()
        rc, err = _run("train_all.py", *tiny_argv(prepared, mirror), "--vocab-size", "400",
                       "--only", "tokenize")
        _assert_one_clean_line(rc, err, "train_all: error:", "other settings", "rm -rf")
        # a flag value out of range, and a flag that does not parse
        rc, err = _run("train_all.py", "--smoke", "--run-dir", run_dir, "--sft-warmdown-frac", "2")
        _assert_one_clean_line(rc, err, "warmdown_frac 2.0")
        rc, err = _run("train_all.py", "--pretrain-depth", "four")
        _assert_one_clean_line(rc, err, "--pretrain-depth", "invalid int value")


def test_cli_programming_errors_keep_their_traceback():
    """An exception that is not a user error (a bug) still prints its traceback."""
    code = "import cli\ndef main():\n    return {}['missing']\ncli.run_main(main, 'x')\n"
    rc, err = _run("-c", code)
    assert rc != 0 and "Traceback" in err and "KeyError" in err, f"a bug lost its traceback:\n{err}"


def test_cli_pick_compile_choices():
    """on and off are obeyed without probing; any other choice is a ValueError naming the three."""
    cpu = torch.device("cpu")
    assert pick_compile(cpu, "off")[0] is False, "--compile off was not obeyed"
    assert pick_compile(cpu, "on")[0] is True, "--compile on was not obeyed"
    try:
        pick_compile(cpu, "yes")
        raise AssertionError("pick_compile accepted 'yes'")
    except ValueError as e:
        assert "auto, on or off" in str(e), f"unhelpful message: {e}"


def test_cli_keep_freed_memory_stops_page_faults():
    """With keep_freed_memory, reallocating a freed 64 MB costs no page faults (16,384 before)."""
    if platform.libc_ver()[0] != "glibc":
        raise unittest.SkipTest("keep_freed_memory acts on glibc only")
    # a child process: the setting is process-wide and would stay for every later test
    script = """
import resource, torch
from cli import keep_freed_memory
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.ones(2**24)  # 64 MB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = faults()
keep_freed_memory(torch.device("cpu"))
for _ in range(4):  # the heap takes a few rounds to hold a free block that fits (measured: 3)
    faults()
print(default, faults())
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    default, kept = map(int, out.stdout.split())
    assert default > 3 * 10_000, f"only {default} faults for 3 x 64 MB by default: control broken"
    assert kept < 1_000, f"{kept} page faults with freed memory kept ({default} before): no effect"


def test_cli_set_server_threads_takes_every_usable_cpu():
    """A server on a CPU computes on every usable CPU; on a GPU the CPU threads stay as they
    were."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # so that a change shows where there are several CPUs
        line = cli.set_server_threads(torch.device("cpu"))
        assert torch.get_num_threads() == cli.usable_cpus(), f"{torch.get_num_threads()}: {line}"
        torch.set_num_threads(1)
        cli.set_server_threads(torch.device("cuda"))  # only reads the count: no GPU is needed
        assert torch.get_num_threads() == 1, "a GPU server changed the CPU threads"
    finally:
        torch.set_num_threads(before)
