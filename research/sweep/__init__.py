"""Ablation sweeps: one config declares the axes of overrides, the job and what to collect; `ziplm sweep` runs
every point into its own directory, skips finished points, resumes interrupted ones and writes one table.

A sweep config is a Python file whose `get_config()` returns a ConfigDict (or dict) with

    name     the sweep's name: its W&B group and the default directory runs/sweeps/<name>
    job      "train", "compress", "eval" or "encode"
    base     the job's config: a ConfigDict, a config file "path.py[:arg]", or for eval / encode a dict of the
             command's options (model, corpus, protocol, window, ... / model, input, chunk_len, ...); default: the
             demo run (train) or the default compress config (compress)
    axes     a list of groups; the points are the product over groups. A group is a dict {override key: list}
             whose lists are zipped, or a list of override dicts (one option each; a "label" entry names the
             option in the point's name and in the table)
    extra    optional list of override dicts (with "label"): points outside the product (a control, a baseline)
    collect  optional {column: dotted path in the result} (default: research/sweep/table.py DEFAULTS)
    plot     optional dict or list of dicts: x, y, hue, logx, logy, title, file
    wandb    optional {mode, project, entity}: the points' W&B settings (default: the base config's; offline)
    workdir  optional: where the points go (default runs/sweeps/<name>; --workdir overrides)

Every override is applied as `--config.KEY=VALUE` would be (research/config.py `override`): unknown keys and
wrong types are one-line errors before anything runs. For example (experiments/sweeps/prune_study.py):

    axes = [
        {"compress.0.method": ["magnitude", "wanda", "sparsegpt"]},
        [{"label": f"{s:.0%}", "compress.0.sparsity": s} for s in (0.1, 0.5, 0.9)],
    ]

gives 9 points named like "method=wanda,50%". Each point directory holds the job's own outputs (summary.json,
model.zlm, checkpoints, metrics.jsonl, W&B offline files) and point.json (overrides, resolved config, its hash,
status, seconds). The sweep directory holds results.jsonl (every row with its full overrides), results.csv,
results.md and the declared plots. In W&B every point is one run: group = the sweep's name, job type = the
compress chain's methods (or the job), name = the point, and the config carries the point's overrides under
"sweep". `--wandb-yaml FILE` writes a grid sweep over the point names for `wandb sweep` / `wandb agent`.

Modules: points (config, axes, names), jobs (one point: its config, the job, its status), table (rows, files,
plots), runner (the command).
"""
