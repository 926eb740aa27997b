"""Check grpo_core's vLLM adapter against the real source of each vLLM release, statically (AST).

Every name grpo_core calls in vLLM is declared once, in grpo_core/rollout/vllm_compat.py (`API_NEEDS`):
the public path it is reached by (`vllm.LLM.__init__`, `vllm.SamplingParams`, `vllm.config.LogprobsMode`,
...) and the parameters / fields / values used. This script parses an unpacked release (a directory holding
`vllm/__init__.py`, e.g. the .py files of `pip download --no-deps vllm==X`) and looks each one up the way
Python would reach it: through `from .x import Y`, vLLM's lazy `MODULE_ATTRS` table, class bases (mixins),
and, for `LLM.__init__`'s `**kwargs`, the class they are forwarded to (`EngineArgs(..., **kwargs)`). Nothing
is imported (vLLM's modules need CUDA), so it runs anywhere.

A name the adapter needs that a release lacks is reported as
    vllm 0.32.0: missing vllm.SamplingParams field 'seed' (per-request seed: sampling invariant to sharding)
and the exit status is 1.

Usage:
    python benchmarks/check_vllm_api.py /work/cache/vllm-src          # every release directory under it
    python benchmarks/check_vllm_api.py DIR/0.32.0 DIR/0.34.0 --out benchmarks/results
The release is read from the directory's dist-info METADATA (else vllm/version.py / _version.py, else the
directory name). --out writes vllm_api_check.json and vllm_api_check.md (the table in benchmarks/results/).
"""
from __future__ import annotations

import argparse
import ast
import datetime as _dt
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere
from grpo_core.rollout import vllm_compat as compat  # noqa: E402


# --------------------------------------------------------------------------------------------- source tree
class SourceTree:
    """The parsed modules of one unpacked vLLM release, looked up lazily by dotted module name."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not (self.root / "vllm" / "__init__.py").is_file():
            raise FileNotFoundError(f"{self.root} has no vllm/__init__.py (expected an unpacked vLLM release)")
        self._cache: dict[str, ast.Module | None] = {}

    def module_file(self, dotted: str) -> Path | None:
        base = self.root.joinpath(*dotted.split("."))
        for cand in (base.with_suffix(".py"), base / "__init__.py"):
            if cand.is_file():
                return cand
        return None

    def is_package(self, dotted: str) -> bool:
        f = self.module_file(dotted)
        return f is not None and f.name == "__init__.py"

    def parse(self, dotted: str) -> ast.Module | None:
        if dotted not in self._cache:
            f = self.module_file(dotted)
            self._cache[dotted] = None if f is None else ast.parse(f.read_text(encoding="utf-8"), str(f))
        return self._cache[dotted]

    def requirement(self, name: str) -> str:
        """The pin of one dependency in the release's METADATA (e.g. 'torch==2.13.0'), '' when absent."""
        for meta in sorted(self.root.glob("vllm-*.dist-info/METADATA")):
            m = re.search(rf"^Requires-Dist:\s*({re.escape(name)}\s*[=<>!~][^;\n]*)",
                          meta.read_text(encoding="utf-8", errors="replace"), re.M)
            if m:
                return m.group(1).strip()
        return ""

    def version(self) -> str:
        for meta in sorted(self.root.glob("vllm-*.dist-info/METADATA")):
            m = re.search(r"^Version:\s*(\S+)", meta.read_text(encoding="utf-8", errors="replace"), re.M)
            if m:
                return m.group(1)
        for name in ("_version.py", "version.py"):
            f = self.root / "vllm" / name
            if f.is_file():
                m = re.search(r"""(?:__version__|version)\s*(?::\s*str\s*)?=\s*['"]([0-9][^'"]*)['"]""",
                              f.read_text(encoding="utf-8"))
                if m:
                    return m.group(1)
        return self.root.name


@dataclass
class Found:
    """A resolved definition: the node and the module it lives in (for resolving names it mentions)."""

    node: ast.AST
    module: str


def _top_level(body: list[ast.stmt]):
    """Module-level statements, descending into if/else and try blocks (TYPE_CHECKING, optional imports)."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.If):
            yield from _top_level(stmt.body)
            yield from _top_level(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            for part in (stmt.body, stmt.orelse, stmt.finalbody, *[h.body for h in stmt.handlers]):
                yield from _top_level(part)


def _is_stub(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A method whose body is only a docstring, `pass`, `...` or `raise NotImplementedError` (abstract)."""
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if not body:
        return True
    if len(body) == 1 and isinstance(body[0], ast.Pass):
        return True
    if len(body) == 1 and isinstance(body[0], ast.Raise) and body[0].exc is not None:
        exc = body[0].exc.func if isinstance(body[0].exc, ast.Call) else body[0].exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _absolute(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    parts = module.split(".")
    if not is_pkg:
        parts = parts[:-1]
    parts = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join(parts + ([target] if target else []))


class Resolver:
    def __init__(self, tree: SourceTree):
        self.tree = tree

    def resolve(self, symbol: str) -> Found | None:
        """`vllm.a.b.C.m` -> the definition of m: the longest importable module prefix, then attributes."""
        parts = symbol.split(".")
        for cut in range(len(parts), 0, -1):
            module = ".".join(parts[:cut])
            if self.tree.module_file(module) is None:
                continue
            found: Found | None = None
            rest = parts[cut:]
            if not rest:
                return Found(self.tree.parse(module), module)
            found = self.in_module(module, rest[0])
            for attr in rest[1:]:
                if found is None:
                    return None
                found = self.member(found, attr)
            return found
        return None

    def in_module(self, module: str, name: str, _seen: frozenset = frozenset()) -> Found | None:
        """Where `module.name` is defined: a def/class/assignment, followed through imports."""
        key = (module, name)
        if key in _seen:
            return None
        _seen = _seen | {key}
        tree = self.tree.parse(module)
        if tree is None:
            return None
        stmts = list(_top_level(tree.body))
        for stmt in stmts:  # definitions first
            if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name:
                return Found(stmt, module)
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
                if isinstance(stmt.value, ast.Name) and stmt.value.id != name:  # an alias: `X = _X`
                    alias = self.in_module(module, stmt.value.id, _seen)
                    if alias is not None:
                        return alias
                return Found(stmt, module)
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name \
                    and stmt.value is not None:
                return Found(stmt, module)
        is_pkg = self.tree.is_package(module)
        for stmt in stmts:  # then imports
            if isinstance(stmt, ast.ImportFrom):
                src = _absolute(module, is_pkg, stmt.level, stmt.module)
                for alias in stmt.names:
                    if alias.name == "*":
                        hit = self.in_module(src, name, _seen)
                        if hit is not None:
                            return hit
                    elif (alias.asname or alias.name) == name:
                        sub = f"{src}.{alias.name}"
                        if self.tree.module_file(sub) is not None:  # `from pkg import submodule`
                            return Found(self.tree.parse(sub), sub)
                        return self.in_module(src, alias.name, _seen)
        lazy = self._lazy_table(stmts).get(name)  # vllm/__init__.py: MODULE_ATTRS = {"LLM": ".entrypoints.llm:LLM"}
        if lazy is not None:
            mod, _, attr = lazy.partition(":")
            level = len(mod) - len(mod.lstrip("."))
            src = _absolute(module, is_pkg, level, mod.lstrip(".") or None)
            return self.in_module(src, attr or name, _seen)
        if is_pkg and self.tree.module_file(f"{module}.{name}") is not None:
            return Found(self.tree.parse(f"{module}.{name}"), f"{module}.{name}")
        return None

    @staticmethod
    def _lazy_table(stmts) -> dict[str, str]:
        table: dict[str, str] = {}
        for stmt in stmts:
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and isinstance(stmt.value, ast.Dict):
                for k, v in zip(stmt.value.keys, stmt.value.values):
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant) and isinstance(v.value, str) \
                            and isinstance(k.value, str) and ":" in v.value:
                        table.setdefault(k.value, v.value)
        return table

    def expr(self, node: ast.expr, module: str) -> Found | None:
        """A Name / Attribute expression (a base class, a callee) resolved in `module`."""
        if isinstance(node, ast.Name):
            return self.in_module(module, node.id)
        if isinstance(node, ast.Attribute):
            owner = self.expr(node.value, module)
            return None if owner is None else self.member(owner, node.attr)
        if isinstance(node, ast.Subscript):  # Generic[...] bases
            return self.expr(node.value, module)
        return None

    def member(self, owner: Found, attr: str, _depth: int = 0) -> Found | None:
        """An attribute of a class (searching its bases) or of a module."""
        if isinstance(owner.node, ast.Module):
            return self.in_module(owner.module, attr)
        if not isinstance(owner.node, ast.ClassDef) or _depth > 12:
            return None
        for stmt in owner.node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == attr:
                if _is_stub(stmt):  # an abstract placeholder is not an implementation: look no further
                    return None
                return Found(stmt, owner.module)
            if isinstance(stmt, ast.ClassDef) and stmt.name == attr:
                return Found(stmt, owner.module)
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == attr:
                return Found(stmt, owner.module)
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attr for t in stmt.targets):
                return Found(stmt, owner.module)
        for base in owner.node.bases:
            b = self.expr(base, owner.module)
            if b is not None:
                hit = self.member(b, attr, _depth + 1)
                if hit is not None:
                    return hit
        return None

    # ------------------------------------------------------------------ what a definition offers
    def class_fields(self, found: Found, _depth: int = 0) -> set[str]:
        """Annotated class-level names (dataclass / msgspec.Struct / pydantic fields), bases included."""
        if not isinstance(found.node, ast.ClassDef) or _depth > 12:
            return set()
        names = {s.target.id for s in found.node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
        for base in found.node.bases:
            b = self.expr(base, found.module)
            if b is not None:
                names |= self.class_fields(b, _depth + 1)
        return names

    def params(self, found: Found) -> tuple[set[str], set[str]]:
        """(named parameters, parameters reachable through **kwargs forwarded to a class's constructor)."""
        node = found.node
        if isinstance(node, ast.ClassDef):  # a class called directly: its __init__, else its fields
            init = self.member(found, "__init__")
            return self.params(init) if init is not None else (self.class_fields(found), set())
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return set(), set()
        a = node.args
        named = {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)}
        forwarded: set[str] = set()
        if a.kwarg is not None:
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and any(k.arg is None and isinstance(k.value, ast.Name)
                                                      and k.value.id == a.kwarg.arg for k in call.keywords):
                    callee = self.expr(call.func, found.module)
                    if callee is not None and isinstance(callee.node, ast.ClassDef):
                        forwarded |= self.class_fields(callee)
        return named, forwarded

    @staticmethod
    def self_attrs(found: Found) -> set[str]:
        """`self.X` assigned (plain or annotated) in a method."""
        out = set()
        for n in ast.walk(found.node):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
            for t in targets:
                for e in ast.walk(t):
                    if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                        out.add(e.attr)
        return out

    @staticmethod
    def strings(found: Found) -> set[str]:
        return {n.value for n in ast.walk(found.node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}

    def values(self, found: Found) -> set[str]:
        """String values of a `Literal[...]` alias or of an Enum class's members."""
        node = found.node
        if isinstance(node, ast.ClassDef):
            return {s.value.value for s in node.body if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant)
                    and isinstance(s.value.value, str)}
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if value is None:
            return set()
        return {n.value for n in ast.walk(value) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


# --------------------------------------------------------------------------------------------- the check
@dataclass
class ReleaseResult:
    release: str
    path: str
    checked: int = 0
    missing: list[str] = field(default_factory=list)  # one line per missing name
    supported: bool = True  # inside SUPPORTED_VLLM
    torch: str = ""  # the release's torch requirement (its METADATA)
    weight_update_api: str = ""  # what the release offers publicly (information; see vllm_compat's docstring)

    @property
    def ok(self) -> bool:
        return not self.missing


# need.kind -> the word for one missing name; an "exists" need has no names to look for.
_LABELS = {"params": "parameter", "fields": "field", "values": "value", "attrs": "attribute", "mentions": "string"}
# need.kind -> what the source resolver lists for the found symbol.
_SOURCE_NAMES = {
    "params": lambda r, f: set().union(*r.params(f)),  # named, or forwarded through **kwargs
    "fields": lambda r, f: r.class_fields(f),
    "values": lambda r, f: r.values(f),
    "attrs": lambda r, f: r.self_attrs(f),
    "mentions": lambda r, f: r.strings(f),
}


def _missing(version: str, need, have: set[str] | None) -> list[str]:
    """One line per name of `need` absent from `have` (None: an "exists" need, found is enough)."""
    if have is None:
        return []
    return [f"vllm {version}: missing {need.symbol} {_LABELS[need.kind]} {n!r} ({need.why})"
            for n in need.names if n not in have]


def check_release(root: Path | str, version: str | None = None) -> ReleaseResult:
    """Check every ApiNeed that applies to this release; the missing ones named in `missing`."""
    tree = SourceTree(Path(root))
    version = version or tree.version()
    res = ReleaseResult(release=version, path=str(root), supported=compat.is_supported(version),
                        torch=tree.requirement("torch"))
    resolver = Resolver(tree)
    res.weight_update_api = public_weight_update_api(resolver)
    for need in compat.api_needs(version):
        res.checked += 1
        found = resolver.resolve(need.symbol)
        if found is None:
            res.missing.append(f"vllm {version}: missing {need.symbol} ({need.why})")
            continue
        names = _SOURCE_NAMES.get(need.kind)
        res.missing += _missing(version, need, names(resolver, found) if names else None)
    return res


def public_weight_update_api(resolver: Resolver) -> str:
    """The release's public LLM-level weight-update methods and transfer backends, as found in its source."""
    methods = [m for m in ("init_weight_transfer_engine", "start_weight_update", "update_weights",
                           "finish_weight_update") if resolver.resolve(f"vllm.LLM.{m}") is not None]
    if not methods:
        return "none"
    backends: set[str] = set()
    cfg = resolver.resolve("vllm.config.weight_transfer.WeightTransferConfig")
    if cfg is not None:
        field_ = resolver.member(cfg, "backend")
        if field_ is not None:
            backends = resolver.strings(Found(field_.node.annotation, field_.module)) \
                if isinstance(field_.node, ast.AnnAssign) else set()
    return f"LLM.{'/'.join(methods)}; backends: {', '.join(sorted(backends)) or '?'}"


def check_imported() -> ReleaseResult:
    """The same needs checked on the importable `vllm` of this environment with `inspect` (live signatures,
    dataclass / msgspec / TypedDict fields, Literal / Enum values): the second route, where vLLM imports
    without CUDA (0.32 does on CPU torch 2.13 with its pure-Python dependencies)."""
    import dataclasses
    import enum
    import importlib
    import inspect
    import textwrap
    import typing

    vllm = importlib.import_module("vllm")
    version = str(vllm.__version__)
    res = ReleaseResult(release=version, path=str(Path(vllm.__file__).parent), supported=compat.is_supported(version))

    def resolve(symbol: str):
        parts = symbol.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = inspect.getattr_static(obj, attr, None) if inspect.isclass(obj) else getattr(obj, attr, None)
                obj = obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj
                if obj is None:
                    return None
            return obj
        return None

    def fields(cls) -> set[str]:
        out: set[str] = set()
        if dataclasses.is_dataclass(cls):
            out |= {f.name for f in dataclasses.fields(cls)}
        out |= set(getattr(cls, "__struct_fields__", ()))  # msgspec.Struct
        out |= set(getattr(cls, "model_fields", {}) or {})  # pydantic
        for klass in getattr(cls, "__mro__", (cls,)):
            out |= set(getattr(klass, "__annotations__", {}))  # TypedDict, plain annotated classes
        return out

    def source_tree(obj) -> ast.AST:
        return ast.parse(textwrap.dedent(inspect.getsource(obj)))

    for need in compat.api_needs(version):
        res.checked += 1
        obj = resolve(need.symbol)
        if obj is None:
            res.missing.append(f"vllm {version}: missing {need.symbol} ({need.why})")
            continue
        have: set[str] | None = None
        if need.kind == "params":
            sig = inspect.signature(obj)
            have = set(sig.parameters)
            var_kw = [p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]
            if var_kw:  # **kwargs forwarded to a class: the callee's fields count
                for call in ast.walk(source_tree(obj)):
                    if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and any(
                            k.arg is None and isinstance(k.value, ast.Name) and k.value.id == var_kw[0]
                            for k in call.keywords):
                        callee = obj.__globals__.get(call.func.id)
                        if inspect.isclass(callee):
                            have |= fields(callee)
        elif need.kind == "fields":
            have = fields(obj)
        elif need.kind == "values":
            if inspect.isclass(obj) and issubclass(obj, enum.Enum):
                have = {m.value for m in obj}
            else:
                have = {a for a in typing.get_args(obj) if isinstance(a, str)}
        elif need.kind in ("attrs", "mentions"):
            have = _SOURCE_NAMES[need.kind](Resolver, Found(source_tree(obj), ""))
        res.missing += _missing(version, need, have)
    return res


def release_dirs(paths: list[str]) -> list[Path]:
    """Each path is a release (has vllm/__init__.py) or a folder of releases; sorted by version."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "vllm" / "__init__.py").is_file():
            out.append(p)
        elif p.is_dir():
            out += [d for d in p.iterdir() if (d / "vllm" / "__init__.py").is_file()]
        else:
            raise FileNotFoundError(f"{p}: not a vLLM source tree nor a folder of them")
    return sorted(out, key=lambda d: compat.parse_version(SourceTree(d).version()))


def markdown(results: list[ReleaseResult]) -> str:
    lines = [
        "# vLLM API check: grpo_core/rollout/vllm_compat.py against each release's source",
        "",
        f"Supported range: `{compat.supported_range()}`. Each release's wheel was fetched with "
        "`pip download --no-deps vllm==X` and its .py files parsed (AST; nothing imported) by "
        "`python benchmarks/check_vllm_api.py`. `checked` counts the adapter's declared needs (symbols with the "
        "parameters / fields / values used) that apply to the release.",
        "",
        "| release | torch pin | in range | needs checked | result | API used (vllm_compat.api_used) | public weight-update API "
        "found in the source (not used: cross-process transports) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        verdict = "pass" if r.ok else "FAIL: " + "; ".join(m.split(": missing ", 1)[1] for m in r.missing)
        lines.append(f"| {r.release} | {r.torch or '?'} | {'yes' if r.supported else 'no'} | {r.checked} | {verdict} | "
                     f"{compat.api_used(r.release)} | {r.weight_update_api} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="unpacked vLLM release(s), or folder(s) of them")
    ap.add_argument("--out", default=None, help="write vllm_api_check.json and vllm_api_check.md here")
    args = ap.parse_args(argv)
    results = [check_release(d) for d in release_dirs(args.paths)]
    for r in results:
        print(f"vllm {r.release}: {'ok' if r.ok else 'FAIL'} ({r.checked} needs checked"
              f"{'' if r.supported else ', outside the supported range'})")
        for m in r.missing:
            print("  " + m)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"utc_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "supported_range": compat.supported_range(), "python": sys.version.split()[0]}
        (out / "vllm_api_check.json").write_text(json.dumps(
            {"meta": meta, "releases": [{"release": r.release, "torch": r.torch, "supported": r.supported, "checked": r.checked,
                                         "ok": r.ok, "missing": r.missing, "api_used": compat.api_used(r.release),
                                         "public_weight_update_api": r.weight_update_api}
                                        for r in results]}, indent=1) + "\n", encoding="utf-8")
        (out / "vllm_api_check.md").write_text(markdown(results), encoding="utf-8")
        print(f"wrote {out / 'vllm_api_check.json'} and {out / 'vllm_api_check.md'}")
    bad = [r for r in results if r.supported and not r.ok]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
