"""numbn's whole calls against those of another commit, in one process.

Run ``python benchmarks/against_commit.py REV [--rounds N]`` from a git
checkout: REV's ``numbn`` package (``git archive``) is unpacked into a
temporary folder as ``numbn_rev`` and imported beside the working tree's, and
the two are timed on ``numbn bench``'s seven float32 inputs, interleaved with
PyTorch's call (when installed) and a copy of x as ``numbn bench`` interleaves
them, so that both versions see the same cache and allocator history. Prints
this tree's time over REV's per input and operation, and their geometric
means. REV's kernels compile on the first run (into its own Numba cache,
kept in the folder for the run only: a few minutes); with ``--folder DIR``
REV is unpacked into DIR and kept there, compiled kernels included, for the
next run against the same commit.

Differences between two runs of ``numbn bench`` are mostly this machine's
noise (2x between runs); a ratio taken this way is not.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numba
import numpy as np

import numbn
from numbn import _bench


def _import_rev(rev: str, folder: Path):
    """REV's ``numbn`` as the module ``numbn_rev`` (its imports are relative),
    unpacked into ``folder`` unless the commit there is REV already."""
    root = Path(numbn.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", rev], check=True,
                            capture_output=True, text=True).stdout.strip()
    marker = folder / "numbn_rev.commit"
    if not (marker.exists() and marker.read_text() == commit):
        shutil.rmtree(folder / "numbn_rev", ignore_errors=True)
        archive = folder / "rev.tar"
        subprocess.run(["git", "-C", str(root), "archive", "-o", str(archive), commit, "numbn"],
                       check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
        (folder / "numbn").rename(folder / "numbn_rev")
        marker.write_text(commit)
    sys.path.insert(0, str(folder))
    return importlib.import_module("numbn_rev")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the commit to compare with (e.g. HEAD~1)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--folder", type=Path, help="unpack REV here and keep it (default: a "
                   "temporary folder)")
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        else:
            folder = args.folder
            folder.mkdir(parents=True, exist_ok=True)
        rev = _import_rev(args.rev, folder)
        print(f"this tree over {args.rev}: time ratio (median of {args.rounds} interleaved "
              f"runs, float32, {numba.get_num_threads()} threads)")
        rng = np.random.default_rng(0)
        ratios = {op: [] for op in _bench.OPS}
        for layout, shape, axis in _bench.STANDARD:
            x = rng.standard_normal(shape).astype(np.float32)
            # numbn bench's calls of either version, on the same x and dy.
            new, old = (_bench._numbn_calls(x, axis, "cpu", np.random.default_rng(1), module=m)
                        for m in (numbn, rev))
            for op in _bench.OPS:  # the same results first
                got, want = new[op](), old[op]()
                for a, o in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, want))):
                    np.testing.assert_allclose(a, o, rtol=1e-5, atol=1e-5)
            peer = _bench._torch_calls(x, axis, rng) if _bench.has_torch() else None
            flat = x.reshape(-1)
            dst = np.empty_like(flat)

            def copy(flat=flat, dst=dst):
                _bench._parallel_copy(flat, dst, numba.get_num_threads())

            line = []
            for op in _bench.OPS:
                funcs = [new[op], old[op], copy] + ([peer[op]] if peer else [])
                for f in funcs:
                    f()
                t = _bench._median_interleaved(funcs, args.rounds)
                ratios[op].append(t[0] / t[1])
                line.append(f"{op} {t[0] / t[1]:.2f}")
            print(f"{layout:5} {str(shape):22} " + "  ".join(line), flush=True)
        means = "  ".join(f"{op} {np.exp(np.mean(np.log(v))):.3f}" for op, v in ratios.items())
        print(f"geometric mean: {means}")


if __name__ == "__main__":
    main()
