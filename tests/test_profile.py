"""python -m attn.profile: the CPU report, the GPU report under Numba's simulator (CI),
and the real GPU report (marker ``gpu``, on the GPU machine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# attn.cpu is imported by the CPU test itself: the GPU machine's runs (marker gpu) have
# no CPU build.
from attn import profile

ROOT = Path(__file__).resolve().parent.parent


# `python -m attn.profile` in a child process. From a source tree without an install
# (the GPU machine's runs) attn.gpu is not importable: the child then lets attn find gpu/
# as the GPU test files do in-process (an install maps gpu/ to attn.gpu).
_BOOT = """\
import importlib.util, runpy, sys
import attn
if importlib.util.find_spec("attn.gpu") is None:
    attn.__path__.append(sys.argv.pop(1))
else:
    sys.argv.pop(1)
runpy.run_module("attn.profile", run_name="__main__", alter_sys=True)
"""


def _run(args, env=None, timeout=300):
    e = dict(os.environ, **(env or {}))
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", _BOOT, str(ROOT), *args], cwd=ROOT,
                          env=e, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("schedule", ["auto", "split"])
def test_cpu_report(schedule, monkeypatch, capsys, tmp_path):
    from attn import cpu

    monkeypatch.setenv("ATTN_CPU_BWD_SCHEDULE", schedule)
    out = tmp_path / "r.json"
    r = profile.main(["--device", "cpu", "--batch", "2", "--heads", "4", "--kv-heads", "2",
                      "--seqlen", "80", "--headdim", "16", "--causal", "--repeats", "2",
                      "--json", str(out)])
    text = capsys.readouterr().out
    threads = cpu.num_threads()
    assert r["isa"] == cpu.ISA and r["threads"] == threads
    assert (r["BLOCK_M"], r["BLOCK_N"]) == (cpu.BLOCK_M, cpu.BLOCK_N)
    expected = cpu.choose_schedule(2, 2, threads)
    assert r["backward_schedule"] == expected
    if schedule == "split":
        assert expected == "split"
    assert [k["name"] for k in r["kernels"]] == ["forward", "backward"]
    assert all(k["seconds"] > 0 for k in r["kernels"]) and r["forward_backward"]["seconds"] > 0
    for piece in (f"ISA {cpu.ISA}", f"{threads} threads", f"BLOCK_M={cpu.BLOCK_M}",
                  f"backward schedule: {expected}", "B=2 H=4 Hkv=2 L=80 D=16 float32 causal",
                  "forward+backward"):
        assert piece in text, piece
    assert json.loads(out.read_text())["backward_schedule"] == expected


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        profile.main(["--device", "cpu", "--heads", "3", "--kv-heads", "2"])
    assert "multiple of kv_heads" in capsys.readouterr().err
    if not torch.cuda.is_available() and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        with pytest.raises(SystemExit):
            profile.main(["--device", "gpu"])
        assert "needs a CUDA device" in capsys.readouterr().err


def test_sass_mix_counts_tensor_core_instructions():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @!P0 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/                   FFMA R2, R3, R4, R2 ;
        /*0040*/              @P1  FFMA R2, R3, R4, R2 ;
        /*0050*/                   EXIT ;
    """
    assert profile.sass_mix(sass) == {"instructions": 6, "tensor_core": 2, "ffma": 2}


def test_simulator_report(tmp_path):
    """Under NUMBA_ENABLE_CUDASIM=1 the GPU report lists the launches (tiny shape)."""
    out = tmp_path / "sim.json"
    res = _run(["--device", "gpu", "--batch", "1", "--heads", "2", "--kv-heads", "1",
                "--seqlen", "9", "--headdim", "8", "--causal", "--ptx", "--json", str(out)],
               env={"NUMBA_ENABLE_CUDASIM": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["simulator"] and r["problem"] == "B=1 H=2 Hkv=1 L=9 D=8 float32 causal"
    # One forward kernel; the backward's dK/dV kernel and (unless dQ is accumulated
    # atomically inside it) a dQ kernel.
    phases = [k["phase"] for k in r["kernels"]]
    assert phases[0] == "forward" and set(phases[1:]) == {"backward"}
    for k in r["kernels"]:
        assert k["specialisation"]["CAUSAL"] is True and k["threads"] > 0
        assert k["seconds"] > 0 and "simulator" in k["note"]
        assert "registers_per_thread" not in k
    assert "no PTX (the simulator has no compiled code)" in res.stdout


# ------------------------------------------------------------------- GPU machine
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_report(tmp_path):
    out = tmp_path / "gpu.json"
    res = _run(["--device", "gpu", "--batch", "2", "--heads", "4", "--seqlen", "512",
                "--headdim", "64", "--dtype", "bfloat16", "--causal", "--sass",
                "--out", str(tmp_path / "code"), "--json", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert not r["simulator"]
    assert [k["phase"] for k in r["kernels"]][0] == "forward"
    for k in r["kernels"]:
        assert 0 < k["registers_per_thread"] <= 255
        assert k["local_bytes_per_thread"] >= 0 and k["static_shared_bytes"] >= 0
        assert 0 < k["occupancy"] <= 1 and k["blocks_per_sm"] >= 1
        assert k["mix"]["instructions"] > 0 and k["seconds"] > 0
        assert k["compile_seconds"] is not None
    assert r["forward"]["tflops"] > 0 and r["public"]["forward_backward"]["seconds"] > 0
    assert "ms per call (CUDA events)" in res.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_lineinfo_build(tmp_path):
    res = _run(["--device", "gpu", "--batch", "1", "--heads", "2", "--seqlen", "128",
                "--headdim", "64", "--dtype", "float32", "--lineinfo", "--ptx",
                "--out", str(tmp_path), "--json", str(tmp_path / "r.json")])
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["lineinfo"]
    # NVVM refuses line info for the backward kernels (gpu/_cuda.py _compile): those
    # are built without it and say so; the forward keeps it.
    fwd = [k for k in r["kernels"] if k["phase"] == "forward"]
    assert fwd and all("lineinfo_missing" not in k for k in fwd)
    assert all(k["seconds"] > 0 for k in r["kernels"])
    # float32 runs the 3xTF32 tensor-core kernels (attn.gpu._mma*) and the SIMT helpers
    # (delta, dQ); line info reaches them through the shared _JIT options.
    assert {k["module"] for k in r["kernels"]} & {"attn.gpu._mma", "attn.gpu._mma_bwd",
                                                  "attn.gpu._kernels"}
    for k in r["kernels"]:
        ptx = (tmp_path / f"{k['index']}_{k['phase']}_{k['name']}.ptx").read_text()
        # source locations for Nsight Compute's source view, where NVVM allowed them
        assert (".loc" in ptx) == ("lineinfo_missing" not in k), k["name"]
