"""What the package installs and how it imports: the kernels as `grpo_kernels` (a top-level `kernels` is Hugging
Face's kernel-hub package, which transformers requires), recipes shipped as package data, no top-level name that
another installed distribution also provides. .ci/smoke_installed.sh runs the whole thing outside the checkout."""
import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from grpo_core.config import ConfigError, load_config, recipe_names, resolve_recipe

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_public_kernel_contract_imports():
    from grpo_kernels import (clipped_policy_loss, fused_logprob_entropy, fused_token_loss,  # noqa: F401
                              gspo_policy_loss, hidden_align_loss)


@pytest.mark.parametrize("where", ["checkout root", "elsewhere"])
def test_top_level_kernels_is_never_ours(where, tmp_path):
    """From the checkout root (on sys.path as '') the folder kernels/ steps aside: `import kernels` gives the
    installed distribution of that name, or fails as if the folder were not there."""
    cwd = ROOT if where == "checkout root" else tmp_path
    proc = _python("import kernels, grpo_kernels; print(kernels.__file__); print(grpo_kernels.__file__)", cwd)
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert proc.returncode != 0 and "No module named 'kernels'" in proc.stderr, proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    theirs, ours = proc.stdout.split()
    assert not theirs.startswith(str(ROOT) + "/") and ours.startswith(str(ROOT / "kernels"))
    proc = _python("from kernels import get_kernel", cwd)  # Hugging Face's API, as transformers uses it
    assert proc.returncode == 0, proc.stderr


def test_installed_top_level_names_are_ours_alone():
    """Every top-level name grpo-core installs is provided by no other installed distribution."""
    owners = importlib.metadata.packages_distributions()
    for name in ("grpo_core", "grpo_kernels"):
        assert set(owners.get(name, [])) <= {"grpo-core", "grpo_core"}, (name, owners.get(name))
    assert "grpo-core" not in owners.get("kernels", []) and "grpo_core" not in owners.get("kernels", [])


@pytest.mark.slow
def test_wheel_holds_the_packages_and_recipes(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    names = zipfile.ZipFile(next(tmp_path.glob("grpo_core-*.whl"))).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"grpo_core", "grpo_kernels"}
    assert {f"grpo_core/recipes/{p.name}" for p in (ROOT / "configs").glob("*.yaml")} <= set(names)
    assert {"grpo_kernels/__init__.py", "grpo_kernels/reference/__init__.py"} <= set(names)


def test_recipes_by_name_or_path(tmp_path, monkeypatch):
    assert {"demo_cpu", "instruct_math", "dapo_gpu"} <= set(recipe_names())
    assert resolve_recipe("demo_cpu").read_text() == (ROOT / "configs" / "demo_cpu.yaml").read_text()
    assert load_config("demo_cpu") == load_config(ROOT / "configs" / "demo_cpu.yaml")
    monkeypatch.chdir(tmp_path)
    Path("demo_cpu").write_text("trainer:\n  max_steps: 7\n")  # a file of the user's with a recipe's name wins
    assert resolve_recipe("demo_cpu") == Path("demo_cpu") and load_config("demo_cpu").trainer.max_steps == 7
    with pytest.raises(ConfigError, match="neither a file nor a shipped recipe.*demo_cpu"):
        load_config("no_such_recipe")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
