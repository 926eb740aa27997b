"""Smoke tests of the kernel benchmark scripts: each main(argv) runs end to end on tiny shapes.

On CPU they time with perf_counter and do not measure memory; the Triton providers run in the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU). The point is that a GPU session never
loses its time to a crash in a script: every provider x mode x shape gives one finite row, the JSON has
the machine/version/commit meta, the table prints and the plot is written.
"""
import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from benchmarks import bench_logprob_entropy, bench_policy_loss, common

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
META_KEYS = ("device", "torch", "triton", "commit", "cpu", "utc_time")


def _load_single_json(out_dir: Path) -> dict:
    paths = sorted(out_dir.glob("*.json"))
    assert len(paths) == 1, paths
    return json.loads(paths[0].read_text())


def _check_rows(rows, key, expected: Counter, device: str, peak_key="peak_mib"):
    assert Counter(key(r) for r in rows) == expected  # exactly one row each, nothing else
    for r in rows:
        assert isinstance(r["ms"], float) and math.isfinite(r["ms"]) and r["ms"] > 0, r
        if device == "cpu":
            assert r[peak_key] is None, r  # not measured on CPU
        else:
            assert isinstance(r[peak_key], float) and math.isfinite(r[peak_key]), r


def _check_meta(meta: dict, device: str, bench: str):
    for key in META_KEYS:
        assert meta.get(key), (key, meta)
    assert meta["device"] == device and meta["bench"] == bench
    assert meta["torch"] == torch.__version__
    if device == "cpu":
        assert "not measured" in meta["memory"]


def test_logprob_entropy_bench_cpu(tmp_path, capsys):
    providers = (["ours", "ours_lp", "ours_tokens", "ours_loss"] if INTERPRET else []) + ["ours_torch", "naive"]
    # Few tokens: the interpreter runs one Python program per token row.
    shapes = [(16, 32, 257), (16, 32, 100)]
    argv = ["--device", "cpu", "--n", "16", "--d", "32", "--v", "257", "100", "--dtype", "fp32", "--reps", "2",
            "--warmup", "0", "--providers", *providers, "liger", "--out-dir", str(tmp_path), "--no-plot"]
    assert bench_logprob_entropy.main(argv) == 0
    out = capsys.readouterr().out
    assert "liger: skipped on cpu" in out
    assert "provider  mode" in out and "wrote " in out  # the table, then the JSON path
    data = _load_single_json(tmp_path)
    _check_meta(data["meta"], "cpu", "logprob_entropy")
    expected = Counter((p, m, s) for p in providers for m in bench_logprob_entropy.MODES for s in shapes)
    _check_rows(data["rows"], lambda r: (r["provider"], r["mode"], (r["N"], r["D"], r["V"])), expected, "cpu")
    for r in data["rows"]:
        assert r["extra_mib"] is None and r["dtype"] == "float32"
        assert r["roofline_ms"] > 0 and math.isfinite(r["eff"]) and r["eff"] > 0
    assert not list(tmp_path.glob("*.png"))


def test_logprob_entropy_bench_cpu_compiled_and_plot(tmp_path, capsys):
    # Two equal chunks of 24 tokens: one torch.compile (a cold inductor compile is most of the runtime).
    argv = ["--device", "cpu", "--n", "48", "--d", "16", "--v", "129", "--dtype", "fp32", "--reps", "1",
            "--warmup", "0", "--providers", "compiled", "naive", "--modes", "both", "--chunk-size", "24",
            "--out-dir", str(tmp_path)]
    assert bench_logprob_entropy.main(argv) == 0
    out = capsys.readouterr().out
    data = _load_single_json(tmp_path)
    _check_rows(data["rows"], lambda r: (r["provider"], r["mode"]),
                Counter([("compiled", "both"), ("naive", "both")]), "cpu")
    pngs = list(tmp_path.glob("*_ms.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 1000 and f"wrote {pngs[0]}" in out
    assert not list(tmp_path.glob("*_extra_mib.png"))  # no memory numbers on CPU, so no memory plot


def test_policy_loss_bench_cpu(tmp_path, capsys):
    providers = (["ours"] if INTERPRET else []) + ["ours_torch", "torch", "compile"]
    # compile: one cold inductor compile per NSR rule, most of this test's runtime.
    argv = ["--device", "cpu", "--sizes", "300", "--nsr", "off", "scaled", "--align-shapes", "16x8",
            "--providers", *providers, "--reps", "2", "--warmup", "0", "--out-dir", str(tmp_path)]
    assert bench_policy_loss.main(argv) == 0
    out = capsys.readouterr().out
    assert "hidden_align: compile skipped" in out
    assert "provider  mode" in out
    data = _load_single_json(tmp_path)
    meta = data["meta"]
    _check_meta(meta, "cpu", "policy_loss")
    assert meta["copy_bw_gbs"] > 0 and meta["nominal_bw_gbs"] is None
    modes = bench_policy_loss.MODES
    expected = Counter(("policy_loss", p, m, nsr) for p in providers for m in modes for nsr in ("off", "scaled"))
    expected.update(("hidden_align", p, m, None) for p in providers if p != "compile" for m in modes)
    _check_rows(data["rows"], lambda r: (r["op"], r["provider"], r["mode"], r.get("nsr")), expected, "cpu")
    for r in data["rows"]:
        assert math.isfinite(r["gbs"]) and r["gbs"] > 0 and math.isfinite(r["bw_util"])
    png = next(tmp_path.glob("*.json")).with_suffix(".png")
    assert png.exists() and png.stat().st_size > 1000 and f"wrote {png}" in out


@pytest.mark.parametrize("bench, argv", [
    (bench_logprob_entropy, ["--n", "8", "--d", "4", "--v", "16", "--providers", "ours", "naive"]),
    (bench_policy_loss, ["--sizes", "8", "--ops", "policy_loss", "--providers", "ours", "torch"]),
], ids=["logprob_entropy", "policy_loss"])
def test_cpu_triton_provider_without_interpreter_is_a_clear_error(bench, argv, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert bench.main(["--device", "cpu", *argv, "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "TRITON_INTERPRET=1" in err and "ours" in err
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize("bench", [bench_logprob_entropy, bench_policy_loss], ids=["logprob_entropy", "policy_loss"])
def test_cuda_device_without_gpu_is_a_clear_error(bench, tmp_path, capsys):
    assert bench.main(["--out-dir", str(tmp_path)]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_common_cpu_helpers():
    assert common.measure(lambda _: torch.ones(3).sum(), reps=2, device="cpu")[1] is None
    assert common.matmul_tflops(16, 16, 16, torch.float32, reps=2, device="cpu") > 0
    meta = common.machine_info("cpu")
    assert meta["device"] == "cpu" and common.device_label(meta) == "cpu"
    assert common.device_label({"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"}) == "NVIDIA H100 80GB HBM3"
    assert bench_policy_loss.nominal_bandwidth_gbs("NVIDIA H100 PCIe") == 2000.0
    assert bench_policy_loss.nominal_bandwidth_gbs("NVIDIA H100 80GB HBM3") == 3350.0
    assert bench_policy_loss.nominal_bandwidth_gbs(None) is None


@pytest.mark.gpu
def test_kernel_benchmarks_cuda(tmp_path, capsys):
    """The real scripts on a GPU, tiny shapes, every provider (liger only when installed)."""
    lp_dir, pl_dir = tmp_path / "lp", tmp_path / "pl"
    assert bench_logprob_entropy.main(["--n", "256", "--d", "64", "--v", "1000", "--reps", "2",
                                       "--out-dir", str(lp_dir)]) == 0
    data = _load_single_json(lp_dir)
    _check_meta(data["meta"], "cuda", "logprob_entropy")
    providers = {r["provider"] for r in data["rows"]}
    assert set(bench_logprob_entropy.PROVIDERS) - {"liger"} <= providers
    _check_rows(data["rows"], lambda r: (r["provider"], r["mode"]),
                Counter((p, m) for p in providers for m in bench_logprob_entropy.MODES), "cuda")
    assert len(list(lp_dir.glob("*.png"))) == 2
    assert bench_policy_loss.main(["--smoke", "--reps", "2", "--out-dir", str(pl_dir)]) == 0
    data = _load_single_json(pl_dir)
    _check_meta(data["meta"], "cuda", "policy_loss")
    assert len(data["rows"]) == (2 * 2 * 4 + 3) * 3
    _check_rows(data["rows"], lambda r: (r["op"], r["provider"], r["mode"], r.get("nsr"), r.get("N")),
                Counter((r["op"], r["provider"], r["mode"], r.get("nsr"), r.get("N")) for r in data["rows"]), "cuda")
    assert "provider  mode" in capsys.readouterr().out
