"""
The sampler: a trained GPT plus a prompt in, new tokens out one step at a time, with a
calculator tool.

Every piece of text tinychat writes goes through generate(): the terminal chat (tinychat.py), the
web chat and API (serve.py), the chat evals (evals.py) and the samples printed during training
(train_all.py). It imports gpt.py (the KV cache, autocast, checkpoints) and bpe.py (load_model
reads the tokenizer), and takes any bpe.Tokenizer as `tok`. The caller decides the precision, once,
in its entry point (decode_precision below is the policy), and passes it in.

Design:
- generate() is a Python generator. It reads the prompt once at batch 1 into the KV cache, copies
  that cache to num_samples rows, then feeds one token per row per step: each step costs one
  token of compute per row instead of re-reading the whole sequence (bench.py decode measures it).
- temperature 0 is argmax; otherwise softmax(logits / temperature) over the top_k largest logits,
  cut to the top_p nucleus when top_p < 1,
  drawn with a torch.Generator seeded by `seed`, so a (prompt, seed) pair always gives one answer.
- OpenAI's frequency and presence penalties act on the logits before temperature, top-k and
  top-p: each token's logit is lowered by frequency_penalty per time the row has already written
  it (forced calculator tokens count too), and by presence_penalty once if it has written it at
  all. A small model loops ("a joke for a joke for a joke"); a penalty moves it on to other words.
- each row samples its own first token. nanochat's OLD engine sampled it once and copied it to every
  row, so all num_samples answers began alike (pass@k evals were quietly weaker).
- the calculator tool is a small per-row state machine: when the model writes <|python_start|>
  expr <|python_end|>, the sampler forces <|output_start|> result <|output_end|> (mask 0) and
  feeds those tokens back one per step, as if the model had written them.
- use_calculator() parses the expression and walks its syntax tree against an allow-list; nothing
  is ever eval'd. nanochat's eval-based calculator was escaped from a chat prompt.
- stream_text() releases text only at whole UTF-8 characters, so an emoji split across two
  tokens never reaches a terminal or a browser as two broken halves. stop_at() ends such a
  stream at stop strings (the API's `stop`), holding back any tail that may begin one.

Left out on purpose:
- min-p, CTRL's multiplicative repetition penalty and beam search: nanochat samples with
  temperature and top-k only (top-p and the penalties are here because OpenAI-API clients of
  serve.py send them; a frequency penalty of 0.5 is also the chat default, see SampleConfig)
- finished rows keep their slot in the batch (no shrinking of the cache); simpler, and the waste
  only exists at num_samples > 1
- one prompt per call: no batching of different prompts (they would need padding and masks)
- the calculator has no `**`, names, or calls other than str.count (nanochat also rejects `**`)

References:
- nanochat's engine: https://github.com/karpathy/nanochat/blob/master/nanochat/engine.py
- Holtzman et al., The Curious Case of Neural Text Degeneration (why truncate the tail):
  https://arxiv.org/abs/1904.09751
- Python's ast module: https://docs.python.org/3/library/ast.html
- OpenAI's frequency and presence penalties:
  https://platform.openai.com/docs/api-reference/chat/create
"""
import ast
import codecs
import operator
import os
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bpe import Tokenizer
from cli import pick_precision
from gpt import KVCache, autocast, load_checkpoint

# Limits on what a user may ask for (SampleConfig checks them; a web server must use the same
# numbers).
MAX_TEMPERATURE = 2.0   # above 2 the text is noise; nanochat's web UI allowed 0..2 too
MAX_TOP_K = 200         # nanochat's web UI bound
MAX_NEW_TOKENS = 4096   # nanochat's web UI bound; generate() also stops at the model's context
MAX_PENALTY = 2.0       # OpenAI's bound on frequency_penalty and presence_penalty (-2 to 2)

# Calculator limits. They keep every operation tiny: no operand or result above 10**18 (so at most
# a 36-digit product is ever computed), and expressions no longer than a line of GSM8K arithmetic.
MAX_CALC_CHARS = 256    # GSM8K's longest calculator annotation (train split) is 30 characters
MAX_CALC_ABS = 10**18   # bound on |number| for every literal and every intermediate result

# The operators the calculator knows, by syntax-tree node type. Anything not in here is refused.
CALC_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}


@dataclass
class SampleConfig:
    """How generate() picks tokens. The defaults are nanochat's chat settings (chat_cli.py) plus
    a frequency penalty of 0.5, which nanochat does not have: on the --cpu run's SFT model (the
    eval phase's 24 prompts, README) it took repeated token 4-grams from 60% to 16% of all the
    answers' 4-grams. The greedy evals (evals.sample, evaluate_chat) pass 0; the chat-quality
    measure samples at these defaults."""
    temperature: float = 0.6        # softmax temperature; 0 = greedy (likeliest after penalties)
    top_k: int | None = 50          # sample among the k likeliest tokens only; 0 or None = all
    top_p: float = 1.0              # nucleus: fewest likeliest tokens holding top_p of it; 1 = off
    max_tokens: int = 256           # new tokens per answer at most, forced tool tokens included
    seed: int = 42                  # seeds the sampling generator: same prompt + seed = same answer
    frequency_penalty: float = 0.5  # logit minus this per time the answer already has the token
    presence_penalty: float = 0.0   # logit minus this once if the answer already has the token

    def __post_init__(self):
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature {self.temperature} is out of range; use 0 (greedy) to "
                             f"{MAX_TEMPERATURE}")
        if self.top_k is not None and not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k {self.top_k} is out of range; use 1 to {MAX_TOP_K}, "
                             "or 0 for no limit")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p {self.top_p} is out of range; "
                             "use 0 (likeliest token only) to 1 (off)")
        if not 1 <= self.max_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_tokens {self.max_tokens} is out of range; use 1 to "
                             f"{MAX_NEW_TOKENS}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise ValueError(f"{name} {getattr(self, name)} is out of range; use "
                                 f"{-MAX_PENALTY} to {MAX_PENALTY} (0 = off)")


# --- loading the model to talk to ---

# phase -> its folder in the run dir, newest first
PHASE_DIRS = {"sft": "sft", "mid": "mid", "base": "base"}


def load_model(run_dir: str, phase: str | None, device) -> tuple:
    """(model, tokenizer, phase) from a run dir; phase None = the newest of sft, mid, base
    that exists.

    Raises FileNotFoundError naming the command that trains one when there is none.
    """
    # a folder counts once its meta.json exists: save_checkpoint writes it after the weights
    done = [p for p in PHASE_DIRS
            if os.path.exists(os.path.join(run_dir, PHASE_DIRS[p], "meta.json"))]
    tok_path = os.path.join(run_dir, "tokenizer.bin")
    chosen = phase or (done[0] if done else "sft")
    if chosen not in done or not os.path.exists(tok_path):
        message = (f"no trained {chosen} model in {run_dir}. Train one first with\n"
                   f"    python train_all.py --cpu           (every phase, about an hour)\n"
                   f"    python train_all.py --smoke         (a tiny model in a few minutes)\n"
                   f"adding --run-dir {run_dir} if that is not the default, "
                   "or pass that run dir here.")
        raise FileNotFoundError(message)
    model, _ = load_checkpoint(os.path.join(run_dir, PHASE_DIRS[chosen]), device)
    return model, Tokenizer.load(tok_path), chosen


def decode_precision(device) -> str:
    """The sampler's precision: "fp32" on a CPU, else cli.pick_precision's;
    pass it to generate()."""
    # At batch 1 each matmul is one vector times a weight matrix, so a token costs one read of
    # every weight, and bf16 autocast adds writing and reading a bf16 copy of each fp32 weight,
    # every token. Measured on an AVX-512 BF16 CPU, one thread, 128 tokens: 73 tok/s in fp32 vs 60
    # in bf16 at depth 6, vocab 32,768 (23 M weights); 203 vs 187 at the --cpu preset's shape.
    return "fp32" if device.type == "cpu" else pick_precision(device)


# --- the calculator tool ---

def _bounded(x):
    # NOTE: written as `not abs(x) <= MAX` rather than `abs(x) > MAX` so that NaN (every comparison
    # with NaN is False) and inf are refused too.
    if not abs(x) <= MAX_CALC_ABS:
        raise ValueError(f"number out of range: {x}")
    return x


def _is_str(node):
    return isinstance(node, ast.Constant) and type(node.value) is str


def _calc(node):
    """Value (int or float) of one allowed syntax-tree node; raises ValueError on anything else."""
    if isinstance(node, ast.Expression):
        return _calc(node.body)
    # `type(...) in` and not isinstance: True and False are ints to isinstance, and are refused.
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    # unary plus too: GSM8K writes annotations like "+30+46+38"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _calc(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in CALC_BINOPS:
        return _bounded(CALC_BINOPS[type(node.op)](_calc(node.left), _calc(node.right)))
    # 'strawberry'.count('r'): the one call allowed, on a string literal with one string literal
    # argument (the spelling tasks of midtraining teach the model to write exactly this).
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "count" and _is_str(node.func.value) and len(node.args) == 1
            and _is_str(node.args[0]) and not node.keywords):
        return node.func.value.value.count(node.args[0].value)
    raise ValueError(f"not allowed in the calculator: {type(node).__name__}")


def _format_number(x):
    # GSM8K writes results as "24" and "0.5", never "24.0": integral floats print as ints, and 10
    # significant digits hide float noise (0.1 + 0.2 prints 0.3).
    if isinstance(x, float):
        return str(int(x)) if x.is_integer() else f"{x:.10g}"
    return str(x)


def use_calculator(expr: str) -> str | None:
    """The result of an arithmetic expression as text, or None when it is not allowed. Never raises.

    Allowed: numbers, + - * / // %, unary minus and plus, parentheses, 'text'.count('x'). Commas are
    stripped first ("1,200 * 3" is 3600), as nanochat does. There is no eval: the expression is
    parsed into a syntax tree and only the node types above are evaluated, so names, attributes,
    imports, lambdas and comprehensions cannot run. `**` is refused (9**9**9 would hang the server).
    """
    expr = expr.replace(",", "").strip()
    if len(expr) > MAX_CALC_CHARS:
        return None
    try:
        return _format_number(_calc(ast.parse(expr, mode="eval")))
    # What parsing and arithmetic can raise: bad syntax, null bytes (ValueError), refusals
    # (ValueError), x/0 and x%0, float overflow, and parser limits on deep nesting.
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
        return None


# --- sampling ---

def _sample(logits, generator, temperature, top_k, top_p):
    """(B, V) fp32 logits -> (B,) token ids: argmax at temperature 0, else a top-k, top-p
    softmax draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    if top_k and top_k < logits.size(-1):  # None or 0 = no limit (0 as in nanochat HEAD)
        # keep the k largest logits per row, -inf for the rest (ties with the k-th are kept too)
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, V)
    probs = F.softmax(logits / temperature, dim=-1)  # (B, V)
    if top_p < 1:
        # nucleus (Holtzman et al.): in descending order, keep a token while the mass before it is
        # below top_p. probs [0.5, 0.3, 0.15, 0.05], top_p 0.7: mass before = [0, 0.5, 0.8, 0.95]
        # -> keep the first two. The likeliest token is always kept (top_p 0 = only it).
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V), (B, V)
        is_cut = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # (B, V)
        is_cut[:, 0] = False
        # multinomial renormalizes, so zeroing the tail is enough
        probs = torch.zeros_like(probs).scatter_(-1, order,
                                                 sorted_probs.masked_fill(is_cut, 0.0))  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


@dataclass
class _RowState:
    # tokens this row must emit next (a calculator answer)
    forced: deque = field(default_factory=deque)
    # token ids since <|python_start|>; None outside a tool call
    expr: list | None = None
    # emitted <|assistant_end|> or <|bos|>
    is_done: bool = False
    # the token ids it has written (a presence penalty lowers each once)
    written: set = field(default_factory=set)


def _advance(row, token, tok, special):
    """Update one row's tool state after it emits `token`; queue the calculator's answer if any."""
    if token in (special["<|assistant_end|>"], special["<|bos|>"]):
        row.is_done = True
    elif token == special["<|python_start|>"]:
        row.expr = []
    elif token == special["<|python_end|>"] and row.expr is not None:
        result = use_calculator(tok.decode(row.expr))
        if result is not None:
            row.forced.extend([special["<|output_start|>"], *tok.encode(result),
                               special["<|output_end|>"]])
        row.expr = None
    elif row.expr is not None:
        row.expr.append(token)


def _next_column(rows, sampled, tok, special):
    """This step's (tokens, masks), one entry per row: the sampled token (mask 1), or the
    calculator's forced one (mask 0), or None for a finished row. Updates each row's tool state."""
    tokens, masks = [], []
    for row, token in zip(rows, sampled):
        if row.is_done:
            tokens.append(None)
            masks.append(None)
            continue
        mask = 1
        if row.forced:
            token, mask = row.forced.popleft(), 0
        _advance(row, token, tok, special)
        tokens.append(token)
        masks.append(mask)
    return tokens, masks


@torch.inference_mode()
def generate(model, tok, ids, max_tokens, temperature=1.0, top_k=None, seed=42, num_samples=1,
             precision="fp32", top_p=1.0, frequency_penalty=0.0, presence_penalty=0.0):
    """Yield (tokens, masks) once per step, each a list with one entry per row (num_samples rows).

    `ids` is the prompt (list of token ids). A mask is 1 for a sampled token and 0 for a token the
    calculator forced. `precision` ("fp32" or "bf16", see gpt.autocast) is the caller's choice.
    The stop token (<|assistant_end|> or <|bos|>) is yielded, so callers can see
    why a row stopped; afterwards that row's entries are None. The generator ends when every row
    has stopped, after max_tokens steps, or when prompt + answer fill the model's context.
    A SampleConfig fits straight in: generate(model, tok, ids, **dataclasses.asdict(cfg)). The
    defaults here are plain sampling (penalties off); SampleConfig's are the chat's.

    Plan: 1) prefill the prompt at batch 1; 2) copy the cache to num_samples rows; 3) each step:
    lower the logits of tokens already written (the penalties), sample a token per row, replace it
    by a forced token where the tool has one, update the tool state, yield, then run the new
    column of tokens through the model to get the next logits.
    """
    # NOTE: inference_mode is applied as a decorator, not a `with` around the loop: torch's
    # decorator re-enters it on every resume of the generator and leaves it at every yield, so the
    # caller's own code between two steps keeps autograd. Autocast gets the same care in
    # last_logits.
    seq_len = model.config.seq_len
    if not ids or max_tokens < 1:
        raise ValueError(f"got a prompt of {len(ids)} tokens and max_tokens {max_tokens}: generate "
                         f"needs at least one prompt token (e.g. <|bos|>) and max_tokens >= 1")
    if len(ids) >= seq_len:
        raise ValueError(f"the prompt has {len(ids)} tokens but the model reads at most {seq_len} "
                         f"(prompt + answer); start a new conversation or shorten this one")
    # Never write past the cache: the prompt and the answer together fit in the context.
    num_steps = min(max_tokens, seq_len - len(ids))
    device = next(model.parameters()).device
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator(device=device).manual_seed(seed)
    special = {name: tok.special_id(name)
               for name in ("<|assistant_end|>", "<|bos|>", "<|python_start|>", "<|python_end|>",
                            "<|output_start|>", "<|output_end|>")}

    def last_logits(x, cache):
        with autocast(device, precision):
            logits = model(x, kv_cache=cache, last_only=True)  # (B, 1, V)
        return logits[:, -1, :].float()  # (B, V)

    # 1) prefill: the prompt runs once, whatever num_samples is
    prefill = KVCache(1, model.config, len(ids) + num_steps, device, dtype)
    logits = last_logits(torch.tensor([ids], dtype=torch.long, device=device), prefill)  # (1, V)
    # 2) every row starts from the same cache and the same logits, but draws its own first token
    cache = KVCache(num_samples, model.config, len(ids) + num_steps, device, dtype)
    # row 0 broadcast to all rows
    cache.k.copy_(prefill.k.expand_as(cache.k))  # (L, B, Hkv, max_len, D)
    cache.v.copy_(prefill.v.expand_as(cache.v))  # (L, B, Hkv, max_len, D)
    cache.pos = prefill.pos
    del prefill
    logits = logits.expand(num_samples, -1)  # (B, V)
    rows = [_RowState() for _ in range(num_samples)]
    # OpenAI's penalties, on what each row has written so far: logit[j] is lowered by
    # frequency_penalty * count[j] + presence_penalty * (count[j] > 0). The sum is kept as it grows,
    # one token at a time, so a step subtracts one (B, V) tensor (zeros when both are 0)
    lowered = torch.zeros(num_samples, logits.size(-1), device=device)  # (B, V)
    # 3) one token per row per step
    for step in range(num_steps):
        logits = logits - lowered  # (B, V)
        sampled = _sample(logits, generator, temperature, top_k, top_p).tolist()
        tokens, masks = _next_column(rows, sampled, tok, special)
        for i, (row, token) in enumerate(zip(rows, tokens)):
            if token is not None:
                is_new = token not in row.written
                lowered[i, token] += frequency_penalty + presence_penalty * is_new
                row.written.add(token)
        yield tokens, masks
        if step == num_steps - 1 or all(row.is_done for row in rows):
            return
        # finished rows feed a dummy token 0; their logits are never looked at again
        column = [[0 if token is None else token] for token in tokens]
        logits = last_logits(torch.tensor(column, dtype=torch.long, device=device), cache)  # (B, V)


# --- streaming text ---

def stream_text(tok, token_iter):
    """Yield the text of a stream of token ids, piece by piece, cut only at whole UTF-8 characters.

    Special tokens have no bytes (tok.token_bytes gives b"") and so add nothing. Example: the emoji
    U+1F600 is the 4 bytes F0 9F 98 80; if one token holds F0 9F and the next 98 80, the first
    yields nothing and the second yields the whole emoji. Invalid bytes become U+FFFD.
    """
    # the stdlib's incremental decoder keeps an unfinished character's bytes until the rest arrive
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in token_iter:
        text = decoder.decode(tok.token_bytes(token))
        if text:
            yield text
    text = decoder.decode(b"", final=True)  # bytes of a character the stream never finished
    if text:
        yield text


def stop_at(pieces, stops: list):
    """Yield the text pieces of the generator `pieces` until one of the strings `stops` appears.

    The text before the stop string is the last piece, and `pieces` is closed (so a generate()
    under it stops too). A tail that could begin a stop string is held back until the next piece
    decides: with stop "##", the pieces "a#" and "#b" yield "a" and end. No stops: pieces as is.
    """
    held = ""
    for piece in pieces:
        held += piece
        hits = [i for i in (held.find(s) for s in stops) if i >= 0]
        if hits:
            pieces.close()
            if min(hits) > 0:
                yield held[:min(hits)]
            return
        # the longest tail of `held` that is the start of some stop string waits for more text
        keep = max([k for s in stops for k in range(1, len(s)) if held.endswith(s[:k])], default=0)
        if len(held) > keep:
            yield held[:len(held) - keep]
            held = held[len(held) - keep:]
    if held:
        yield held
