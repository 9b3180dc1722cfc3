"""How hard ``fit`` is to follow: the files a reader walks through when following its ``data`` argument.

Run from a checkout (any commit whose ``tlpipe.pipeline.fit(data, config, output=, tracking_uri=)``
exists; prints which tlpipe it imported):  ``PYTHONPATH=. python bench/follow_data.py``
or ``python bench/follow_data.py --tree PATH`` (``--keep``: leave the temp folder; ``--depth N``:
how deep a value is searched for the data).

Method:
1. A real linear fit (recipe ``quick``, ``strategy: linear``, no tuning, CPU, 0 workers) of a tiny
   dataset made here (2 classes x 12 noisy one-colour 40x32 JPEGs in ``train/`` and ``val/``).
2. ``sys.setprofile`` keeps the Python calls (main thread) whose code lies in the tlpipe package and
   whose arguments carry the data: a value that is the data folder's path, or a str/Path naming it or
   a file under it, or holds one as an attribute (``vars``/``__slots__``) or an element (first 32 of a
   list/tuple/set/dict) within ``--depth`` levels (default 2: FitContext.data, Prepared.spec.root,
   a samples list of (path, label) pairs).
3. The reader reads each function once: the calls are reduced to the first call of each function,
   in order. On that sequence of files: *files entered* = distinct files; *re-entries* = moves into
   a file that was already left for another one; *climbs* = first calls made from a deeper package
   layer into a shallower one (layer = package depth: ``tlpipe/x.py`` 0, ``tlpipe/a/x.py`` 1...; the
   caller is the nearest tlpipe frame up the stack), except into a leaf utility (a module that
   imports no other tlpipe module, e.g. ``utils.py``, ``errors.py``): calling down a helper is no climb.
The column "every call" measures the same on all tlpipe calls of the fit, data or not (for scale).
Module bodies and Jinja templates (``*.j2``, code compiled from files in the package) are not calls.
Measured (data / every call; files, re-entries, climbs): 201ef86 (pipeline.py 636 lines) 11/11/1 and
28/73/5; 00c26aa 20/10/2 and 39/82/14. ``--depth 4``: 11/13/1 and 20/12/2.
"""
from __future__ import annotations

import argparse
import ast
import itertools
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

CAP = 32  # elements of a container looked at


def make_dataset(root: Path) -> Path:
    """``root/{train,val}/{red,blue}/<k>.jpg``: 12 seeded noisy 40x32 images a class and split."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "blue": (40, 40, 200)}
    for split, (name, colour) in itertools.product(("train", "val"), colours.items()):
        (root / split / name).mkdir(parents=True)
        for k in range(12):
            pixels = np.clip(np.array(colour) + rng.integers(-30, 31, (32, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / split / name / f"{k}.jpg", quality=90)
    return root


def carries(value, needle: str, depth: int, seen: set) -> bool:
    """Whether ``value`` is a str/Path naming ``needle``, or holds one within ``depth`` levels."""
    if isinstance(value, (str, Path)):
        return needle in str(value)
    if depth <= 0 or id(value) in seen or isinstance(value, (int, float, bool, bytes, type(None))):
        return False
    seen.add(id(value))
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        items = list(value.values() if isinstance(value, dict) else value)[:CAP]
    elif hasattr(value, "__dict__"):
        items = list(vars(value).values())
    else:
        items = [getattr(value, s, None) for s in getattr(type(value), "__slots__", ())]
    return any(carries(v, needle, depth - 1, seen) for v in items)


def leaf_modules(package: Path) -> set[str]:
    """Modules of ``package`` that import no other tlpipe module (anywhere in their source)."""
    leaves = set()
    for path in package.rglob("*.py"):
        nodes = list(ast.walk(ast.parse(path.read_text())))
        names = [a.name for n in nodes if isinstance(n, ast.Import) for a in n.names]
        names += ["." * n.level + (n.module or "") for n in nodes if isinstance(n, ast.ImportFrom)]
        if not any(name.startswith(("tlpipe", ".")) for name in names):
            leaves.add(str(path))
    return leaves


def trace_fit(data: Path, tmp: Path, depth: int) -> list[tuple[str, str, str | None, bool]]:
    """(callee file, function name:line, caller file, carries the data) of each tlpipe call, in order."""
    import tlpipe
    import tlpipe.pipeline as pipeline
    from tlpipe.config import load_config

    package = str(Path(tlpipe.__file__).resolve().parent) + "/"
    needle, calls = str(data), []

    def caller_file(frame):
        frame = frame.f_back
        while frame is not None and not frame.f_code.co_filename.startswith(package):
            frame = frame.f_back
        return frame and frame.f_code.co_filename

    def profile(frame, event, arg):
        code = frame.f_code
        if (event != "call" or not code.co_filename.startswith(package) or not code.co_filename.endswith(".py")
                or code.co_name == "<module>"):
            return
        seen: set = set()
        carried = any(carries(v, needle, depth, seen) for v in list(frame.f_locals.values()))
        calls.append((code.co_filename, f"{code.co_name}:{code.co_firstlineno}", caller_file(frame), carried))

    config = load_config("quick", strategy="linear", device="cpu", num_workers=0, budget="3m",
                         tuning={"trials": 0})
    sys.setprofile(profile)
    try:
        pipeline.fit(data, config, output=tmp / "out", tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    finally:
        sys.setprofile(None)
    return calls


def measure(calls, package: Path) -> dict:
    leaves = leaf_modules(package)
    layer = lambda f: len(Path(f).relative_to(package).parts) - 1  # noqa: E731
    read, entered, left = set(), [], set()  # functions read; files in the order entered; files left
    climbs = reentries = 0
    for file, func, caller, _ in calls:
        if (file, func) in read:
            continue
        read.add((file, func))
        climbs += bool(caller and file not in leaves and layer(caller) > layer(file))
        if not entered or entered[-1] != file:
            left.update(entered[-1:])
            reentries += file in left
            entered.append(file)
    files = list(dict.fromkeys(entered))
    return {"files entered": len(files), "re-entries": reentries, "climbs": climbs,
            "functions read": len(read), "traced calls": len(calls), "files": files, "leaves": leaves}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--tree", help="a checkout to import tlpipe from (default: PYTHONPATH)")
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, str(Path(args.tree).resolve()))
    import tlpipe

    package = Path(tlpipe.__file__).resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix="follow-data-")).resolve()
    data = make_dataset(tmp / "data" / "colours")
    calls = trace_fit(data, tmp, args.depth)
    m, every = measure([c for c in calls if c[3]], package), measure(calls, package)
    print(f"\ntlpipe: {tlpipe.__file__}   data: {data}   depth: {args.depth}")
    print(f"  {'':<15} {'data':>6} {'every call':>11}")
    for key in ("files entered", "re-entries", "climbs", "functions read", "traced calls"):
        print(f"  {key:<15} {m[key]:>6} {every[key]:>11}")
    print("files the data enters, in order (L<layer>, * leaf utility):")
    for f in m["files"]:
        print(f"  L{len(Path(f).relative_to(package).parts) - 1} {'*' if f in m['leaves'] else ' '} "
              f"{Path(f).relative_to(package.parent)}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
