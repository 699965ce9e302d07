"""Two processes x 4 CPU devices on localhost (gloo) train under a transform and compress (calibration, fine-tuning
stages, evaluation) exactly as one process with 8 devices does, a checkpoint written by the two resumes in one
process and one process's in two, a failure on process 0 alone stops both with the same status, and `eval`,
`encode` and `decode` split their windows / streams over both processes' devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from research import hardware, log
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


def _two(command: list, status: int = 0, args_style: str = "config") -> list:
    """Runs `ziplm *command` as processes 0 and 1 of one run, connected by config overrides (train, compress) or
    by the environment (`args_style="cli"`: eval, encode, decode); returns their (stdout, stderr)."""
    port = _port()

    def how(i):
        if args_style == "cli":
            env = {"ZIPLM_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}"}
            return [], {**_env(4), **env, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
        flags = [
            "--config.distributed.enabled=True",
            f"--config.distributed.coordinator=localhost:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
        ]
        return flags, _env(4)

    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "research", *command, *how(i)[0]],
            env=how(i)[1],
            cwd=helpers.REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == status, err[-3000:]
    return outs


def _train_two(workdir, *extra):
    return _two(["train", "--workdir", str(workdir), *ARGS, *extra])


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
    # And the one process's checkpoint resumes in two, on the same trajectory.
    _train_two(single, "--config.train.steps=6")
    assert json.loads((single / "summary.json").read_text())["resumed_from"] == 4
    a, b = _losses(single), _losses(multi)
    assert sorted(a) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


COMPRESS = [
    "--config.compress=[{'method': 'wanda', 'sparsity': 0.5}, {'finetune': 2}, "
    "{'method': 'rtn', 'bits': 4, 'granularity': 'channel'}]",
    "--config.finetune.steps=0",
    "--config.finetune.log_every=1",
    "--config.data.batch_size=8",
    "--config.calibration.n=8",
    "--config.calibration.length=32",
    "--config.calibration.batch_size=8",
    "--config.eval.max_windows=8",
    "--config.eval.batch_size=8",
    "--config.eval.agreement=True",
    "--config.mesh.data=8",
]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A dense model trained in one process on one device."""
    path = tmp_path_factory.mktemp("mp-source") / "run"
    r = _train(path, "--config.compress=[]", "--config.mesh.data=1", devices=1)
    assert r.returncode == 0, r.stderr
    return path


def test_two_processes_compress_like_one(source, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    cmd = ["compress", "--model", str(source), *COMPRESS]
    r = subprocess.run(
        [sys.executable, "-m", "research", *cmd, "--workdir", str(single)],
        env=_env(8), cwd=helpers.REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    outs = _two([*cmd, "--workdir", str(multi)])
    assert "packed:" in outs[0][0] and "packed:" not in outs[1][0]  # process 0 alone reports and writes
    assert sorted(x.name for x in multi.iterdir()) == ["metrics.jsonl", "model.zlm", "summary.json"]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (single, multi))
    kind = b["devices"].pop("kind")  # "8 x cpu": jax.device_count() across both processes
    assert kind == "8 x cpu", kind
    assert b["devices"].pop("jax") == jax.__version__
    assert b["devices"].pop("cpu") == a["devices"]["cpu"] == hardware.cpu()
    assert b["devices"].pop("lock") == a["devices"]["lock"] == hardware.lock()
    assert b["devices"] == {"processes": 2, "mesh": {"data": 8, "model": 1}, "host_cpus": hardware.host_cpus()}
    assert a["devices"]["processes"] == 1
    # Calibration (Wanda's norms), the fine-tuning stage and every evaluation agree across layouts.
    assert a["sparsity"] == b["sparsity"] == 0.5
    for key in ("dense", "compressed"):
        for m in ("loss", "kl", "top1_agreement") if key != "dense" else ("loss",):
            assert abs(a[key][m] - b[key][m]) <= 1e-5, (key, m, a[key][m], b[key][m])
    assert abs(a["stages"][0]["val"]["loss"] - b["stages"][0]["val"]["loss"]) <= 1e-5
    la, lb = _losses(single), _losses(multi)
    assert sorted(la) == sorted(lb) == [1, 2]
    for step in la:
        assert abs(la[step] - lb[step]) <= 1e-5, (step, la[step], lb[step])


def test_a_failure_on_process_zero_alone_stops_both_with_its_status(source, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # the output's parent is a file: only process 0, which writes, finds out
    cmd = ["compress", "--model", str(source), "--workdir", str(blocker / "out")]
    outs = _two(
        [*cmd, "--config.compress=[{'method': 'magnitude', 'sparsity': 0.5}]", "--config.mesh.data=8"], status=2
    )
    assert "error: " in outs[0][1] and "another" not in outs[0][1], outs[0][1]
    assert "error: process 0 could not set up" in outs[1][1], outs[1][1]
    assert "Traceback" not in outs[0][1] + outs[1][1]


def test_two_processes_evaluate_and_code_data_as_one_process_with_their_devices(source, tmp_path):
    # ziplm eval in two processes (windows split over all 8 devices) scores as one process on one device.
    _two(["eval", "--model", str(source), "--json", str(tmp_path / "two.json")], args_style="cli")
    r = subprocess.run(
        [sys.executable, "-m", "research", "eval", "--model", str(source), "--json", str(tmp_path / "one.json")],
        env=_env(1), cwd=helpers.REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) <= 1e-5
    data = tmp_path / "in.txt"
    data.write_bytes(b"Each process codes its own streams; process 0 writes the file.\n" * 40)
    coded, single = tmp_path / "two.zlmt", tmp_path / "one.zlmt"
    opts = ["--batch-size", "16", "--context", "32"]
    outs = _two(["encode", "--model", str(source), str(data), str(coded), *opts], args_style="cli")
    assert "decode with --devices 8" in outs[0][0] and "bytes ->" not in outs[1][0]  # process 0 reports
    run = [sys.executable, "-m", "research"]
    r = subprocess.run(
        [*run, "encode", "--model", str(source), str(data), str(single), *opts, "--devices", "8"],
        env=_env(8), cwd=helpers.REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert coded.read_bytes() == single.read_bytes()  # the same streams on the same 8 devices: the same bytes
    back = tmp_path / "back.txt"
    r = subprocess.run(
        [*run, "decode", "--model", str(source), str(coded), str(back), "--devices", "8"],
        env=_env(8), cwd=helpers.REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == data.read_bytes()
