"""The wheels the GPU check carries to a machine that has PyTorch but no network.

    python benchmarks/gpu_wheels.py fetch [DIR]   # pip download them (on a machine online)
    python benchmarks/gpu_wheels.py check [DIR]   # all there, for CPython 3.12 x86_64?

The GPU machine's image has PyTorch, numpy and most of what PreFast needs
(``ON_GPU_IMAGE``); it lacks zarr, numcodecs, crc32c and zarr's own donfig and
google-crc32c. Their versions are the ones in ``constraints.txt``. ``check``
says, one line per problem, which wheel is missing, of another version, built
for another platform, unreadable, or needs a package neither carried nor on
the image; it exits 1 if there is any. DIR defaults to ``.whl`` (git ignores it).
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
CARRIED = ("zarr", "numcodecs", "crc32c", "donfig", "google-crc32c")
ON_GPU_IMAGE = {  # read off the GPU image's package list (the device tool's KINDS.md)
    "torch", "torchvision", "numpy", "packaging", "typing-extensions", "pyyaml", "psutil",
    "rich", "filelock", "scikit-learn", "matplotlib", "pytest", "pytest-timeout",
    "setuptools", "wheel",
}  # fmt: skip
PLATFORMS = [
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
    "manylinux2014_x86_64", "manylinux1_x86_64",
]  # fmt: skip
# Where the wheels install: CPython 3.12 on Linux x86_64 (markers of Requires-Dist).
ENVIRONMENT = {
    "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
    "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "os_name": "posix", "extra": "",
}  # fmt: skip


def pinned() -> dict[str, str]:
    """Carried package -> its exact version in constraints.txt."""
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.-]+)==(\S+)", line)
        if m and canonicalize_name(m.group(1)) in CARRIED:
            pins[str(canonicalize_name(m.group(1)))] = m.group(2)
    missing = [n for n in CARRIED if n not in pins]
    if missing:
        raise SystemExit(f"constraints.txt pins no version of {', '.join(missing)}")
    return pins


def fetch(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(folder)]  # fmt: skip
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += [f"{name}=={version}" for name, version in pinned().items()]
    return subprocess.run(cmd).returncode


def _fits(tags: frozenset) -> bool:
    return any(
        t.interpreter in ("py3", "cp312")
        and t.abi in ("none", "abi3", "cp312")
        and (t.platform == "any" or (t.platform.startswith("manylinux") and "x86_64" in t.platform))
        for t in tags
    )


def problems(folder: Path) -> list[str]:
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    found: dict[str, list[tuple[str, Path, frozenset]]] = {}
    for w in wheels:
        try:
            dist, wheel_version, _, wheel_tags = parse_wheel_filename(w.name)
        except ValueError as exc:
            return [f"{w.name}: not a wheel's name ({exc})"]
        found.setdefault(str(dist), []).append((str(wheel_version), w, wheel_tags))
    out = []
    needs: dict[str, list[str]] = {}
    for name, version in pinned().items():
        have = found.get(name, [])
        if len(have) != 1:
            out.append(f"{name}=={version}: {len(have)} wheels in {folder} (need exactly one)")
            continue
        got, path, tags = have[0]
        if got != version:
            out.append(f"{path.name}: version {got}, constraints.txt pins {version}")
        if not _fits(tags):
            out.append(f"{path.name}: not for CPython 3.12 on manylinux x86_64")
        try:
            with zipfile.ZipFile(path) as z:
                meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
                info = Parser().parsestr(z.read(meta).decode())
        except (zipfile.BadZipFile, StopIteration, OSError) as exc:
            out.append(f"{path.name}: unreadable ({type(exc).__name__})")
            continue
        for line in info.get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(ENVIRONMENT):
                needs.setdefault(canonicalize_name(req.name), []).append(name)
    for dep, users in sorted(needs.items()):
        if dep not in pinned() and dep not in ON_GPU_IMAGE:
            out.append(f"{dep} (needed by {', '.join(users)}) is neither carried nor on the image")
    return out


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("fetch", "check"):
        print(__doc__)
        return 2
    folder = Path(argv[1]) if len(argv) > 1 else ROOT / ".whl"
    if argv[0] == "fetch":
        return fetch(folder)
    found = problems(folder)
    for p in found:
        print(f"gpu_wheels: {p}")
    if found:
        print(f"gpu_wheels: fill {folder} with `make gpu-wheels` on a machine with network access")
        return 1
    names = ", ".join(f"{n}=={v}" for n, v in pinned().items())
    print(f"gpu_wheels: {folder} holds {names} for CPython 3.12 x86_64; needs covered")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
