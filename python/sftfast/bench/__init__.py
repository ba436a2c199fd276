"""Benchmarks: `python -m sftfast.bench {tokenizer,data,prep,loss,train,generate,all} [--json]`.

Each subcommand lives in its own module (sftfast/bench/<name>.py) exposing
`add_arguments(parser)` and `run(args) -> dict`; results print as JSON. Benchmarks
never assert a time: they measure sftfast and its peers in the same run.
"""


def finite_or_null(obj):
    """obj with every NaN or infinite float replaced by None: JSON has no NaN (a peer's NaN loss,
    a ratio of two zero times), and strict parsers reject Python's NaN token."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj
