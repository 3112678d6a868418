"""
Every phase of tinychat in one command: download, tokenizer, pretraining, midtraining, SFT, eval,
report.

The learner's entry point (layer 4): imports cli, bpe, gpt, data, tasks, sampler, core, evals,
report and train (the one training loop), writes everything into the run directory (default
~/.cache/tinychat) and, rerun after a crash or a kill, continues where it stopped. main() reads
top to bottom: flags -> configs -> runtime -> banner -> each phase in order.

Design:
- one dataclass per phase; cli.add_config_args turns every field into a --flag whose help is the
  field's comment. The dataclass defaults ARE the --cpu preset; --smoke and the GPU preset only
  list the fields they change
- pretrain, midtrain and SFT run train.train, the one training loop: they differ only in their
  batches and config; a killed phase resumes exactly from its last checkpoint
- a phase is done when its output exists; phases.json records the settings each phase was made
  with, so a changed setting that makes finished work stale stops the run and says what to do.
  eval and report only read the models, so they are simply redone when asked for with --only
- the training phases and the eval phase have budgets in minutes: a training phase plans its
  steps from the speed of its first steps (train.plan_steps); the eval phase sizes the caps of
  CORE and the chat evals that are left at -1 from a timed probe, to fit what is left of it
- under torchrun every rank trains on its share of the data and scores its share of the eval
  examples; counts are summed over ranks, so results do not depend on the number of processes
- device, precision and torch.compile are decided once, in make_runtime (compile: where a probe
  shows it works, --compile to force either; cli.pick_compile), and shown in the banner

Left out on purpose:
- wandb, and a sharded optimizer (under torchrun every rank holds all of it)

References:
- nanochat (base_train.py, mid_train.py, chat_sft.py): https://github.com/karpathy/nanochat
- Muon, momentum warmup: https://kellerjordan.github.io/posts/muon/

Examples:
    python train_all.py --cpu --mirror ../shared/mirror
    python train_all.py --smoke --run-dir /tmp/smoke --mirror ../shared/mirror
    torchrun --nproc_per_node=2 train_all.py --smoke --from pretrain
"""
import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from bpe import Tokenizer
from cli import (Progress, add_config_args, config_from_args, keep_freed_memory, pick_compile,
                 pick_device, pick_precision, run_main, usable_cpus)
from core import (core_lines, core_summary, evaluate_core, load_core_tasks, tokenizer_eval,
                  tokenizer_samples)
from data import (build_token_cache, default_run_dir, download_all, eval_bundle_path,
                  midtrain_batches, pretrain_batches, sft_batches, tokenizer_texts)
from evals import (CHAT_TASKS, chat_lines, chat_summary, evaluate_bpb, evaluate_chat,
                   evaluate_quality, load_chat_tasks, merge_counts, quality_summary, sample,
                   val_tensor)
from gpt import GPT, config_from_depth, load_checkpoint
from report import (HONESTY, environment, read_json, record_phase, stale_message, write_atomic,
                    write_report)
from sampler import decode_precision
from tasks import load_task, midtrain_conversations, sft_conversations, with_text_replay
from train import Runtime, TrainConfig, compiled, train

PHASES = ["download", "tokenizer", "tokenize", "pretrain", "midtrain", "sft", "eval", "report"]
TRAINING = ["pretrain", "midtrain", "sft"]  # the phases that run the training loop, in order
# What a phase leaves in the run dir; it is done when this exists (training: model.pt + meta.json)
OUTPUTS = {
    "tokenizer": "tokenizer.bin",
    "pretrain": "base",
    "midtrain": "mid",
    "sft": "sft",
    "eval": "eval.json",
}
PROBE_CAP = 2  # examples per task of the timed probe that sizes a budgeted eval cap
DERIVED = ["eval", "report"]  # computed from the models: redone with --only, never stale
# Rates for the banner's time estimates: measured on the 2-core reference machine (GPU nominal).
FLOPS_PER_S = {"cpu": 120e9, "cuda": 300e12, "mps": 5e12}  # sustained training FLOP/s per process
SHARD_CHARS = 12.3e6        # characters of text per pretraining shard in the mirror
CHARS_PER_TOKEN = 3.8       # characters per token of our 8K BPE on the mirror's text
BPE_CHARS_PER_S = 3e6       # bpe.py training
ENCODE_CHARS_PER_S = 1.5e6  # bpe.py encoding, both cores


# ----------------------------------------------------------------------------- configs

@dataclass
class RunConfig:
    """Where the run lives, where downloads come from, and the tokenizer."""
    run_dir: str = ""            # run directory; "" = ~/.cache/tinychat
    mirror: str = ""             # read https://HOST/PATH from MIRROR/HOST/PATH; "" = the network
    device: str = ""             # cpu | cuda | mps; "" = cuda when available, else cpu
    compile: str = "auto"        # torch.compile: auto (where it works here), on or off
    num_train_shards: int = 4    # pretraining shards to fetch (the mirror has 4, ~12 MB text each)
    vocab_size: int = 8192       # 256 bytes + merges + 9 special tokens, counted as nanochat does
    tokenizer_chars: int = 40_000_000  # characters of training text the BPE trainer reads


@dataclass
class PretrainConfig(TrainConfig):
    """Pretraining: the GPT learns to continue documents from the token cache."""
    depth: int = 4               # transformer blocks
    head_dim: int = 64           # width per attention head; n_embd = 64 * depth rounded up to it
    seq_len: int = 256           # context length in tokens of pretraining
    minutes: float = 35.0        # wall-clock budget, evals included (when num_steps is 0)
    warmdown_frac: float = 0.5   # lr falls linearly over the last half (nanochat HEAD; measured)
    final_lr_frac: float = 0.05  # to 5% of the peak lr (nanochat HEAD; measured)
    use_chats: bool = True       # SmolTalk's train chats join the documents (data.py says why)


@dataclass
class MidtrainConfig(TrainConfig):
    """Midtraining: conversations, tool use and multiple choice, every token trained."""
    seq_len: int = 512           # tokens per row (RoPE covers 10x pretraining's); 0 = pretraining's
    device_batch_size: int = 16  # 16 rows x 512: 8,192 tokens a forward pass, as pretraining
    minutes: float = 5.0         # wall-clock budget, evals included (when num_steps is 0)
    text_every: int = 3          # every 3rd micro-batch is pretraining text (replay); 0 = none


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: one conversation per row, only assistant tokens trained."""
    seq_len: int = 512           # tokens per row at most, so answers fit; 0 = the previous model's
    device_batch_size: int = 16  # rows per forward pass, 8,192 tokens at most
    minutes: float = 4.0         # wall-clock budget, evals included (when num_steps is 0)
    lr_frac: float = 0.02        # nanochat SFT starts at 2% of the base lrs
    warmdown_frac: float = 1.0   # lr falls linearly to 0 over the whole phase, as in nanochat


@dataclass
class EvalConfig:
    """Evaluation: bpb and samples of every model, CORE (base), chat evals, quality (mid, sft)."""
    minutes: float = 8.0         # wall-clock budget; caps left at -1 are sized to fit in it
    bpb_tokens: int = 0          # val tokens scored for the base model; 0 = the whole val shard
    chat_bpb_tokens: int = 262_144  # the same for mid and sft (their bpb shows what text they kept)
    sample_tokens: int = 48      # tokens generated per greedy sample
    core_max_per_task: int = -1  # CORE examples per task; 0 = all, -1 = as the budget allows
    chat_max_per_task: int = -1  # examples per chat eval; 0 = all, -1 = as the budget allows
    quality_conversations: int = 200  # SmolTalk test conversations of the assistant-bpb measure


# section -> (flag prefix, dataclass): --vocab-size, --pretrain-depth, --sft-lr-frac, ...
SECTIONS = {
    "run": ("", RunConfig),
    "pretrain": ("pretrain", PretrainConfig),
    "midtrain": ("midtrain", MidtrainConfig),
    "sft": ("sft", SFTConfig),
    "eval": ("eval", EvalConfig),
}
# Settings that change what a phase prints or where it runs, never what it produces.
COSMETIC = {"run_dir", "mirror", "device", "compile", "eval_every", "eval_tokens", "log_every",
            "save_every_min"}
SMOKE_CHAT = {"num_steps": 10, "seq_len": 256, "device_batch_size": 8, "total_batch_tokens": 2048,
              "eval_tokens": 8192, "log_every": 5}  # midtrain and sft of --smoke: a few tiny steps
PRESETS = {
    "cpu": {},  # the dataclass defaults
    # every phase on a tiny model in under 2 minutes, to check that everything works
    "smoke": {
        "run": {"num_train_shards": 1, "vocab_size": 1024, "tokenizer_chars": 2_000_000},
        "pretrain": {"depth": 2, "head_dim": 32, "seq_len": 128, "num_steps": 30,
                     "device_batch_size": 8, "total_batch_tokens": 2048, "eval_every": 15,
                     "eval_tokens": 8192, "log_every": 5},
        "midtrain": SMOKE_CHAT,
        "sft": SMOKE_CHAT,
        "eval": {"bpb_tokens": 32_768, "chat_bpb_tokens": 32_768, "sample_tokens": 16,
                 "core_max_per_task": 2, "chat_max_per_task": 2, "quality_conversations": 8},
    },
    # nanochat's d20 speedrun (reference §6.1) at device batch 16: 32 runs out of an H100's memory
    "gpu": {
        "run": {"num_train_shards": 240, "vocab_size": 65_536, "tokenizer_chars": 2_000_000_000},
        "pretrain": {"depth": 20, "head_dim": 128, "seq_len": 2048, "num_steps": 21_400,
                     "device_batch_size": 16, "total_batch_tokens": 524_288,
                     "eval_tokens": 10_485_760, "use_chats": False},  # ClimbMix: web text
        "midtrain": {"num_steps": 809, "seq_len": 0, "device_batch_size": 16,
                     "total_batch_tokens": 524_288},
        "sft": {"num_steps": 701, "seq_len": 0, "device_batch_size": 4,
                "total_batch_tokens": 65_536},
    },
}


def build_parser() -> argparse.ArgumentParser:
    """Presets, phase selection, then one --flag per field of every section's dataclass."""
    parser = argparse.ArgumentParser(
        usage="%(prog)s [--cpu | --smoke] [--only PHASE | --from PHASE] [--FLAG VALUE ...]",
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--cpu", action="store_true",
                        help="the preset tuned for an hour on 2 CPU cores (the defaults)")
    preset.add_argument("--smoke", action="store_true",
                        help="every phase on a tiny model in under 2 minutes")
    parser.add_argument("--only", choices=PHASES, help="run just this phase")
    parser.add_argument("--from", dest="start", choices=PHASES,
                        help="run this phase and every later one")
    for prefix, cls in SECTIONS.values():
        add_config_args(parser, cls, prefix)
    return parser


def make_runtime(run: RunConfig) -> tuple:
    """(Runtime, a note for the banner): device and precisions decided once, torchrun's process
    group joined if any, the CPU threads sized, glibc told to keep freed memory. Compile is
    decided in main, and only if a phase will use it (its probe takes a few seconds)."""
    # torchrun describes the process group in these variables; without torchrun we are one process
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(run.device or None)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    if device.type == "cpu":
        # NOTE: processes on one machine share its cores; more threads than cores slow every step
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, usable_cpus() // local_processes))
    run_dir = os.path.expanduser(run.run_dir or default_run_dir())
    os.makedirs(run_dir, exist_ok=True)
    allocator = keep_freed_memory(device)  # process-wide, before the phases allocate
    rt = Runtime(device, pick_precision(device), decode_precision(device), False, rank,
                 world_size, run_dir)
    return rt, allocator


# ----------------------------------------------------------------------------- phases

def run_training_phase(phase: str, cfgs: dict, rt: Runtime) -> dict:
    """pretrain starts a fresh GPT; midtrain and sft continue the previous phase's model."""
    cfg = cfgs[phase]
    tok = Tokenizer.load(rt.path("tokenizer.bin"))
    torch.manual_seed(cfg.seed)  # weight init; the data order has its own seed
    B = cfg.device_batch_size
    if phase == "pretrain":
        config = config_from_depth(cfg.depth, tok.vocab_size, cfg.seq_len, head_dim=cfg.head_dim)
        model = GPT(config).to(rt.device)

        def make_batches(state):
            return pretrain_batches(rt.run_dir, "train", B, cfg.seq_len, seed=cfg.seed, state=state,
                                    rank=rt.rank, world_size=rt.world_size)
    else:
        previous = TRAINING[TRAINING.index(phase) - 1]
        model, _ = load_checkpoint(rt.path(OUTPUTS[previous]), rt.device)
        if cfg.seq_len:  # a longer context than pretraining: the rotary tables reach 10x it
            model.config = replace(model.config, seq_len=cfg.seq_len)
        T = model.config.seq_len
        conversations = midtrain_conversations if phase == "midtrain" else sft_conversations
        mine = conversations(rt.run_dir)[rt.rank::rt.world_size]  # each rank its share

        def make_batches(state):
            if phase == "sft":
                return sft_batches(tok, mine, B, T, state=state)
            return with_text_replay(  # every text_every-th micro-batch from pretraining's stream
                lambda s: midtrain_batches(tok, mine, B, T, state=s),
                lambda s: pretrain_batches(rt.run_dir, "train", B, T, seed=cfg.seed, state=s,
                                           rank=rt.rank, world_size=rt.world_size),
                cfg.text_every, state)
    return train(phase, rt.path(OUTPUTS[phase]), model.train(), tok, cfg, make_batches, rt)


def sum_over_ranks(counts: dict, rt: Runtime) -> dict:
    """Counts of every rank's share of an eval, added up (evals.merge_counts); alone: counts."""
    if rt.world_size == 1:
        return counts
    parts = [None] * rt.world_size
    dist.all_gather_object(parts, counts)
    return merge_counts(parts)


def sized_cap(cap: int, run, seconds: float, rt: Runtime) -> int:
    """cap when given (>= 0); for -1, the largest cap whose run(cap) fits in `seconds` after a timed
    probe run(PROBE_CAP), whose results are dropped. Rank 0's measurement decides for all."""
    if cap >= 0:
        return cap
    t0 = time.time()
    run(PROBE_CAP)
    probe_s = time.time() - t0
    per_unit = probe_s / PROBE_CAP  # seconds per unit of cap (one example per task)
    # 10% kept in reserve: the probe's few examples only estimate the rate of the many
    sized = torch.tensor([max(PROBE_CAP, int(0.9 * (seconds - probe_s) / per_unit))])
    if rt.world_size > 1:
        dist.broadcast(sized, src=0)
    return int(sized.item())


def run_eval_phase(cfgs: dict, rt: Runtime):
    """Every eval of every model into eval.json, within cfg.minutes (see EvalConfig)."""
    cfg = cfgs["eval"]
    tok = Tokenizer.load(rt.path("tokenizer.bin"))
    t_end = time.time() + cfg.minutes * 60
    results = {phase: {} for phase in TRAINING}
    results["tokenizer"] = tokenizer_eval(tok, tokenizer_samples(rt.run_dir))
    models = {phase: load_checkpoint(rt.path(OUTPUTS[phase]), rt.device)[0] for phase in TRAINING}
    token_bytes = torch.tensor(tok.token_byte_lengths())  # (V,) for bits per byte
    smoltalk = load_task(rt.run_dir, "smoltalk-test")[:cfg.quality_conversations]
    # --- 1) what every model gets: val bpb and greedy samples (rank 0); chat quality (mid, sft) ---
    for phase, model in models.items():
        is_chat = phase != "pretrain"
        if rt.rank == 0:
            T = model.config.seq_len
            max_tokens = cfg.chat_bpb_tokens if is_chat else cfg.bpb_tokens
            rows = val_tensor(rt.run_dir, T, max_tokens // T or None)  # (N, T+1)
            forward = compiled(model, rt.use_compile)
            bpb, loss = evaluate_bpb(forward, rows, token_bytes, rt.device, rt.precision)
            samples = sample(model, tok, is_chat, cfg.sample_tokens, rt.decode_precision)
            results[phase].update(val_bpb=bpb, val_loss=loss, val_tokens=rows.shape[0] * T,
                                  samples=samples)
            rt.log(f"eval | {phase} | val_bpb {bpb:.4f} | {rows.shape[0] * T:,} tokens")
            for prompt, text in samples:
                rt.log(f"sample | {prompt!r} -> {text!r}")
        if is_chat:
            counts = evaluate_quality(model, tok, smoltalk, rt.decode_precision, rt.rank,
                                      rt.world_size)
            q = results[phase]["quality"] = quality_summary(sum_over_ranks(counts, rt))
            rt.log(f"quality | {phase} | ended {q['ended_share']:.2f} | 4-gram repeats "
                   f"{q['repeat_share']:.2f} | templates {q['template_share']:.2f} | smoltalk "
                   f"bpb {q['smoltalk_bpb']:.4f}")
    # --- 2) CORE (base), then the chat evals (mid, sft): each takes its share of what is left ---
    bundle = eval_bundle_path(rt.run_dir)

    def core(cap):
        return evaluate_core(models["pretrain"], tok, bundle, rt.device, rt.precision, cap,
                             rt.rank, rt.world_size)
    cap = sized_cap(cfg.core_max_per_task, core, (t_end - time.time()) / 3, rt)
    per_task = {label: {k: t[k] for k in ("correct", "total", "cropped")}
                for label, t in core(cap)["tasks"].items()}
    baselines = {t["label"]: t["baseline"] for t in load_core_tasks(bundle, PROBE_CAP)}
    results["pretrain"]["core"] = core_summary(sum_over_ranks(per_task, rt), baselines)
    for line in core_lines(results["pretrain"]["core"]):
        rt.log(line)
    for i, phase in enumerate(TRAINING[1:]):
        def chat(cap):
            tasks = load_chat_tasks(rt.run_dir, {name: cap for name in CHAT_TASKS})
            return evaluate_chat(models[phase], tok, tasks, rt.decode_precision, 256, rt.rank,
                                 rt.world_size)
        cap = sized_cap(cfg.chat_max_per_task, chat, (t_end - time.time()) / (2 - i), rt)
        summary = chat_summary(sum_over_ranks(chat(cap), rt))
        results[phase]["chat"] = summary
        for line in chat_lines(summary):
            rt.log(f"{phase} | {line}")
    if rt.rank == 0:
        write_atomic(rt.path("eval.json"), json.dumps(results, indent=1))


def run_report_phase(cfgs: dict, rt: Runtime):
    """report.py reads what the phases left in the run dir: report.md, loss.svg, report.json."""
    env = environment(torch=torch.__version__, device=str(rt.device), precision=rt.precision,
                      processes=rt.world_size)
    config = {s: asdict(c) for s, c in cfgs.items()}
    for line in write_report(rt.run_dir, env, config, {p: OUTPUTS[p] for p in TRAINING}):
        rt.log(line)


def run_phase(phase: str, cfgs: dict, rt: Runtime) -> dict | None:
    """Run one phase; a training phase returns its results (with its minutes), the others None."""
    run = cfgs["run"]
    if phase == "download":  # every file now, so no later phase ever waits on the network
        download_all(rt.run_dir, run.mirror or None, run.num_train_shards)
    elif phase == "tokenizer":
        texts = tokenizer_texts(rt.run_dir, run.tokenizer_chars)
        Tokenizer.train(texts, run.vocab_size, progress=Progress).save(rt.path("tokenizer.bin"))
    elif phase == "tokenize":  # encoded once; redone if the tokenizer or the file list changes
        tok = Tokenizer.load(rt.path("tokenizer.bin"))
        build_token_cache(rt.run_dir, tok, use_chats=cfgs["pretrain"].use_chats)
    elif phase in TRAINING:
        return run_training_phase(phase, cfgs, rt)
    elif phase == "eval":
        run_eval_phase(cfgs, rt)
    else:
        run_report_phase(cfgs, rt)
    return None


# ----------------------------------------------------------------------------- bookkeeping

def phase_settings(phase: str, cfgs: dict) -> dict:
    """The settings a phase's output depends on: its own section's and every earlier phase's."""
    sections = ["run"] + [s for s in SECTIONS if s in PHASES[:PHASES.index(phase) + 1]]
    return {f"{s}.{k}": v
            for s in sections for k, v in asdict(cfgs[s]).items() if k not in COSMETIC}


def is_done(phase: str, rt: Runtime) -> bool:
    """Its output exists; for a model folder, its meta.json (written after the weights)."""
    if phase not in OUTPUTS:
        return False
    parts = [OUTPUTS[phase], "meta.json"] if phase in TRAINING else [OUTPUTS[phase]]
    return os.path.exists(rt.path(*parts))


def check_settings(cfgs: dict, rt: Runtime):
    """Stop, saying what to do, when work on disk was made with other settings than this run's."""
    # eval and report only read the models: they are redone, never stale
    settings = {p: phase_settings(p, cfgs) for p in OUTPUTS if p not in DERIVED}
    message = stale_message(rt.run_dir, settings, {p: rt.path(OUTPUTS[p]) for p in OUTPUTS})
    if message:
        raise ValueError(message)


def estimate(cfgs: dict, rt: Runtime) -> tuple:
    """({phase: expected minutes}, GB of memory, GB of disk), from FLOPs and the rates above."""
    p, run = cfgs["pretrain"], cfgs["run"]
    with torch.device("meta"):  # shapes only: no memory, no init
        model = GPT(config_from_depth(p.depth, run.vocab_size, p.seq_len, head_dim=p.head_dim))
    flops = FLOPS_PER_S[rt.device.type] * rt.world_size
    chars = (run.num_train_shards + 1) * SHARD_CHARS
    minutes = {}
    for ph in TRAINING:  # a budget where there is one, else the FLOPs of the steps asked for
        train_flops = cfgs[ph].num_steps * cfgs[ph].total_batch_tokens * model.flops_per_token()
        minutes[ph] = train_flops / flops / 60 if cfgs[ph].num_steps else cfgs[ph].minutes
    ev = cfgs["eval"]  # eval scores its tokens with forward passes only: 1/3 of a training step
    eval_tokens = (ev.bpb_tokens or SHARD_CHARS / CHARS_PER_TOKEN) + 2 * ev.chat_bpb_tokens
    minutes["eval"] = eval_tokens * model.flops_per_token() / 3 / flops / 60
    if min(ev.core_max_per_task, ev.chat_max_per_task) < 0:  # caps sized to fill its budget
        minutes["eval"] = ev.minutes
    minutes["download"] = 0.2
    minutes["tokenizer"] = min(run.tokenizer_chars, chars) / BPE_CHARS_PER_S / 60
    minutes["tokenize"] = chars / ENCODE_CHARS_PER_S / 60
    minutes["report"] = 0.0
    # memory: weights, grads and optimizer state (16 bytes/param) + one micro-batch's activations
    # (about 32 bytes per layer and channel, 4 per logit: the bf16 logits and their gradient) +
    # 1 GB of Python. Fitted to measured peaks: d20 at batch 16 on an H100, 52.4 GiB (54.9
    # estimated; batch 32 ran out of its 79 GiB, 87.9 estimated); --cpu pretraining, 1.8 GB (1.7)
    per_token = p.depth * model.config.n_embd * 32 + run.vocab_size * 4
    act = p.device_batch_size * p.seq_len * per_token
    # disk: parquet, the token cache, checkpoints
    disk = chars * 0.4 + chars / CHARS_PER_TOKEN * 2 + model.num_params() * 4 * 6
    return minutes, (16 * model.num_params() + act) / 2**30 + 1.0, disk / 2**30


# ----------------------------------------------------------------------------- main

def main(argv=None):
    """Parse flags, print the banner, then run the selected phases, skipping the ones done."""
    args = build_parser().parse_args(argv)
    if args.smoke:
        preset = "smoke"
    elif args.cpu or not torch.cuda.is_available():
        preset = "cpu"
    else:
        preset = "gpu"
    # each section: the dataclass defaults, then the preset's changes, then the flags given
    cfgs = {}
    for section, (prefix, cls) in SECTIONS.items():
        cfgs[section] = config_from_args(args, cls, prefix, PRESETS[preset].get(section))
    rt, allocator = make_runtime(cfgs["run"])
    selected = [args.only] if args.only else PHASES[PHASES.index(args.start or "download"):]
    check_settings(cfgs, rt)
    minutes, mem_gb, disk_gb = estimate(cfgs, rt)

    # --- the banner: what will run, how long, what it needs ---
    # eval and report are redone when --only asks for them; a finished phase is otherwise skipped
    todo = [p for p in selected if not is_done(p, rt) or (p == args.only and p in DERIVED)]
    chosen = "" if args.cpu or args.smoke else " (chosen for this machine)"
    why = "compile: not needed"
    if any(p in TRAINING or p == "eval" for p in todo):
        rt.use_compile, why = pick_compile(rt.device, cfgs["run"].compile)
    rt.log(f"== tinychat ==  {HONESTY}")
    rt.log(f"preset {preset}{chosen} | device {rt.device} | {rt.precision} | "
           f"{rt.world_size} process(es) | run dir {rt.run_dir}")
    rt.log(f"{why} | {allocator}")
    for phase in PHASES:
        status = "run" if phase in todo else "done, skip" if is_done(phase, rt) else "not selected"
        rt.log(f"  {phase:<10} {status:<13} ~{minutes[phase]:5.1f} min")
    total = sum(minutes[p] for p in todo)
    rt.log(f"expected ~{total:.0f} min on the reference 2-core CPU, ~{mem_gb:.1f} GB memory, "
           f"~{disk_gb:.1f} GB disk")

    # --- the phases, in order ---
    for phase in selected:
        rt.log(f"\n== {phase} ==")
        if phase not in todo:
            rt.log(f"{phase} is done ({rt.path(OUTPUTS[phase])} exists; delete it to redo it), "
                   "skipping")
            continue
        rt.log(json.dumps(asdict(cfgs[phase if phase in SECTIONS else "run"])))  # its settings
        t0 = time.time()
        # minutes of an earlier, killed attempt count too; a redone eval or report starts from 0
        prior = read_json(rt.path("phases.json")).get(phase, {}).get("minutes", 0.0)
        if phase in DERIVED:
            prior = 0.0
        if rt.rank == 0:
            record_phase(rt.run_dir, phase, phase_settings(phase, cfgs))
        # training and eval run on every rank (each its share); the others on rank 0 while the
        # rest wait below
        result = None
        if rt.rank == 0 or phase in TRAINING or phase == "eval":
            result = run_phase(phase, cfgs, rt)
        if rt.world_size > 1:
            dist.barrier()
        # a training phase counts its own minutes (resumes included); the others are timed here
        phase_minutes = result["minutes"] if result else prior + (time.time() - t0) / 60
        if rt.rank == 0:
            record_phase(rt.run_dir, phase, phase_settings(phase, cfgs), minutes=phase_minutes)
    if rt.world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main, "train_all", "stopped; run the same command again to continue where it left off")
