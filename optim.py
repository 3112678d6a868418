"""
The two optimizers nanochat trains with, written out: AdamW for the embeddings, Muon for matrices.

Used by train_all.py (and bench.py); imports only torch. `make_optimizers(model)` routes every
parameter of a gpt.GPT to one of them and returns both, with nanochat's learning rates.

Design:
- AdamW is the textbook algorithm with decoupled weight decay and bias correction, in a few
  lines of tensor math instead of torch's fused kernel, so a reader sees every step; a test checks
  it against torch.optim.AdamW.
- Muon = momentum SGD whose update matrix is replaced by the nearest (semi-)orthogonal matrix,
  computed with a few Newton-Schulz iterations. Every direction of the update then moves by
  the same amount, so rare directions learn as fast as common ones. It only makes sense for 2-D
  weight matrices inside the blocks; the embedding lookup and the output layer use AdamW.
- Nesterov momentum is written as two lerps (nanochat's form): buf <- lerp(buf, g, 1 - mu), then
  the update direction is lerp(g, buf, mu) = (1 - mu) g + mu buf.
- Orthogonalization: Polar Express coefficients rather than nanochat OLD's fixed quintic: same
  cost, closer to orthogonal, and (measured) not worse in training; see `orthogonalize`.
- Every param group stores `initial_lr`; train_all.py's schedule sets lr = initial_lr * lr_scale.

Left out on purpose:
- distributed versions (nanochat's DistAdamW/DistMuon shard the optimizer state over ranks):
  under torchrun, train_all.py all-reduces the gradients itself, so every process runs these
  same single-process optimizers on identical gradients and stays in sync.
- nanochat HEAD's Muon extras (NorMuon variance reduction, cautious weight decay, MuonEq row
  scaling): the course follows the simpler OLD Muon.
- weight decay for Muon: nanochat OLD has none.

References:
- Adam (Kingma, Ba): https://arxiv.org/abs/1412.6980
- AdamW, decoupled weight decay (Loshchilov, Hutter): https://arxiv.org/abs/1711.05101
- Muon (Keller Jordan): https://kellerjordan.github.io/posts/muon/
- Muon is scalable for LLM training (Liu et al.): https://arxiv.org/abs/2502.16982
- Polar Express (Amsel et al.): https://arxiv.org/abs/2505.16932
- nanochat: https://github.com/karpathy/nanochat
"""
import math

import torch

# Polar Express coefficients (Amsel et al., as nanochat HEAD uses them): one (a, b, c) per
# iteration, each pair of steps tuned for where the singular values are by then. nanochat OLD used
# one fixed triple for all 5 steps, (3.4445, -4.7750, 2.0315). Same cost (3 matmuls per step);
# measured here in bf16 on 384x384 and 1536x384 matrices with singular values spread over 10^-1
# or 10^-2, 5 steps left every singular value in [0.85, 1.15] with Polar Express but only in
# [0.68, 1.21] with the fixed triple (RMS distance from 1: 0.10 vs 0.18).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(G):
    """Approximate U V^T of each G = U S V^T in G (..., rows, cols) with 5 Newton-Schulz steps."""
    # Each step applies an odd polynomial to every singular value s of X at once:
    #   X <- a X + b (X X^T) X + c (X X^T)^2 X   maps s -> a s + b s^3 + c s^5
    # Starting from s <= 1 (after dividing by the Frobenius norm), the steps drive every s
    # towards 1 while keeping the singular vectors, i.e. X -> U V^T. Worked example, one s:
    #   s = 0.01: 0.082, 0.33, 1.18, 1.05, 1.03   (fixed quintic: 0.034, 0.12, 0.40, 1.09, 0.70)
    #   s = 0.5:  1.76, 0.25, 0.94, 1.46, 0.91    (overshoots on the way, lands near 1)
    # s below ~0.003 do not reach 1 in 5 steps: directions the gradient barely uses move less.
    # In bf16: the iteration tolerates rounding (each step corrects the last), and bf16 matmuls
    # are several times faster than fp32 on CPUs with AVX-512 BF16 and on GPUs.
    # A stack of same-shape matrices (K, rows, cols) goes through the same steps at once, as one
    # batched matmul each: Muon.step stacks them to launch a few big kernels instead of many small.
    X = G.bfloat16()  # (..., rows, cols)
    is_tall = X.size(-2) > X.size(-1)
    if is_tall:
        X = X.mT  # (..., cols, rows): iterate on the wide side, so X X^T is the smaller square
    # 1.01: the coefficients assume s <= 1 with a safety margin for bf16 rounding of the norm;
    # 1e-6 guards an all-zero gradient (both as in nanochat HEAD). One norm per matrix.
    X = X / (1.01 * X.norm(dim=(-2, -1), keepdim=True) + 1e-6)
    for a, b, c in POLAR_EXPRESS:
        A = X @ X.mT  # (..., m, m), m = min(rows, cols)
        B = b * A + c * A @ A  # (..., m, m)
        X = a * X + B @ X  # (..., m, n)
    if is_tall:
        X = X.mT  # (..., rows, cols)
    return X.to(G.dtype)  # (..., rows, cols)


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay; defaults are nanochat's (betas 0.8, 0.95; eps 1e-10)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.8, 0.95), eps: float = 1e-10,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        """One update of every parameter that has a gradient."""
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad  # same shape as p
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)  # first moment: running mean of g
                    state["v"] = torch.zeros_like(p)  # second moment: running mean of g^2
                state["step"] += 1
                t, m, v = state["step"], state["m"], state["v"]
                # decoupled weight decay: shrink p directly, p <- p * (1 - lr * wd), instead
                # of adding wd * p to g (which Adam would then rescale per coordinate)
                p.mul_(1 - lr * wd)
                # m <- b1*m + (1-b1)*g ;  v <- b2*v + (1-b2)*g^2   (lerp(x, y, w) = x + w (y - x))
                m.lerp_(g, 1 - b1)
                v.lerp_(g.square(), 1 - b2)
                # bias correction: m and v start at 0, so early averages are too small by the
                # factors (1 - b1^t) and (1 - b2^t):  p <- p - lr * m_hat / (sqrt(v_hat) + eps)
                # NOTE: eps is added to sqrt(v_hat), not sqrt(v), exactly as torch does; moving it
                # changes early steps enough to fail the oracle test.
                denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D weight matrices; nanochat OLD's
    defaults."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95):
        super().__init__(params, dict(lr=lr, momentum=momentum))
        for group in self.param_groups:
            for p in group["params"]:
                assert p.ndim == 2, (f"Muon is for 2-D matrices, got a parameter of shape "
                                     f"{tuple(p.shape)}")

    @torch.no_grad()
    def step(self):
        """One update of every matrix that has a gradient; same-shape ones orthogonalized
        together."""
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            by_shape = {}  # (rows, cols) -> [(parameter, its update direction)]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad  # (rows, cols)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]  # (rows, cols)
                # Nesterov momentum: buf <- mu*buf + (1-mu)*g, step along (1-mu)*g + mu*buf,
                # i.e. "where the momentum is about to take us" rather than where it is
                buf.lerp_(g, 1 - mu)
                by_shape.setdefault(tuple(p.shape), []).append((p, g.lerp(buf, mu)))
            # One batched orthogonalization per shape: at depth 20, 3 runs (80 C x C attention
            # matrices, 20 of 4C x C, 20 of C x 4C) instead of 120: a GPU launches 40x fewer kernels
            for (rows, cols), pairs in by_shape.items():
                updates = orthogonalize(torch.stack([d for _, d in pairs]))  # (K, rows, cols)
                # An orthogonal (rows, cols) matrix has RMS entry 1/sqrt(max(rows, cols)); the
                # factor sqrt(max(1, rows/cols)) lifts tall matrices (torch Linear weights are
                # (out, in), so the MLP's c_fc, 4C x C, gets x2) to the same per-entry size.
                alpha = -lr * math.sqrt(max(1.0, rows / cols))
                for (p, _), update in zip(pairs, updates):
                    p.add_(update, alpha=alpha)


def make_optimizers(model, embedding_lr: float = 0.2, unembedding_lr: float = 0.004,
                    matrix_lr: float = 0.02,
                    weight_decay: float = 0.0) -> list[torch.optim.Optimizer]:
    """[AdamW for wte and lm_head, Muon for every block matrix], with nanochat OLD's learning
    rates."""
    # nanochat tuned the AdamW rates at C = 768; wider models take smaller steps, scaled as
    # 1/sqrt(C): lr * (C/768)^-0.5, e.g. x1.73 at C = 256 and x0.77 at C = 1280 (d20).
    C = model.config.n_embd
    lr_scale = (C / 768) ** -0.5
    embedding = [model.wte.weight]
    value_embeds = list(model.value_embeds.parameters())
    unembedding = [model.lm_head.weight]
    matrices = [p for p in model.h.parameters()]  # the value embeddings' gates too
    routed = embedding + value_embeds + unembedding + matrices
    assert len(routed) == len(list(model.parameters())), \
        "a parameter is routed to no optimizer: make_optimizers does not know a new module"
    # value embeddings: half the embedding's lr and a slow second moment (beta2 0.995), as
    # nanochat HEAD; a table row moves only when its token occurs
    adamw = AdamW([dict(params=unembedding, lr=unembedding_lr * lr_scale),
                   dict(params=embedding, lr=embedding_lr * lr_scale),
                   dict(params=value_embeds, lr=embedding_lr * lr_scale * 0.5,
                        betas=(0.8, 0.995))],
                  weight_decay=weight_decay)
    muon = Muon([dict(params=matrices, lr=matrix_lr)])
    for opt in (adamw, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]  # the schedule multiplies this
    return [adamw, muon]
