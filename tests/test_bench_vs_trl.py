"""benchmarks/bench_vs_trl.py without TRL: its matched settings come from the demo recipe and round-trip through
grpo-core's config, and a wrong --trl-python is one line that creates nothing."""
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import bench_vs_trl as bench
from grpo_core.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_matched_settings_are_the_demo_recipes():
    demo = load_config(ROOT / "configs" / "demo_cpu.yaml")
    settings = bench.demo_settings()
    assert settings["trainer.lr"] == demo.trainer.lr and settings["rollout.temperature"] == demo.rollout.temperature
    assert settings["warm_start.steps"] == demo.warm_start.steps and bench.demo_settings(7)["warm_start.steps"] == 7
    # The overrides the grpo-core child applies give back exactly these values (lists, floats, strings).
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", bench._overrides(settings))
    for key, value in settings.items():
        section, name = key.split(".")
        got = getattr(getattr(cfg, section), name)
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_wrong_trl_python_is_one_line_and_creates_nothing(tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("bench_vs_trl_*"))
    for python, said in ((str(tmp_path / "no-python"), "cannot be run"), ("/bin/true", "cannot import trl")):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_vs_trl.py"), "--trl-python", python,
                               "--out", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        line, = proc.stderr.strip().splitlines()
        assert python in line and said in line, line
    assert set(Path(tempfile.gettempdir()).glob("bench_vs_trl_*")) == before
    assert not (tmp_path / "out.json").exists()
