"""Coding the same bytes with models and with the classic codecs: bits per byte and total description length.

    rows = compare.rows(data, {"dense": "runs/x/model.zlm", ...})     # model coders and gzip / bz2 / xz / zstd
    print(compare.table(rows)); compare.plot({"val": rows}, "coding.png")

Every model codes through `lm.encode` and is decoded again (`lm.decode`) and compared with the input (unless
`verify=False`); a model's bytes are its file's size (the file a decoder needs), so total = model bytes + coded
data bytes, while the classic codecs need no model (total = their output).
"""

from __future__ import annotations

from pathlib import Path

from research import report, sources
from research.coding import classic, lm


def rows(
    data: bytes,
    models: dict,
    *,
    batch_size: int = 64,
    chunk_len: int | None = None,
    context: int | None = None,
    progress=print,
    classics: bool = True,
    verify: bool = True,
) -> list:
    """One row per classic codec (unless `classics` is False) and per model ({name: model file: packed, GGUF}),
    sorted by total description length. With `verify` (the default) every model's file is decoded and compared
    with the input; without, the row says `decoded: False` (for runs where decoding would double the cost)."""
    out = [
        dict(coder=name, model_bytes=0, data_bytes=size, bits_per_byte=8 * size / max(len(data), 1), total_bytes=size)
        for name, size in (classic.compress_all(data).items() if classics else ())
    ]
    for name, path in models.items():
        m = sources.load(str(path))
        blob, rep = lm.encode(data, m, batch_size=batch_size, context=context, chunk_len=chunk_len)
        drep = None
        if verify:
            back, drep = lm.decode(blob, m)
            if back != data:
                raise RuntimeError(f"{name}: decoding did not give back the input")  # the coder's bug, not the user's
        model_bytes = Path(path).stat().st_size
        out.append(
            dict(
                coder=f"model: {name}",
                model_bytes=model_bytes,
                data_bytes=len(blob),
                bits_per_byte=rep["bits_per_byte"],
                ideal_bits_per_byte=rep["ideal_bits_per_byte"],
                overhead_bytes=rep["overhead_bytes"],
                total_bytes=model_bytes + len(blob),
                encode_kb_per_s=rep["kb_per_s"],
                decoded=verify,
                decode_kb_per_s=drep["kb_per_s"] if drep else None,
                coder_share=rep["coder_seconds"] / max(rep["seconds"], 1e-9),
            )
        )
        if progress:
            progress(
                f"coded with {name}: {rep['bits_per_byte']:.4f} bits/byte, total {model_bytes + len(blob):,} bytes"
            )
    return sorted(out, key=lambda r: r["total_bytes"])


def table(rs: list) -> str:
    return report.table(
        ["coder", "bits/byte", "ideal", "data kB", "model kB", "total kB"],
        [
            [
                r["coder"],
                r["bits_per_byte"],
                r.get("ideal_bits_per_byte"),
                round(r["data_bytes"] / 1e3, 1),
                round(r["model_bytes"] / 1e3, 1),
                round(r["total_bytes"] / 1e3, 1),
            ]
            for r in rs
        ],
    )


def plot(results: dict, path) -> Path:
    """Stacked bars per data set: coded data + model bytes (the total description length), labelled with bits per
    byte."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results.items())
    fig, axes = plt.subplots(
        1, len(sets), figsize=(7 * len(sets), 0.5 * max(len(r) for _, r in sets) + 2), squeeze=False
    )
    for ax, (name, rs) in zip(axes[0], sets):
        labels = [x["coder"].removeprefix("model: ") for x in rs]
        data = [x["data_bytes"] / 1e3 for x in rs]
        ax.barh(labels, data, color="C0", label="coded data")
        ax.barh(labels, [x["model_bytes"] / 1e3 for x in rs], left=data, color="C1", label="model (packed)")
        for i, x in enumerate(rs):
            ax.text(x["total_bytes"] / 1e3, i, f" {x['bits_per_byte']:.2f} bits/byte", va="center", fontsize=8)
        ax.set_xlabel("kB: total description length = coded data + model")
        ax.set_title(name, fontsize=10)
        ax.invert_yaxis()
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
