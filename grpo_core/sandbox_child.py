"""The child side of grpo_core.sandbox: run as a script (``python -I -S -B sandbox_child.py KEY=VALUE ...``) in
the sandbox's fresh process, before and around the model-written program. Never imported by the trainer.

Order of events:
  1. namespaces (network, pid, mount) when the parent found them usable;
  2. in the mount namespace, one size-bounded tmpfs at /tmp holds every place the program may write (its
     work dir and bind mounts over /var/tmp, /dev/shm, /run/lock): the disk it can fill is bounded in total;
  3. in the pid namespace, pid 1 mounts its own /proc, so no host process is visible;
  4. "script" mode: the program runs as ``__main__`` (pid 1 only reaps);
     "tests" mode: pid 1 forks the program's process, which closes every descriptor of the judge's, drops
     to an unprivileged uid and serves calls into its namespace over a pipe; pid 1 then becomes the judge:
     it drops to another uid, reads the tests (from a descriptor the program never had), runs them with the
     program's names as remote proxies, compares values itself and writes the verdict. The program only
     ever answers calls it is asked: it never sees an expected value, the tests or the report channel.

Config comes as KEY=VALUE words on argv (nothing secret); the nonce and the tests come on descriptors.
"""
import ast
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER = 0x00020000, 0x20000000, 0x10000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 1 << 14, 1 << 18
JUDGE_UID = JUDGE_GID = 65533  # the judge's uid when the sandbox starts as root (the program's is nobody)
MAX_MESSAGE = 8 << 20  # bytes of one message from the program


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def unshare(flags: int) -> bool:
    flags |= 0 if os.geteuid() == 0 else CLONE_NEWUSER
    return _libc().unshare(flags) == 0


def private_mounts(cfg: dict, source: str, uid: int, gid: int) -> bool:
    """The bounded tmpfs at /tmp (work dir inside it, bind mounts over the other world-writable dirs).
    Returns False if the kernel refused (the caller then runs without them)."""
    libc = _libc()
    libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None)  # nothing mounted here reaches the host
    opts = ("size=%dk,mode=1777" % int(cfg["disk_kb"])).encode()
    if libc.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, opts) != 0:
        return False
    for d in filter(None, cfg.get("private_dirs", "").split(":")):
        if d == "/tmp":
            continue
        inner = "/tmp/." + d.strip("/").replace("/", "_")
        os.mkdir(inner)
        os.chmod(inner, 0o1777)
        libc.mount(inner.encode(), d.encode(), None, MS_BIND, None)
    os.mkdir("/tmp/work")
    with open("/tmp/work/solution.py", "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(source)
    if uid >= 0:
        os.chown("/tmp/work", uid, gid)
        os.chown("/tmp/work/solution.py", uid, gid)
    os.chdir("/tmp/work")
    return True


def wait_for(pid: int) -> None:
    """Reap children until `pid` exits, then exit with its status (pid 1 also reaps the program's orphans)."""
    while True:
        got, status = os.wait()
        if got == pid:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


def set_limits(cfg: dict) -> None:
    for name in [k for k in cfg if k.startswith("RLIMIT_")]:
        value = int(cfg[name])
        lim = getattr(resource, name)
        _soft, hard = resource.getrlimit(lim)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(lim, (value, value))


def drop_to(uid: int, gid: int) -> None:
    """Become `uid` (when started as root), keeping the interpreter's import directories reachable through
    descriptors opened now (a pyenv under /root is not searchable by nobody); without root, drop every
    capability (a user namespace gives them) so that the judge's process cannot be traced."""
    if uid < 0:
        import ctypes

        class _Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class _Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        libc = _libc()
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        libc.capset(ctypes.byref(_Header(0x20080522, 0)), (_Data * 2)())
        return
    paths = []
    for p in sys.path:
        try:
            paths.append("/proc/self/fd/%d" % os.open(p, os.O_RDONLY | os.O_DIRECTORY))
        except OSError:
            paths.append(p)
    remap = [(p.rstrip("/") + "/", q + "/") for p, q in zip(sys.path, paths) if p != q and p]
    sys.path[:] = paths
    for module in list(sys.modules.values()):  # packages imported at start-up (collections, encodings, ...)
        mpath = getattr(module, "__path__", None)
        if isinstance(mpath, list):
            for i, d in enumerate(mpath):
                for p, q in remap:
                    if (d + "/").startswith(p):
                        mpath[i] = q + d[len(p):]
                        break
    sys.path_importer_cache.clear()
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        os._exit(120)


# ----------------------------------------------------------------------------------------- messages

def send(fd: int, obj) -> None:
    data = repr(obj).encode("utf-8", "surrogatepass")
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(fd, data):]


def recv(fd: int):
    """One message as a Python literal (ast.literal_eval: no code runs), or EOFError."""

    def exactly(n):
        out = b""
        while len(out) < n:
            chunk = os.read(fd, min(n - len(out), 1 << 20))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    n = int.from_bytes(exactly(4), "big")
    if n > MAX_MESSAGE:
        raise EOFError
    return ast.literal_eval(exactly(n).decode("utf-8", "surrogatepass"))


_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_CONTAINERS = {list: "l", tuple: "t", set: "s", frozenset: "S"}


# ----------------------------------------------------------------------------------------- the program

def serve(source: str, rfd: int, wfd: int) -> None:
    """The program's process: run the program, then answer the judge's requests about its namespace.
    Values go back as literals of exact built-in types; anything else as a handle the judge can call."""
    exit_ = os._exit
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(source, "solution.py", "exec"), namespace)
        status = "ready"
    except BaseException:
        status = "crash"
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    send(wfd, (status,))
    if status != "ready":
        exit_(1)
    kept: list = []

    def enc(v, depth=0):
        t = type(v)
        if t in _SCALARS:
            try:
                return ("v", repr(v)) if t is not float or v == v and abs(v) != float("inf") else ("f", repr(v))
            except ValueError:  # an int too long for repr
                pass
        elif depth < 64 and t in _CONTAINERS:
            return (_CONTAINERS[t], [enc(x, depth + 1) for x in v])
        elif depth < 64 and t is dict:
            return ("d", [(enc(k, depth + 1), enc(x, depth + 1)) for k, x in v.items()])
        kept.append(v)
        return ("h", len(kept) - 1, t.__name__)

    def dec(e):
        tag = e[0]
        if tag == "v":
            return ast.literal_eval(e[1])
        if tag == "f":
            return float(e[1])
        if tag == "h":
            return kept[e[1]]
        items = [dec(x) for x in e[1]] if tag != "d" else [(dec(k), dec(x)) for k, x in e[1]]
        return {"l": list, "t": tuple, "s": set, "S": frozenset, "d": dict}[tag](items)

    while True:
        try:
            req = recv(rfd)
        except BaseException:
            exit_(0)
        try:
            op = req[0]
            if op == "get":
                out = enc(namespace[req[1]]) if req[1] in namespace else ("n",)
            else:
                obj = kept[req[1]]
                if op == "call":
                    out = enc(obj(*dec(req[2]), **dec(req[3])))
                elif op == "attr":
                    out = enc(getattr(obj, req[2]))
                elif op == "item":
                    out = enc(obj[dec(req[2])])
                elif op == "iter":
                    out = ("l", [enc(x) for x in obj])
                elif op == "contains":
                    out = enc(bool(dec(req[2]) in obj))
                else:  # bool, len, str, repr
                    out = enc({"bool": bool, "len": len, "str": str, "repr": repr}[op](obj))
        except BaseException as exc:
            try:
                out = ("e", type(exc).__name__, str(exc)[:2000])
            except BaseException:
                out = ("e", "Exception", "")
        try:
            send(wfd, out)
        except BaseException:
            exit_(0)


# ----------------------------------------------------------------------------------------- the judge

def defined_names(source: str) -> tuple[set, bool]:
    """Names the program binds at module level (statically), and whether it star-imports. The judge asks the
    program for these names only: a program that defines nothing is asked nothing and scores 0."""
    names: set = set()
    star = False

    def visit(node, top):
        nonlocal star
        if isinstance(node, ast.Global):
            names.update(node.names)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if top:
                names.add(node.name)
            top = False
        elif isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            top = False
        elif top and isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif top and isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    star = True
                else:
                    names.add(alias.asname or alias.name.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child, top)

    try:
        visit(ast.parse(source), True)
    except (SyntaxError, ValueError, RecursionError):
        pass
    return names, star


def judge(cfg: dict, source: str, rfd: int, wfd: int, program_pid: int, uid: int) -> None:
    """Run the tests with the program's names as proxies; write "NONCE STATUS PASSED TOTAL" to the verdict
    descriptor. A program name that resolves is what lets a test pass: with none, the verdict is 0."""
    import builtins

    nonce = os.read(int(cfg["nonce_fd"]), 128)
    os.close(int(cfg["nonce_fd"]))
    tests_fd, verdict_fd = int(cfg["tests_fd"]), int(cfg["verdict_fd"])
    chunks = []
    while True:
        chunk = os.read(tests_fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(tests_fd)
    units = b"".join(chunks).decode("utf-8", "surrogateescape").split("\0")
    set_limits({k: v for k, v in cfg.items() if k != "RLIMIT_NPROC"})
    if uid >= 0:
        os.setgroups([])
        os.setgid(JUDGE_GID)
        os.setuid(JUDGE_UID)
    _libc().prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no tracing, no /proc/<pid>/mem of the judge
    names, star = defined_names(source)
    total = sum(u[:1] == "T" for u in units)

    def report(status, passed):
        try:
            os.write(verdict_fd, nonce + (" %s %d %d\n" % (status, passed, total)).encode())
        except OSError:
            pass
        os._exit(0)

    try:
        ready = recv(rfd)
    except BaseException:
        ready = ("crash",)
    if ready != ("ready",):
        report("crash", 0)
    resolved = [False]

    def rpc(req):
        send(wfd, req)
        out = recv(rfd)
        if out[0] == "e":
            kind = getattr(builtins, str(out[1]), None)
            if not (isinstance(kind, type) and issubclass(kind, Exception)):
                kind = RuntimeError
            raise kind(out[2])
        return decode(out)

    def encode(v, depth=0):
        if isinstance(v, Remote):
            return ("h", v._id)
        t = type(v)
        if t in _SCALARS:
            return ("v", repr(v)) if t is not float or v == v and abs(v) != float("inf") else ("f", repr(v))
        if depth < 64 and t in _CONTAINERS:
            return (_CONTAINERS[t], [encode(x, depth + 1) for x in v])
        if depth < 64 and t is dict:
            return ("d", [(encode(k, depth + 1), encode(x, depth + 1)) for k, x in v.items()])
        raise TypeError("the sandbox passes only built-in values and the program's own objects to the program, "
                        "not %s" % t.__name__)

    def decode(e):
        tag = e[0]
        if tag == "v":
            v = ast.literal_eval(e[1])
            if type(v) not in _SCALARS:
                raise TypeError("bad value")
            return v
        if tag == "f":
            if e[1] not in ("nan", "inf", "-inf"):
                raise TypeError("bad float")
            return float(e[1])
        if tag == "h":
            return Remote(int(e[1]), str(e[2]))
        if tag == "n":
            raise KeyError
        items = [decode(x) for x in e[1]] if tag != "d" else [(decode(k), decode(x)) for k, x in e[1]]
        return {"l": list, "t": tuple, "s": set, "S": frozenset, "d": dict}[tag](items)

    class Remote:
        """An object of the program's; equality with it is identity (the program cannot vouch for a value)."""

        def __init__(self, ident, kind):
            object.__setattr__(self, "_id", ident)
            object.__setattr__(self, "_kind", kind)

        def __call__(self, *args, **kwargs):
            return rpc(("call", self._id, encode(args), encode(kwargs)))

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return rpc(("attr", self._id, name))

        def __getitem__(self, key):
            return rpc(("item", self._id, encode(key)))

        def __iter__(self):
            return iter(rpc(("iter", self._id)))

        def __contains__(self, item):
            return rpc(("contains", self._id, encode(item)))

        def __bool__(self):
            return rpc(("bool", self._id))

        def __len__(self):
            return rpc(("len", self._id))

        def __str__(self):
            return rpc(("str", self._id))

        def __repr__(self):
            return rpc(("repr", self._id))

        __hash__ = object.__hash__

    class Names(dict):
        def __missing__(self, name):
            if name in builtins.__dict__ or not (star or name in names):
                raise KeyError(name)
            value = rpc(("get", name))
            resolved[0] = True
            return value

    scope = Names(__builtins__=builtins.__dict__, __name__="__main__")
    passed = 0
    for unit in units:
        is_test = unit[:1] == "T"
        try:
            exec(compile(unit[1:], "tests.py", "exec"), scope)
            passed += is_test
        except BaseException:
            if not is_test:  # a failing setup statement: the rest cannot be judged
                break
    report("done", passed if resolved[0] else 0)


# ----------------------------------------------------------------------------------------- entry

def main() -> None:
    cfg = dict(a.split("=", 1) for a in sys.argv[1:])
    del sys.argv[1:]
    sys.argv[0] = "solution.py"
    uid, gid = int(cfg.get("uid", -1)), int(cfg.get("gid", -1))
    source = ""
    if "probe" not in cfg:
        with open("solution.py", encoding="utf-8", errors="surrogateescape") as f:
            source = f.read()
    ns = int(cfg.get("ns", 0))
    if ns and not unshare(ns):
        ns = 0
    mounted = bool(ns & CLONE_NEWNS) and private_mounts(cfg, source, uid, gid)
    if "probe" in cfg:  # the parent's one-time check of what this machine allows
        if not mounted or not ns & CLONE_NEWPID:
            os._exit(1)
        child = os.fork()
        if child == 0:
            os._exit(0 if _libc().mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) == 0
                     else 1)
        wait_for(child)
    if ns & CLONE_NEWPID:
        # This process stays outside; its child is pid 1 of the new namespace. When pid 1 exits or is
        # killed, the kernel kills everything left in the namespace, setsid'd or not.
        child = os.fork()
        if child:
            wait_for(child)
        if mounted:
            _libc().mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    if cfg["mode"] == "script":
        if ns & CLONE_NEWPID:
            child = os.fork()
            if child:
                wait_for(child)  # pid 1 only reaps
        set_limits(cfg)
        drop_to(uid, gid)
        del cfg
        namespace = {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "solution.py"}
        exec(compile(source, "solution.py", "exec"), namespace)
        return
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    program = os.fork()
    if program == 0:
        for fd in (int(cfg["nonce_fd"]), int(cfg["verdict_fd"]), int(cfg["tests_fd"]), req_w, resp_r):
            os.close(fd)
        set_limits(cfg)
        drop_to(uid, gid)
        del cfg
        serve(source, req_r, resp_w)
        os._exit(0)
    os.close(req_r)
    os.close(resp_w)
    judge(cfg, source, resp_r, req_w, program, uid)


if __name__ == "__main__":
    main()
