"""
Tests of train.py: the lr schedule and Muon's momentum warmup (exact resume is tested end to end
in test_train_all.py).
"""
from train import lr_scale, muon_momentum
from train_all import MidtrainConfig, PretrainConfig, SFTConfig


def test_train_lr_schedule_known_values():
    """nanochat's schedules: base flat then linear to 0 over the last 20%, SFT linear to 0, warmup linear from 0."""
    base = PretrainConfig(num_steps=100)
    assert [lr_scale(s, base) for s in (0, 50, 80, 90, 100)] == [1.0, 1.0, 1.0, 0.5, 0.0], "base schedule wrong"
    sft = SFTConfig(num_steps=10)
    assert [lr_scale(s, sft) for s in (0, 5, 9)] == [1.0, 0.5, 0.1], "SFT schedule wrong"
    warm = MidtrainConfig(num_steps=10, warmup_frac=0.2, warmdown_frac=0.2, final_lr_frac=0.5)
    assert [lr_scale(s, warm) for s in (0, 1, 2, 8, 9)] == [0.5, 1.0, 1.0, 1.0, 0.75], "warmup/final_lr_frac wrong"
    assert [round(muon_momentum(s), 12) for s in (0, 150, 300, 1000)] == [0.85, 0.9, 0.95, 0.95], \
        "Muon momentum warmup wrong"
