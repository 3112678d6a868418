"""
Tests of optim.py: AdamW against torch.optim.AdamW, Muon's near-orthogonal update, and a tiny GPT
that overfits one batch.
"""
import torch

from gpt import GPT, GPTConfig
from optim import AdamW, Muon, make_optimizers


def test_optim_adamw_matches_torch():
    """Our AdamW equals torch.optim.AdamW (decoupled weight decay, bias correction) within 1e-6
    over 10 steps."""
    torch.manual_seed(0)
    w = [torch.randn(16, 8), torch.randn(8)]
    ours = [t.clone().requires_grad_() for t in w]
    ref = [t.clone().requires_grad_() for t in w]
    kw = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    opt, ref_opt = AdamW(ours, **kw), torch.optim.AdamW(ref, **kw, foreach=False)
    for _ in range(10):
        for a, b in zip(ours, ref):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
    err = max((a - b).abs().max().item() for a, b in zip(ours, ref))
    assert err < 1e-6, (f"AdamW drifts from torch by {err}: check bias correction, eps placement "
                        "or weight decay")


def test_optim_muon_update_nearly_orthogonal():
    """Muon's first update of a wide and a tall matrix has all singular values near 1 (times its
    lr scale)."""
    torch.manual_seed(0)
    for rows, cols in ((32, 64), (64, 32)):
        p = torch.zeros(rows, cols, requires_grad=True)
        # columns scaled 0.1..1 on purpose
        p.grad = torch.randn(rows, cols) * torch.logspace(-1, 0, cols)
        Muon([p], lr=0.1).step()
        scale = 0.1 * max(1.0, rows / cols) ** 0.5
        s = torch.linalg.svdvals(p.detach() / scale)  # (min(rows, cols),)
        assert 0.7 < s.min() and s.max() < 1.3, (
            f"{rows}x{cols}: singular values {s.min():.3f}..{s.max():.3f}, not ~1: "
            "Newton-Schulz or lr scale broken")


def test_optim_tiny_gpt_overfits_one_batch():
    """make_optimizers drives a tiny GPT's loss on one batch from ln(64)=4.16 to below 0.1 within
    40 steps."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(seq_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    opts = make_optimizers(model)
    assert all("initial_lr" in g for o in opts for g in o.param_groups), (
        "every group needs initial_lr for schedules")
    ids = torch.randint(0, 64, (4, 17))  # (B, T+1)
    for step in range(40):
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
    assert loss.item() < 0.1, (f"loss {loss.item():.3f} after 40 steps: the model or the "
                               "optimizers do not learn")


def test_optim_muon_stacked_matches_one_at_a_time():
    """Muon stepping three same-shape matrices together moves each as stepping it alone would."""
    torch.manual_seed(0)
    grads = [torch.randn(24, 16) * 10.0 ** (-2 * k) for k in range(3)]  # scales 1, 0.01, 1e-4
    together = [torch.zeros(24, 16, requires_grad=True) for _ in grads]
    for p, g in zip(together, grads):
        p.grad = g.clone()
    Muon(together, lr=0.1).step()
    for p, g in zip(together, grads):
        alone = torch.zeros(24, 16, requires_grad=True)
        alone.grad = g.clone()
        Muon([alone], lr=0.1).step()
        err = (p - alone).abs().max().item()
        assert err < 1e-3, (f"stacked update differs by {err}: orthogonalize must treat each "
                            "matrix alone")
