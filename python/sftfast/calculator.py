"""The calculator tool: evaluates what the model writes between <|python_start|> and <|python_end|>.

    from sftfast.calculator import calculate, CalculatorError
    calculate("12/60")                      # -> "0.2"
    calculate("'strawberry'.count('r')")    # -> "3"
    calculate("__import__('os')")           # raises CalculatorError

Model output is hostile input. Nothing here calls eval/exec: the text is parsed with
`ast.parse(mode="eval")` and the tree is walked by hand, accepting only

    numbers (int, float), + - * / // % ** (binary), unary + -, parentheses,
    'string literal'.count('string literal')

and every value is bounded: the size of the input, the nesting depth, the number of
nodes, the bits of an integer (checked *before* computing a power, so 9**9**9 is
refused in microseconds instead of running for hours), the exponent, string lengths,
and a deadline in the calling thread's CPU time checked at every node (wall-clock time
would count waiting for the GIL: a loader thread building Arithmetic examples on a busy
machine saw valid expressions refused). The output is a short string, the
form the engine forces into the token stream as <|output_start|>result<|output_end|>.

`use_calculator(text)` is the engine's entry point: the result string, or None when
the expression is refused (the engine then forces nothing, as nanochat does).
"""

from __future__ import annotations

import ast
import math
import re
import time

# Limits. Generous for GSM8K-style arithmetic (the largest intermediate values there
# have a dozen digits), tiny against an attacker.
MAX_INPUT_CHARS = 512  # characters of the expression text
MAX_DEPTH = 24  # nesting of parentheses, checked on the text before the parser (which recurses on them) sees it
MAX_NODES = 128  # syntax tree nodes: also bounds the evaluator's recursion (a flat a+b+c+... chain is a deep tree)
MAX_INT_BITS = 512  # |int| < 2**512 (about 154 digits), for operands and results
MAX_EXPONENT = 1024  # |exponent| of **
MAX_STR_CHARS = 256  # length of a string literal
TIME_LIMIT_S = 0.05  # CPU time of the calling thread for one evaluation


class CalculatorError(ValueError):
    """The expression was refused or could not be evaluated; the message says why."""


_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}
# Only these characters can appear outside string literals: digits, operators,
# parentheses, the dot of floats and of .count, and the letters of "count" plus the
# e of exponents ("1e5"). Rejecting the rest before ast.parse keeps odd input away
# from the parser altogether.
_ALLOWED_OUTSIDE_STRINGS = set("0123456789+-*/%(). \t_eEcount")
_STRING_LITERAL = re.compile(r"'[^'\\\n]*'|\"[^\"\\\n]*\"")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _check_number(x, what="result"):
    if isinstance(x, bool):
        raise CalculatorError("booleans are not numbers here")
    if isinstance(x, int):
        if x.bit_length() > MAX_INT_BITS:
            raise CalculatorError(f"{what} too large (more than {MAX_INT_BITS} bits)")
    elif isinstance(x, float):
        if not math.isfinite(x):
            raise CalculatorError(f"{what} is not finite")
    else:
        raise CalculatorError(f"{what} is not a number")
    return x


def _power(base, exp):
    if isinstance(exp, float) and exp.is_integer() and abs(exp) <= MAX_EXPONENT:
        exp_i = int(exp)
    else:
        exp_i = exp
    if isinstance(exp_i, int) and abs(exp_i) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {exp_i} exceeds {MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exp, int) and exp >= 0:
        # Predict the result's size before computing it: bits(base**exp) <= bits(base) * exp.
        if base not in (-1, 0, 1) and (abs(base).bit_length() - 1) * exp > MAX_INT_BITS:
            raise CalculatorError(f"result too large (more than {MAX_INT_BITS} bits)")
        return base**exp
    if base == 0 and exp < 0:
        raise CalculatorError("zero to a negative power")
    try:
        result = float(base) ** float(exp)
    except OverflowError:
        raise CalculatorError("result too large") from None
    if isinstance(result, complex):
        raise CalculatorError("complex result")
    return result


class _Evaluator:
    def __init__(self, deadline: float):
        self.deadline = deadline
        self.nodes = 0

    def visit(self, node):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise CalculatorError(f"expression has more than {MAX_NODES} nodes")
        if time.thread_time() > self.deadline:
            raise CalculatorError(f"took longer than {TIME_LIMIT_S}s")
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str):
                if len(value) > MAX_STR_CHARS:
                    raise CalculatorError(f"string literal longer than {MAX_STR_CHARS}")
                return value
            if type(value) in (int, float):
                return _check_number(value, "literal")
            raise CalculatorError(f"literal of type {type(value).__name__} not allowed")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            operand = self._number(node.operand)
            return _check_number(-operand if isinstance(node.op, ast.USub) else +operand)
        if isinstance(node, ast.BinOp):
            left = self._number(node.left)
            right = self._number(node.right)
            if isinstance(node.op, ast.Pow):
                return _check_number(_power(left, right))
            op = _BINOPS.get(type(node.op))
            if op is None:
                raise CalculatorError(f"operator {type(node.op).__name__} not allowed")
            if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
                raise CalculatorError("division by zero")
            try:
                return _check_number(op(left, right))
            except OverflowError:
                raise CalculatorError("result too large") from None
        if isinstance(node, ast.Call):
            return self._count(node)
        raise CalculatorError(f"{type(node).__name__} not allowed")

    def _number(self, node):
        value = self.visit(node)
        if isinstance(value, str):
            raise CalculatorError("arithmetic on strings not allowed")
        return value

    def _count(self, node: ast.Call):
        func = node.func
        if not (isinstance(func, ast.Attribute) and func.attr == "count"):
            raise CalculatorError("only 'text'.count('x') calls are allowed")
        if node.keywords or len(node.args) != 1:
            raise CalculatorError("count takes exactly one positional argument")
        # The receiver and argument must be plain string literals: no computed strings.
        receiver, arg = func.value, node.args[0]
        for part in (receiver, arg):
            if not (isinstance(part, ast.Constant) and isinstance(part.value, str)):
                raise CalculatorError("count works on string literals only")
        text = self.visit(receiver)
        needle = self.visit(arg)
        return text.count(needle)


def _outside_strings(text: str) -> str:
    return _STRING_LITERAL.sub("", text)


def _format(value) -> str:
    if isinstance(value, int):
        return str(value)
    # Integral floats print as integers (12/4 -> "3", the form GSM8K's <<12/4=3>> uses).
    # Others with 12 significant digits, which hides binary noise (0.1+0.2 -> "0.3", and
    # 10.1-10 -> "0.1", whose noise sits in the 15th digit), but at least 3 digits past the
    # point up to 15 in all: 123456789012.34 keeps its cents (12 digits gave 123456789012).
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    integer_digits = len(str(int(abs(value)))) if abs(value) >= 1 else 0
    return format(value, f".{min(15, max(12, integer_digits + 3))}g")


def _parse(expr: str) -> ast.Expression:
    """ast.parse, retried on CPython 3.11's spurious "AST constructor recursion depth mismatch"
    SystemError: the depth it checks is shared by the interpreter's threads, and a thread switch
    inside the parse (a finalizer run by the garbage collector) lets another thread's parse move
    it (seen once in the test suite: the demo's engine and a loader thread building Arithmetic
    examples). The input is never at fault there, so parsing again is right."""
    for attempt in range(3):
        try:
            return ast.parse(expr, mode="eval")
        except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
            raise CalculatorError(f"not an expression: {type(e).__name__}") from None
        except SystemError as e:
            if "recursion depth mismatch" not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def calculate(text: str, time_limit: float = TIME_LIMIT_S) -> str:
    """Evaluate one calculator expression and return its result as text, or raise CalculatorError."""
    if not isinstance(text, str):
        raise CalculatorError("expression is not a string")
    if len(text) > MAX_INPUT_CHARS:
        raise CalculatorError(f"expression longer than {MAX_INPUT_CHARS} characters")
    expr = text.strip()
    if not expr:
        raise CalculatorError("empty expression")
    outside = _outside_strings(expr)
    if "'" not in expr and '"' not in expr:
        # "1,000*2": thousands separators as GSM8K writes them.
        expr = _THOUSANDS.sub("", expr)
        outside = expr
    bad = sorted(set(outside) - _ALLOWED_OUTSIDE_STRINGS)
    if bad:
        raise CalculatorError(f"characters not allowed: {''.join(bad)!r}")
    # The parser recurses on parentheses; refuse deep nesting before it sees the text.
    depth = max_depth = 0
    for ch in outside:
        depth += ch == "("
        depth -= ch == ")"
        max_depth = max(max_depth, depth)
    if max_depth > MAX_DEPTH:
        raise CalculatorError(f"expression nested deeper than {MAX_DEPTH}")
    tree = _parse(expr)
    evaluator = _Evaluator(time.thread_time() + time_limit)
    value = evaluator.visit(tree.body)
    if isinstance(value, str):
        raise CalculatorError("result is a string, not a number")
    return _format(value)


def use_calculator(text: str) -> str | None:
    """The engine's hook: the result text, or None when the expression is refused."""
    try:
        return calculate(text)
    except CalculatorError:
        return None
