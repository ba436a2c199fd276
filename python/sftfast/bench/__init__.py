"""Benchmarks: `python -m sftfast.bench {tokenizer,data,prep,loss,train,generate,all} [--json]`.

Each subcommand lives in its own module (sftfast/bench/<name>.py) exposing
`add_arguments(parser)` and `run(args) -> dict`; results print as JSON. Benchmarks
never assert a time: they measure sftfast and its peers in the same run.
"""
