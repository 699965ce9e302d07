"""`ziplm compress` end to end: compress, fine-tune, save, evaluate the saved model; bad input writes nothing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from research import cli, errors, files, models, sources
from research.coding import container
from research.compress import core, pipeline
from tests.test_cli import TINY, _bad

SMALL = ["--config.calibration.n=4", "--config.calibration.length=32"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("compress") / "run"
    assert cli.main(["train", "--workdir", str(path), *TINY]) == 0
    return path


def _compress(run, out, *extra):
    return ["compress", "--model", str(run), "--workdir", str(out), *SMALL, *extra]


def _leaves(out) -> dict:
    """{path: header record} of the leaves of a compress directory's model.zlm."""
    return {leaf["path"]: leaf for leaf in container.Reader(out / "model.zlm").leaves}


def _kernel(out, path="layers/0/mlp/up/kernel"):
    m = sources.load(str(out))
    node = m.params
    for k in path.split("/"):
        node = node[int(k) if k.isdigit() else k]
    return m, np.asarray(node)


def test_compress_finetune_save_and_evaluate(run, tmp_path, capsys):
    out = tmp_path / "pruned"
    args = _compress(run, out, "--config.finetune.steps=6", "--config.finetune.log_every=3")
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "finetuned" in text and "methods: magnitude" in text
    s = json.loads((out / "summary.json").read_text())
    assert s["sparsity"] == pytest.approx(0.5) and s["sparsity_compressed"] == pytest.approx(0.5)
    assert s["methods"] == [{"method": "magnitude", "sparsity": 0.5}]
    assert s["finetune"]["steps"] == 6 and set(s["seconds"]) >= {"compress", "finetune", "eval_dense", "total"}
    assert s["nonzero"] < s["params"]
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())][:2] == [3, 6]

    # The saved model is the fine-tuned compressed one: eval reproduces its loss and sees its zeros.
    assert cli.main(["eval", "--model", str(out), "--json", str(tmp_path / "e.json")]) == 0
    capsys.readouterr()
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["loss"] == pytest.approx(s["finetuned"]["loss"], rel=1e-6)
    # So does its packed file, which the summary sizes with every byte counted.
    assert cli.main(["eval", "--model", str(out / "model.zlm"), "--json", str(tmp_path / "p.json")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "p.json").read_text())["loss"] == e["loss"]
    assert s["packed"]["file_bytes"] == (out / "model.zlm").stat().st_size
    assert s["packed"]["ratio_vs_fp32"] == pytest.approx(4 * s["params"] / s["packed"]["file_bytes"])
    assert s["packed_compressed"]["file_bytes"] > 0
    # One artifact: the packed model, its summary and the run log.
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "model.zlm", "summary.json"]
    meta = container.Reader(out / "model.zlm").meta
    assert meta["source"] == str(run) and meta["source_kind"] == "run" and meta["methods"] == s["methods"]
    assert meta["compress_config"]["finetune"]["steps"] == 6
    m, kernel = _kernel(out)
    assert m.kind == "packed" and (kernel == 0).mean() == pytest.approx(0.5, abs=0.01)
    assert _leaves(out)["layers/0/mlp/up/kernel"]["kind"] == "masked"
    # export, encode and pack read the directory as they read any model.
    assert cli.main(["export", "--model", str(out), "--out", str(tmp_path / "hf")]) == 0
    assert cli.main(["pack", "--model", str(out), "--out", str(tmp_path / "again.zlm")]) == 0
    (tmp_path / "t.txt").write_text("a little text to code")
    assert cli.main(["encode", "--model", str(out), str(tmp_path / "t.txt"), str(tmp_path / "t.zlmt")]) == 0
    capsys.readouterr()
    assert sources.load(str(tmp_path / "hf")).kind == "hf"

    _bad(args, capsys, "--overwrite")  # an existing result is never replaced silently
    assert cli.main([*args, "--overwrite"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["finetuned"]["loss"] == s["finetuned"]["loss"]  # same config and seed, same result


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--config.compress.0.sparsity=1.5"], "sparsity must be a fraction in [0, 1)"),
        (["--config.compress.0.pattern=4:2"], "1 <= N <= M"),
        (["--config.compress.0.pattern=2:5"], "do not divide the input dimension 32"),
        (["--config.compress.0.method=nope"], "unknown compression method 'nope'"),
        (["--config.compress.0.method=snip", "--config.calibration.n=0"], "snip needs calibration data"),
        (["--config.compress.0.where=layers/9/.*"], "selects no parameter"),
        (["--config.compress.0.amount=0.2"], "unexpected keyword argument 'amount'"),
        (["--config.compress.0.distribution=erk2"], "distribution must be one of"),
        (["--config.data.seq_len=64"], "data.seq_len (64) exceeds the model's context (32)"),
        (["--config.compress.0.method=gradual"], "gradual pruning ends at step 1000 but finetune.steps runs 0 steps"),
        (["--config.finetune.log_every=0"], "finetune.log_every must be an integer >= 1"),
        (["--config.compress=[{'finetune': 0}]"], "needs a positive integer, got 0"),
        (["--config.compress=[{'finetune': 3}]"], "names no method"),
        (["--config.compress=[{'method': 'act_quant', 'bits': 1}]"], "activation bits must be an integer in 2..16"),
        (["--config.compress=[{'method': 'act_quant', 'bits': 8, 'where': 'x'}]"], "exactly one argument, bits"),
        (
            ["--config.compress=[{'method': 'act_quant', 'bits': 8}, {'method': 'act_quant', 'bits': 4}]"],
            "more than one",
        ),
        (
            ["--config.compress.0.method=wanda", "--config.mesh.data=4", "--config.calibration.batch_size=6"],
            "calibration.batch_size=6 is not divisible by mesh.data=4",
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, capsys, extra, match):
    out = tmp_path / "x"
    _bad(_compress(run, out, *extra), capsys, match)
    assert not out.exists() and not list(tmp_path.glob(".x.*"))


def test_non_finite_weights_are_never_saved(run, tmp_path, monkeypatch):
    def poison(params, state):
        return {**params, "final_norm": {**params["final_norm"], "scale": params["final_norm"]["scale"] * jnp.nan}}

    monkeypatch.setattr(pipeline, "members", lambda specs: [core.Transform(lambda p, k, c: (), poison)])
    cfg = pipeline.base_config()
    cfg.model, cfg.calibration.n, cfg.eval.max_windows = str(run), 0, 2
    with pytest.raises(errors.UserError, match="non-finite weights in final_norm/scale"):
        pipeline.run(cfg, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_old_compressed_directories_load_with_a_deprecation_message(run, tmp_path, capsys):
    old = tmp_path / "old"
    m = sources.load(str(run))
    old.mkdir()
    with ocp.StandardCheckpointer() as ck:
        ck.save(old / "params", m.params)
        ck.wait_until_finished()
    record = dict(format="ziplm-compressed", version=1, model=m.cfg.to_dict(), tokenizer=m.tokenizer)
    files.write_json(old / "compressed.json", dict(record, run_config=m.run_config.to_dict()))
    back = sources.load(str(old))
    assert "old format" in capsys.readouterr().err and back.kind == "compressed"
    for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cli.main(["pack", "--model", str(old), "--out", str(old / "model.zlm")]) == 0  # the conversion
    capsys.readouterr()
    assert sources.load(str(old)).kind == "packed"


def test_structured_shrink_saves_a_smaller_model_that_evaluates_the_same(run, tmp_path, capsys):
    out = tmp_path / "small"
    spec = '[{"method": "structured", "heads": 0.5, "neurons": 0.5}]'
    assert cli.main(_compress(run, out, f"--config.compress={spec}", "--config.shrink=true")) == 0
    capsys.readouterr()
    s = json.loads((out / "summary.json").read_text())
    assert s["shrunk"]["loss"] == pytest.approx(s["compressed"]["loss"], abs=1e-5)
    assert s["shrunk"]["params"] < s["params"] and s["shrunk"]["model"]["n_head"] == 1
    assert sum(int(np.prod(x["shape"])) for x in _leaves(out).values()) == s["shrunk"]["params"]
    assert cli.main(["eval", "--model", str(out), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["loss"] == pytest.approx(s["shrunk"]["loss"], rel=1e-6)
    _bad(_compress(run, tmp_path / "y", "--config.shrink=true"), capsys, "exactly one 'structured' entry")


def test_report_counts_masked_sparsity_from_the_masks():
    from research.compress import report

    effective = {"a": {"kernel": jnp.asarray([[0.0, 2.0], [0.0, 0.0]])}, "b": {"bias": jnp.zeros(2)}}
    masks = {"a": {"kernel": jnp.asarray([[True, True], [False, False]])}, "b": {"bias": None}}
    s = report.summarize(effective, masks)
    assert s["masked_sparsity"] == 0.5  # the kept zero at a[0, 0] is kept, not pruned
    assert s["sparsity"] == pytest.approx(5 / 6) and s["params"] == 6 and s["nonzero"] == 1
    assert s["dense_bytes_fp32"] == 24 and "effective_bytes" not in s


def test_prune_then_quantize_packs_the_exported_codes(run, tmp_path, capsys):
    out = tmp_path / "pq"
    gptq = '{"method": "gptq", "bits": 4, "group_size": 16, "granularity": "group"}'
    spec = f'[{{"method": "magnitude", "sparsity": 0.5}}, {gptq}]'
    assert cli.main(_compress(run, out, f"--config.compress={spec}")) == 0
    capsys.readouterr()
    s = json.loads((out / "summary.json").read_text())
    assert s["packed_compressed"] == s["packed"]  # no fine-tuning: the saved model is the compressed one
    assert s["packed"]["kinds"]["grid"]["leaves"] == 6  # every quantized kernel stored as integer codes
    up = _leaves(out)["layers/0/mlp/up/kernel"]
    assert up["kind"] == "grid" and up["layout"] == "group" and up["group"] == 16 and up["scale_shape"] == [2, 128]
    _, kernel = _kernel(out)
    assert (kernel == 0).mean() >= 0.5  # quantization kept the pruned zeros
    # Packing the compressed model again keeps its codes: the same leaves, kinds and section bytes.
    assert cli.main(["pack", "--model", str(out), "--out", str(tmp_path / "again.zlm")]) == 0
    capsys.readouterr()
    again = {leaf["path"]: leaf for leaf in container.Reader(tmp_path / "again.zlm").leaves}
    for path, leaf in _leaves(out).items():
        assert again[path]["kind"] == leaf["kind"], path
        assert {k: v["length"] for k, v in again[path]["sections"].items()} == {
            k: v["length"] for k, v in leaf["sections"].items()
        }, path


def test_prune_finetune_quantize_in_one_list(run, tmp_path, capsys):
    out = tmp_path / "pfq"
    spec = "[{'method': 'magnitude', 'sparsity': 0.5}, {'finetune': 4}, {'method': 'rtn', 'bits': 4}]"
    assert cli.main(_compress(run, out, f"--config.compress={spec}")) == 0
    assert "magnitude -> finetune 4 -> rtn" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert len(s["stages"]) == 1 and s["stages"][0]["after"] == ["magnitude"]
    assert s["stages"][0]["finetune"]["steps"] == 4
    assert _leaves(out)["layers/0/attn/q/kernel"]["kind"] == "grid"
    _, kernel = _kernel(out, "layers/0/attn/q/kernel")
    assert (kernel == 0).mean() >= 0.5  # pruned weights hold the zero code


def test_w4a4_lsq_quantizes_activations_through_fine_tuning_and_saving(run, tmp_path, capsys):
    out = tmp_path / "wa"
    qat = "{'method': 'qat', 'bits': 4, 'learn_scale': True, 'scale_lr': 0.01}"
    spec = f"[{qat}, {{'method': 'act_quant', 'bits': 4}}, {{'finetune': 3}}]"
    assert cli.main(_compress(run, out, f"--config.compress={spec}")) == 0
    capsys.readouterr()
    s = json.loads((out / "summary.json").read_text())
    q = _leaves(out)["layers/0/attn/q/kernel"]
    assert q["kind"] == "grid" and q["scale_shape"] == [32]  # the learned scales are saved with the codes
    assert s["act_bits"] == 4 and container.Reader(out / "model.zlm").meta["model"]["act_bits"] == 4
    # The same weights without activation quantization score differently: the activations were quantized.
    m = sources.load(str(out))
    mcfg, params = m.cfg, m.params
    plain = models.abstract(mcfg.replace(act_bits=None))[0]
    tokens = jnp.arange(32)[None] % 200
    quantized = models.merge(models.abstract(mcfg)[0], params)(tokens)
    assert float(jnp.abs(quantized - models.merge(plain, params)(tokens)).max()) > 1e-3
    # The saved model evaluates to the summary's loss (it runs with 4-bit activations when loaded).
    assert cli.main(["eval", "--model", str(out), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["loss"] == pytest.approx(s["compressed"]["loss"], rel=1e-6)
    assert len(s["stages"]) == 1 and s["stages"][0]["val"]["loss"] == pytest.approx(s["compressed"]["loss"])


def test_pretrained_gguf_with_own_calibration_and_gptq_protocol(tmp_path):
    """A real-model config: a GGUF source, a calibration text of its own, evaluation on a second text under the
    GPTQ protocol, with KL / top-1 agreement against the dense model."""
    from research import sources
    from research.models import config as model_config
    from research.models import gguf
    from tests import gguf_files

    cfg = model_config.llama_style(vocab_size=256, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=64)
    _, params = models.init(cfg, 0)
    gguf_files.write_llama(tmp_path / "m.gguf", cfg, params)
    rng = np.random.default_rng(0)
    (tmp_path / "calib.txt").write_text("".join(rng.choice(list("abc de"), 3000)))
    (tmp_path / "eval.txt").write_text("".join(rng.choice(list("xyz uv"), 1000)))
    c = pipeline.base_config()
    c.model = str(tmp_path / "m.gguf")
    c.data.tokenizer = "byte"
    c.compress = [dict(method="gptq", bits=3, granularity="group", group_size=16)]
    c.calibration.update(n=4, length=32, corpus=str(tmp_path / "calib.txt"))
    c.eval.update(corpus=str(tmp_path / "eval.txt"), protocol="gptq", window=50, agreement=True)
    c.wandb.mode = "disabled"
    s = pipeline.run(c, tmp_path / "out", progress=False)
    assert s["calibration"]["corpus"] == str(tmp_path / "calib.txt") and s["eval_corpus"] == str(tmp_path / "eval.txt")
    assert s["compressed"]["tokens"] == (1000 // 50) * 49  # 20 disjoint windows, first token of each unscored
    assert "GPTQ/SparseGPT protocol" in s["compressed"]["protocol"]
    assert s["compressed"]["kl"] > 0 and 0 < s["compressed"]["top1_agreement"] <= 1 and "kl" not in s["dense"]
    assert sources.load(str(tmp_path / "out")).cfg == gguf.load(tmp_path / "m.gguf").cfg


def test_structured_heads_then_a_finetune_stage(run, tmp_path):
    # The staged path gets the head width the model gives (it used to re-parse the list without it).
    out = tmp_path / "heads"
    spec = "[{'method': 'structured', 'heads': 0.5, 'neurons': 0.25}, {'finetune': 2}]"
    assert cli.main(_compress(run, out, f"--config.compress={spec}")) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["stages"][0]["finetune"]["steps"] == 2 and s["stages"][0]["after"] == ["structured"]


def test_the_final_finetune_continues_the_batch_stream_after_the_stages(run, monkeypatch):
    seen = []
    real = pipeline.fit.finetune

    def spy(graphdef, params, transform, cstate, batches, t, **kw):
        seen.append([int(np.asarray(batches.rows(s, 0, 4)["inputs"]).sum()) for s in range(t.steps)])
        return real(graphdef, params, transform, cstate, batches, t, **kw)

    monkeypatch.setattr(pipeline.fit, "finetune", spy)
    cfg = pipeline.base_config()
    cfg.model = str(run)
    cfg.compress = [dict(method="magnitude", sparsity=0.5), {"finetune": 3}]
    cfg.finetune.steps = 3
    cfg.eval.max_windows = 2
    pipeline.run(cfg, run.parent / "stream", overwrite=True)
    stage, final = seen
    assert not set(stage) & set(final)  # different batches, not the stage's again from step 0
