"""Ahead-of-time compile check of every Triton kernel in kernels/ for real GPU targets, without a GPU.

    python -m grpo_kernels.compile_check [--arch 90 80] [--json PATH] [--kernel SUBSTR] [--jobs N] [--no-align]

The CPU tests run the kernels in the Triton interpreter, which accepts code the real compiler may reject
and says nothing about registers. This compiles each kernel through the full Triton -> PTX -> cubin
pipeline (ptxas included) for each requested SM arch, once per variant a launcher can produce:

  * every config the module launches with on a GPU (an autotuned kernel's whole non-interpreter config
    list, a fixed config's block size and num_warps),
  * every constexpr combination and dtype of the tensors the launcher passes (the table below),
  * integer arguments whose value can reach 2^31 as both i32 and i64 (Triton types a Python int by value).

Pointers and specializable ints are compiled with the 16-divisibility hint a GPU launch gives to
16-byte-aligned tensors (fresh torch allocations) and to strides / sizes that are multiples of 16 (LLM
vocabularies and hidden sizes); `--no-align` compiles the unhinted variant instead.

Per variant it reports registers, spill bytes (ptxas -v, cross-checked against cuobjdump's resource
usage of the cubin), stack frame, shared memory (what Triton will launch with) and compile seconds.
Exit status 1 if any variant fails to compile or spills, or if the table below is stale: each table
entry is checked against the kernel's parameter list, so a signature change names the kernel and the
missing / extra argument instead of compiling an outdated signature.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import io
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Callable, Dict, List, Tuple

MODULES = ("grpo_kernels.logprob_entropy", "grpo_kernels.policy_loss", "grpo_kernels.hidden_align")
# @triton.jit functions defined in MODULES that are device helpers (called by kernels, never launched).
DEVICE_HELPERS: frozenset = frozenset()

Variant = Dict[str, object]
Launch = List[Tuple[Dict[str, object], Dict[str, object]]]  # [(config constexprs, compile options)]


def _each(key: str, *values) -> Tuple[Variant, ...]:
    """One axis: `key` takes each of `values`."""
    return tuple({key: v} for v in values)


def _autotuned(kernel: str) -> Callable[[object], Launch]:
    """Every config of the module's @triton.autotune list (read with TRITON_INTERPRET unset)."""
    def launch(mod) -> Launch:
        return [(dict(c.kwargs), _options(c)) for c in getattr(mod, kernel).configs]
    return launch


def _options(config, stages: bool = True) -> Dict[str, object]:
    opts = {"num_warps": config.num_warps, "num_ctas": config.num_ctas}
    if stages:
        opts["num_stages"] = config.num_stages
    if config.maxnreg is not None:
        opts["maxnreg"] = config.maxnreg
    return opts


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """How a module launches one kernel.

    args: every non-constexpr parameter in order, "name:type"; "{key}" in a type is filled from the axes.
    axes: each axis is a tuple of dicts; the product of the axes is compiled. Keys naming a constexpr
        parameter are constexpr values, the other keys fill the "{key}" placeholders of `args`.
    launch: module -> [(constexprs from the launch config, compile options)].
    """

    module: str
    kernel: str
    args: str
    axes: Tuple[Tuple[Variant, ...], ...]
    launch: Callable[[object], Launch]

    @property
    def name(self) -> str:
        return f"{self.module}.{self.kernel}"


_FLOATS = _each("x", "fp32", "bf16", "fp16")  # fp64 is accepted for tests only and never runs on GPU
_WIDE_INT = _each("int", "i32", "i64")  # ints that may reach 2^31: Triton types them by value

SPECS: Tuple[KernelSpec, ...] = (
    KernelSpec(
        "grpo_kernels.logprob_entropy", "_logprob_entropy_fwd_kernel",
        # Logits are fp32 (fp32-output GEMM), or the 16-bit input dtype when torch lacks that GEMM.
        "p_logits:*{x} p_targets:*i64 p_logprob:*fp32 p_entropy:*fp32 p_lse:*fp32 stride_row:i32 V:i32 "
        "inv_temp:fp32",
        axes=(_FLOATS, _each("IGNORE", -100), _each("WITH_ENTROPY", True, False)),
        launch=_autotuned("_logprob_entropy_fwd_kernel"),
    ),
    KernelSpec(
        "grpo_kernels.logprob_entropy", "_logprob_entropy_bwd_kernel",
        "p_logits:*{logits} p_dlogits:*{dlogits} p_targets:*i64 p_lse:*fp32 p_entropy:*fp32 p_dlogprob:*fp32 "
        "p_dentropy:*fp32 stride_row:{int} stride_drow:{int} n_rows:i32 n_cols:i32 v_offset:{int} inv_temp:fp32",
        axes=(
            # fp32 inputs: d logits overwrite the fp32 logits; 16-bit inputs: fp32 logits -> 16-bit d logits,
            # or 16-bit logits overwritten in place when the fp32-output GEMM is unavailable.
            ({"logits": "fp32", "dlogits": "fp32"}, {"logits": "fp32", "dlogits": "bf16"},
             {"logits": "fp32", "dlogits": "fp16"}, {"logits": "bf16", "dlogits": "bf16"},
             {"logits": "fp16", "dlogits": "fp16"}),
            _each("IGNORE", -100),
            # Backward returns early when neither upstream gradient exists: (False, False) never launches.
            ({"HAS_DLOGPROB": True, "HAS_DENTROPY": False}, {"HAS_DLOGPROB": False, "HAS_DENTROPY": True},
             {"HAS_DLOGPROB": True, "HAS_DENTROPY": True}),
            _WIDE_INT,
        ),
        # _bwd_epilogue_triton passes BLOCK_V and num_warps of _BWD_CONFIG (not num_stages).
        launch=lambda m: [(dict(m._BWD_CONFIG.kwargs), _options(m._BWD_CONFIG, stages=False))],
    ),
    KernelSpec(
        "grpo_kernels.policy_loss", "_policy_loss_fwd_kernel",
        "p_logp:*{x} p_old:*{x} p_adv:*{x} p_mask:*u8 p_index:*{index} p_loss:*fp32 p_dlogp:*fp32 "
        "p_counts:*i32 N:i32 seed:{int} offset:{int} step:{int} b_low:fp32 b_high:fp32 dual_c:fp32 "
        "band_min_rho:fp32 nsr_prob:fp32",
        axes=(
            _each("x", "fp32", "bf16"),  # logprob / old_logprob / advantages as given (fp32 in the trainer)
            _each("DUAL", False, True),
            _each("NSR", 0, 1, 2),
            # Without token_index the launcher passes the fp32 loss buffer as a dummy pointer.
            ({"HAS_INDEX": False, "index": "fp32"}, {"HAS_INDEX": True, "index": "i64"}),
            _WIDE_INT,  # seed < 2^63, offset < 2^62, step < 2^32
        ),
        # _token_forward_triton launches BLOCK=_BLOCK with num_warps=_NUM_WARPS.
        launch=lambda m: [({"BLOCK": m._BLOCK}, {"num_warps": m._NUM_WARPS})],
    ),
    *(
        KernelSpec(
            "grpo_kernels.hidden_align", kernel, args, axes=(_FLOATS,),
            # BLOCK_D = _block_d(D) with num_warps=_NUM_WARPS: a tiny test model's D and the cap LLM sizes hit.
            launch=lambda m, extra=extra: [({**extra(m), "BLOCK_D": b}, {"num_warps": m._NUM_WARPS})
                                           for b in sorted({m._block_d(d) for d in (64, 896, 8192)})],
        )
        for kernel, args, extra in (
            ("_hidden_align_norm_kernel", "p_h:*{x} p_inv_norm:*fp32 p_usq:*fp32 D:i32 eps:fp32", lambda m: {}),
            ("_hidden_align_fwd_kernel",
             "p_h:*{x} p_perm:*i64 p_start:*i64 p_count:*i64 p_inv_norm:*fp32 p_sum:*fp32 p_sq:*fp32 D:i32",
             lambda m: {"BLOCK_R": m._BLOCK_R}),
            ("_hidden_align_bwd_kernel",
             "p_h:*{x} p_group:*i64 p_inv_norm:*fp32 p_clamped:*i8 p_coef:*fp32 p_sum:*fp32 p_dh:*{x} D:i32",
             lambda m: {}),
        )
    ),
)


# ------------------------------------------------------------------------------------------------------------
# Table -> compile jobs, with the table checked against the kernels' real parameter lists.


@dataclasses.dataclass
class Job:
    kernel: str
    arch: int
    config: str
    variant: str
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    attrs: Dict[Tuple[int, ...], list]
    options: Dict[str, object]


def _jit_fn(obj):
    """The JITFunction under @triton.autotune / @triton.heuristics wrappers (None if obj is not a kernel)."""
    from triton.runtime.jit import JITFunction

    while obj is not None and not isinstance(obj, JITFunction):
        obj = getattr(obj, "fn", None)
    return obj


def discover_kernels() -> Dict[str, object]:
    """'module.name' -> JITFunction for every @triton.jit function defined (not imported) in MODULES."""
    found = {}
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for attr, obj in vars(mod).items():
            fn = _jit_fn(obj)
            if fn is not None and fn.fn.__module__ == mod_name and attr not in DEVICE_HELPERS:
                found[f"{mod_name}.{attr}"] = fn
    return found


def _config_label(constexprs: Dict[str, object], options: Dict[str, object]) -> str:
    parts = [f"{k}={v}" for k, v in constexprs.items()]
    parts.append(f"w{options['num_warps']}")
    if "num_stages" in options:
        parts.append(f"s{options['num_stages']}")
    return " ".join(parts)


def build_jobs(spec: KernelSpec, fn, archs, align: bool = True) -> List[Job]:
    """All compile jobs of one kernel; ValueError naming the kernel if the table no longer fits it."""
    params = fn.params
    runtime = [p.name for p in params if not p.is_constexpr]
    constexpr = [p.name for p in params if p.is_constexpr]
    table = [a.split(":", 1) for a in spec.args.split()]
    table_names = [n for n, _ in table]
    problems = []
    if sorted(table_names) != sorted(runtime):
        missing = [n for n in runtime if n not in table_names]
        extra = [n for n in table_names if n not in runtime]
        problems.append(f"kernel argument(s) missing from the table: {missing}; table argument(s) the kernel "
                        f"no longer has: {extra}")
    elif table_names != runtime:
        problems.append(f"table argument order {table_names} differs from the kernel's {runtime}")
    mod = importlib.import_module(spec.module)
    launches = spec.launch(mod)
    axis_keys = {k for axis in spec.axes for d in axis for k in d}
    launch_keys = {k for c, _ in launches for k in c}
    placeholders = set(re.findall(r"\{(\w+)\}", spec.args))
    given = (axis_keys | launch_keys) - placeholders
    if sorted(given) != sorted(constexpr):
        problems.append(f"constexpr(s) missing from the table: {sorted(set(constexpr) - given)}; table "
                        f"constexpr(s) the kernel no longer has: {sorted(given - set(constexpr))}")
    if placeholders - axis_keys:
        problems.append(f"type placeholder(s) with no axis: {sorted(placeholders - axis_keys)}")
    if problems:
        raise ValueError(f"{spec.name}: compile table is stale: " + "; ".join(problems)
                         + f" (kernel parameters: {fn.arg_names})")

    dont = {p.name for p in params if p.do_not_specialize}
    jobs = []
    for combo in itertools.product(*spec.axes):
        variant = {k: v for d in combo for k, v in d.items()}
        signature = {}
        for name, typ in table:
            signature[name] = typ.format(**variant)
        for name in constexpr:
            signature[name] = "constexpr"
        signature = {p.name: signature[p.name] for p in params}
        attrs = {}
        if align:
            for i, p in enumerate(params):
                ty = signature[p.name]
                if p.name not in dont and (ty.startswith("*") or ty in ("i32", "i64")):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        label = " ".join(f"{k}={v}" for k, v in variant.items())
        for config, options in launches:
            consts = {**{k: v for k, v in variant.items() if k in constexpr}, **config}
            for arch in archs:
                jobs.append(Job(spec.name, arch, _config_label(config, options), label, signature,
                                consts, attrs, dict(options)))
    return jobs


# ------------------------------------------------------------------------------------------------------------
# Compiling one variant and reading its resource usage.

_PROPS = re.compile(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                    r"(\d+) bytes spill loads")
_USED = re.compile(r"Compiling entry function '(\S+)'.*?Used (\d+) registers", re.S)


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def parse_ptxas_log(log: str, entry: str) -> Dict[str, int]:
    """regs / stack of `entry` and spill bytes summed over every function in a `ptxas -v` log."""
    regs = {m.group(1): int(m.group(2)) for m in _USED.finditer(log)}
    props = {m.group(1): tuple(int(x) for x in m.groups()[1:]) for m in _PROPS.finditer(log)}
    if entry not in regs or entry not in props:
        raise RuntimeError(f"no register / spill line for {entry!r} in the ptxas log:\n{log}")
    return {"regs": regs[entry], "stack_bytes": props[entry][0],
            "spill_stores": sum(p[1] for p in props.values()), "spill_loads": sum(p[2] for p in props.values())}


def cubin_resources(cubin: bytes, entry: str) -> Dict[str, int]:
    """REG / STACK / SHARED / LOCAL of `entry` from `cuobjdump --dump-resource-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(rf"Function {re.escape(entry)}:\n\s*(.*)", out)
    if m is None:
        raise RuntimeError(f"no resource usage for {entry!r} in cuobjdump output:\n{out}")
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", m.group(1))}


@contextlib.contextmanager
def _cold_cache():
    """An empty Triton cache for one compile: a cache hit would skip ptxas and so its log."""
    before = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="compile_check_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("TRITON_CACHE_DIR")
            else:
                os.environ["TRITON_CACHE_DIR"] = before


def compile_job(job: Job) -> Dict[str, object]:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = discover_kernels()[job.kernel]
    row = {k: getattr(job, k) for k in ("kernel", "arch", "config", "variant")}
    row["constexprs"] = dict(job.constexprs)
    row["signature"] = dict(job.signature)
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints the `ptxas -v` log of this exact compile
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with _cold_cache(), contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
            src = ASTSource(fn, job.signature, constexprs=job.constexprs, attrs=job.attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
        row["compile_s"] = round(time.perf_counter() - start, 3)
        entry = compiled.metadata.name
        row.update(parse_ptxas_log(log.getvalue(), entry))
        res = cubin_resources(compiled.asm["cubin"], entry)
        if res.get("REG") != row["regs"] or res.get("STACK") != row["stack_bytes"]:
            raise RuntimeError(f"ptxas log (regs {row['regs']}, stack {row['stack_bytes']}) disagrees with the "
                               f"cubin's resource usage {res}")
        row["shared_bytes"] = compiled.metadata.shared + res.get("SHARED", 0)
        row["error"] = None
    except Exception as err:  # noqa: BLE001 - every failure becomes a reported row
        row.setdefault("compile_s", round(time.perf_counter() - start, 3))
        row["error"] = f"{type(err).__name__}: {err}"[:4000]
    return row


def _failed(row) -> bool:
    return row["error"] is not None or row.get("spill_stores", 0) + row.get("spill_loads", 0) > 0


# ------------------------------------------------------------------------------------------------------------


def _table(rows) -> str:
    head = ("kernel", "sm", "config", "variant", "regs", "spill", "stack", "smem", "s", "")
    lines = [head]
    for r in rows:
        ok = r["error"] is None
        spill = r.get("spill_stores", 0) + r.get("spill_loads", 0)
        lines.append((r["kernel"].split(".")[-1], str(r["arch"]), r["config"], r["variant"],
                      str(r["regs"]) if ok else "-", str(spill) if ok else "-",
                      str(r["stack_bytes"]) if ok else "-", str(r["shared_bytes"]) if ok else "-",
                      f"{r['compile_s']:.2f}", "" if not _failed(r) else ("SPILL" if ok else "FAIL")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpo_kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="SM versions (90 = H100/H200)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8), help="parallel compiles")
    parser.add_argument("--no-align", action="store_true", help="no 16-divisibility hints on pointers / ints")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The kernel modules pick their configs and @triton.jit its mode at import: start over without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "grpo_kernels.compile_check", *argv], env=env).returncode

    import triton

    try:
        _tool("ptxas"), _tool("cuobjdump")
    except Exception as err:  # noqa: BLE001
        print(f"compile_check: triton's NVIDIA tools are unusable here: {err}", file=sys.stderr)
        return 2
    kernels = discover_kernels()
    specs = {s.name: s for s in SPECS}
    rows, jobs = [], []
    for name, fn in kernels.items():
        if args.kernel not in name:
            continue
        base = {"kernel": name, "arch": "-", "config": "-", "variant": "-", "compile_s": 0.0}
        if name not in specs:
            rows.append({**base, "error": f"{name}: @triton.jit function with no entry in the compile table "
                                          "(add a KernelSpec, or DEVICE_HELPERS if it is never launched)"})
            continue
        try:
            jobs += build_jobs(specs[name], fn, args.arch, align=not args.no_align)
        except ValueError as err:
            rows.append({**base, "error": str(err)})
    rows += [{"kernel": n, "arch": "-", "config": "-", "variant": "-", "compile_s": 0.0,
              "error": f"{n}: in the compile table but not a @triton.jit function of {MODULES}"}
             for n in specs if n not in kernels and args.kernel in n]

    start = time.perf_counter()
    if args.jobs > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("fork")) as pool:
            rows += list(pool.map(compile_job, jobs, chunksize=4))
    else:
        rows += [compile_job(j) for j in jobs]
    wall = time.perf_counter() - start

    print(_table(rows))
    failed = [r for r in rows if _failed(r)]
    for r in failed:
        what = r["error"] or f"spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded"
        print(f"\nFAILED {r['kernel']} sm_{r['arch']} [{r['config']}] [{r['variant']}]:\n"
              + "\n".join(str(what).splitlines()[:40]))
    print(f"\n{len(rows) - len(failed)}/{len(rows)} variants ok ({len(jobs)} compiled in {wall:.1f} s, "
          f"triton {triton.__version__}, sm {args.arch})")
    if args.json:
        import torch

        report = {"triton_version": triton.__version__, "torch_version": torch.__version__,
                  "python": platform.python_version(), "archs": args.arch, "align_hints": not args.no_align,
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "n_variants": len(rows), "n_failed": len(failed), "wall_s": round(wall, 1), "results": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
