"""Which state costs a low-bit format its loss: AdamW with each state passed through a quantize/dequantize round
trip after every step, on the digits task of ``qop.bench.quality`` (needs scikit-learn).

``python benchmarks/state_format_variants.py`` (~30 s) prints the final eval loss of each variant against fused
fp32 AdamW: fp8 and 4-bit first and second moments alone and together, and ways of storing an fp8 second moment
(e5m2, zero-free, its square root).  Tensors under 4096 elements keep float32 states, as in qop's classes.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from a source tree without installing qop

from qop._maps import code_book  # noqa: E402
from qop.bench.quality import Provider, digits_task, train_one  # noqa: E402

torch.set_num_threads(1)
E4 = torch.float8_e4m3fn
E5 = torch.float8_e5m2


def fp8(x, dt=E4, bs=256, nozero=False):
    mx = torch.finfo(dt).max
    b = x.reshape(-1, bs)
    scale = b.abs().amax(1, keepdim=True).clamp(min=1e-12) / mx
    c = (b / scale).to(dt)
    if nozero:  # positive values never take code 0: the smallest subnormal instead
        tiny = torch.tensor(torch.finfo(dt).smallest_normal * 2.0 ** -(3 if dt == E4 else 2)).to(dt)
        c = torch.where((b > 0) & (c.float() == 0), tiny, c)
    return (c.float() * scale).reshape(x.shape)


def sqrt_fp8(x):  # second moment stored as sqrt(v) in e4m3fn
    return fp8(x.sqrt()).square()


MAP4_U = code_book(False, 4)  # the zero-free linear map k/16
MAP4_S = code_book(True, 4)  # the signed 4-bit dynamic map


def book(x, code, bs):
    b = x.reshape(-1, bs)
    a = b.abs().amax(1, keepdim=True)
    y = b / a.clamp(min=1e-12)
    idx = (y[..., None] - code).abs().argmin(-1)
    return (code[idx] * a).reshape(x.shape)


def q4m(x):
    return book(x, MAP4_S, 128)


def q4v(x):
    return book(x, MAP4_U, 128)


ident = lambda x: x


class EmuAdamW(torch.optim.Optimizer):
    def __init__(self, params, qm, qv, stats=None, lr=1e-3, weight_decay=1e-2, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))
        self.qm, self.qv, self.stats = qm, qv, stats

    @torch.no_grad()
    def step(self):
        for gr in self.param_groups:
            lr = float(gr["lr"])
            b1, b2 = gr["betas"]
            eps = gr["eps"]
            for p in gr["params"]:
                st = self.state[p]
                if not st:
                    st["t"] = 0
                    st["m"] = torch.zeros_like(p)
                    st["v"] = torch.zeros_like(p)
                st["t"] += 1
                t = st["t"]
                g = p.grad
                quant = p.numel() >= 4096
                p.mul_(1 - lr * gr["weight_decay"])
                m = st["m"].lerp(g, 1 - b1)
                v = st["v"].lerp(g * g, 1 - b2)
                u = (m / (1 - b1**t)) / (v.sqrt() / math.sqrt(1 - b2**t) + eps)
                p.add_(u, alpha=-lr)
                if quant:
                    qv = self.qv(v)
                    if self.stats is not None:
                        s = self.stats.setdefault(id(p), [])
                        s.append(
                            (
                                t,
                                int(((v > 0) & (qv == 0)).sum()),
                                int((v > 0).sum()),
                                float(u.abs().max()),
                                int((u.abs() > 10).sum()),
                            )
                        )
                    st["m"] = self.qm(m)
                    st["v"] = qv
                else:
                    st["m"] = m
                    st["v"] = v


VARIANTS = {
    "m fp32, v fp32": (ident, ident),
    "m fp8, v fp8 (qop/torchao AdamWFp8)": (fp8, fp8),
    "m fp8, v fp32": (fp8, ident),
    "m fp32, v fp8": (ident, fp8),
    "m fp8, v fp8 e5m2": (fp8, lambda x: fp8(x, E5)),
    "m fp8, v fp8 zero-free": (fp8, lambda x: fp8(x, nozero=True)),
    "m fp8, v = fp8(sqrt v)^2": (fp8, sqrt_fp8),
    "m 4bit, v 4bit (AdamW4bit)": (q4m, q4v),
    "m 4bit, v fp32": (q4m, ident),
    "m fp32, v 4bit": (ident, q4v),
}
if __name__ == "__main__":
    task = digits_task(False, 0)
    ref = train_one(
        task, Provider("torch", lambda p, **kw: torch.optim.AdamW(p, fused=True, **kw)), 300, 1e-2
    ).final_loss
    print(f"{'torch AdamW fused fp32':40s} {ref:.4f}")
    for name, (qm, qv) in VARIANTS.items():
        stats = {}
        build = lambda p, _qm=qm, _qv=qv, _stats=stats, **kw: EmuAdamW(p, _qm, _qv, _stats, **kw)
        r = train_one(task, Provider(name, build), 300, 1e-2)
        z = sum(s[1] for v in stats.values() for s in v)
        nz = sum(s[2] for v in stats.values() for s in v)
        big = sum(s[4] for v in stats.values() for s in v)
        mx = max(s[3] for v in stats.values() for s in v)
        print(
            f"{name:40s} {r.final_loss:.4f} {r.final_loss - ref:+.4f} ({100 * (r.final_loss / ref - 1):+.1f}%)  "
            f"v>0 stored as 0: {100 * z / max(nz, 1):.2f}%  |u|>10: {big}  max|u| {mx:.3g}",
            flush=True,
        )
