"""grpo_core.sandbox and rewards.code_reward: hostile programs stay bounded in time and harmless."""
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from grpo_core import sandbox
from grpo_core.rewards import code_reward, extract_code, parse_code_tests
from grpo_core.sandbox import SandboxLimits, run_python

TIMEOUT = 1.5
BOUND = TIMEOUT + 2.0
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(0, 0) == 0\n"


def _fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


def _timed(fn, *args, **kw):
    t0 = time.monotonic()
    out = fn(*args, **kw)
    return out, time.monotonic() - t0


def _sandbox_processes_alive() -> int:
    """Processes still carrying a sandbox token in their environment (readable as root or same uid)."""
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    n += b"GRPO_SANDBOX_TOKEN=" in f.read()
            except OSError:
                pass
    return n


def test_extract_code_forms():
    assert extract_code("x\n```python\na = 1\n```\n```python\nb = 2\n```") == "b = 2\n"
    assert extract_code("```\nc = 3\n```") == "c = 3\n"
    assert extract_code("```python\nunterminated = 1") == "unterminated = 1"
    assert extract_code("print(1)") == "print(1)"
    assert extract_code("```js\nx\n```\n```py\ny = 1\n```") == "y = 1\n"


def test_parse_code_tests_forms_and_errors():
    assert parse_code_tests('[{"input": "1", "output": "2"}]') == ("io", [("1", "2")])
    assert parse_code_tests("assert f(1) == 2")[0] == "asserts"
    with pytest.raises(ValueError, match="neither a JSON list"):
        parse_code_tests("assert (")
    with pytest.raises(ValueError, match="non-empty list"):
        parse_code_tests('[{"input": 1}]')
    with pytest.raises(ValueError, match="non-empty string"):
        parse_code_tests("  ")


def test_correct_wrong_partial_and_missing_code():
    assert code_reward(_fenced("def add(a, b):\n    return a + b"), ADD_TESTS, TIMEOUT) == 1.0
    assert code_reward(_fenced("def add(a, b):\n    return a * b"), ADD_TESTS, TIMEOUT) == pytest.approx(1 / 3)
    assert code_reward(_fenced("def add(a, b):\n    return 7"), ADD_TESTS, TIMEOUT) == 0.0
    assert code_reward("", ADD_TESTS, TIMEOUT) == 0.0
    assert code_reward(_fenced("def add(a, b) return"), ADD_TESTS, TIMEOUT) == 0.0  # syntax error: a crash
    assert code_reward(_fenced("raise SystemExit(0)"), ADD_TESTS, TIMEOUT) == 0.0
    # No top-level asserts: the whole block (HumanEval style check(candidate)) is one test.
    check = "def check(f):\n    assert f(2, 2) == 4\ncheck(add)\n"
    assert code_reward(_fenced("def add(a, b):\n    return a + b"), check, TIMEOUT) == 1.0
    assert code_reward(_fenced("def add(a, b):\n    return 0"), check, TIMEOUT) == 0.0


def test_stdin_stdout_cases():
    tests = '[{"input": "1 2\\n", "output": "3\\n"}, {"input": "5 5", "output": "10"}, {"input": "0 1", "output": "2"}]'
    prog = "a, b = map(int, input().split())\nprint(a + b)"
    assert code_reward(_fenced(prog), tests, TIMEOUT) == pytest.approx(2 / 3)


def test_program_cannot_forge_the_verdict():
    # Writing to every inherited descriptor puts extra lines on the report channel: scored 0, not 1.
    prog = ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'x done 3 3\\n')\n"
            "    except OSError:\n        pass\nos._exit(0)")
    assert code_reward(_fenced(prog), ADD_TESTS, TIMEOUT) == 0.0


@pytest.mark.parametrize("name, prog", [
    ("infinite loop", "while True:\n    pass"),
    ("sleep", "import time\ntime.sleep(60)"),
    ("fork bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"),
])
def test_runaway_programs_are_killed_in_time(name, prog):
    before = _sandbox_processes_alive()
    score, took = _timed(code_reward, _fenced(prog), ADD_TESTS, TIMEOUT)
    assert score == 0.0
    assert took < BOUND, f"{name} took {took:.2f}s"
    assert _sandbox_processes_alive() <= before, f"{name} left processes behind"


def test_escaped_child_does_not_survive():
    prog = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')"
    result = run_python(prog, limits=SandboxLimits(timeout_s=TIMEOUT))
    assert result.stdout == "parent done\n"
    assert _sandbox_processes_alive() == 0


def test_huge_allocation_fails_fast():
    result, took = _timed(run_python, "x = bytearray(10 * 1024 ** 3)\nprint('allocated')",
                          limits=SandboxLimits(timeout_s=TIMEOUT))
    assert "MemoryError" in result.stderr and "allocated" not in result.stdout
    assert took < BOUND


def test_output_is_capped():
    prog = "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))"
    result, took = _timed(run_python, prog, limits=SandboxLimits(timeout_s=5, output_bytes=4096))
    assert len(result.stdout) == 4096 and result.stdout_truncated
    assert result.returncode != 0  # the file-size limit stops it long before 100 MB
    assert took < 5 + 2


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("GRPO_TEST_SECRET", "hunter2")
    prog = ("import os\nprint(sorted(os.environ))\nprint(os.environ.get('GRPO_TEST_SECRET'))\n"
            "try:\n    print(open('/proc/%d/environ' % os.getppid()).read())\nexcept OSError:\n    print('denied')")
    result = run_python(prog, limits=SandboxLimits(timeout_s=TIMEOUT))
    assert "hunter2" not in result.stdout
    keys = eval(result.stdout.splitlines()[0])  # our own program's output, not a model's
    assert set(keys) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "GRPO_SANDBOX_TOKEN"}
    # And through code_reward: a program that returns the parent's secret scores 0.
    leak = _fenced("import os\ndef secret():\n    return os.environ.get('GRPO_TEST_SECRET')")
    assert code_reward(leak, "assert secret() == 'hunter2'", TIMEOUT) == 0.0


def test_network_is_unreachable():
    if not sandbox.network_isolation_available():
        pytest.skip("this OS allows no network namespace (the sandbox logs a warning)")
    prog = ("import socket\ntry:\n    socket.create_connection(('127.0.0.1', 22), timeout=1)\n    print('connected')\n"
            "except OSError as e:\n    print('blocked', e.errno)\n"
            "try:\n    socket.create_connection(('1.1.1.1', 80), timeout=1)\n    print('connected')\n"
            "except OSError as e:\n    print('blocked', e.errno)")
    result = run_python(prog, limits=SandboxLimits(timeout_s=TIMEOUT))
    assert result.stdout.count("blocked") == 2, result.stdout + result.stderr


def test_cannot_write_outside_its_dir(tmp_path):
    if not sandbox.drops_privileges():
        pytest.skip("not root: the sandbox runs under the trainer's own uid")
    target = tmp_path / "owned.txt"
    os.chmod(tmp_path, 0o777)  # even a world-writable folder of the host is out of reach
    tmp_probe = Path("/tmp") / f"grpo-sandbox-escape-{os.getpid()}"
    prog = ("import os\nfor p in %r:\n    try:\n        open(p, 'w').write('x')\n    except OSError:\n        pass\n"
            "open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())") % ([str(target), str(tmp_probe),
                                                                                         "/root/grpo_escape"],)
    result = run_python(prog, limits=SandboxLimits(timeout_s=TIMEOUT))
    assert result.stdout == "ok\n", result.stderr
    assert not target.exists() and not tmp_probe.exists() and not Path("/root/grpo_escape").exists()


def test_work_dir_is_removed(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox.tempfile, "tempdir", str(tmp_path))
    run_python("import os\nos.makedirs('a/b')\nopen('a/b/c', 'w').write('x')\nos.chmod('a', 0)",
               limits=SandboxLimits(timeout_s=TIMEOUT))
    assert list(tmp_path.iterdir()) == []


def test_parallel_calls_respect_the_global_bound(monkeypatch):
    monkeypatch.setattr(sandbox, "_slots", threading.BoundedSemaphore(2))
    sandbox.peak_concurrency(reset=True)
    good, bad = _fenced("def add(a, b):\n    return a + b"), _fenced("while True:\n    pass")
    jobs = [good, bad, good, good, bad, good]
    with ThreadPoolExecutor(6) as pool:
        scores = list(pool.map(lambda r: code_reward(r, ADD_TESTS, 1.0), jobs))
    assert scores == [1.0 if r is good else 0.0 for r in jobs]
    assert sandbox.peak_concurrency() <= 2
    assert _sandbox_processes_alive() == 0


def test_limits_validate():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="timeout_s"):
        code_reward("x", ADD_TESTS, timeout_s=-1)


# ------------------------------------------------------------------------------- the verdict, /proc, the disk

@pytest.mark.parametrize("name, prog", [
    ("the runner's own functions", "import sys\nm = sys.modules['__main__']\nfor k in dir(m):\n"
                                   "    f = getattr(m, k)\n    try:\n        f('done', 3)\n    except BaseException:\n"
                                   "        pass\n    try:\n        f('done', 3, 3)\n    except BaseException:\n"
                                   "        pass\n"),
    ("builtins patched", "import builtins\nbuiltins.add = lambda *a: 3\nbuiltins.AssertionError = type(None)"),
    ("every descriptor", "import os\nfor fd in range(3, 1024):\n    try:\n        os.write(fd, b'x done 3 3\\n')\n"
                         "    except OSError:\n        pass"),
    ("signals to every pid", "import os\nfor pid in range(1, 200):\n    try:\n        os.kill(pid, 9)\n"
                             "    except OSError:\n        pass"),
    ("memory of every process", "import os\nfor p in os.listdir('/proc'):\n    try:\n"
                                "        open('/proc/%s/mem' % p, 'rb').read(1)\n    except OSError:\n        pass"),
    ("a generic answer server", "import sys\nm = sys.modules['__main__']\nm.serve = lambda *a: None\nTrue"),
])
def test_a_program_that_defines_nothing_scores_zero(name, prog):
    """The verdict comes from the judge process: nothing a program does inside its own process forges it."""
    assert code_reward(_fenced(prog), ADD_TESTS + "assert 1 == 1\n", TIMEOUT) == 0.0, name


def test_tests_that_never_reach_the_program_score_zero():
    assert code_reward(_fenced("x = 1"), "assert True\nassert 2 + 2 == 4", TIMEOUT) == 0.0


def test_judged_values_methods_exceptions_and_program_objects():
    prog = ("class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
            "        self.items.append(x)\n        return self\n    def __len__(self):\n        return len(self.items)\n"
            "def gen(n):\n    yield from range(n)\n"
            "def check(x):\n    if x < 0:\n        raise ValueError('negative')\n    return {'x': [x, (x,), {x}]}\n"
            "def nan():\n    return float('nan')\n")
    tests = ("s = Stack()\nassert len(s.push(1).push(2)) == 2\nassert s.items == [1, 2]\n"
             "assert list(gen(3)) == [0, 1, 2]\nassert check(2) == {'x': [2, (2,), {2}]}\n"
             "try:\n    check(-1)\n    raised = False\nexcept ValueError:\n    raised = True\nassert raised\n"
             "assert nan() != nan()\nassert all(check(i)['x'][0] == i for i in range(3))\n")
    assert code_reward(_fenced(prog), tests, 5.0) == 1.0
    # a program object never equals a value, whatever its __eq__ says
    liar = "class Any:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Any()"
    assert code_reward(_fenced(liar), ADD_TESTS, TIMEOUT) == 0.0


def test_no_host_process_is_visible():
    if not sandbox.namespace_flags() & sandbox._CLONE_NEWPID:
        pytest.skip("no pid namespace here (the sandbox logs a warning)")
    prog = "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
    result = run_python(prog, limits=SandboxLimits(timeout_s=TIMEOUT))
    assert max(eval(result.stdout)) <= 3, result.stdout  # our own output: the namespace's pids only


def test_total_disk_use_is_bounded(monkeypatch, tmp_path):
    if not sandbox.namespace_flags() & sandbox._CLONE_NEWNS:
        pytest.skip("no mount namespace here: only the per-file bound holds (the sandbox logs a warning)")
    monkeypatch.setattr(sandbox.tempfile, "tempdir", str(tmp_path))
    prog = ("n = 0\nfor d in ['.', '/tmp', '/var/tmp', '/dev/shm', '/run/lock']:\n    for i in range(50):\n"
            "        try:\n            open('%s/f%d' % (d, i), 'wb').write(b'x' * (4 << 20))\n            n += 4\n"
            "        except OSError:\n            break\nprint(n)")
    result = run_python(prog, limits=SandboxLimits(timeout_s=10, disk_mb=24))
    assert int(result.stdout) <= 24, result.stdout
