"""
Chat in the terminal with the model train_all.py made: one streamed answer, or a conversation.

Layer 5 entry point: loads tokenizer.bin and a checkpoint from the run directory and streams
answers through sampler.generate, the same sampler the web server and the evals use.

Design:
- a prompt on the command line gets one answer and the program exits; without one it opens an
  interactive chat that keeps the conversation (/clear starts over, /quit or Ctrl-D leaves)
- each turn re-renders the whole conversation with chat.render_for_completion, so the model sees
  exactly the chat format it was trained on; the oldest turns are dropped when the context is full
- text is printed as it is generated, but only at whole UTF-8 characters (sampler.stream_text);
  special tokens have no text, so they never reach the screen
- --phase base continues the prompt as plain text instead: a base model has never seen a chat

Left out on purpose:
- line editing and history beyond what the terminal gives input()
- the calculator's calls are printed as plain text, without marking where the tool answered

Examples:
    python tinychat.py "Tell me a joke"
    python tinychat.py -t 0 --phase mid
    python tinychat.py --run-dir /tmp/smoke
"""
import argparse
from dataclasses import asdict

from chat import render_for_completion
from cli import add_config_args, config_from_args, pick_device, run_main
from data import default_run_dir
from sampler import (PHASE_DIRS, SampleConfig, decode_precision, generate, load_model,
                     stream_text)

def prompt_ids(tok, messages: list, max_prompt: int) -> tuple:
    """(ids ending in <|assistant_start|>, messages kept): the oldest exchanges go while it is
    too long."""
    while True:
        ids = render_for_completion(tok, {"messages": messages})
        if len(ids) <= max_prompt or len(messages) <= 1:
            return ids, messages
        messages = messages[2:]  # drop the oldest user turn and its answer, keep roles alternating


def respond(model, tok, ids: list, cfg: SampleConfig, seed: int, precision: str) -> str:
    """Stream the model's continuation of `ids` to stdout in whole characters; return its text."""
    tokens = (row[0] for row, _ in generate(model, tok, ids, **{**asdict(cfg), "seed": seed},
                                            precision=precision))
    pieces = []
    for text in stream_text(tok, tokens):
        print(text, end="", flush=True)
        pieces.append(text)
    print(flush=True)
    return "".join(pieces)


def chat(model, tok, cfg: SampleConfig, phase: str, precision: str):
    """The interactive loop: read a line, answer it, keep the conversation until /quit or end of
    input."""
    print(f"tinychat ({phase} model, {model.num_params():,} parameters). "
          "/clear starts over, /quit leaves.")
    messages = []
    while True:
        try:
            line = input("\nyou> ").strip()
        except EOFError:  # Ctrl-D, or the end of piped input
            print()
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/clear":
            messages = []
            print("(conversation cleared)")
            continue
        if not line:
            continue
        print("tinychat> ", end="", flush=True)
        if phase == "base":  # a base model has no chat format: continue the line as text
            respond(model, tok, [tok.bos_id] + tok.encode(line), cfg, cfg.seed, precision)
            continue
        # leave the answer room: keep the prompt within the context minus max_tokens
        # (at least half of it)
        budget = max(model.config.seq_len - cfg.max_tokens, model.config.seq_len // 2)
        ids, messages = prompt_ids(tok, messages + [{"role": "user", "content": line}], budget)
        try:
            # a new seed per turn: asking the same thing again may get another answer,
            # as in a chat app
            answer = respond(model, tok, ids, cfg, cfg.seed + len(messages), precision)
        except ValueError as e:  # a single message longer than the context
            print(f"\n({e})")
            messages = []
            continue
        # the answer goes back as plain text: a calculator call is replayed as ordinary words
        messages.append({"role": "assistant", "content": answer})


def main(argv=None):
    """Parse the flags, load the model, then answer the one prompt or open the chat."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("Examples:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?",
                        help="answer this one prompt and exit; without it, chat")
    parser.add_argument("--phase", choices=PHASE_DIRS, default=None,
                        help="which model to load (default: the newest of sft, mid, base)")
    parser.add_argument("--run-dir", default=None,
                        help=f"run directory of train_all.py (default: {default_run_dir()})")
    # -t, -k, --top-p, --max-tokens, --seed, --frequency-penalty, --presence-penalty:
    # sampler.SampleConfig's fields, declared once there
    add_config_args(parser, SampleConfig, short={"temperature": "-t", "top_k": "-k"})
    args = parser.parse_args(argv)
    cfg = config_from_args(args, SampleConfig)
    device = pick_device()
    precision = decode_precision(device)  # fp32 on a CPU: see sampler.decode_precision
    model, tok, phase = load_model(args.run_dir or default_run_dir(), args.phase, device)
    if args.prompt is None:
        chat(model, tok, cfg, phase, precision)
    elif phase == "base":
        respond(model, tok, [tok.bos_id] + tok.encode(args.prompt), cfg, cfg.seed, precision)
    else:
        # a prompt longer than the context raises a ValueError: run_main prints it as one line
        messages = [{"role": "user", "content": args.prompt}]
        respond(model, tok, render_for_completion(tok, {"messages": messages}), cfg, cfg.seed,
                precision)


if __name__ == "__main__":
    run_main(main, "tinychat")
