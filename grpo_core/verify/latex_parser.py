"""A small tokenizer + recursive-descent parser from LaTeX / plain-text math to sympy objects.

Nothing here evaluates model text as code: tokens are mapped to sympy constructors from an explicit
whitelist (``_FUNCS``, ``_CONSTANTS``); no ``eval``/``sympify``/``parse_expr``/``parse_latex``. Work is
bounded: input length is capped by the caller, nesting by MAX_DEPTH (beyond MAX_INEXACT_DEPTH only exact
rational values are accepted), and numeric powers/factorials whose
result would exceed MAX_RESULT_DIGITS raise :class:`TooBig` before sympy computes them.

Grammar (lowest precedence first)::

    top      := union (',' union)*                       -> AnswerList if more than one
    union    := relation ('\\cup' relation)*             -> UnionOf if more than one
    relation := expr (relop expr)*                       -> Relation if any relop (=, <, \\le, \\in ...)
    expr     := term (('+' | '-' | '\\pm' | '\\mp') term)*
    term     := unary (('*' | '\\cdot' | '\\times' | '/' | '\\div' | <implicit>) unary)*
    unary    := ('-' | '+' | '\\pm') unary | power
    power    := postfix ('^' unary)?                     (right associative: 9^9^9 = 9^(9^9))
    postfix  := atom ('!')*
    atom     := number | letter | \\command | '(' top ')' | '[' top ']' | '{' top '}' | '\\{' top '\\}'
              | '|' expr '|' | \\frac A B | \\sqrt[n]{A} | func arg | \\begin{pmatrix} ... \\end{pmatrix}

``a \\pm b`` is built as ``a + PM*b`` with the private symbol :data:`PM`; the comparator expands it into
the set {a+b, a-b}. Brackets give :class:`Bracketed` (tuples, intervals), ``\\{..\\}`` gives
:class:`SetOf`, environments give :class:`MatrixOf`.
"""

from __future__ import annotations

import math
import re
import sys

import sympy

from grpo_core.verify.limits import (
    MAX_DEPTH,
    MAX_FACTORIAL_ARG,
    MAX_INEXACT_DEPTH,
    MAX_RESULT_DIGITS,
    ParseError,
    TooBig,
)
from grpo_core.verify.values import (
    PM,
    AnswerList,
    Bracketed,
    MatrixOf,
    Relation,
    SetOf,
    SolutionGroups,
    UnionOf,
    check_tower,
    safe_mul,
    safe_pow,
)

__all__ = ["PM", "AnswerList", "Bracketed", "MatrixOf", "Relation", "SetOf", "UnionOf", "parse_math", "tokenize"]

_FUNCS = {
    "sin": sympy.sin,
    "cos": sympy.cos,
    "tan": sympy.tan,
    "cot": sympy.cot,
    "sec": sympy.sec,
    "csc": sympy.csc,
    "arcsin": sympy.asin,
    "arccos": sympy.acos,
    "arctan": sympy.atan,
    "sinh": sympy.sinh,
    "cosh": sympy.cosh,
    "tanh": sympy.tanh,
    "exp": sympy.exp,
    "ln": sympy.log,
    "log": sympy.log,
    "sqrt": sympy.sqrt,
    "abs": sympy.Abs,
}
_CONSTANTS = {"pi": sympy.pi, "infty": sympy.oo, "infin": sympy.oo, "infinity": sympy.oo, "inf": sympy.oo}
_GREEK = {
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "varepsilon",
    "zeta",
    "eta",
    "theta",
    "vartheta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "varphi",
    "chi",
    "psi",
    "omega",
    "Gamma",
    "Delta",
    "Theta",
    "Lambda",
    "Xi",
    "Sigma",
    "Phi",
    "Psi",
    "Omega",
}
_RELOPS = {
    "=": "=",
    "<": "<",
    ">": ">",
    r"\lt": "<",
    r"\gt": ">",
    r"\le": "<=",
    r"\leq": "<=",
    r"\leqslant": "<=",
    r"\ge": ">=",
    r"\geq": ">=",
    r"\geqslant": ">=",
    r"\ne": "!=",
    r"\neq": "!=",
    "<=": "<=",
    ">=": ">=",
    "!=": "!=",
    r"\in": "in",
    r"\approx": "~",
    r"\equiv": "=",
}
_MATRIX_ENVS = {"pmatrix", "bmatrix", "matrix", "smallmatrix", "Bmatrix", "array", "vmatrix"}
_FUNCTION_LETTERS = frozenset("fghP")
"""Single letters read as a function application when followed by "(": ``f(3) = 10`` names the value 10."""
_IGNORED = frozenset({r"\angle", r"\measuredangle", r"\triangle", r"\overline", r"\overrightarrow", r"\vec", r"\hat"})
MAX_MATRIX_CELLS = 400
MAX_LETTERS = 200
"""More single-letter symbols than this is prose, not a formula (and sympy's products of them get slow)."""
MAX_BINOMIAL_DIGITS = 3000
"""sympy's binomial is slow far below MAX_RESULT_DIGITS (C(100000, 50000) takes seconds): its own bound."""
_PLAIN_WORDS = sorted(
    [w for w in list(_FUNCS) + list(_CONSTANTS) if len(w) > 1] + ["arcsin", "arccos", "arctan"],
    key=len,
    reverse=True,
)
_TOKEN_RE = re.compile(
    r"(?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d{1,5}(?![A-Za-z]))?|\.\d+)"
    r"|(?P<cmd>\\[A-Za-z]+|\\.)"
    r"|(?P<op><=|>=|!=|\*\*|\S)"
)


def tokenize(text: str) -> list[str]:
    """Split ``text`` into tokens: numbers, ``\\commands``, plain function words, single characters."""
    tokens: list[str] = []
    pos, n = 0, len(text)
    while pos < n:
        if text[pos].isspace():
            pos += 1
            continue
        if text[pos].isalpha():
            # Plain-text function/constant words ("sqrt", "pi", "sin"); other letters are single symbols.
            for word in _PLAIN_WORDS:
                if text.startswith(word, pos) and not text[pos + len(word) : pos + len(word) + 1].isalpha():
                    tokens.append("\\" + word)
                    pos += len(word)
                    break
            else:
                tokens.append(text[pos])
                pos += 1
            continue
        m = _TOKEN_RE.match(text, pos)
        if m is None:  # pragma: no cover - \S always matches
            raise ParseError(f"cannot tokenize at {pos}")
        tok = m.group(0)
        tokens.append("^" if tok == "**" else tok)
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.toks = tokenize(text)
        if sum(1 for t in self.toks if t.isalpha()) > MAX_LETTERS:
            raise TooBig("too many letters for a formula")
        self.i = 0
        self.depth = 0
        self.deepest = 0
        self.decimals: dict = {}  # |value| of each decimal literal -> its number of decimal places

    # ---- token helpers -------------------------------------------------------------------------
    def peek(self, k: int = 0) -> str | None:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ParseError("unexpected end of answer")
        self.i += 1
        return tok

    def expect(self, tok: str) -> None:
        got = self.take()
        if got != tok:
            raise ParseError(f"expected {tok!r}, got {got!r}")

    def enter(self) -> None:
        self.depth += 1
        self.deepest = max(self.deepest, self.depth)
        if self.depth > MAX_DEPTH:
            raise TooBig("nesting too deep")

    # ---- grammar -------------------------------------------------------------------------------
    def parse(self):
        if not self.toks:
            raise ParseError("empty answer")
        out = self.top(closers=())
        if self.peek() is not None:
            raise ParseError(f"unexpected {self.peek()!r}")
        return out

    def top(self, closers):
        groups = [self.comma_list(closers)]
        while self.peek() == ";":
            self.take()
            if self.peek() is None or self.peek() in closers:
                break
            groups.append(self.comma_list(closers))
        if len(groups) == 1:
            return groups[0]
        if not any(isinstance(g, AnswerList) for g in groups):
            return AnswerList(tuple(groups))
        return SolutionGroups(tuple(groups))

    def comma_list(self, closers):
        items = [self.union()]
        while self.peek() == ",":
            self.take()
            if self.peek() is None or self.peek() in closers:
                break
            items.append(self.union())
        return items[0] if len(items) == 1 else AnswerList(tuple(items))

    def union(self):
        parts = [self.relation()]
        while self.peek() in (r"\cup", r"\setminus", r"\backslash"):
            op = self.take()
            right = self.relation()
            if op == r"\cup":
                parts.append(right)
            else:  # interval minus finitely many points: \mathbb{R} \setminus \{0\}
                parts[-1:] = _remove_points(parts[-1], right)
        return parts[0] if len(parts) == 1 else UnionOf(tuple(parts))

    def relation(self):
        terms, ops = [self.ratio()], []
        while self.peek() in _RELOPS:
            ops.append(_RELOPS[self.take()])
            terms.append(self.ratio() if ops[-1] != "in" else self.union())
        return terms[0] if not ops else Relation(tuple(terms), tuple(ops))

    def ratio(self):
        """``a : b`` is the number a/b; ``a : b : c`` an ordered ratio tuple."""
        parts = [self.expr()]
        while self.peek() == ":":
            self.take()
            parts.append(self.expr())
        if len(parts) == 1:
            return parts[0]
        _need_scalar(*parts)
        if len(parts) == 2:
            if parts[1] == 0:
                raise ParseError("ratio with zero")
            return safe_mul(parts[0], sympy.Pow(parts[1], -1))
        return Bracketed(tuple(parts), ":", ":")

    def expr(self):
        left = self.term()
        while self.peek() in ("+", "-", r"\pm", r"\mp"):
            op = self.take()
            right = self.term()
            if isinstance(left, MatrixOf) and isinstance(right, MatrixOf) and op in ("+", "-"):
                left = _matrix_add(left, right, 1 if op == "+" else -1)
                continue
            _need_scalar(left, right)
            if op == "+":
                left = sympy.Add(left, right)
            elif op == "-":
                left = sympy.Add(left, -right)
            else:
                left = sympy.Add(left, (PM if op == r"\pm" else -PM) * right)
        return left

    def _starts_atom(self, tok) -> bool:
        if tok is None:
            return False
        if tok[0].isdigit() or tok[0] == "." or tok.isalpha() or tok in ("(", "{", r"\{"):
            return True
        if tok.startswith("\\") and len(tok) > 2:
            name = tok[1:]
            return (
                name in _FUNCS
                or name in _CONSTANTS
                or name in _GREEK
                or name in ("frac", "sqrt", "binom", "begin", "lfloor", "lceil", "log", "emptyset", "varnothing")
                or tok in _IGNORED
            )
        return False

    def term(self):
        head = self.peek(1) if self.peek() == "-" else self.peek()
        int_literal = head is not None and head.isdigit()
        left = self.unary()
        first = True
        while True:
            tok = self.peek()
            if tok in ("*", r"\cdot", r"\times", "/", r"\div"):
                self.take()
                right = self.unary()
                if tok not in ("/", r"\div") and (isinstance(left, MatrixOf) or isinstance(right, MatrixOf)):
                    left = _matrix_mul(left, right)
                    continue
                _need_scalar(left, right)
                if tok in ("/", r"\div"):
                    if right == 0:
                        raise ParseError("division by zero")
                    left = safe_mul(left, sympy.Pow(right, -1))
                else:
                    left = safe_mul(left, right)
            elif self._starts_atom(tok):
                mixed = first and int_literal and tok == r"\frac"
                right = self.power()
                if isinstance(left, MatrixOf) or isinstance(right, MatrixOf):
                    left = _matrix_mul(left, right)
                    first = False
                    continue
                _need_scalar(left, right)
                if mixed and right.is_Rational and 0 < right < 1 and left.is_Integer:
                    # 2\frac{1}{3} is the mixed number 7/3 and -2\frac{1}{3} is -7/3
                    left = left + right if left >= 0 else left - right
                else:
                    left = safe_mul(left, right)
            else:
                return left
            first = False

    def unary(self):
        tok = self.peek()
        if tok in ("-", "+"):
            negative = False
            while self.peek() in ("-", "+"):  # "------3": a run of signs, read without recursion
                negative ^= self.take() == "-"
            v = self.unary()
            if isinstance(v, MatrixOf) and negative:
                return _matrix_mul(sympy.Integer(-1), v)
            _need_scalar(v)
            return -v if negative else v
        if tok in (r"\pm", r"\mp"):
            self.take()
            v = self.unary()
            _need_scalar(v)
            return (PM if tok == r"\pm" else -PM) * v
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek() == "^":
            self.take()
            self.enter()
            exp = self.group() if self.peek() == "{" else self.unary()
            self.depth -= 1
            _need_scalar(base, exp)
            base = safe_pow(base, exp)
        if self.deepest > MAX_INEXACT_DEPTH and isinstance(base, sympy.Basic) and not base.is_Rational:
            # refused where it is built: sympy's work on deep irrational nests (sin(sin(...))) grows fast
            raise TooBig("deep nesting with a value that is not an exact rational")
        return base

    def postfix(self):
        value = self.atom()
        while self.peek() == "!":
            self.take()
            _need_scalar(value)
            if value.is_Integer:
                if value < 0 or value > MAX_FACTORIAL_ARG:
                    raise TooBig("factorial argument out of range")
                value = sympy.factorial(value)
            elif value.is_Number:
                raise ParseError("factorial of a non-integer")
            else:
                value = sympy.factorial(value)
        return value

    def group(self):
        """'{' top '}'"""
        self.expect("{")
        self.enter()
        inner = self.top(closers=("}",))
        self.expect("}")
        self.depth -= 1
        return inner

    def arg(self):
        """A LaTeX macro argument: a {group}, or a single token (only the first digit of a number)."""
        tok = self.peek()
        if tok == "{":
            return self.group()
        if tok is not None and tok[0].isdigit() and len(tok) > 1:
            self.toks[self.i] = tok[1:]
            return sympy.Integer(int(tok[0]))
        return self.atom()

    def atom(self):
        tok = self.take()
        while tok in _IGNORED:
            tok = self.take()
        if tok[0].isdigit() or tok[0] == ".":
            value = _number(tok)
            if "." in tok and "e" not in tok.lower():
                self.decimals[value] = len(tok.partition(".")[2])
            return value
        if tok.isalpha():
            return self._symbol(tok)
        if tok == "{":
            self.i -= 1
            return self.group()
        if tok in ("(", "["):
            self.enter()
            inner = self.top(closers=(")", "]"))
            close = self.take()
            if close not in (")", "]"):
                raise ParseError("unbalanced bracket")
            self.depth -= 1
            items = inner.items if isinstance(inner, AnswerList) else (inner,)
            if len(items) == 1 and (tok, close) in (("(", ")"), ("[", "]")):
                return inner
            return Bracketed(tuple(items), tok, close)
        if tok == r"\{":
            self.enter()
            if self.peek() == r"\}":
                self.take()
                self.depth -= 1
                return SetOf(())
            inner = self.top(closers=(r"\}",))
            self.expect(r"\}")
            self.depth -= 1
            return SetOf(inner.items if isinstance(inner, AnswerList) else (inner,))
        if tok == "|":
            self.enter()
            inner = self.expr()
            self.expect("|")
            self.depth -= 1
            return sympy.Abs(inner)
        if tok in (r"\lfloor", r"\lceil"):
            self.enter()
            inner = self.expr()
            self.expect(r"\rfloor" if tok == r"\lfloor" else r"\rceil")
            self.depth -= 1
            return sympy.floor(inner) if tok == r"\lfloor" else sympy.ceiling(inner)
        if tok.startswith("\\"):
            return self._command(tok[1:])
        raise ParseError(f"unexpected {tok!r}")

    def _symbol(self, name: str):
        if name in _FUNCTION_LETTERS and self.peek() == "(":
            self.take()
            self.enter()
            inner = self.top(closers=(")",))
            self.expect(")")
            self.depth -= 1
            args = inner.items if isinstance(inner, AnswerList) else (inner,)
            if not all(isinstance(a, sympy.Basic) for a in args):
                raise ParseError("unsupported function argument")
            return sympy.Symbol(f"{name}({','.join(sympy.sstr(a) for a in args)})")
        if name == "e":
            return sympy.E
        if name == "i" and self.peek() != "_":
            return sympy.I
        if self.peek() == "_":  # subscripted symbol: x_1, a_{n}
            self.take()
            sub = self.take()
            if sub == "{":
                parts = []
                while self.peek() not in ("}", None):
                    parts.append(self.take())
                self.expect("}")
                sub = "".join(parts)
            if not re.fullmatch(r"[A-Za-z0-9]{1,8}", sub):
                raise ParseError("unsupported subscript")
            name = f"{name}_{sub}"
        return sympy.Symbol(name)

    def _command(self, name: str):
        if name == "frac":
            self.enter()
            num, den = self.arg(), self.arg()
            self.depth -= 1
            _need_scalar(num, den)
            if den == 0:
                raise ParseError("division by zero")
            return safe_mul(num, sympy.Pow(den, -1))
        if name == "sqrt":
            index = None
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.expect("]")
            self.enter()
            radicand = self.arg()
            self.depth -= 1
            _need_scalar(radicand)
            if index is None:
                return sympy.sqrt(radicand)
            _need_scalar(index)
            if index == 0:
                raise ParseError("zeroth root")
            return safe_pow(radicand, sympy.Pow(index, -1))
        if name == "binom":
            n, k = self.arg(), self.arg()
            _need_scalar(n, k)
            if n.is_Integer and k.is_Integer and 0 <= k <= n:
                log10 = (math.lgamma(int(n) + 1) - math.lgamma(int(k) + 1) - math.lgamma(int(n - k) + 1)) / math.log(10)
                if abs(int(n)) > 10 * MAX_RESULT_DIGITS or log10 > MAX_BINOMIAL_DIGITS:
                    raise TooBig("binomial too large")
            elif n.is_Number and abs(n) > 10 * MAX_RESULT_DIGITS:
                raise TooBig("binomial too large")
            return sympy.binomial(n, k)
        if name in _CONSTANTS:
            return _CONSTANTS[name]
        if name in ("emptyset", "varnothing"):
            return SetOf(())
        if name in _GREEK:
            return sympy.Symbol(name.replace("var", ""))
        if name == "log" and self.peek() == "_":
            self.take()
            self.enter()
            base = self.arg()
            self.depth -= 1
            arg = self._func_arg()
            _need_scalar(base, arg)
            return sympy.log(arg, base)
        if name in _FUNCS:
            power = None
            if self.peek() == "^":  # \sin^2 x
                self.take()
                power = self.arg()
            arg = self._func_arg()
            _need_scalar(arg)
            value = check_tower(_FUNCS[name](arg))
            return safe_pow(value, power) if power is not None else value
        if name == "begin":
            return self._environment()
        raise ParseError(f"unsupported command \\{name}")

    def _func_arg(self):
        self.enter()
        if self.peek() in ("(", "{"):
            value = self.atom()
        else:  # \sin 2x: the argument is the following implicit product
            value = self.power()
            while (
                self._starts_atom(self.peek())
                and self.peek() not in ("(",)
                and not (self.peek().startswith("\\") and self.peek()[1:] in _FUNCS)
            ):
                value = safe_mul(value, self.power())
        self.depth -= 1
        return value

    def _environment(self):
        self.expect("{")
        env = "".join(iter(lambda: self.take() if self.peek() != "}" else None, None))
        self.expect("}")
        if env not in _MATRIX_ENVS:
            raise ParseError(f"unsupported environment {env}")
        if env == "array" and self.peek() == "{":  # column spec
            while self.take() != "}":
                pass
        self.enter()
        rows, row = [], []
        while True:
            while self.peek() == r"\hline":
                self.take()
            if self.peek() == r"\end":
                break
            row.append(self.expr())
            if len(rows) * max(1, len(row)) > MAX_MATRIX_CELLS:
                raise TooBig("matrix too large")
            tok = self.take()
            if tok == "&":
                continue
            if tok == r"\\":
                rows.append(tuple(row))
                row = []
                continue
            if tok == r"\end":
                self.i -= 1
                break
            raise ParseError(f"unexpected {tok!r} in matrix")
        if row:
            rows.append(tuple(row))
        self.take()
        self.expect("{")
        while self.take() != "}":
            pass
        self.depth -= 1
        if not rows or len({len(r) for r in rows}) != 1:
            raise ParseError("ragged or empty matrix")
        return MatrixOf(tuple(rows))


def _big_int(digits: str) -> int:
    """int(digits) in O(n^1.6) by halving (CPython's int(str) is quadratic and capped at 4300 digits)."""
    if len(digits) <= 3000:
        return int(digits)
    half = len(digits) // 2
    return _big_int(digits[:-half]) * 10**half + _big_int(digits[-half:])


def _number(tok: str):
    if len(tok) > MAX_RESULT_DIGITS:
        raise TooBig("number literal too long")
    mantissa, _, exponent = tok.replace("E", "e").partition("e")
    # Exact decimal from integers (no string parsing by sympy): "12.50" -> 1250 / 100.
    whole, _, frac = mantissa.partition(".")
    value = sympy.Rational(_big_int((whole or "0") + frac), 10 ** len(frac))
    if exponent:
        if abs(int(exponent)) > MAX_RESULT_DIGITS:
            raise TooBig("scientific exponent too large")
        value = value * sympy.Integer(10) ** int(exponent)
    return value


def _remove_points(interval, points) -> list:
    if not (isinstance(interval, Bracketed) and len(interval.items) == 2 and isinstance(points, SetOf)):
        raise ParseError("unsupported set difference")
    lo, hi = interval.items
    cuts = sorted(set(points.items), key=lambda p: float(p) if p.is_real and p.is_number else math.inf)
    if not all(isinstance(p, sympy.Basic) and p.is_number and p.is_real and bool(lo < p < hi) for p in cuts):
        raise ParseError("unsupported set difference")
    pieces, left, start = [], interval.left, lo
    for p in cuts:
        pieces.append(Bracketed((start, p), left, ")"))
        left, start = "(", p
    pieces.append(Bracketed((start, hi), left, interval.right))
    return pieces


def _matrix_add(a: MatrixOf, b: MatrixOf, sign: int) -> MatrixOf:
    if len(a.rows) != len(b.rows) or len(a.rows[0]) != len(b.rows[0]):
        raise ParseError("adding matrices of different shapes")
    return MatrixOf(tuple(tuple(x + sign * y for x, y in zip(ra, rb)) for ra, rb in zip(a.rows, b.rows)))


def _matrix_mul(a, b) -> MatrixOf:
    """scalar * matrix, matrix * scalar or a matrix product (shapes checked, size bounded)."""
    if isinstance(a, sympy.Basic) and isinstance(b, MatrixOf):
        return MatrixOf(tuple(tuple(safe_mul(a, y) for y in row) for row in b.rows))
    if isinstance(a, MatrixOf) and isinstance(b, sympy.Basic):
        return MatrixOf(tuple(tuple(safe_mul(x, b) for x in row) for row in a.rows))
    if isinstance(a, MatrixOf) and isinstance(b, MatrixOf):
        n, k, m = len(a.rows), len(a.rows[0]), len(b.rows[0])
        if k != len(b.rows) or n * k * m > 8 * MAX_MATRIX_CELLS:
            raise ParseError("matrix product of incompatible or too large shapes")
        return MatrixOf(tuple(
            tuple(sympy.Add(*[safe_mul(a.rows[i][t], b.rows[t][j]) for t in range(k)]) for j in range(m))
            for i in range(n)
        ))
    raise ParseError("arithmetic on a non-scalar (tuple, set, relation)")


def _need_scalar(*values) -> None:
    for v in values:
        if not isinstance(v, sympy.Basic):
            raise ParseError("arithmetic on a non-scalar (tuple, set, relation)")


def parse_math(text: str):
    """Parse normalized answer text into a sympy expression or one of the container types above.

    Raises ParseError / TooBig on anything outside the grammar or the size bounds.
    """
    return parse_with_decimals(text)[0]


def parse_with_decimals(text: str):
    """(parsed value, {|value|: decimal places} of the decimal literals written in ``text``)."""
    parser = _Parser(text)
    limit = sys.getrecursionlimit()
    if limit < 6000:  # MAX_DEPTH nested groups need ~12 frames each; Python 3.11 frames are cheap
        sys.setrecursionlimit(6000)
    try:
        value = parser.parse()
    finally:
        if limit < 6000:
            sys.setrecursionlimit(limit)
    if parser.deepest > MAX_INEXACT_DEPTH and not _exact_rational(value):
        raise TooBig("deep nesting with a value that is not an exact rational")
    return value, parser.decimals


def _exact_rational(value) -> bool:
    """Every scalar in ``value`` (a sympy number or a container of them) is a Rational."""
    if isinstance(value, sympy.Basic):
        return bool(value.is_Rational)
    if isinstance(value, (Bracketed, SetOf, AnswerList, UnionOf)):
        return all(_exact_rational(v) for v in value.items)
    if isinstance(value, MatrixOf):
        return all(_exact_rational(v) for row in value.rows for v in row)
    if isinstance(value, Relation):
        return all(_exact_rational(t) for t in value.terms)
    return False
