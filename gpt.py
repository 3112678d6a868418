"""
The GPT: nanochat's Transformer, its loss, its KV cache, autocast, and checkpoints.

Used by sampler.py (sampling), evals.py (scoring), train_all.py (training) and bench.py; imports
only torch. Builds the model, runs it, saves it, loads it. The optimizers live in optim.py.

Shape legend, used in every `# (...)` comment of the project:
    B batch rows, T time steps (tokens per row), C = n_embd channels, H heads (query heads),
    D = C / H head dim, V vocab size, L layers. Hkv = n_kv_head key/value heads.

Design:
- nanochat's OLD architecture (gpt.py@5c93a56), so a reader can diff the two files:
  param-free RMSNorm after the embedding, before each sublayer and before lm_head; attention
  with rotary position embeddings (RoPE, theta 10,000, half-split) and then QK-norm; a ReLU^2
  MLP of width 4C; untied input and output embeddings; logits soft-capped at 15 in fp32.
- Grouped-query attention (GQA) through `n_kv_head`: Hkv key/value heads shared by H query heads.
  nanochat's scripts (and ours) set Hkv = H, so it is plain multi-head attention by default.
- One attention path, F.scaled_dot_product_attention (SDPA), for training, prefill and decode.
  The KV cache decides the mask: none -> causal; one new token -> no mask (it may see the whole
  cache); a chunk after earlier tokens -> an explicit mask (see `attend`).
- The KV cache is preallocated once for max_len tokens and tells the model where it is
  (`cache.pos`), so rotary positions of decoded tokens come from the cache, never from the caller.
- Precision: weights are always fp32 ("master weights"); `autocast` runs the matmuls in bf16
  where cli.pick_precision says so: on GPUs and on CPUs with bf16 instructions, where it trains as
  well as fp32 and faster. The model code itself never names a dtype, so fp32 is one argument away.
- The loss keeps one copy of the (B, T, V) logits for backward (SoftcapCrossEntropy), not six.
- torch.compile fuses the many small ops (norms, rotary, softcap, loss) into a few kernels, where
  cli.pick_compile finds it works; the code is the same compiled or eager, so are the numbers.
- Checkpoints: model.pt (tensors only), meta.json (config, step, metrics), optim.pt, each written
  to name.tmp and os.replace'd, and read with torch.load(weights_only=True), which cannot run code.
- One addition from nanochat HEAD, value embeddings (VE): every other layer has a second token
  table whose row is added to the attention values, through a small per-head gate. Lookups cost
  almost no FLOPs; at the --cpu preset's shape they lowered val bpb by 0.15 at equal steps (see
  the README). GPTConfig(value_embeds=False) is nanochat OLD's model exactly.

Left out on purpose:
- nanochat HEAD's other additions (per-layer residual scalars, smear, backout, sliding windows,
  vocab padding): the residual scalars measured worse here (README); the rest is the simpler
  OLD model.
- dropout and biases: nanochat has neither; pretraining sees each token about once.
- building the model on the "meta" device: our CPU models initialise in well under a second.

References:
- Attention is all you need (Vaswani et al.): https://arxiv.org/abs/1706.03762
- RoFormer, rotary embeddings (Su et al.): https://arxiv.org/abs/2104.09864
- QK-norm (Henry et al.): https://arxiv.org/abs/2010.04245
- ReLU^2, Primer (So et al.): https://arxiv.org/abs/2109.08668
- GQA (Ainslie et al.): https://arxiv.org/abs/2305.13245
- RMSNorm (Zhang, Sennrich): https://arxiv.org/abs/1910.07467
- PaLM, FLOPs per token (Chowdhery et al., appendix B): https://arxiv.org/abs/2204.02311
- ResFormer, value residual learning (Zhou et al.): https://arxiv.org/abs/2410.17897
- nanochat: https://github.com/karpathy/nanochat
"""
import contextlib
import json
import math
import os
import pickle
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SOFTCAP = 15.0  # logits = 15 * tanh(logits / 15): nanochat's cap, keeps early logits tame
ROPE_THETA = 10_000.0  # RoPE base from the RoFormer paper; nanochat OLD uses it (HEAD: 100,000)
ROPE_LENGTH_FACTOR = 10  # rotary tables cover 10 x seq_len positions, as in nanochat
CHECKPOINT_VERSION = 2  # bump when the checkpoint layout changes; old files then fail loudly
VE_GATE_CHANNELS = 12  # channels of x that decide how much value embedding each head takes


@dataclass
class GPTConfig:
    seq_len: int = 1024  # context length in tokens used for training (T at most this)
    vocab_size: int = 65536  # V: token ids 0..V-1 (bpe.py's vocab_size)
    n_layer: int = 12  # L: transformer blocks
    n_head: int = 6  # H: query heads per attention layer
    n_kv_head: int = 6  # Hkv: key/value heads; H must be a multiple (GQA), H == Hkv is plain MHA
    n_embd: int = 768  # C: width of the residual stream; D = C / H must be even for RoPE
    value_embeds: bool = True  # a value embedding in every other layer (nanochat HEAD; see VE)

    def __post_init__(self):
        for name in ("seq_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            assert getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}"
        assert self.n_embd % self.n_head == 0, (f"n_embd {self.n_embd} not divisible by n_head "
                                                f"{self.n_head}")
        assert self.n_head % self.n_kv_head == 0, (f"n_head {self.n_head} not a multiple of "
                                                   f"n_kv_head {self.n_kv_head}")
        assert (self.n_embd // self.n_head) % 2 == 0, (f"head dim {self.n_embd // self.n_head} "
                                                       "must be even for RoPE")


def config_from_depth(depth: int, vocab_size: int, seq_len: int, head_dim: int = 128,
                      aspect_ratio: int = 64) -> GPTConfig:
    """Model shape from one knob, depth: C = depth * aspect_ratio rounded up to a multiple of
    head_dim."""
    # nanochat OLD used C = 64 * depth and H = ceil(C / 128), which crashes for odd depths
    # (depth 5: C = 320 is not divisible by H = 3). nanochat HEAD rounds C up instead:
    #   depth 5, head_dim 128: ceil(320 / 128) = 3 heads -> C = 384
    #   depth 6, head_dim 64:  ceil(384 / 64) = 6 heads  -> C = 384 (nanochat's CPU shape)
    if depth < 1 or head_dim < 2 or head_dim % 2 or aspect_ratio < 1:
        raise ValueError(f"need depth >= 1, an even head_dim >= 2 and aspect_ratio >= 1; got "
                         f"depth={depth}, head_dim={head_dim}, aspect_ratio={aspect_ratio}")
    n_head = math.ceil(depth * aspect_ratio / head_dim)
    return GPTConfig(seq_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=n_head * head_dim)


def norm(x):
    """RMSNorm without a learnable gain: x / sqrt(mean(x^2) + eps) over the last dim."""
    # eps defaults to the dtype's machine epsilon, as in nanochat
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int, device=None):
    """cos and sin tables for RoPE, each (1, T, 1, D/2), fp32."""
    # frequency i (of D/2) is theta^(-2i/D): fast pairs rotate near 1 rad per token, slow ones
    # near 1/theta per token, so every position up to ~theta gets a distinct rotation pattern
    inv_freq = ROPE_THETA ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
                              / head_dim)  # (D/2,)
    t = torch.arange(seq_len, dtype=torch.float32, device=device)  # (T,)
    angles = torch.outer(t, inv_freq)  # (T, D/2): angle of position t in frequency pair i
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, T, 1, D/2) each


def apply_rotary(x, cos, sin):
    """Rotate each channel pair (x[i], x[i + D/2]) of x (B, T, H, D) by its position's angle."""
    # half-split layout: channel i pairs with channel i + D/2 (not with i+1 as in the paper).
    # y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos is a rotation by -angle; a consistent sign for
    # q and k is all attention needs, because q.k then depends only on the distance between them.
    # NOTE: cast the small table, not x; else bf16 x becomes fp32
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]  # (B, T, H, D/2) each
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)  # (B, T, H, D)


def softcap(logits):
    """SOFTCAP * tanh(logits / SOFTCAP): each logit squashed into (-15, 15), same shape."""
    return SOFTCAP * torch.tanh(logits / SOFTCAP)


# Logits per chunk of rows in the eager loss. CPU: 2^20, fp32 temporaries of 4 MB that stay in
# cache (the --cpu preset's loss: 1.4 s vs 3.1 s with 2^24). GPU: 2^26, for fewer kernel launches.
LOSS_CHUNK = {"cpu": 2**20, "cuda": 2**26, "mps": 2**26}


class SoftcapCrossEntropy(torch.autograd.Function):
    """Each row's nats = logsumexp(z) - z[target], z = softcap(logits), keeping one copy of logits.

    As plain ops (.float(), /15, tanh, *15, log_softmax), autograd keeps six (B, T, V) tensors for
    backward, five in fp32: 1.4 GB of the --cpu preset's 2.3 GB peak (8,192 rows x 8,192 logits).
    This keeps the logits it was given (bf16 under autocast) and one number per row, and recomputes
    the rest in chunks of rows: on that shape 272 instead of 1,024 MiB at peak, 1.4 instead of 2.2 s
    (forward + backward). Compiled, it fuses like the plain ops into kernels that stream each row
    without temporaries (384 MiB, 1.0 s), so one code path serves both.
    """

    @staticmethod
    def forward(ctx, logits, targets):
        """logits (N, V), any float dtype; targets (N,), -1 = ignored -> nats (N,) fp32."""
        rows = _loss_rows(logits)
        is_counted = targets != -1  # (N,)
        safe = targets.clamp(min=0)  # (N,): -1 -> 0, a valid index whose loss is zeroed
        nats = logits.new_empty(len(logits), dtype=torch.float32)  # (N,)
        lse = torch.empty_like(nats)  # (N,) logsumexp of each row
        for i in range(0, len(logits), rows):
            # NOTE: .float() before the softcap: in bf16, tanh and the logsumexp over 32k+ logits
            # lose the small differences between likely tokens
            z = softcap(logits[i:i + rows].float())  # (n, V) fp32
            lse[i:i + rows] = torch.logsumexp(z, dim=-1)  # (n,)
            picked = z.gather(1, safe[i:i + rows, None]).squeeze(1)  # (n,) each target's z
            nats[i:i + rows] = (lse[i:i + rows] - picked) * is_counted[i:i + rows]  # (n,)
        ctx.save_for_backward(logits, safe, is_counted, lse)
        return nats

    @staticmethod
    def backward(ctx, grad_nats):
        # d nats/d z = softmax(z) - onehot(target), d z/d logit = 1 - t^2 with t = tanh(logit/15):
        #   grad = grad_nats * (exp(z - lse) - onehot) * (1 - t^2), zero on ignored rows
        logits, safe, is_counted, lse = ctx.saved_tensors
        rows = _loss_rows(logits)
        scale = (grad_nats * is_counted)[:, None]  # (N, 1)
        grad = torch.empty_like(logits)  # (N, V), the logits' dtype
        vocab = torch.arange(logits.size(1), device=logits.device)  # (V,)
        for i in range(0, len(logits), rows):
            t = torch.tanh(logits[i:i + rows].float() / SOFTCAP)  # (n, V)
            p = torch.exp(SOFTCAP * t - lse[i:i + rows, None])  # (n, V) softmax of z
            is_target = vocab == safe[i:i + rows, None]  # (n, V) onehot
            grad[i:i + rows] = (p - is_target.float()) * scale[i:i + rows] * (1 - t * t)  # (n, V)
        return grad, None


def _loss_rows(logits):
    # NOTE: compiled, one chunk: the fused kernels hold no (n, V) temporaries, and a loop would be
    # unrolled into one copy of the graph per chunk (slower to compile, nothing gained)
    if torch.compiler.is_compiling():
        return logits.size(0)
    return max(1, LOSS_CHUNK.get(logits.device.type, 2**26) // logits.size(1))


class KVCache:
    """Keys and values of every layer for up to max_len tokens, preallocated; `pos` = tokens
    stored."""

    def __init__(self, batch_size: int, config: GPTConfig, max_len: int, device=None,
                 dtype=torch.float32):
        # dtype: the dtype keys and values arrive in, i.e. torch.bfloat16 under bf16 autocast
        D = config.n_embd // config.n_head
        # (L, B, Hkv, max_len, D)
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, D)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, Hkv, max_len, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, Hkv, max_len, D)
        self.max_len = max_len
        self.pos = 0  # tokens already stored = position of the next token

    def reset(self):
        """Forget every stored token (the buffers are reused)."""
        self.pos = 0

    def update(self, layer: int, k, v):
        """Store k, v (B, Hkv, T, D) at positions pos..pos+T-1; return this layer's keys and
        values so far."""
        # NOTE: `pos` does not move here: every layer writes at the same positions, and
        # GPT.forward advances it once after the last layer.
        end = self.pos + k.size(2)
        assert end <= self.max_len, (f"KV cache full: {self.pos} + {k.size(2)} tokens > max_len "
                                     f"{self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, Hkv, pos+T, D) views


def attend(q, k, v, pos: int):
    """SDPA of q (B, H, Tq, D) over k, v (B, Hkv, Tk, D), where q's first token sits at position
    pos."""
    # The three cases (nanochat OLD gpt.py:80-104), with Tk = pos + Tq:
    # 1) no earlier tokens (training, or a prefill into an empty cache): plain causal mask.
    # 2) one new token (decoding): it may see every key, which are all in its past: no mask.
    # 3) a chunk of Tq > 1 new tokens after pos earlier ones: query i (position pos+i) sees keys
    #    0..pos+i. E.g. pos=2, Tq=2 -> rows [1 1 1 0] and [1 1 1 1]: tril shifted right by pos.
    Tq, Tk = q.size(2), k.size(2)
    is_gqa = q.size(1) != k.size(1)  # each group of H/Hkv query heads reads one key/value head
    if pos == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              enable_gqa=is_gqa)  # (B, H, Tq, D)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=is_gqa)  # (B, H, 1, D)
    # True = may attend
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=pos)  # (Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          enable_gqa=is_gqa)  # (B, H, Tq, D)


def has_value_embed(layer: int, config: GPTConfig) -> bool:
    """Every other layer, counted back from the last one (which always has one), as nanochat."""
    return config.value_embeds and layer % 2 == (config.n_layer - 1) % 2


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        C, D = config.n_embd, self.head_dim
        self.c_q = nn.Linear(C, self.n_head * D, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * D, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * D, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.ve_gate = None  # (Hkv, VE_GATE_CHANNELS) where the layer has a value embedding
        if has_value_embed(layer, config):
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)

    def forward(self, x, ve, cos, sin, kv_cache):
        """x (B, T, C) -> (B, T, C); ve (B, T, Hkv*D) this layer's value embedding of the tokens,
        or None; cos, sin (1, T, 1, D/2) for this chunk's positions."""
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        if ve is not None:
            # VE: each head adds its share of the token's own value vector, v <- v + g * ve,
            # g = 3 sigmoid(x[:12] W) in (0, 3), so each token decides how much (nanochat's gate)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        # RoPE, then QK-norm (unit-RMS q and k keep attention logits bounded; nanochat's order)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # (B, T, H|Hkv, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, D)
        pos = 0
        if kv_cache is not None:
            pos = kv_cache.pos
            k, v = kv_cache.update(self.layer, k, v)  # (B, Hkv, pos+T, D)
        y = attend(q, k, v, pos)  # (B, H, T, D), scaled by 1/sqrt(D) inside SDPA
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.c_proj(y)  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        # 4x: GPT-2's width ratio
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        """x (B, T, C) -> (B, T, C) through relu(x W1)^2 W2."""
        # ReLU^2 (Primer), cheap and a bit better than GELU
        h = F.relu(self.c_fc(x)).square()  # (B, T, 4C)
        return self.c_proj(h)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, kv_cache):
        """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x));
        (B, T, C) -> (B, T, C)."""
        x = x + self.attn(norm(x), ve, cos, sin, kv_cache)  # (B, T, C)
        return x + self.mlp(norm(x))  # (B, T, C)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding, (V, C)
        # value embeddings: a second token table per VE layer, added to that layer's values
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim)  # (V, Hkv*D)
            for i in range(config.n_layer) if has_value_embed(i, config)})
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # untied from wte
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # (V, C)
        cos, sin = rotary_tables(ROPE_LENGTH_FACTOR * config.seq_len,
                                 config.n_embd // config.n_head)
        # persistent=False: recomputed here, never stored in model.pt
        self.register_buffer("cos", cos, persistent=False)  # (1, 10*seq_len, 1, D/2)
        self.register_buffer("sin", sin, persistent=False)  # (1, 10*seq_len, 1, D/2)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """nanochat OLD's init, drawn from torch's default RNG (the caller seeds it)."""
        # Linear W (fan_out, fan_in): std = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)), the
        # "spectral" init of https://arxiv.org/abs/2310.17813 that keeps each layer's output scale
        # near its input's; e.g. c_q at C=256: 1/16; c_proj of the MLP (fan_in 4C): 1/sqrt(4C)/2.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
        # 1.0: norm() follows, so the scale is free
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        # zero output projections: every block starts as the identity and the model as uniform
        # logits (loss ln V); Muon and AdamW move them off zero in the first step
        nn.init.zeros_(self.lm_head.weight)
        for block in self.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        # value embeddings like the values c_v makes (std 1/sqrt(C), uniform: no outliers);
        # gates small and positive, so each layer starts with a little of its table (nanochat)
        bound = math.sqrt(3 / self.config.n_embd)  # uniform(-b, b) has std b/sqrt(3)
        for table in self.value_embeds.values():
            nn.init.uniform_(table.weight, -bound, bound)
        for block in self.h:
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)

    def num_params(self) -> int:
        """Every trainable number, embeddings included (nanochat's count)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), the PaLM estimate nanochat prints."""
        # 6 per weight (2 forward multiply-adds, 4 backward) for every matrix the token passes
        # through; the embeddings are lookups, not matmuls, so wte and the value embeddings are
        # excluded. Attention scores add 12 * L * H * D * T: q.k and att.v are 2 * T * D
        # multiply-adds per head, x3 for backward.
        cfg = self.config
        tables = [self.wte.weight] + [table.weight for table in self.value_embeds.values()]
        n = self.num_params() - sum(table.numel() for table in tables)
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.seq_len

    def forward(self, ids, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        """ids (B, T) -> fp32 logits (B, T, V); with targets (B, T), the loss instead
        (-1 = ignored). last_only: the last position's logits only, (B, 1, V), for a prefill.

        loss_reduction: "mean" over counted targets, "sum" (nats), or "none" -> (B, T) nats, 0 where
        ignored. With a kv_cache, ids continue the cached tokens and the cache advances by T.
        """
        B, T = ids.shape
        pos = 0 if kv_cache is None else kv_cache.pos
        assert pos + T <= self.cos.size(1), (f"positions {pos}+{T} exceed the rotary table "
                                             f"({self.cos.size(1)})")
        cos, sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]  # (1, T, 1, D/2)
        x = norm(self.wte(ids))  # (B, T, C)
        for i, block in enumerate(self.h):
            table = self.value_embeds[str(i)] if str(i) in self.value_embeds else None
            ve = None if table is None else table(ids)  # (B, T, Hkv*D)
            x = block(x, ve, cos, sin, kv_cache)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.pos += T
        # a prefill needs one position's logits: at the --cpu shape lm_head is C*V = 2.1 M of
        # ~5.3 M multiply-adds a token (V = 32 C), and the softcap runs over T*V values
        x = norm(x[:, -1:] if last_only else x)  # (B, T or 1, C)
        logits = self.lm_head(x)  # (B, T or 1, V), bf16 under bf16 autocast
        if targets is None:
            return softcap(logits.float())  # (B, T or 1, V) fp32
        nats = SoftcapCrossEntropy.apply(logits.view(B * T, -1), targets.reshape(B * T))  # (B*T,)
        if loss_reduction == "none":
            return nats.view(B, T)  # (B, T), 0 where ignored
        assert loss_reduction in ("mean", "sum"), f"unknown loss_reduction {loss_reduction!r}"
        # the mean is over counted targets (NaN when there are none, as in F.cross_entropy)
        return nats.sum() / ((targets != -1).sum() if loss_reduction == "mean" else 1)


# --- precision --------------------------------------------------------------------------------

def autocast(device: torch.device, precision: str):
    """Context manager that runs the forward pass in `precision` ("bf16" or "fp32") on `device`."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# --- checkpoints ----------------------------------------------------------------------------

def _atomic_save(obj, path: str):
    torch.save(obj, path + ".tmp")
    # NOTE: a crash mid-write leaves only the .tmp, never half a file
    os.replace(path + ".tmp", path)


def save_checkpoint(ckpt_dir: str, model: GPT, meta: dict, optim_state: dict | None = None):
    """Write model.pt, optim.pt (if given) and meta.json (config added) into ckpt_dir, each
    atomically."""
    # meta.json goes last: a directory holding a meta.json holds the model it describes
    os.makedirs(ckpt_dir, exist_ok=True)
    _atomic_save(model.state_dict(), os.path.join(ckpt_dir, "model.pt"))
    if optim_state is not None:
        _atomic_save(optim_state, os.path.join(ckpt_dir, "optim.pt"))
    meta = {**meta, "version": CHECKPOINT_VERSION, "config": asdict(model.config)}
    path = os.path.join(ckpt_dir, "meta.json")
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(path + ".tmp", path)


def _load_tensors(path: str, device):
    """torch.load(weights_only=True) with errors that name the file and the fix."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}; run 'python train_all.py' to train this model")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    # what torch raises depends on where the file was cut: RuntimeError (zip directory missing),
    # OSError (a record cut short), EOFError (empty file), UnpicklingError (not a torch file)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}); delete "
                         f"{os.path.dirname(path) or '.'} and rerun 'python train_all.py'") from e


def load_checkpoint(ckpt_dir: str, device) -> tuple[GPT, dict]:
    """Rebuild the model saved in ckpt_dir on `device`; returns (model in eval mode, meta dict)."""
    path = os.path.join(ckpt_dir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {ckpt_dir} ({path} missing); run "
                                "'python train_all.py' first")
    try:
        with open(path) as f:
            meta = json.load(f)
        config = GPTConfig(**meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"{path} is corrupt ({e}); delete {ckpt_dir} and rerun "
                         "'python train_all.py'") from e
    if meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint version {meta.get('version')}, this code reads "
                         f"{CHECKPOINT_VERSION}; delete {ckpt_dir} and rerun 'python train_all.py'")
    state = _load_tensors(os.path.join(ckpt_dir, "model.pt"), device)
    model = GPT(config).to(device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{ckpt_dir}/model.pt does not match the config in {path}: {e}; delete "
                         f"{ckpt_dir} and rerun 'python train_all.py'") from e
    return model.eval(), meta


def load_optim_state(ckpt_dir: str) -> dict | None:
    """The optimizer state saved next to the model (on the CPU), or None when there is none."""
    path = os.path.join(ckpt_dir, "optim.pt")
    return _load_tensors(path, "cpu") if os.path.exists(path) else None
