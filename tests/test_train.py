"""
Tests of train.py: the lr schedule, Muon's momentum warmup, and the steps planned from a budget in
minutes (exact resume is tested end to end in test_train_all.py).
"""
import json
import os
import shutil
import tempfile

import torch

import train_all
from tests.fixtures import prepared_run_dir, run_quiet, tiny_argv
from train import LoopState, Runtime, compiled, lr_scale, muon_momentum, plan_steps
from train_all import MidtrainConfig, PretrainConfig, SFTConfig


def test_train_lr_schedule_known_values():
    """nanochat's schedules: OLD's base flat then linear to 0 over the last 20%, the --cpu preset's
    over the last half to 5%, SFT linear to 0, warmup linear from 0."""
    old = PretrainConfig(num_steps=100, warmdown_frac=0.2, final_lr_frac=0.0)
    assert [lr_scale(s, old) for s in (0, 50, 80, 90, 100)] == [1.0, 1.0, 1.0, 0.5, 0.0], \
        "base schedule wrong"
    base = PretrainConfig(num_steps=100)
    assert [lr_scale(s, base) for s in (0, 50, 75, 100)] == [1.0, 1.0, 0.525, 0.05], \
        "the --cpu preset's warmdown (last half, to 5%) is wrong"
    sft = SFTConfig(num_steps=10)
    assert [lr_scale(s, sft) for s in (0, 5, 9)] == [1.0, 0.5, 0.1], "SFT schedule wrong"
    warm = MidtrainConfig(num_steps=10, warmup_frac=0.2, warmdown_frac=0.2, final_lr_frac=0.5)
    assert [lr_scale(s, warm) for s in (0, 1, 2, 8, 9)] == [0.5, 1.0, 1.0, 1.0, 0.75], \
        "warmup/final_lr_frac wrong"
    assert [round(muon_momentum(s), 12) for s in (0, 150, 300, 1000)] == [0.85, 0.9, 0.95, 0.95], \
        "Muon momentum warmup wrong"


def test_train_plan_steps_known_values():
    """A budget's plan: with 540 s left, 1 s steps (median) and a 10 s eval every 100 steps,
    (540 - 10) / (1 + 10/100) = 481 more steps; the measured speed is recorded."""
    cfg = PretrainConfig(minutes=10, eval_every=100)
    loop = LoopState(step=8)
    rt = Runtime(torch.device("cpu"), "fp32", "fp32", False, 0, 1, "")
    plan = plan_steps(cfg, loop, [1.0, 1.0, 2.0, 1.0, 0.5], 10.0, 60.0, rt)
    assert plan == 8 + 481, f"planned {plan} steps, expected 489: the budget arithmetic is off"
    assert loop.step_s == 1.0, f"recorded {loop.step_s} s/step, expected the median 1.0"


def test_train_budget_plan_is_recorded_kept_on_resume_and_overridden():
    """A phase with a minutes budget plans its steps from its first timed steps, records the plan,
    keeps it after a kill and resume, and an explicit --num-steps replaces the budget."""
    with tempfile.TemporaryDirectory() as tmp:
        _, mirror, prepared = prepared_run_dir()
        run_dir = shutil.copytree(prepared, os.path.join(tmp, "run"))
        budget = ["--pretrain-num-steps", "0", "--pretrain-minutes", "0.04",
                  "--pretrain-save-every-min", "0", "--only", "pretrain"]
        real, taken = train_all.pretrain_batches, []

        # 2 batches a step; the plan is made after step 7 (3 warm-up + PLAN_STEPS timed steps) and
        # plans at least one more step, so the kill lands in step 8 whatever the machine's speed
        def dies_after_16_batches(*args, **kwargs):
            for batch in real(*args, **kwargs):
                if len(taken) == 16:
                    raise KeyboardInterrupt("simulated kill")
                taken.append(1)
                yield batch
        train_all.pretrain_batches = dies_after_16_batches
        try:
            run_quiet(train_all.main, tiny_argv(run_dir, mirror) + budget)
            raise AssertionError("the simulated kill did not happen")
        except KeyboardInterrupt:
            pass
        finally:
            train_all.pretrain_batches = real
        loop = json.load(open(os.path.join(run_dir, "base", "resume", "meta.json")))["loop"]
        assert loop["num_steps"] > loop["step"] == 8 and loop["step_s"] > 0, \
            f"no plan saved: {loop}"
        log = run_quiet(train_all.main, tiny_argv(run_dir, mirror) + budget)
        assert "resuming from" in log and "plan |" not in log, f"the plan was made again:\n{log}"
        results = json.load(open(os.path.join(run_dir, "base", "meta.json")))["results"]
        assert results["steps"] == loop["num_steps"], f"{results['steps']} steps run, plan {loop}"
        shutil.rmtree(os.path.join(run_dir, "base"))
        explicit = [a if a != "0" else "6" for a in budget]  # --pretrain-num-steps 6
        run_quiet(train_all.main, tiny_argv(run_dir, mirror) + explicit)
        results = json.load(open(os.path.join(run_dir, "base", "meta.json")))["results"]
        assert results["steps"] == 6 and results["step_s"] == 0, f"--num-steps ignored: {results}"


def test_train_compiled_forgets_earlier_phases():
    """compiled() clears dynamo's cache before compiling: the versions of GPT.forward compiled by
    earlier phases would count towards its limit of 8 (past it, dynamo runs eagerly). Eager gets
    the model itself. torch.compile and the reset are recorded here, not run."""
    calls = []
    real_reset, real_compile = torch.compiler.reset, torch.compile
    torch.compiler.reset = lambda: calls.append("reset")
    torch.compile = lambda model: calls.append("compile") or ("compiled", model)
    try:
        model = torch.nn.Linear(2, 2)
        assert compiled(model, False) is model and calls == [], "eager must not compile"
        assert compiled(model, True) == ("compiled", model), "compiled() did not compile"
        assert calls == ["reset", "compile"], f"dynamo's cache not cleared first: {calls}"
    finally:
        torch.compiler.reset, torch.compile = real_reset, real_compile
