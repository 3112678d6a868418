"""
Tests of train_all.py: every phase on synthetic data, exact resume after a kill,
and the command line generated from the dataclasses.
"""
import dataclasses
import json
import os
import shutil
import tempfile
import types

import torch

import train_all
from cli import config_from_args
from tests.fixtures import prepared_run_dir, run_quiet, tiny_argv
from train import Runtime


def test_train_all_every_phase_writes_its_files():
    """main() on synthetic text runs every phase, writes the expected files, skips them on a rerun
    and stops with what to do when a setting that makes them stale changes."""
    _, mirror, prepared = prepared_run_dir()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, cwd = shutil.copytree(prepared, os.path.join(tmp, "run")), os.getcwd()
        os.chdir(tmp)  # report.md is also copied to the working directory
        try:
            # compiled where torch.compile works: the one test of the wiring in train.py
            run_quiet(train_all.main, tiny_argv(run_dir, mirror, compile="auto"))
            for name in ("tokenizer.bin", "tokens/train.bin", "base/model.pt", "mid/meta.json",
                         "sft/model.pt", "eval.json", "report.md", "report.json", "loss.svg",
                         "log.txt", os.path.join(tmp, "report.md")):
                assert os.path.exists(os.path.join(run_dir, name)), \
                    f"{name} missing: a phase did not write its output"
            assert not [d for d in os.listdir(os.path.join(run_dir, "base"))
                        if d.startswith("resume")], "resume checkpoint left"
            cache = json.load(open(os.path.join(run_dir, "tokens", "meta.json")))
            assert len(cache["shards"]["train"]) == 2, \
                f"use_chats is on, but the chats are not in the train cache: {cache['shards']}"
            report = json.load(open(os.path.join(run_dir, "report.json")))
            evals = report["eval"]
            assert set(evals) == {"pretrain", "midtrain", "sft", "tokenizer"}, \
                f"eval.json lacks a model or the tokenizer: {evals.keys()}"
            assert evals["pretrain"]["core"]["num_tasks"] == 3, "CORE missed a task of the bundle"
            for phase in ("midtrain", "sft"):
                assert len(evals[phase]["chat"]["tasks"]) == 6 and "quality" in evals[phase], \
                    f"{phase}: the chat evals or the quality measure did not run"
            assert ("| Metric | BASE | MID | SFT |"
                    in open(os.path.join(run_dir, "report.md")).read()), "summary table missing"
            assert open(os.path.join(run_dir, "loss.svg")).read().startswith("<svg"), \
                "loss.svg is not an SVG"
            again = run_quiet(train_all.main, tiny_argv(run_dir, mirror))
            assert again.count("skipping") == 5, \
                f"a rerun should skip the 5 finished phases:\n{again}"
            try:
                run_quiet(train_all.main, tiny_argv(run_dir, mirror) + ["--pretrain-depth", "2"])
                raise AssertionError("a changed --pretrain-depth was not detected")
            except ValueError as e:
                assert ("rm -rf" in str(e) and "base" in str(e)
                        and "pretrain.depth 1 -> 2" in str(e)), f"unclear message: {e}"
        finally:
            os.chdir(cwd)


def test_train_all_resume_is_exact():
    """A pretraining run killed mid-way and rerun ends with the same weights as one that never
    stopped."""
    # eager (tiny_argv's default): under torch.compile the resumed process may compile other
    # kernels (dynamo's shape choices depend on what ran before), equal only to float rounding
    with tempfile.TemporaryDirectory() as tmp:
        _, mirror, prepared = prepared_run_dir()
        first, second = (shutil.copytree(prepared, os.path.join(tmp, name)) for name in "ab")
        argv = lambda run_dir: (tiny_argv(run_dir, mirror, steps=5)
                                + ["--pretrain-save-every-min", "0"])
        run_quiet(train_all.main, argv(first) + ["--only", "pretrain"])
        real, taken = train_all.pretrain_batches, []

        # 2 micro-batches per step: the "kill" lands inside step 3
        def dies_after_7_batches(*args, **kwargs):
            for batch in real(*args, **kwargs):
                if len(taken) == 7:
                    raise KeyboardInterrupt("simulated kill")
                taken.append(1)
                yield batch
        train_all.pretrain_batches = dies_after_7_batches
        try:
            run_quiet(train_all.main, argv(second) + ["--only", "pretrain"])
            raise AssertionError("the simulated kill did not happen")
        except KeyboardInterrupt:
            pass
        finally:
            train_all.pretrain_batches = real
        meta = json.load(open(os.path.join(second, "base", "resume", "meta.json")))
        assert meta["loop"]["step"] == 3, \
            f"the checkpoint before the kill is at step {meta['loop']['step']}, not 3"
        log = run_quiet(train_all.main, argv(second) + ["--only", "pretrain"])
        assert "resuming from" in log and "step 3" in log, \
            f"the rerun did not resume from step 3:\n{log}"
        a = torch.load(os.path.join(first, "base", "model.pt"), weights_only=True)
        b = torch.load(os.path.join(second, "base", "model.pt"), weights_only=True)
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-6), \
                f"{name} differs after resume: model, optimizer or data state not restored"


def test_train_all_cli_from_dataclasses():
    """Every dataclass field has a typed --flag whose help is the field's comment; flags beat
    presets beat defaults."""
    parser = train_all.build_parser()
    help_text = " ".join(parser.format_help().split())
    for section, (prefix, cls) in train_all.SECTIONS.items():
        for f in dataclasses.fields(cls):
            flag = "--" + "-".join(filter(None, [prefix, f.name])).replace("_", "-")
            assert flag in help_text, \
                f"{flag} missing from --help: the CLI is not generated from {cls.__name__}"
    assert "context length in tokens" in help_text, "field comments are not used as help"
    args = parser.parse_args(["--smoke", "--pretrain-depth", "3", "--sft-lr-frac", "0.5"])
    cfgs = {s: config_from_args(args, cls, prefix, train_all.PRESETS["smoke"].get(s))
            for s, (prefix, cls) in train_all.SECTIONS.items()}
    assert cfgs["pretrain"].depth == 3 and isinstance(cfgs["sft"].lr_frac, float), \
        "flag values not parsed or typed"
    assert cfgs["pretrain"].seq_len == train_all.PRESETS["smoke"]["pretrain"]["seq_len"], \
        "preset not applied"
    assert cfgs["midtrain"].matrix_lr == train_all.MidtrainConfig.matrix_lr, "default lost"


def test_train_all_sized_cap_fits_the_probe_and_the_run():
    """A cap of -1 is sized from a timed probe so that probe and run together fit the seconds
    given, with 10% in reserve; a cap given (0 = all) is kept and nothing is probed. The clock is
    fake: each unit of cap costs 1.5 s."""
    clock = [0.0]
    real_time = train_all.time
    train_all.time = types.SimpleNamespace(time=lambda: clock[0])  # train_all's clock only
    runs = []

    def run(cap):
        runs.append(cap)
        clock[0] += 1.5 * cap

    try:
        rt = Runtime(torch.device("cpu"), "fp32", "fp32", False, 0, 1, "")
        cap = train_all.sized_cap(-1, run, 60.0, rt)
        probe_s = 1.5 * train_all.PROBE_CAP
        assert cap == int(0.9 * (60.0 - probe_s) / 1.5), f"cap {cap}"
        assert probe_s + 1.5 * cap <= 60.0, "probe and run together overrun the budget"
        assert runs == [train_all.PROBE_CAP], f"expected one probe run: {runs}"
        assert train_all.sized_cap(0, run, 60.0, rt) == 0 and len(runs) == 1, "a given cap changed"
    finally:
        train_all.time = real_time


def test_train_all_banner_expects_the_eval_budget():
    """The banner's eval minutes are the phase's budget when its caps are sized to fill it (the
    --cpu defaults), and the forward passes of its bpb when every cap is fixed."""
    cfgs = {section: cls() for section, (_, cls) in train_all.SECTIONS.items()}
    rt = Runtime(torch.device("cpu"), "fp32", "fp32", False, 0, 1, "")
    minutes, _, _ = train_all.estimate(cfgs, rt)
    assert minutes["eval"] == cfgs["eval"].minutes, f"eval expected {minutes['eval']} min"
    cfgs["eval"] = dataclasses.replace(cfgs["eval"], core_max_per_task=2, chat_max_per_task=2)
    minutes, _, _ = train_all.estimate(cfgs, rt)
    assert 0 < minutes["eval"] < cfgs["eval"].minutes, f"fixed caps: {minutes['eval']} min"
