"""The demo's picture: the loss curves of every run beside their optimizer state per parameter."""

from __future__ import annotations

from ._demo import BNB, COMPILED, QOP, TORCH, DemoResult

#: Line style of each run in the plot: the curves lie on top of each other, so each keeps its own dash and marker.
_STYLES = {TORCH: ("-", "", 2.5), QOP: ("--", "o", 1.5), COMPILED: (":", "x", 1.5), BNB: ("-.", "s", 1.2)}


def plot(result: DemoResult, path: str) -> None:
    """Save a PNG (needs matplotlib): the loss curves of every run, and their optimizer state per parameter."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"qop demo: --plot needs matplotlib ({exc}); pip install matplotlib") from exc
    curves = [c for c in result.curves if not c.absent]
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for c in curves:
        steps, losses = zip(*c.points)
        style, marker, width = _STYLES.get(c.name, ("-", "", 1.5))
        ax.plot(
            steps,
            losses,
            style,
            marker=marker,
            markersize=4,
            linewidth=width,
            label=f"{c.name} (final eval loss {c.final_loss:.3f})",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over logging window)")
    ax.set_title(f"TinyLM on procedural addition, {result.n_params:,} params")
    ax.legend(fontsize=8)
    per_param = [c.state_bytes / result.n_params for c in curves]
    drawn = bars.barh([c.name for c in curves], per_param, color="tab:blue")
    bars.bar_label(drawn, labels=[f"{v:.2f} B" for v in per_param], padding=3, fontsize=8)
    bars.invert_yaxis()
    bars.set_xlabel("optimizer state, bytes per parameter")
    bars.set_xlim(0, max(per_param) * 1.25)
    absent = [f"{c.name}: {c.absent}" for c in result.curves if c.absent]
    bars.set_title("state memory" + ("\n" + "; ".join(absent) if absent else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
