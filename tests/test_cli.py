"""The command line's three subcommands, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest


def _numbn(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "numbn", *args], capture_output=True,
                          text=True, timeout=timeout)


def _script(tmp_path, *lines, timeout=300):
    """Run ``lines`` as a Python script of their own in ``tmp_path`` (a test's
    setup, such as a patched module, then the command line's ``main``)."""
    path = tmp_path / "script.py"
    path.write_text("".join(line + "\n" for line in lines))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


def test_info():
    r = _numbn("info")
    assert r.returncode == 0, r.stderr
    for word in ("numbn", "numba", "numpy", "cpu", "cuda", "threads", "threading layer", "GPU"):
        assert word in r.stdout
    assert "cpu    available" in r.stdout


def test_check_passes():
    r = _numbn("check", "--backend", "cpu", "--backend", "numpy")
    assert r.returncode == 0, r.stdout + r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.endswith(" 0 failed") and int(last.split()[0]) > 50


def test_check_fails_on_a_wrong_kernel(tmp_path):
    # A deliberately broken backend must make `numbn check` fail (exit 1).
    r = _script(tmp_path,
                "import sys, numpy as np",
                "import numbn._cpu as cpu",
                "real = cpu.stats",
                "cpu.stats = lambda x3: tuple(v * 1.01 for v in real(x3))",
                "from numbn.__main__ import main",
                "sys.exit(main(['check', '--backend', 'cpu']))", timeout=600)
    assert r.returncode == 1 and "FAIL" in r.stdout


@pytest.mark.parametrize("command", ["check", "bench"])
def test_unavailable_backend_is_one_clear_line(command, tmp_path):
    """Asking for CUDA where it cannot run: one line that says why, exit 2,
    nothing run (`check` printed a failure per case, `bench` a traceback)."""
    r = _script(tmp_path,
                "import sys",
                "from numbn import _dispatch",
                "_dispatch.cuda_unavailable_reason = lambda: 'no CUDA GPU was found'",
                "from numbn.__main__ import main",
                f"sys.exit(main(['{command}', '--backend', 'cpu', '--backend', 'cuda']))")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == ""
    assert r.stderr.strip() == (f"numbn {command}: backend 'cuda' is unavailable here: "
                                "no CUDA GPU was found")


@pytest.mark.slow
def test_bench_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    r = _numbn("bench", "--quick", "--repeat", "2", "--no-progress", "--backend", "cpu",
               "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "compiling kernels" in r.stdout and "of copy" in r.stdout
    data = json.loads(out.read_text())
    ops = {(row["layout"], tuple(row["shape"]), row["op"]) for row in data["rows"]
           if row["backend"] == "cpu"}
    assert len(ops) == 7 * 3
    assert all(row["ms"] > 0 and row["gbps"] > 0 for row in data["rows"])


@pytest.mark.slow
def test_bench_float16_json(tmp_path):
    out = tmp_path / "bench.json"
    r = _numbn("bench", "--quick", "--repeat", "1", "--no-progress", "--backend", "cpu",
               "--dtype", "float16", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "float16" in r.stdout.splitlines()[0]
    rows = json.loads(out.read_text())["rows"]
    assert {row["dtype"] for row in rows} == {"float16"}
    assert len([row for row in rows if row["backend"] == "cpu"]) == 7 * 3
    # Effective bandwidth counts float16's two bytes per value.
    row = next(row for row in rows if row["backend"] == "cpu" and row["op"] == "eval")
    nbytes = 2 * 2 * int(np.prod(row["shape"]))
    assert row["gbps"] == pytest.approx(nbytes / (row["ms"] * 1e-3) / 1e9, rel=1e-6)


@pytest.mark.slow
def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (numbn[bench])")
    png = tmp_path / "bench.png"
    r = _numbn("bench", "--quick", "--repeat", "1", "--no-progress", "--backend", "cpu",
               "--no-torch", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_without_matplotlib(tmp_path):
    r = _script(tmp_path,
                "import sys",
                "sys.modules['matplotlib'] = None",
                "from numbn import _bench",
                "row = _bench.Row('NCHW', (2, 3), 'float32', 'eval', 'cpu', 1.0, 1.0, 0.5, None)",
                "_bench.plot([row], 'x.png')")
    assert r.returncode != 0 and "needs matplotlib" in r.stderr


@pytest.mark.parametrize("repeat", ["0", "-3"])
def test_bench_repeat_must_be_positive(repeat):
    """--repeat below 1: argparse's error, exit 2, nothing timed (-3 printed a
    table of NaN, 0 ran the default while the header said so)."""
    r = _numbn("bench", "--quick", "--repeat", repeat, "--backend", "cpu", "--no-torch")
    assert r.returncode == 2 and r.stdout == ""
    assert f"--repeat: must be 1 or more, not {repeat}" in r.stderr


def test_bench_plot_without_matplotlib_says_so_first(tmp_path):
    """`numbn bench --plot` without matplotlib: said before the benchmark
    runs (it was said after the whole run), exit 2."""
    r = _script(tmp_path,
                "import sys",
                "sys.modules['matplotlib'] = None",
                "from numbn.__main__ import main",
                "sys.exit(main(['bench', '--quick', '--backend', 'cpu', '--plot', 'x.png']))")
    assert r.returncode == 2 and r.stdout == ""
    assert "needs matplotlib" in r.stderr


def test_check_tools_run_on_the_backend_asked_for(tmp_path):
    """The tool checks (folding, recalibrate) of `numbn check --backend cpu`
    run on the CPU backend, not the process default: with the default set
    to a CUDA that cannot run here, they failed (and the command exited 1)."""
    r = _script(tmp_path,
                "import sys, numbn",
                "from numbn import _dispatch",
                "_dispatch.cuda_unavailable_reason = lambda: 'no CUDA GPU was found'",
                "numbn.set_backend('cuda')",
                "from numbn.__main__ import main",
                "sys.exit(main(['check', '--backend', 'cpu', '-v']))", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    tools = [line for line in r.stdout.splitlines() if " tools " in line]
    assert len(tools) == 4 and all(line.startswith("PASS  tools (cpu) ") for line in tools)


def test_info_into_a_closed_pipe_is_quiet():
    """`numbn info | head -1`: the reader goes away; no BrokenPipeError traceback."""
    with subprocess.Popen([sys.executable, "-m", "numbn", "info"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        proc.stdout.close()  # before numbn has printed anything (its imports take a while)
        err = proc.stderr.read()
        proc.wait(timeout=300)
    assert "Traceback" not in err and "BrokenPipeError" not in err
