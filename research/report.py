"""Plain-text tables for the terminal, and the loss-curve plot of a run."""

from __future__ import annotations

from pathlib import Path

from research import log


def table(headers: list[str], rows: list[list]) -> str:
    """An aligned text table; floats print with 4 significant decimals."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.4f}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return "-" if v is None else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def train_table(s: dict) -> str:
    val = s.get("val") or {}
    rows = [
        ["parameters", s["params"]],
        ["steps", s["steps"]],
        ["train loss (nats/token, last batch)", s["train_loss"]],
        ["val loss (nats/token)", val.get("loss")],
        ["val bits per byte", val.get("bits_per_byte")],
        ["val next-token accuracy", val.get("accuracy")],
        ["tokens/s (train, after compile)", s["tokens_per_second"]],
        ["devices", s["devices"]],
        ["wall time (s)", s["wall_seconds"]],
    ]
    foot = f"\nprotocol: validation split, {val.get('protocol', '-')}; run directory: {s['workdir']}"
    return table(["metric", "value"], rows) + foot


def eval_table(r: dict) -> str:
    rows = [
        ["loss (nats/token)", r["loss"]],
        ["perplexity", r["perplexity"]],
        ["bits per byte", r["bits_per_byte"]],
        ["next-token accuracy", r["accuracy"]],
        ["tokens scored", r["tokens"]],
        ["bytes scored", r["bytes"]],
    ]
    where = f"checkpoint step {r['step']}" if r.get("step") is not None else f"model {r.get('model', '-')}"
    foot = f"\nprotocol: {r['corpus']} ({r['split']}), {r['protocol']}; perplexity = exp(mean NLL); {where}"
    return table(["metric", "value"], rows) + foot


def plot_losses(workdir: Path, out: Path | None = None) -> Path:
    """Plots train and validation loss of a run from its metrics.jsonl; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = log.read_jsonl(Path(workdir) / "metrics.jsonl")
    out = Path(out or Path(workdir) / "loss.png")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for split, style in (("train", "-"), ("val", "o-")):
        pts = [(r["step"], r["loss"]) for r in records if r.get("split") == split and "loss" in r]
        if pts:
            ax.plot(*zip(*pts), style, label=split, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out
