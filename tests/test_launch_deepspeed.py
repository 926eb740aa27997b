"""launch/deepspeed_hostfile.sh: one node needs no ssh (no ssh check, local rendezvous); several nodes keep
deepspeed's ssh path. A stand-in `deepspeed` on PATH records the arguments the script passes."""
import os
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "deepspeed_hostfile.sh"


def _run(tmp_path, env_extra):
    fake = tmp_path / "bin" / "deepspeed"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n'
                    'hf=$2; cat "$hf" > "$ARGS_OUT.hostfile"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k not in ("HOSTFILE", "NPROC_PER_NODE", "MASTER_ADDR")}
    env.update({"PATH": f"{fake.parent}:{env['PATH']}", "ARGS_OUT": str(tmp_path / "args"), **env_extra})
    proc = subprocess.run(["bash", str(SCRIPT), "cfg.yaml", "--set", "a.b=1"], env=env, capture_output=True,
                          text=True, timeout=60)
    args = (tmp_path / "args").read_text().split("\n")[:-1] if proc.returncode == 0 else []
    return proc, args


def test_one_node_hostfile_skips_ssh(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one node\nnode0 slots=8\n\n")
    proc, args = _run(tmp_path, {"HOSTFILE": str(hostfile)})
    assert proc.returncode == 0, proc.stderr
    assert args[:2] == ["--hostfile", str(hostfile)]
    assert "--no_ssh_check" in args and args[args.index("--master_addr") + 1] == "127.0.0.1"
    assert args[-6:] == ["--module", "grpo_core", "train", "cfg.yaml", "--set", "a.b=1"]


def test_no_hostfile_means_this_machine(tmp_path):
    proc, args = _run(tmp_path, {"NPROC_PER_NODE": "2"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "args.hostfile").read_text() == "localhost slots=2\n"
    assert "--no_ssh_check" in args
    assert not Path(args[1]).exists()  # the temporary hostfile is removed when the run ends


def test_several_nodes_keep_the_ssh_path(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\n")
    proc, args = _run(tmp_path, {"HOSTFILE": str(hostfile)})
    assert proc.returncode == 0, proc.stderr
    assert "--no_ssh_check" not in args and "--master_addr" not in args


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("# nothing\n", "lists no hosts")])
def test_bad_hostfile_is_one_clear_error(tmp_path, content, message):
    hostfile = tmp_path / "hostfile"
    if content is not None:
        hostfile.write_text(content)
    proc, _ = _run(tmp_path, {"HOSTFILE": str(hostfile)})
    assert proc.returncode == 2 and message in proc.stderr
