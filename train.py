"""
The one training loop: gradient accumulation, the lr schedule, exact resume, evals and logging.

Used by train_all.py for pretraining, midtraining and SFT alike: the three phases differ only in
the batches they feed it and in their config (a TrainConfig subclass). Imports gpt (autocast,
checkpoints), optim (the two optimizers) and evals (val bpb and samples during training).

Design:
- one optimizer step = grad_accum micro-batches of device_batch_size rows, their gradients
  summed (each loss divided by grad_accum, so the sum is the mean), then averaged over torchrun
  ranks, then one step of Muon (block matrices) and AdamW (embeddings, lm_head)
- the lr multiplier is nanochat's: an optional linear warmup, flat, then a linear warmdown to
  final_lr_frac; Muon's momentum warms up from 0.85 to 0.95 over 300 steps
- resume is exact: a checkpoint holds the weights, the optimizer state and the LoopState (step,
  loss EMA, time spent, every rank's data-stream position, the curves), so a killed run rerun
  with the same command continues with the very batches it would have seen
- checkpoints go to a .tmp folder that is renamed into place every save_every_min minutes; the
  phase's final model goes to its folder with its results in meta.json
- step lines follow STYLE.md section 9: the loss as a bias-corrected EMA, the ETA from the
  steps after the first three

Left out on purpose:
- gradient clipping (never active in nanochat either) and loss scaling (bf16 needs none)
- a sharded optimizer: under torchrun every rank holds the whole optimizer state

References:
- nanochat base_train.py: https://github.com/karpathy/nanochat
- Muon, momentum warmup: https://kellerjordan.github.io/posts/muon/
- nanoGPT train.py (a loop read in one pass): https://github.com/karpathy/nanoGPT
"""
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist

from evals import evaluate_bpb, sample, val_tensor
from gpt import autocast, load_checkpoint, load_optim_state, save_checkpoint
from optim import make_optimizers

PLAN_STEPS = 5  # timed steps (after 3 warm-up ones) whose median speed plans a budgeted phase


@dataclass
class TrainConfig:
    """Knobs every training phase has; each phase below sets its own defaults."""
    num_steps: int = 0           # optimizer steps; 0 = as many as `minutes` allows on this machine
    minutes: float = 0.0         # wall-clock budget of the phase, evals included (num_steps 0)
    device_batch_size: int = 32  # rows per forward pass; lower it if memory runs out
    total_batch_tokens: int = 8192  # tokens per optimizer step; the rest is gradient accumulation
    embedding_lr: float = 0.2    # AdamW lr of the token embedding (nanochat)
    unembedding_lr: float = 0.004  # AdamW lr of lm_head (nanochat)
    matrix_lr: float = 0.02      # Muon lr of the block matrices (nanochat)
    lr_frac: float = 1.0         # multiplies all three lrs (nanochat's init_lr_frac)
    warmup_frac: float = 0.0     # share of steps where lr rises linearly from 0
    warmdown_frac: float = 0.2   # share of steps at the end where lr falls linearly
    final_lr_frac: float = 0.0   # lr multiplier reached at the end of the warmdown
    eval_every: int = 250        # steps between val bpb evaluations and samples (and at the end)
    eval_tokens: int = 65_536    # val tokens scored per evaluation during training
    log_every: int = 25          # steps between step lines
    save_every_min: float = 2.0  # minutes between checkpoints (what a kill may lose); 0 = each step
    seed: int = 1337             # seeds weight init and data order

    def __post_init__(self):
        if not 0 <= self.warmup_frac + self.warmdown_frac <= 1:
            raise ValueError(f"warmup_frac {self.warmup_frac} + warmdown_frac {self.warmdown_frac} "
                             f"must lie between 0 and 1")
        if self.num_steps <= 0 and self.minutes <= 0:
            raise ValueError(f"give a number of steps or a budget in minutes; got num_steps "
                             f"{self.num_steps}, minutes {self.minutes}")
        if self.num_steps <= 0 and self.warmup_frac > 0:
            raise ValueError("a warmup needs an explicit num_steps: with a budget in minutes the "
                             "first steps run before the number of steps is known")


@dataclass
class Runtime:
    """What main() decides once and passes down: device, precisions, compile, rank, the run dir."""
    device: torch.device
    precision: str               # "bf16" | "fp32" of training and scoring, cli.pick_precision
    decode_precision: str        # the same for generating text, sampler.decode_precision
    use_compile: bool            # train and score through torch.compile(model), cli.pick_compile
    rank: int                    # this process under torchrun; 0 when alone
    world_size: int              # processes under torchrun; 1 when alone
    run_dir: str

    def path(self, *parts) -> str:
        return os.path.join(self.run_dir, *parts)

    def log(self, msg: str = ""):
        """Print on rank 0 and append to <run_dir>/log.txt: the only way this file prints."""
        if self.rank == 0:
            print(msg, flush=True)
            with open(self.path("log.txt"), "a", encoding="utf-8") as f:
                f.write(msg + "\n")


def lr_scale(step: int, cfg: TrainConfig) -> float:
    """Multiplier of every base lr at 0-based `step`: linear warmup, constant, linear warmdown."""
    warmup = round(cfg.warmup_frac * cfg.num_steps)
    warmdown = round(cfg.warmdown_frac * cfg.num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= cfg.num_steps - warmdown:
        return 1.0
    progress = (cfg.num_steps - step) / warmdown  # 1 where the warmdown starts, 0 at num_steps
    return progress + (1 - progress) * cfg.final_lr_frac


def muon_momentum(step: int) -> float:
    """Muon's momentum: 0.85 -> 0.95 over the first 300 steps, then 0.95 (nanochat, K. Jordan)."""
    return 0.85 + 0.10 * min(step / 300, 1.0)  # a lighter momentum while the weights move fast


# --- the loop ---

@dataclass
class LoopState:
    """What the training loop carries from step to step; a checkpoint saves it through asdict."""
    step: int = 0                # optimizer steps done
    num_steps: int = 0           # the plan: optimizer steps of the whole phase; 0 until it is made
    step_s: float = 0.0          # seconds per step measured for the plan (0: num_steps was given)
    ema: float = 0.0             # exponential moving average of the train loss, not yet debiased
    elapsed: float = 0.0         # seconds of training so far, summed over every resume
    data: list = field(default_factory=list)   # each rank's data-stream state, to resume exactly
    train: list = field(default_factory=list)  # [step, smoothed train loss] at each logged step
    val: list = field(default_factory=list)    # [step, val loss, val bpb] at each evaluation


def save_resume(out_dir: str, model, optimizers, loop: LoopState, rt: Runtime):
    """Checkpoint weights, optimizer and loop state (each rank's data) in out_dir/resume."""
    if rt.world_size > 1:
        states = [None] * rt.world_size
        dist.all_gather_object(states, loop.data[rt.rank])
        loop.data = states
    if rt.rank == 0:
        # NOTE: three files cannot be replaced together atomically, so they go to resume.tmp, which
        # then takes resume's place. save_checkpoint writes meta.json last: a folder with one is
        # complete, so a kill between the rmtree and the rename leaves a whole one in resume.tmp
        tmp = os.path.join(out_dir, "resume.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        optim_state = {"optimizers": [opt.state_dict() for opt in optimizers]}
        save_checkpoint(tmp, model, {"loop": asdict(loop)}, optim_state)
        shutil.rmtree(os.path.join(out_dir, "resume"), ignore_errors=True)
        os.replace(tmp, os.path.join(out_dir, "resume"))


def restore(out_dir: str, model, optimizers, rt: Runtime) -> LoopState:
    """Load out_dir's resume checkpoint, if any, into model and optimizers; return its LoopState."""
    for folder in (os.path.join(out_dir, "resume"), os.path.join(out_dir, "resume.tmp")):
        if os.path.exists(os.path.join(folder, "meta.json")):
            saved, meta = load_checkpoint(folder, rt.device)
            model.load_state_dict(saved.state_dict())
            for opt, state in zip(optimizers, load_optim_state(folder)["optimizers"]):
                opt.load_state_dict(state)  # also moves the state to the parameters' device
            rt.log(f"resuming from {folder} (step {meta['loop']['step']})")
            return LoopState(**meta["loop"])
    return LoopState(data=[None] * rt.world_size)


def plan_steps(cfg: TrainConfig, loop: LoopState, step_times: list, eval_s: float, elapsed: float,
               rt: Runtime) -> int:
    """The phase's number of optimizer steps: as many as fit in cfg.minutes on this machine.

    Made once, from the median of the first timed steps and the time of the first evaluation
    (eval_s): with S seconds left, a step of s seconds and an eval of e seconds every E steps,
    n more steps cost n*s + (n/E + 1)*e, so n = (S - e) / (s + e/E). Rank 0 decides for all ranks.
    """
    step_s = sorted(step_times)[len(step_times) // 2]
    left_s = cfg.minutes * 60 - elapsed
    more = int((left_s - eval_s) / (step_s + eval_s / cfg.eval_every))
    plan = torch.tensor([loop.step + max(more, 1), step_s], dtype=torch.float64)
    if rt.world_size > 1:  # NOTE: every rank must stop at the same step, or the all-reduce hangs
        dist.broadcast(plan, src=0)
    loop.step_s = plan[1].item()
    return int(plan[0].item())


def grad_accum_steps(phase: str, cfg: TrainConfig, T: int, rt: Runtime) -> int:
    """Micro-batches per optimizer step: total_batch_tokens / (rows x T x processes), whole."""
    tokens_per_pass = cfg.device_batch_size * T * rt.world_size
    if cfg.total_batch_tokens < tokens_per_pass or cfg.total_batch_tokens % tokens_per_pass:
        raise ValueError(f"--{phase}-total-batch-tokens {cfg.total_batch_tokens} must be a "
                         f"multiple of device batch {cfg.device_batch_size} x seq_len {T} x "
                         f"{rt.world_size} processes = {tokens_per_pass}")
    return cfg.total_batch_tokens // tokens_per_pass


def is_save_due(step: int, start_step: int, t_saved: float, cfg: TrainConfig, rt: Runtime) -> bool:
    """save_every_min minutes since the last checkpoint, except right after a resume (that one is
    on disk)."""
    is_due = step > start_step and time.time() - t_saved >= cfg.save_every_min * 60
    due = torch.tensor([float(is_due)], device=rt.device)
    if rt.world_size > 1:  # NOTE: rank 0's clock decides for all, or they would wait forever
        dist.broadcast(due, src=0)
    return bool(due.item())


def evaluate(phase: str, step: int, forward, model, tok, val, loop: LoopState, rt: Runtime,
             batch_size: int) -> float:
    """Val bpb of `forward` on the rows `val` (recorded in loop.val) and greedy samples of
    `model`, both logged; returns the seconds it took."""
    t0 = time.time()
    token_bytes = torch.tensor(tok.token_byte_lengths())  # (V,)
    bpb, val_loss = evaluate_bpb(forward, val, token_bytes, rt.device, rt.precision, batch_size)
    loop.val.append([step, val_loss, bpb])
    rt.log(f"eval | {phase} | step {step:04d} | val_bpb {bpb:.4f}")
    for prompt, text in sample(model, tok, phase != "pretrain", 24, rt.decode_precision):
        rt.log(f"sample | {prompt!r} -> {text!r}")
    return time.time() - t0


def compiled(model, use_compile: bool):
    """model's forward through torch.compile, sharing its weights, or model itself when eager."""
    if not use_compile:
        return model
    # dynamo keeps the compiled versions of GPT.forward of every phase so far (other shapes, other
    # rotary tables), and past its limit of 8 it runs eagerly (seen in a --cpu SFT): each phase
    # starts afresh
    torch.compiler.reset()
    return torch.compile(model)


def train(phase: str, out_dir: str, model, tok, cfg: TrainConfig, make_batches,
          rt: Runtime) -> dict:
    """Train `model` in place, resuming from the newest checkpoint in out_dir, and save it there as
    the phase's final model; return the results for the report. make_batches(state) gives this
    rank's iterator of (x, y, state), (B, T) int64 each. The number of steps is cfg.num_steps, or
    planned after the first PLAN_STEPS timed steps to fill cfg.minutes (see plan_steps)."""
    T = model.config.seq_len
    grad_accum = grad_accum_steps(phase, cfg, T, rt)
    lrs = {k: getattr(cfg, k) * cfg.lr_frac
           for k in ("embedding_lr", "unembedding_lr", "matrix_lr")}
    optimizers = make_optimizers(model, **lrs)
    # the compiled forward shares model's weights; sampling (the KV cache moves every token) and
    # checkpoints (state_dict keys) use model itself
    forward = compiled(model, rt.use_compile)
    loop = restore(out_dir, model, optimizers, rt)
    if cfg.num_steps:  # given: no plan to make
        loop.num_steps = cfg.num_steps
    batches = make_batches(loop.data[rt.rank])
    val = val_tensor(rt.run_dir, T, max(1, cfg.eval_tokens // T))  # (N, T+1)
    budget = f"{cfg.num_steps:,} steps" if cfg.num_steps else f"a {cfg.minutes:g} min budget"
    rt.log(f"{model.num_params():,} parameters | {model.flops_per_token():.3g} FLOPs/token | "
           f"{cfg.total_batch_tokens:,} tokens/step = {cfg.device_batch_size} rows x {T} x "
           f"{rt.world_size} processes x {grad_accum} grad-accum | {budget} | {rt.precision}")
    start_step = loop.step
    t_start = time.time() - loop.elapsed
    t_saved = time.time()
    step_times = []
    eval_s = 0.0  # seconds the first evaluation took, for the plan
    while True:
        step = loop.step
        loop.elapsed = time.time() - t_start
        is_last = step == loop.num_steps > 0  # 0: not planned yet
        # --- evaluate and sample (rank 0 only; the other ranks wait in the next all-reduce) ---
        is_eval_step = is_last or step % cfg.eval_every == 0
        if rt.rank == 0 and is_eval_step and not (step == start_step > 0):
            seconds = evaluate(phase, step, forward, model, tok, val, loop, rt,
                               cfg.device_batch_size)
            eval_s = eval_s or seconds
        if is_last:
            return finish(phase, out_dir, model, cfg, loop, rt)
        # --- checkpoint every few minutes ---
        if is_save_due(step, start_step, t_saved, cfg, rt):
            save_resume(out_dir, model, optimizers, loop, rt)
            t_saved = time.time()
        # --- forward and backward over grad_accum micro-batches ---
        t0 = time.time()
        loss_sum = 0.0
        for _ in range(grad_accum):
            x, y, loop.data[rt.rank] = next(batches)  # (B, T) each, on the CPU
            with autocast(rt.device, rt.precision):
                loss = forward(x.to(rt.device), y.to(rt.device))  # mean nats over the targets
            # NOTE: divided by grad_accum, the summed gradients are the mean over the whole step;
            # without it the step grows with the number of micro-batches
            (loss / grad_accum).backward()
            loss_sum += loss.item() / grad_accum
        # --- update: both optimizers at this step's lr and momentum ---
        # before the plan the lr is the schedule's start: no warmup, the warmdown not begun
        scale = lr_scale(step, replace(cfg, num_steps=loop.num_steps)) if loop.num_steps else 1.0
        optimizer_step(model, optimizers, scale, muon_momentum(step), rt)
        dt = time.time() - t0
        if step - start_step >= 3:  # the first steps pay for warm-up: leave them out of the ETA
            step_times.append(dt)
        loop.step = step + 1
        # --- plan: the number of steps, once, from the first timed steps ---
        if not loop.num_steps and len(step_times) == PLAN_STEPS:
            loop.num_steps = plan_steps(cfg, loop, step_times, eval_s, time.time() - t_start, rt)
            rt.log(f"plan | {phase} | {cfg.minutes:g} min = {loop.num_steps:,} steps at "
                   f"{loop.step_s:.2f} s/step and {eval_s:.1f} s per eval")
        # --- log: the loss as a bias-corrected EMA, the ETA from steps after the first 3 ---
        # ema <- 0.9*ema + 0.1*loss; dividing by 1 - 0.9^(step+1) removes the pull towards 0
        loop.ema = 0.9 * loop.ema + 0.1 * loss_sum
        smooth = loop.ema / (1 - 0.9 ** (step + 1))
        num_steps = loop.num_steps
        if step % cfg.log_every == 0 or step == num_steps - 1:
            loop.train.append([step, smooth])
            steps_left = max(num_steps - step - 1, 0)
            eta = sum(step_times) / max(len(step_times), 1) * steps_left / 60
            rt.log(f"step {step:04d}/{num_steps:04d} | loss {smooth:.4f} | lr_scale {scale:.2f} | "
                   f"dt {dt * 1000:.0f} ms | {cfg.total_batch_tokens / dt:,.0f} tok/s | "
                   f"eta {eta:.1f} min")


def optimizer_step(model, optimizers, lr_scale_: float, momentum: float, rt: Runtime):
    """Average gradients over ranks, set lr (initial_lr * lr_scale_) and Muon's momentum, step,
    zero the gradients."""
    if rt.world_size > 1:
        for p in model.parameters():  # every rank then takes the same step: replicas stay equal
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= rt.world_size
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_scale_
            if "momentum" in group:  # only Muon's groups have it
                group["momentum"] = momentum
        opt.step()
    model.zero_grad(set_to_none=True)


def finish(phase: str, out_dir: str, model, cfg: TrainConfig, loop: LoopState, rt: Runtime) -> dict:
    """Save the phase's final model with its results in meta.json, drop the resume checkpoints."""
    # ru_maxrss: the peak resident memory of this process, in KB on Linux and bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = {
        "params": model.num_params(),
        "steps": loop.num_steps,
        "tokens": loop.num_steps * cfg.total_batch_tokens,
        "step_s": loop.step_s,
        "minutes": loop.elapsed / 60,
        "train_loss": loop.train[-1][1] if loop.train else None,
        "val_bpb": loop.val[-1][2] if loop.val else None,
        "peak_mem_gb": peak / (2**30 if sys.platform == "darwin" else 2**20),
        "curve": loop.train,
        "val": loop.val,
    }
    if rt.rank == 0:
        meta = {"phase": phase, "train_config": asdict(cfg), "results": results}
        save_checkpoint(out_dir, model, meta)
        for name in ("resume", "resume.tmp"):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    return results
