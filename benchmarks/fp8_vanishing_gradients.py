"""fp8 Adam states where gradients vanish: qop's AdamWFp8 beside torchao's and fp32 AdamW on a small ReLU MLP.

``python benchmarks/fp8_vanishing_gradients.py [--steps 6]`` prints how far each optimizer moved the parameters.
Dead ReLU units give gradients that are small and then exactly 0; their second moments sit far below their block's
absmax, under float8_e4m3fn's grid.  Rounded to nearest they become 0 while the first moments do not, and the
update ``m / (sqrt(v) + eps)`` is ``m / eps``; qop keeps such second moments at the smallest subnormal instead.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from a source tree without installing qop

import qop  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--no-torchao", action="store_true", help="leave torchao's AdamWFp8 out (it compiles)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 3))
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(args.steps, 8, 64, generator=g), torch.randn(args.steps, 8, 3, generator=g)
    rows = [("torch AdamW fp32", lambda p: torch.optim.AdamW(p, lr=args.lr))]
    rows.append(("qop AdamWFp8", lambda p: qop.optim.AdamWFp8(p, lr=args.lr)))
    try:
        if not args.no_torchao:
            from torchao import optim as ao

            rows.append(("torchao AdamWFp8", lambda p: ao.AdamWFp8(p, lr=args.lr)))
    except ImportError:
        print("torchao not installed: its row is left out")
    print(f"{args.steps} steps, lr {args.lr}: largest parameter change")
    for label, make in rows:
        model = copy.deepcopy(base)
        opt = make(model.parameters())
        for x, y in zip(xs, ys):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            moved = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), base.parameters()))
        print(f"  {label:18s} {moved:.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
