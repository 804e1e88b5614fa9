"""End to end: Adam8bit trains a real small model like torch.optim.AdamW and keeps ~2 bytes of state per param."""

import functools

import pytest
import torch

import qop


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(64, 96),
        torch.nn.Flatten(),
        torch.nn.Linear(96 * 8, 256),
        torch.nn.GELU(),
        torch.nn.Linear(256, 64),
    )


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randint(0, 64, (32, 8), generator=g)
        y = (x[:, 0] + x[:, 1] // 8) % 64  # a deterministic rule an MLP learns in ~100 steps
        yield x, y


def _train(make_opt, steps: int = 200) -> tuple[list[float], torch.optim.Optimizer, torch.nn.Module]:
    model = _model()
    opt = make_opt(model.parameters())
    losses = []
    for x, y in _batches(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, opt, model


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for k, t in st.items()
        if isinstance(t, torch.Tensor) and k != "step"
    )


@functools.cache
def _reference_run() -> tuple[list[float], torch.optim.Optimizer, torch.nn.Module]:
    return _train(lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.0))


@pytest.mark.parametrize("cls", ["Adam8bit", "AdamW8bit"])
def test_8bit_tracks_adamw_and_saves_memory(cls: str) -> None:
    ref_losses, ref_opt, _ = _reference_run()
    losses, opt, model = _train(lambda p: getattr(qop.optim, cls)(p, lr=2e-3, weight_decay=0.0))
    # it learns: the loss falls well below its start, as AdamW's does
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    # and tracks AdamW's curve
    for a, b in zip(losses[::10], ref_losses[::10]):
        assert abs(a - b) <= 0.1 * max(abs(b), 1.0), (a, b)
    n_params = sum(p.numel() for p in model.parameters())
    big = sum(p.numel() for p in model.parameters() if p.numel() >= 4096)
    assert big > 0.95 * n_params
    per_param = _state_bytes(opt) / n_params
    ref_per_param = _state_bytes(ref_opt) / n_params
    assert ref_per_param == pytest.approx(8.0, rel=0.01)
    assert per_param < 2.2, per_param  # two uint8 codes + one float32 absmax per 256 elements (+ small tensors)
