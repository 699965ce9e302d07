"""Two processes x 4 CPU devices on localhost (gloo) train under a transform exactly as one process with 8 devices
does, and a checkpoint written by the two resumes in one process."""

import json
import os
import socket
import subprocess
import sys

from research import log
from tests import helpers
from tests.test_cli import TINY

ARGS = [
    *TINY,
    "--config.data.batch_size=8",
    "--config.train.steps=4",
    "--config.train.log_every=1",
    "--config.train.ckpt_every=2",
    "--config.mesh.data=8",
    "--config.mesh.rules=replicated",
    "--config.compress=[{'method': 'magnitude', 'sparsity': 0.5}]",
]


def _env(devices: int) -> dict:
    return {**os.environ, "WANDB_MODE": "disabled", "JAX_NUM_CPU_DEVICES": str(devices)}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train(workdir, *extra, devices=8):
    cmd = [sys.executable, "-m", "research", "train", "--workdir", str(workdir), *ARGS, *extra]
    return subprocess.run(cmd, env=_env(devices), cwd=helpers.REPO, capture_output=True, text=True, timeout=600)


def _train_two(workdir, *extra):
    port = _port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "research",
                "train",
                "--workdir",
                str(workdir),
                *ARGS,
                *extra,
                "--config.distributed.enabled=True",
                f"--config.distributed.coordinator=localhost:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            ],
            env=_env(4),
            cwd=helpers.REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def _losses(workdir):
    return {r["step"]: r["loss"] for r in log.read_jsonl(workdir / "metrics.jsonl") if r["split"] == "train"}


def test_two_processes_train_like_one_and_resume_in_one(tmp_path):
    single = tmp_path / "single"
    r = _train(single)
    assert r.returncode == 0, r.stderr
    multi = tmp_path / "multi"
    outs = _train_two(multi)
    assert "in 2 process(es)" in outs[0][0] and "run " not in outs[1][0]  # process 0 alone prints and writes
    a, b = _losses(single), _losses(multi)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    sa = json.loads((single / "summary.json").read_text())["val"]["loss"]
    sb = json.loads((multi / "summary.json").read_text())["val"]["loss"]
    assert abs(sa - sb) <= 1e-5
    # The two processes' checkpoint (step 4) resumes in one process, on another device count.
    r = _train(multi, "--config.train.steps=6", "--config.mesh.data=4", devices=4)
    assert r.returncode == 0, r.stderr
    assert json.loads((multi / "summary.json").read_text())["resumed_from"] == 4
    assert sorted(_losses(multi)) == [1, 2, 3, 4, 5, 6]
