"""The calculator treats model output as hostile: known attacks are refused quickly,
random text never raises anything but CalculatorError, and honest arithmetic matches Python."""

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftfast.calculator import MAX_INT_BITS, CalculatorError, calculate, use_calculator


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("12/60", "0.2"),
        ("12/4", "3"),
        ("2 + 3 * 4", "14"),
        ("(2 + 3) * 4", "20"),
        ("-3 % 5", "2"),
        ("7 // 2", "3"),
        ("2**10", "1024"),
        ("2**-1", "0.5"),
        ("1,000*2", "2000"),
        ("0.1 + 0.2", "0.3"),
        ("10/3", "3.33333333333"),
        ("10.1 - 10", "0.1"),
        ("123456789012.34 * 1", "123456789012.34"),
        ("1234567890123.5 + 0", "1234567890123.5"),
        ("1e16 / 3", "3.33333333333333e+15"),
        ("'strawberry'.count('r')", "3"),
        ('"banana".count("an")', "2"),
        ("'ab'.count('a') + 1", "2"),
        ("  48 / 2  ", "24"),
        ("1_000 + 1", "1001"),
    ],
)
def test_honest_expressions(expr, expected):
    assert calculate(expr) == expected
    assert use_calculator(expr) == expected


ATTACKS = [
    "__import__('os').system('ls')",
    "().__class__.__bases__[0].__subclasses__()",
    "(1).__class__",
    "'a'.__class__",
    "open('/etc/passwd').read()",
    "eval('1+1')",
    "exec('x=1')",
    "globals()",
    "lambda: 1",
    "(lambda x: x)(1)",
    "[x for x in range(10)]",
    "{x: 1 for x in 'ab'}",
    "9**9**9",
    "10**10**10",
    "2**(2**64)",
    "99999999999999999**99999",
    "1" * 200 + "*" + "1" * 200,
    "(" * 500 + "1" + ")" * 500,
    "-" * 400 + "1",
    "1e999 * 1e999",
    "'a' * 10**9",
    "'a' + 'b'",
    "'x'.count('x', 0, 1)",
    "'x'.upper()",
    "'x'.count(x='x')",
    "('a'+'b').count('a')",
    "'" + "a" * 300 + "'.count('a')",
    "True + 1",
    "None",
    "1 if 1 else 0",
    "x = 1",
    "1; 2",
    "import os",
    "1 < 2",
    "1 & 3",
    "~1",
    "not 1",
    "f'{1}'",
    "b'1'",
    "1j",
    "5 / 0",
    "5 // 0",
    "5 % 0",
    "0 ** -1",
    "(-8) ** 0.5",
    "",
    "   ",
    "\x00",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_attacks_are_refused_quickly(attack):
    t0 = time.perf_counter()
    with pytest.raises(CalculatorError):
        calculate(attack)
    assert use_calculator(attack) is None
    # Refused, not evaluated: far below any human-visible delay (generous for a loaded CI box).
    assert time.perf_counter() - t0 < 1.0


def test_big_results_are_bounded():
    assert calculate(f"2**{MAX_INT_BITS - 1}") == str(2 ** (MAX_INT_BITS - 1))
    with pytest.raises(CalculatorError, match="too large"):
        calculate(f"2**{MAX_INT_BITS + 8}")
    with pytest.raises(CalculatorError, match="too large"):
        calculate(f"2**{MAX_INT_BITS - 1} * 2**{MAX_INT_BITS - 1}")


def test_non_string_input():
    with pytest.raises(CalculatorError):
        calculate(None)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_text_only_calculator_errors(text):
    try:
        out = calculate(text)
    except CalculatorError:
        return
    assert isinstance(out, str) and out


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-*/%(). e_'\"count", max_size=60))
def test_fuzz_near_miss_alphabet(text):
    # The alphabet the filter lets through: only the tree walker stands between this and harm.
    try:
        out = calculate(text)
    except CalculatorError:
        return
    assert isinstance(out, str) and out


def _expr_trees():
    leaf = st.integers(min_value=0, max_value=10**6).map(str)
    ops = st.sampled_from(["+", "-", "*", "/", "//", "%"])

    def combine(children):
        return st.tuples(children, ops, children).map(lambda t: f"({t[0]} {t[1]} {t[2]})")

    return st.recursive(leaf, combine, max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(_expr_trees())
def test_arithmetic_matches_python(expr):
    # The expression is generated here (trusted), so Python's own evaluator is a fair oracle.
    try:
        expected = eval(expr, {"__builtins__": {}}, {})  # noqa: S307 - test oracle on generated input
    except ZeroDivisionError:
        with pytest.raises(CalculatorError, match="division by zero"):
            calculate(expr)
        return
    got = calculate(expr)
    if isinstance(expected, int):
        assert got == str(expected)
    else:
        assert math.isclose(float(got), expected, rel_tol=1e-9, abs_tol=1e-9)


def test_flat_chains_are_not_nesting():
    """a+b+c+... parses as a deep tree but nests nothing: bounded by the node count, not refused
    as "nested too deep" (parentheses are what the depth limit is for)."""
    assert calculate("+".join(["12"] * 40)) == "480"
    assert calculate("*".join(["1"] * 40)) == "1"
    with pytest.raises(CalculatorError, match="nested deeper"):
        calculate("(" * 30 + "1" + ")" * 30)
    with pytest.raises(CalculatorError, match="nodes"):
        calculate("+".join(["1"] * 100))


def test_time_limit_counts_this_threads_cpu_time_not_waiting(monkeypatch):
    """A loader thread waiting for the GIL on a busy machine saw a valid expression refused as
    "took longer than 0.05s": the deadline was wall-clock time. Now waiting costs nothing."""
    import time

    from sftfast import calculator

    clock = iter(range(0, 10**6, 10))  # wall clock: 10 s pass between any two readings
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    assert calculator.calculate("(12+30)*2-4/2") == "82"


def test_spurious_ast_recursion_depth_mismatch_is_retried(monkeypatch):
    """CPython 3.11 shares the AST constructor's depth counter between threads; a parse that
    another thread's parse disturbed raises SystemError although the input is fine."""
    import ast

    from sftfast import calculator

    real, calls = ast.parse, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=33, after=52)")
        return real(*args, **kwargs)

    monkeypatch.setattr(ast, "parse", flaky)
    assert calculator.calculate("1+2") == "3" and len(calls) == 2
