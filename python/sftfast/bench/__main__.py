"""Entry point: python -m sftfast.bench SUBCOMMAND [--json] [options]."""

import argparse
import importlib
import json
import platform
import sys

from sftfast.bench import finite_or_null

SUBCOMMANDS = ["tokenizer", "data", "prep", "loss", "train", "generate"]


def machine_info() -> dict:
    import os

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


JSON_HELP = "print one JSON object (default: one 'key: value' line per figure)"


def _flatten(obj, prefix=""):
    """(dotted key, printable value) for every leaf of nested dicts and lists."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        for i, value in enumerate(obj):
            yield from _flatten(value, f"{prefix}[{i}]")
    elif isinstance(obj, float):
        yield prefix, f"{obj:.4g}"
    elif isinstance(obj, str) and "\n" in obj:
        yield prefix, json.dumps(obj)  # one line per figure, a traceback included
    else:
        yield prefix, obj


def _errors(obj, where=""):
    """("where: message") for every "error" entry, at any depth (a failed configuration of
    `bench train` reports under configs.NAME.error)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "error" and isinstance(value, str):
                yield f"{where or 'bench'}: {value}"
            else:
                yield from _errors(value, f"{where}.{key}" if where else str(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _errors(value, f"{where}[{i}]")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftfast.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"sftfast.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"sftfast.bench.{name}":
                raise
            continue
        modules[name] = module
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--json", action="store_true", help=JSON_HELP)
        module.add_arguments(p)
    p = sub.add_parser("all", help="every benchmark with its defaults")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    args = parser.parse_args(argv)

    if args.command == "all":
        results = {}
        for name, module in modules.items():
            sub_args = sub.choices[name].parse_args(["--json"] if args.json else [])
            results[name] = module.run(sub_args)
    else:
        results = modules[args.command].run(args)
    out = {"machine": machine_info(), "results": results}
    if args.json:
        print(json.dumps(finite_or_null(out), indent=2, allow_nan=False))
    else:
        for key, value in _flatten(out):
            print(f"{key}: {value}")
    # a benchmark that could not run (e.g. --device cuda without CUDA) says why in "error"
    # and fails the command, so scripts do not record an empty result as a measurement
    errors = list(_errors(results))
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
