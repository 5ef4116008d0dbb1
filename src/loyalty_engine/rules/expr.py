"""The condition language: a small, safe expression grammar, parsed (never ``eval``-ed), type-checked
against the variable registry and compiled to bytecode that ``_core.run_expr`` executes.

Grammar (lowest binding first)::

    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := sum [("==" | "!=" | "<" | "<=" | ">" | ">=") sum | ["not"] "in" (list | name)]
    sum     := term (("+" | "-") term)*
    term    := unary (("*" | "/" | "%") unary)*
    unary   := "-" unary | atom
    atom    := INT | STRING | "true" | "false" | name | name "(" args ")" | "(" or ")"
    list    := "(" literal ("," literal)* [","] ")"  |  "[" ... "]"

Values are 64-bit integers; booleans are 0 and 1. ``/`` divides and rounds down, and a division by
zero gives 0 (a member with no history has ``avg_basket == 0``; a condition must not crash a batch).
Names (tiers, branches, channels, categories, SKUs, weekdays) are symbols: ``tier in ("silver",
"gold")`` compares symbol numbers assigned when the program is compiled, so no string is touched per
row. A name the program never mentions (a branch opened later) is the symbol 0, "other".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from ..errors import ConfigError

__all__ = ["Op", "Var", "Symbols", "parse", "compile_expr", "evaluate", "Compiled", "VARIABLES",
           "WEEKDAYS"]

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_STACK = 32
INT_LIMIT = 1 << 62


class Op:
    """Bytecode operations; each instruction is two int64 words: (op, arg)."""

    CONST = 1     # push arg
    VAR = 2       # push facts[arg]
    ADD = 3
    SUB = 4
    MUL = 5
    DIV = 6       # floor division, x / 0 == 0
    MOD = 7       # floor modulo, x % 0 == 0
    NEG = 8
    EQ = 9
    NE = 10
    LT = 11
    LE = 12
    GT = 13
    GE = 14
    NOT = 15
    JFALSE = 16   # if top == 0: jump to arg (keep top) else pop   ("and")
    JTRUE = 17    # if top != 0: jump to arg (keep top) else pop   ("or")
    IN = 18       # pop x; push x in pool[arg + 1: arg + 1 + pool[arg]]
    BIT = 19      # pop mask; push (mask >> arg) & 1
    MIN = 20
    MAX = 21
    ABS = 22
    RANGES = 23   # pop day; push day in any [pool[arg+1+2i], pool[arg+2+2i]] for i < pool[arg]
    CATAMT = 24   # push the basket's amount in category arg
    SKUAMT = 25   # push the basket's amount of SKU arg
    BOOL = 26     # pop x; push x != 0


@dataclass(frozen=True, slots=True)
class Var:
    """One variable a condition may read: its slot in the facts vector, its type and meaning."""

    name: str
    slot: int
    type: str      # "int" | "bool" | "sym" | "set"
    kind: str = ""  # for sym/set: "tier", "branch", "channel", "category", "sku", "weekday"
    doc: str = ""


def _vars(*specs: tuple[str, str, str, str]) -> dict[str, Var]:
    return {name: Var(name, i, t, k, d) for i, (name, t, k, d) in enumerate(specs)}


#: The variable registry. The slot is the position in the facts vector the kernel fills per row.
VARIABLES: dict[str, Var] = _vars(
    # the purchase
    ("amount", "int", "", "basket total, in the currency's minor unit"),
    ("quantity", "int", "", "number of items in the basket"),
    ("hour", "int", "", "hour of the day, 0-23, in the program's timezone"),
    ("weekday", "sym", "weekday", "day of the week: \"mon\" ... \"sun\""),
    ("date", "int", "", "the day, comparable with date(\"2026-05-10\")"),
    ("month", "int", "", "month of the year, 1-12"),
    ("day_of_month", "int", "", "day of the month, 1-31"),
    ("branch", "sym", "branch", "the branch (store) of the purchase"),
    ("channel", "sym", "channel", "the sales channel (\"pos\", \"web\", \"app\" ...)"),
    ("categories", "set", "category", "the categories of the basket's items"),
    ("skus", "set", "sku", "the SKUs of the basket's items"),
    ("is_first_purchase", "bool", "", "the member's first purchase ever"),
    # the member just before the purchase
    ("days_since_last", "int", "", "days since the previous purchase (-1 if none)"),
    ("visits_30d", "int", "", "purchases in the 30 days before this one"),
    ("visits_90d", "int", "", "purchases in the 90 days before this one"),
    ("visits_365d", "int", "", "purchases in the 365 days before this one"),
    ("spend_30d", "int", "", "amount spent in the 30 days before this one"),
    ("spend_90d", "int", "", "amount spent in the 90 days before this one"),
    ("spend_365d", "int", "", "amount spent in the 365 days before this one"),
    ("avg_basket", "int", "", "average basket over the 365 days before (0 if none)"),
    ("avg_gap_days", "int", "", "average days between purchases over the 365 days before (0 if < 2)"),
    ("tier", "sym", "tier", "the member's tier before the purchase"),
    ("points_balance", "int", "", "the member's available points"),
    ("credit_balance", "int", "", "the member's available store credit"),
    ("days_to_birthday", "int", "", "days until the next birthday, 0 on the day (-1 if unknown)"),
    ("member_days", "int", "", "days since enrolment"),
    ("referred", "bool", "", "the member was referred by another member"),
)
N_VARS = len(VARIABLES)
WINDOWS = (30, 90, 365)

FUNCTIONS = {"min": 2, "max": 2, "abs": 1, "date": 1, "occasion": 1, "category_amount": 1,
             "sku_amount": 1}


@dataclass
class Symbols:
    """The program's symbol tables: name -> number per kind (0 is "other", never named)."""

    tables: dict[str, dict[str, int]] = field(default_factory=lambda: {
        "tier": {}, "branch": {}, "channel": {}, "category": {}, "sku": {},
        "weekday": {w: i for i, w in enumerate(WEEKDAYS)}})
    occasions: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    #: fixed kinds: a name not in the table is an error, not "other"
    closed: frozenset[str] = frozenset({"tier", "weekday"})

    def number(self, kind: str, name: str, where: str) -> int:
        table = self.tables[kind]
        if name not in table:
            if kind in self.closed:
                raise ConfigError(f"{where}: {name!r} is not a {kind}; the {kind}s are "
                                  f"{', '.join(repr(k) for k in table)}")
            if kind in ("category", "sku") and len(table) >= 63:
                raise ConfigError(f"{where}: a program names at most 63 {kind} values in conditions")
            table[name] = len(table) + 1
        return table[name]


# -- parsing -----------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""\s*(?:(?P<int>\d[\d_]*)|(?P<name>[A-Za-z_][A-Za-z_0-9]*)|(?P<str>"[^"]*"|'[^']*')
                       |(?P<op>==|!=|<=|>=|[-+*/%<>(),\[\]]))""", re.X)


@dataclass(frozen=True, slots=True)
class Node:
    kind: str          # int, str, bool, name, call, unary, binary, compare, in, and, or, not, list
    value: Any = None
    args: tuple[Node, ...] = ()
    pos: int = 0


def _tokens(src: str, where: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    pos = 0
    src = src.rstrip()
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if m is None or m.end() == pos:
            raise ConfigError(f"{where}: cannot read {src[pos:].strip()[:20]!r} at column {pos + 1} of {src!r}")
        kind = m.lastgroup or ""
        text = m.group(kind)
        out.append((kind, text, m.start(kind)))
        pos = m.end()
    out.append(("end", "", len(src)))
    return out


class _Parser:
    def __init__(self, src: str, where: str) -> None:
        self.src, self.where = src, where
        self.toks = _tokens(src, where)
        self.i = 0

    def error(self, msg: str, pos: int | None = None) -> ConfigError:
        p = self.toks[self.i][2] if pos is None else pos
        return ConfigError(f"{self.where}: {msg} at column {p + 1} of {self.src!r}")

    def peek(self) -> tuple[str, str, int]:
        return self.toks[self.i]

    def take(self, text: str | None = None) -> tuple[str, str, int]:
        tok = self.toks[self.i]
        if text is not None and tok[1] != text:
            found = tok[1] or "the end"
            raise self.error(f"expected {text!r}, found {found!r}")
        self.i += 1
        return tok

    def at(self, *texts: str) -> bool:
        kind, text, _ = self.toks[self.i]
        return kind in ("op", "name") and text in texts

    def parse(self) -> Node:
        node = self.or_()
        if self.peek()[0] != "end":
            raise self.error(f"unexpected {self.peek()[1]!r}")
        return node

    def or_(self) -> Node:
        node = self.and_()
        while self.at("or"):
            pos = self.take()[2]
            node = Node("or", args=(node, self.and_()), pos=pos)
        return node

    def and_(self) -> Node:
        node = self.not_()
        while self.at("and"):
            pos = self.take()[2]
            node = Node("and", args=(node, self.not_()), pos=pos)
        return node

    def not_(self) -> Node:
        if self.at("not"):
            pos = self.take()[2]
            return Node("not", args=(self.not_(),), pos=pos)
        return self.compare()

    def compare(self) -> Node:
        left = self.sum()
        if self.at("==", "!=", "<", "<=", ">", ">="):
            _, op, pos = self.take()
            return Node("compare", op, (left, self.sum()), pos)
        negate = False
        if self.at("not") and self.toks[self.i + 1][1] == "in":
            self.take()
            negate = True
        if self.at("in"):
            pos = self.take()[2]
            right = self.list_() if self.at("(", "[") else self.atom()
            node = Node("in", None, (left, right), pos)
            return Node("not", args=(node,), pos=pos) if negate else node
        return left

    def sum(self) -> Node:
        node = self.term()
        while self.at("+", "-"):
            _, op, pos = self.take()
            node = Node("binary", op, (node, self.term()), pos)
        return node

    def term(self) -> Node:
        node = self.unary()
        while self.at("*", "/", "%"):
            _, op, pos = self.take()
            node = Node("binary", op, (node, self.unary()), pos)
        return node

    def unary(self) -> Node:
        if self.at("-"):
            pos = self.take()[2]
            inner = self.unary()
            if inner.kind == "int":
                return Node("int", -inner.value, pos=pos)
            return Node("unary", "-", (inner,), pos)
        return self.atom()

    def list_(self) -> Node:
        _, opener, pos = self.take()
        closer = ")" if opener == "(" else "]"
        items: list[Node] = []
        while not self.at(closer):
            item = self.unary()
            if item.kind not in ("int", "str", "bool"):
                raise self.error("a list after 'in' holds only literal numbers and strings", item.pos)
            items.append(item)
            if not self.at(closer):
                self.take(",")
        self.take(closer)
        if not items:
            raise self.error("an empty list after 'in'", pos)
        return Node("list", None, tuple(items), pos)

    def atom(self) -> Node:
        kind, text, pos = self.take()
        if kind == "int":
            value = int(text.replace("_", ""))
            if value >= INT_LIMIT:
                raise self.error(f"the number {text} is too large", pos)
            return Node("int", value, pos=pos)
        if kind == "str":
            return Node("str", text[1:-1], pos=pos)
        if kind == "name":
            if text in ("true", "false"):
                return Node("bool", int(text == "true"), pos=pos)
            if text in ("and", "or", "not", "in"):
                raise self.error(f"unexpected {text!r}", pos)
            if self.at("("):
                self.take("(")
                args: list[Node] = []
                while not self.at(")"):
                    args.append(self.or_())
                    if not self.at(")"):
                        self.take(",")
                self.take(")")
                return Node("call", text, tuple(args), pos)
            return Node("name", text, pos=pos)
        if text == "(":
            node = self.or_()
            self.take(")")
            return node
        raise self.error(f"unexpected {text or 'end of condition'!r}", pos)


def parse(src: str, where: str = "condition") -> Node:
    """Parse ``src`` into a syntax tree (a :class:`ConfigError` names the column of a mistake)."""
    if not isinstance(src, str):
        raise ConfigError(f"{where}: a condition is a string, not {type(src).__name__} {src!r}")
    if not src.strip():
        raise ConfigError(f"{where}: the condition is empty")
    return _Parser(src, where).parse()


# -- checking and compiling -----------------------------------------------------------------------------

@dataclass
class Compiled:
    """Bytecode of one condition or value: ``code`` is a flat list of (op, arg) words."""

    code: list[int]
    type: str
    source: str
    variables: tuple[str, ...]


class _Compiler:
    def __init__(self, src: str, where: str, symbols: Symbols, pool: list[int]) -> None:
        self.src, self.where, self.symbols, self.pool = src, where, symbols, pool
        self.code: list[int] = []
        self.depth = 0
        self.max_depth = 0
        self.used: list[str] = []

    def error(self, msg: str, node: Node) -> ConfigError:
        return ConfigError(f"{self.where}: {msg} at column {node.pos + 1} of {self.src!r}")

    def emit(self, op: int, arg: int = 0, push: int = 0) -> int:
        self.code += (op, arg)
        self.depth += push
        self.max_depth = max(self.max_depth, self.depth)
        return len(self.code) - 1  # where the arg lives (for jump patching)

    def var(self, node: Node) -> Var:
        v = VARIABLES.get(node.value)
        if v is None:
            near = [n for n in VARIABLES if n.startswith(node.value[:3])]
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise self.error(f"unknown variable {node.value!r}{hint}; the variables are listed in "
                             f"docs/rules.md", node)
        if v.name not in self.used:
            self.used.append(v.name)
        return v

    def type_of_str(self, node: Node, kind: str) -> int:
        return self.symbols.number(kind, node.value, f"{self.where}: {self.src!r}")

    def value(self, node: Node) -> str:
        """Compile ``node``; returns its type: int, bool or sym:<kind>."""
        k = node.kind
        if k == "int":
            self.emit(Op.CONST, node.value, 1)
            return "int"
        if k == "bool":
            self.emit(Op.CONST, node.value, 1)
            return "bool"
        if k == "str":
            raise self.error(f"the string {node.value!r} can only be compared with a name variable "
                             f"(tier, branch, channel, weekday) or tested with 'in'", node)
        if k == "name":
            v = self.var(node)
            if v.type == "set":
                raise self.error(f"{v.name!r} is a set; test it with '\"name\" in {v.name}'", node)
            self.emit(Op.VAR, v.slot, 1)
            return f"sym:{v.kind}" if v.type == "sym" else v.type
        if k == "unary":
            self.expect_int(node.args[0])
            self.emit(Op.NEG)
            return "int"
        if k == "binary":
            self.expect_int(node.args[0])
            self.expect_int(node.args[1])
            self.emit({"+": Op.ADD, "-": Op.SUB, "*": Op.MUL, "/": Op.DIV, "%": Op.MOD}[node.value], 0, -1)
            return "int"
        if k == "not":
            self.expect_bool(node.args[0])
            self.emit(Op.NOT)
            return "bool"
        if k in ("and", "or"):
            self.expect_bool(node.args[0])
            at = self.emit(Op.JFALSE if k == "and" else Op.JTRUE, 0, -1)
            self.expect_bool(node.args[1])
            self.code[at] = len(self.code)
            # after the jump target the stack holds exactly one value either way
            return "bool"
        if k == "compare":
            return self.compare(node)
        if k == "in":
            return self.in_(node)
        if k == "call":
            return self.call(node)
        raise self.error("a list can only follow 'in'", node)

    def expect_int(self, node: Node) -> None:
        t = self.value(node)
        if t != "int":
            raise self.error(f"arithmetic needs a number, this is a {t.replace('sym:', '')}", node)

    def expect_bool(self, node: Node) -> None:
        t = self.value(node)
        if t == "int":
            raise self.error("'and', 'or' and 'not' need a condition, this is a number (compare it)", node)
        if t != "bool":
            raise self.error(f"'and', 'or' and 'not' need a condition, this is a {t.replace('sym:', '')}", node)

    def compare(self, node: Node) -> str:
        left, right = node.args
        op = {"==": Op.EQ, "!=": Op.NE, "<": Op.LT, "<=": Op.LE, ">": Op.GT, ">=": Op.GE}[node.value]
        if right.kind == "str" or left.kind == "str":
            name, lit = (left, right) if right.kind == "str" else (right, left)
            t = self.value(name)
            if not t.startswith("sym:"):
                raise self.error(f"a string compares only with a name variable, not a {t}", name)
            if op not in (Op.EQ, Op.NE) and t != "sym:tier":
                raise self.error("names compare only with == and != (tiers also with < and >)", node)
            if name is right:  # keep the written order for < and >
                self.code[-2:] = []
                self.depth -= 1
                self.emit(Op.CONST, self.type_of_str(lit, t[4:]), 1)
                self.value(name)
                self.emit(op, 0, -1)
                return "bool"
            self.emit(Op.CONST, self.type_of_str(lit, t[4:]), 1)
            self.emit(op, 0, -1)
            return "bool"
        lt = self.value(left)
        rt = self.value(right)
        if lt != rt and not {lt, rt} <= {"int", "bool"}:
            raise self.error(f"cannot compare a {lt.replace('sym:', '')} with a {rt.replace('sym:', '')}", node)
        if lt.startswith("sym:") and lt != "sym:tier" and op not in (Op.EQ, Op.NE):
            raise self.error("names compare only with == and !=", node)
        self.emit(op, 0, -1)
        return "bool"

    def in_(self, node: Node) -> str:
        left, right = node.args
        if right.kind == "name":
            v = self.var(right)
            if v.type != "set":
                raise self.error(f"'in {v.name}' needs a set variable (categories, skus); compare with ==",
                                 right)
            if left.kind != "str":
                raise self.error(f"'... in {v.name}' takes a literal name on the left", left)
            bit = self.type_of_str(left, v.kind)
            self.emit(Op.VAR, v.slot, 1)
            self.emit(Op.BIT, bit)
            return "bool"
        if right.kind != "list":
            raise self.error("'in' takes a literal list like (\"silver\", \"gold\") or a set variable", right)
        t = self.value(left)
        values: list[int] = []
        for item in right.args:
            if t.startswith("sym:"):
                if item.kind != "str":
                    raise self.error(f"a list of {t[4:]} names holds strings", item)
                values.append(self.type_of_str(item, t[4:]))
            else:
                if item.kind == "str":
                    raise self.error(f"a list tested against a {t} holds numbers", item)
                values.append(int(item.value))
        off = len(self.pool)
        self.pool += [len(values), *values]
        self.emit(Op.IN, off)
        return "bool"

    def call(self, node: Node) -> str:
        fn, args = node.value, node.args
        if fn not in FUNCTIONS:
            raise self.error(f"unknown function {fn!r}; the functions are {', '.join(FUNCTIONS)}", node)
        if len(args) != FUNCTIONS[fn]:
            raise self.error(f"{fn}() takes {FUNCTIONS[fn]} argument(s), not {len(args)}", node)
        if fn in ("min", "max"):
            self.expect_int(args[0])
            self.expect_int(args[1])
            self.emit(Op.MIN if fn == "min" else Op.MAX, 0, -1)
            return "int"
        if fn == "abs":
            self.expect_int(args[0])
            self.emit(Op.ABS)
            return "int"
        arg = args[0]
        if arg.kind != "str":
            raise self.error(f"{fn}() takes a literal string", arg)
        if fn == "date":
            try:
                d = date.fromisoformat(arg.value)
            except ValueError:
                raise self.error(f"date() takes YYYY-MM-DD, not {arg.value!r}", arg) from None
            self.emit(Op.CONST, d.toordinal() - EPOCH_ORDINAL, 1)
            return "int"
        if fn == "occasion":
            ranges = self.symbols.occasions.get(arg.value)
            if ranges is None:
                known = ", ".join(self.symbols.occasions) or "none defined"
                raise self.error(f"unknown occasion {arg.value!r} (occasions: {known})", arg)
            off = len(self.pool)
            self.pool.append(len(ranges))
            for lo, hi in ranges:
                self.pool += [lo, hi]
            self.emit(Op.VAR, VARIABLES["date"].slot, 1)
            self.emit(Op.RANGES, off)
            return "bool"
        kind = "category" if fn == "category_amount" else "sku"
        self.emit(Op.CATAMT if kind == "category" else Op.SKUAMT, self.type_of_str(arg, kind), 1)
        return "int"


EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


def compile_expr(src: str, symbols: Symbols, pool: list[int], *, want: str = "bool",
                 where: str = "condition") -> Compiled:
    """Parse, check and compile ``src``. ``want`` is the type the place needs ("bool" or "int");
    constants for ``in`` lists and occasions go to the shared ``pool``."""
    tree = parse(src, where)
    c = _Compiler(src, where, symbols, pool)
    t = c.value(tree)
    if want == "bool" and t != "bool":
        raise ConfigError(f"{where}: {src!r} is a {t.replace('sym:', '')}, not a condition "
                          f"(compare it, e.g. '{src} > 0')")
    if want == "int" and t != "int":
        raise ConfigError(f"{where}: {src!r} is not a number")
    if c.max_depth > MAX_STACK:
        raise ConfigError(f"{where}: {src!r} nests too deeply (more than {MAX_STACK} pending values)")
    return Compiled(c.code, t, src, tuple(c.used))


# -- predicates: conditions the kernel tests without the stack machine ---------------------------------

#: Kinds of a predicate atom; an atom is five int64 words (kind, op, a, b, c). ``op`` is a comparison
#: (0 ==, 1 !=, 2 <, 3 <=, 4 >, 5 >=) for the comparing kinds and a negation flag (0 or 1) for the others.
A_FACT = 1       # facts[a] op c
A_SCALED = 2     # facts[a] op c * facts[b]
A_CAT = 3        # category_amount(a) op c
A_SKU = 4        # sku_amount(a) op c
A_BIT = 5        # (facts[a] >> c) & 1
A_MASK = 6       # 0 <= facts[a] < 64 and (c >> facts[a]) & 1  (``in`` a list of small numbers)
A_IN = 7         # facts[a] in the pool list at c
A_RANGES = 8     # facts[a] within the pool ranges at c
A_CONST = 9      # c != 0
A_TRUTH = 10     # facts[a] != 0
ATOM_WORDS = 5
_CMP = {Op.EQ: 0, Op.NE: 1, Op.LT: 2, Op.LE: 3, Op.GT: 4, Op.GE: 5}
_FLIP = {0: 0, 1: 1, 2: 4, 3: 5, 4: 2, 5: 3}        # c op x  ==  x flip(op) c
_NEGATE = {0: 1, 1: 0, 2: 5, 3: 4, 4: 3, 5: 2}      # not (x op c)  ==  x negate(op) c


def _atom(seg: list[tuple[int, int]], pool: list[int]) -> list[int] | None:
    """The atom one segment of bytecode computes (its truth, as the stack machine's), or None."""
    if len(seg) > 1 and seg[-1][0] == Op.NOT:
        inner = _atom(seg[:-1], pool)
        if inner is None:
            return None
        kind, op = inner[0], inner[1]
        return [kind, _NEGATE[op] if kind in (A_FACT, A_SCALED, A_CAT, A_SKU) else 1 - op, *inner[2:]]
    ops = [o for o, _ in seg]
    args = [a for _, a in seg]
    if ops == [Op.CONST]:
        return [A_CONST, 0, 0, 0, args[0]]
    if ops == [Op.VAR]:
        return [A_TRUTH, 0, args[0], 0, 0]
    if len(ops) == 2 and ops[0] == Op.VAR:
        if ops[1] == Op.BIT:
            return [A_BIT, 0, args[0], 0, args[1]]
        if ops[1] == Op.RANGES:
            return [A_RANGES, 0, args[0], 0, args[1]]
        if ops[1] == Op.IN:
            values = pool[args[1] + 1: args[1] + 1 + pool[args[1]]]
            if all(0 <= v < 64 for v in values):
                mask = sum(1 << v for v in set(values))
                return [A_MASK, 0, args[0], 0, mask - (1 << 64) if mask >= 1 << 63 else mask]
            return [A_IN, 0, args[0], 0, args[1]]
    if len(ops) == 3 and ops[2] in _CMP:
        cmp = _CMP[ops[2]]
        (o1, a1), (o2, a2) = seg[0], seg[1]
        if o2 == Op.CONST and o1 in (Op.VAR, Op.CATAMT, Op.SKUAMT):
            return [{Op.VAR: A_FACT, Op.CATAMT: A_CAT, Op.SKUAMT: A_SKU}[o1], cmp, a1, 0, a2]
        if o1 == Op.CONST and o2 in (Op.VAR, Op.CATAMT, Op.SKUAMT):
            return [{Op.VAR: A_FACT, Op.CATAMT: A_CAT, Op.SKUAMT: A_SKU}[o2], _FLIP[cmp], a2, 0, a1]
        if o1 == Op.VAR and o2 == Op.VAR:
            return [A_SCALED, cmp, a1, a2, 1]
    if len(ops) == 5 and ops[0] == Op.VAR and ops[3] == Op.MUL and ops[4] in _CMP:
        cmp = _CMP[ops[4]]
        if ops[1] == Op.CONST and ops[2] == Op.VAR:
            return [A_SCALED, cmp, args[0], args[2], args[1]]
        if ops[1] == Op.VAR and ops[2] == Op.CONST:
            return [A_SCALED, cmp, args[0], args[1], args[2]]
    return None


def predicate(code: list[int], start: int, end: int, pool: list[int]) -> tuple[int, list[int]] | None:
    """A condition ``code[start:end]`` (jump targets absolute) as a predicate: (1, atoms) when it is
    true exactly when all its atoms are, (2, atoms) when any is; None when it needs the stack machine.

    A chain of ``and`` (or of ``or``) compiles to segments joined by JFALSE (JTRUE) jumps whose targets
    are the end or another jump of the chain, so segment k runs exactly when every earlier one was true
    (false) and the chain's value is the last segment's, or the value that stopped it."""
    words = [(int(code[k]), int(code[k + 1])) for k in range(start, end, 2)]
    jumps = {o for o, _ in words if o in (Op.JFALSE, Op.JTRUE)}
    if len(jumps) > 1:
        return None
    jump = jumps.pop() if jumps else Op.JFALSE
    at = [start + 2 * k for k, (o, _) in enumerate(words) if o == jump]
    if any(words[(p - start) // 2][1] not in (end, *at) for p in at):
        return None
    atoms: list[int] = []
    seg: list[tuple[int, int]] = []
    for o, a in [*words, (jump, end)]:
        if o == jump:
            atom = _atom(seg, pool)
            if atom is None:
                return None
            atoms += atom
            seg = []
        else:
            seg.append((o, a))
    return (1 if jump == Op.JFALSE else 2), atoms


# -- a reference interpreter (the test oracle and the pure-Python peer) ----------------------------------

def _floordiv(a: int, b: int) -> int:
    return 0 if b == 0 else a // b


def _mod(a: int, b: int) -> int:
    return 0 if b == 0 else a % b


def evaluate(code: list[int] | Any, pool: list[int] | Any, facts: Any, cat_amount: Any = None,
             sku_amount: Any = None, start: int = 0, end: int | None = None) -> int:
    """Run bytecode ``code[start:end]`` in Python, instruction by instruction, as the kernel does (for
    tests and the pure-Python peer; jump targets are positions in ``code``)."""
    stack: list[int] = []
    pc = start
    n = len(code) if end is None else end
    while pc < n:
        op, arg = int(code[pc]), int(code[pc + 1])
        pc += 2
        if op == Op.CONST:
            stack.append(arg)
        elif op == Op.VAR:
            stack.append(int(facts[arg]))
        elif op == Op.NEG:
            stack[-1] = -stack[-1]
        elif op == Op.NOT:
            stack[-1] = int(stack[-1] == 0)
        elif op == Op.ABS:
            stack[-1] = abs(stack[-1])
        elif op == Op.BOOL:
            stack[-1] = int(stack[-1] != 0)
        elif op == Op.JFALSE:
            if stack[-1] == 0:
                pc = arg
            else:
                stack.pop()
        elif op == Op.JTRUE:
            if stack[-1] != 0:
                pc = arg
            else:
                stack.pop()
        elif op == Op.IN:
            x = stack.pop()
            k = int(pool[arg])
            stack.append(int(any(int(pool[arg + 1 + i]) == x for i in range(k))))
        elif op == Op.BIT:
            stack[-1] = (stack[-1] >> arg) & 1
        elif op == Op.RANGES:
            d = stack.pop()
            k = int(pool[arg])
            stack.append(int(any(int(pool[arg + 1 + 2 * i]) <= d <= int(pool[arg + 2 + 2 * i])
                                 for i in range(k))))
        elif op == Op.CATAMT:
            stack.append(int(cat_amount[arg]) if cat_amount is not None else 0)
        elif op == Op.SKUAMT:
            stack.append(int(sku_amount[arg]) if sku_amount is not None else 0)
        else:
            b = stack.pop()
            a = stack.pop()
            if op == Op.ADD:
                r = a + b
            elif op == Op.SUB:
                r = a - b
            elif op == Op.MUL:
                r = a * b
            elif op == Op.DIV:
                r = _floordiv(a, b)
            elif op == Op.MOD:
                r = _mod(a, b)
            elif op == Op.EQ:
                r = int(a == b)
            elif op == Op.NE:
                r = int(a != b)
            elif op == Op.LT:
                r = int(a < b)
            elif op == Op.LE:
                r = int(a <= b)
            elif op == Op.GT:
                r = int(a > b)
            elif op == Op.GE:
                r = int(a >= b)
            elif op == Op.MIN:
                r = min(a, b)
            elif op == Op.MAX:
                r = max(a, b)
            else:  # pragma: no cover - the compiler emits no other op
                raise ValueError(f"bad opcode {op}")
            stack.append(r)
    return stack[-1]
