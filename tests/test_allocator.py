"""broadface.allocator: freed memory kept for the next tensor (no page faults on reuse), set up by every
process broadface starts and only there, and BROADFACE_MALLOC read with a clear error."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from broadface import allocator
from broadface.cli import main as cli_main
from broadface.study.parallel import run_parallel

ROOT = Path(__file__).resolve().parents[1]
MB, ROUNDS = 64, 24
PAGES = MB * 2**20 // resource.getpagesize()


def reuse_faults(keep: bool) -> list[int]:
    """Minor page faults of writing a fresh MB-sized tensor, ROUNDS times, each freed before the next."""
    if keep:
        allocator.keep_freed_memory()
    out = []
    for _ in range(ROUNDS):
        x = torch.empty(MB * 2**20 // 4)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x.fill_(1.0)
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del x
    return out


def training_digest(keep: bool) -> str:
    """sha256 of an encoder, a BroadFace classifier and their momenta after three SGD steps (C = 5,000, D = 128: its
    logit chunks and gradients are blocks glibc maps apart by default)."""
    from broadface.heads import ArcFace, BroadFace
    from tests.helpers import state_digest

    if keep:
        allocator.keep_freed_memory()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    enc = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))
    head = BroadFace(ArcFace(5000, 128), queue_size=2048)
    opt = torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    for _ in range(3):
        x, y = torch.randn(512, 256), torch.randint(0, 5000, (512,))
        head(enc(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return state_digest({"encoder": enc.state_dict(), "head": head.state_dict(),
                         "optimizer": opt.state_dict()["state"]})


def _in_fresh_process(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _faults_in_fresh_process(keep: bool) -> list[int]:
    out = _in_fresh_process(f"import json; from tests.test_allocator import reuse_faults; "
                            f"print(json.dumps(reuse_faults({keep})))")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


needs_glibc = pytest.mark.skipif(allocator._glibc() is None, reason="glibc's mallopt only (Linux)")


@needs_glibc
def test_kept_memory_serves_a_repeated_large_tensor_without_page_faults():
    system, keep = _faults_in_fresh_process(False), _faults_in_fresh_process(True)
    assert min(system) > 0.9 * PAGES  # glibc's own: every fresh 64 MB block faulted in again
    # kept: a few rounds grow the heap (64-byte-aligned requests do not fit the block just freed), then reuse
    assert sum(keep[-8:]) < 0.5 * PAGES, keep


@needs_glibc
def test_pool_workers_keep_freed_memory_as_the_command_does(monkeypatch):
    for env, kept in ((None, True), ("system", False)):
        if env:
            monkeypatch.setenv(allocator.ENV_VAR, env)
        else:
            monkeypatch.delenv(allocator.ENV_VAR, raising=False)
        faults = run_parallel(reuse_faults, [(False,), (False,)], 2)
        assert all((sum(f[-8:]) < 0.5 * PAGES) == kept for f in faults), (env, faults)


def test_kept_memory_changes_no_bit_of_training():
    runs = {}
    for keep in (False, True):
        out = _in_fresh_process(f"from tests.test_allocator import training_digest; print(training_digest({keep}))")
        assert out.returncode == 0, out.stderr
        runs[keep] = out.stdout.strip()
    assert runs[False] == runs[True]


def test_malloc_mode_reads_the_environment_and_names_it_on_a_bad_value(monkeypatch):
    monkeypatch.delenv(allocator.ENV_VAR, raising=False)
    assert allocator.malloc_mode() == "keep"
    monkeypatch.setenv(allocator.ENV_VAR, " System ")
    assert allocator.malloc_mode() == "system"
    monkeypatch.setenv(allocator.ENV_VAR, "jemalloc")
    with pytest.raises(ValueError, match=r"BROADFACE_MALLOC='jemalloc': expected one of keep, system"):
        allocator.malloc_mode()


def test_configure_from_env_keeps_memory_unless_asked_not_to(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv(allocator.ENV_VAR, raising=False)
    assert allocator.configure_from_env() == "keep" and calls == [1]
    monkeypatch.setenv(allocator.ENV_VAR, "system")
    assert allocator.configure_from_env() == "system" and calls == [1]
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: False)  # not glibc: nothing was set
    monkeypatch.delenv(allocator.ENV_VAR)
    assert allocator.configure_from_env() == "system"


def test_the_command_sets_up_the_allocator_first_and_main_leaves_it_alone(monkeypatch, capsys):
    order = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: order.append("malloc") or True)
    monkeypatch.setattr(cli_main, "main", lambda: order.append("main") or 0)
    monkeypatch.delenv(allocator.ENV_VAR, raising=False)
    assert cli_main.entry() == 0 and order == ["malloc", "main"]
    order.clear()
    monkeypatch.setenv(allocator.ENV_VAR, "bogus")
    assert cli_main.entry() == 2 and order == []
    assert "BROADFACE_MALLOC='bogus'" in capsys.readouterr().err
    monkeypatch.undo()
    order.clear()
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: order.append("malloc") or True)
    assert cli_main.main([]) == 0 and order == []  # main alone (what tests call in-process): untouched


def test_python_m_broadface_reports_a_bad_setting_in_one_line():
    out = _in_fresh_process("import runpy; runpy.run_module('broadface', run_name='__main__')",
                            {allocator.ENV_VAR: "bogus"})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "broadface: error: environment variable BROADFACE_MALLOC='bogus': expected one of keep, system "
        "(keep: reuse freed memory, the default; system: glibc's own)"]
