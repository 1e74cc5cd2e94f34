"""A GitHub Actions expression evaluator for the workflow tests: enough of the language to decide,
for a given event, what a workflow's `if:` conditions and `with:` values come to.

Covers what mlci's workflows use: literals, context paths (`github.event.pull_request.head.repo`,
`steps.aws.outputs.aws-access-key-id`), `!`, comparisons, `&&`/`||` (which return an operand, as in
GitHub), parentheses, and the functions `format`, `fromJSON`, `toJSON`, `contains`, `startsWith`,
`endsWith`, `always`, `success`, `failure`, `cancelled`. Semantics follow GitHub's documentation:
a missing property is null, strings compare case-insensitively, falsy is false, 0, -0, "", null.
Anything else (e.g. `hashFiles`, `*`) raises, so a test never silently evaluates what it cannot.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<string>'(?:[^']|'')*')
    | (?P<number>-?(?:0x[0-9a-fA-F]+|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?))
    | (?P<op>==|!=|<=|>=|&&|\|\||[!<>()\[\].,*])
    | (?P<name>[A-Za-z_][A-Za-z0-9_-]*)
    )""", re.VERBOSE)


class ExpressionError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise ExpressionError(f"cannot read {text[pos:]!r} in {text!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        pos = match.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return tokens


def truthy(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, float) and value != value)


def _coerce_number(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip() or 0)
        except ValueError:
            return float("nan")
    return float("nan")


def _equal(a: Any, b: Any) -> bool:
    if type(a) is type(b) or (isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool)
                              and not isinstance(b, bool)):
        if isinstance(a, str):
            return a.lower() == b.lower()
        return a == b
    if isinstance(a, dict | list) or isinstance(b, dict | list):
        return a is b
    return _coerce_number(a) == _coerce_number(b)


def _format(template: str, *args: Any) -> str:
    def one(match: re.Match[str]) -> str:
        text = match.group(0)
        if text in ("{{", "}}"):
            return text[0]
        value = args[int(match.group(1))]
        return "" if value is None else (json.dumps(value) if isinstance(value, dict | list) else str(value))
    return re.sub(r"\{\{|\}\}|\{(\d+)\}", one, template)


class _Parser:
    def __init__(self, text: str, context: dict[str, Any], status: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.pos = 0
        self.context = {k.lower(): v for k, v in context.items()}
        self.status = status

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (value is not None and token[1] != value):
            raise ExpressionError(f"expected {value or 'more'} in {self.text!r}")
        self.pos += 1
        return token

    def parse(self) -> Any:
        value = self.or_()
        if self.peek() is not None:
            raise ExpressionError(f"unexpected {self.peek()[1]!r} in {self.text!r}")
        return value

    def or_(self) -> Any:
        value = self.and_()
        while self.peek() == ("op", "||"):
            self.take()
            right = self.and_()
            value = value if truthy(value) else right
        return value

    def and_(self) -> Any:
        value = self.compare()
        while self.peek() == ("op", "&&"):
            self.take()
            right = self.compare()
            value = right if truthy(value) else value
        return value

    def compare(self) -> Any:
        value = self.unary()
        while self.peek() in (("op", "=="), ("op", "!="), ("op", "<"), ("op", ">"), ("op", "<="), ("op", ">=")):
            op = self.take()[1]
            right = self.unary()
            if op in ("==", "!="):
                value = _equal(value, right) == (op == "==")
            else:
                a, b = (value.lower(), right.lower()) if isinstance(value, str) and isinstance(right, str) else (
                    _coerce_number(value), _coerce_number(right))
                value = {"<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op]
        return value

    def unary(self) -> Any:
        if self.peek() == ("op", "!"):
            self.take()
            return not truthy(self.unary())
        return self.postfix(self.primary())

    def primary(self) -> Any:
        kind, text = self.take()
        if kind == "string":
            return text[1:-1].replace("''", "'")
        if kind == "number":
            return float(int(text, 16)) if text.lower().startswith("0x") else float(text)
        if (kind, text) == ("op", "("):
            value = self.or_()
            self.take(")")
            return value
        if kind != "name":
            raise ExpressionError(f"unexpected {text!r} in {self.text!r}")
        if text in ("true", "false"):
            return text == "true"
        if text == "null":
            return None
        if self.peek() == ("op", "("):
            self.take()
            args = []
            while self.peek() != ("op", ")"):
                args.append(self.or_())
                if self.peek() == ("op", ","):
                    self.take()
            self.take(")")
            return self.call(text, args)
        if text.lower() not in self.context:
            raise ExpressionError(f"unknown context {text!r} in {self.text!r}")
        return self.context[text.lower()]

    def postfix(self, value: Any) -> Any:
        while self.peek() in (("op", "."), ("op", "[")):
            if self.take()[1] == ".":
                value = self.member(value, self.take()[1])
            else:
                key = self.or_()
                self.take("]")
                value = self.member(value, key)
        return value

    @staticmethod
    def member(value: Any, key: Any) -> Any:
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(key, str) and k.lower() == key.lower():
                    return v
            return None
        if isinstance(value, list) and isinstance(key, float) and key.is_integer() and 0 <= key < len(value):
            return value[int(key)]
        return None

    def call(self, name: str, args: list[Any]) -> Any:
        functions: dict[str, Callable[..., Any]] = {
            "format": _format,
            "fromjson": lambda s: _numbers(json.loads(s)),
            "tojson": lambda v: json.dumps(v, indent=2),
            "contains": lambda a, b: (any(_equal(x, b) for x in a) if isinstance(a, list)
                                      else str(b).lower() in str(a).lower()),
            "startswith": lambda a, b: str(a).lower().startswith(str(b).lower()),
            "endswith": lambda a, b: str(a).lower().endswith(str(b).lower()),
            "always": lambda: True,
            "success": lambda: self.status == "success",
            "failure": lambda: self.status == "failure",
            "cancelled": lambda: self.status == "cancelled",
        }
        if name.lower() not in functions:
            raise ExpressionError(f"{name}() is not supported here ({self.text!r})")
        return functions[name.lower()](*args)


def _numbers(value: Any) -> Any:
    """fromJSON's numbers are floats, like every number in GitHub's expressions."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def evaluate(expression: str, context: dict[str, Any], status: str = "success") -> Any:
    """The value of one expression (with or without its `${{ }}`) in `context` (github, inputs, ...)."""
    text = expression.strip()
    if text.startswith("${{") and text.endswith("}}") and text.count("${{") == 1:
        text = text[3:-2]
    return _Parser(text, context, status).parse()


def render(value: Any, context: dict[str, Any]) -> Any:
    """A `with:`/`env:` value as the runner sees it: each `${{ }}` replaced by its value as a string
    (a value that is one whole expression keeps its type)."""
    if not isinstance(value, str) or "${{" not in value:
        return value
    whole = re.fullmatch(r"\s*\$\{\{(.*?)\}\}\s*", value, re.DOTALL)
    if whole and "${{" not in whole.group(1):
        return evaluate(whole.group(1), context)

    def one(match: re.Match[str]) -> str:
        result = evaluate(match.group(1), context)
        if result is None:
            return ""
        if isinstance(result, bool):
            return str(result).lower()
        if isinstance(result, float) and result.is_integer():
            return str(int(result))
        return str(result)
    return re.sub(r"\$\{\{(.*?)\}\}", one, value, flags=re.DOTALL)


def condition(value: Any, context: dict[str, Any], status: str = "success") -> bool:
    """Whether an `if:` holds: a bare expression gets GitHub's implicit success() check when it names
    no status function."""
    if value is None:
        return status == "success"
    if isinstance(value, bool):
        return value
    text = str(value).strip()
    if text.startswith("${{") and text.endswith("}}"):
        text = text[3:-2]
    result = truthy(evaluate(text, context, status))
    if not re.search(r"\b(always|success|failure|cancelled)\s*\(", text):
        result = result and status == "success"
    return result
