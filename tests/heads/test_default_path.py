"""The default head path is bit-identical to main's (a reproduction study runs on main's code).

``data/default_case.json`` holds the losses (exact) and SHA-256 digests of every gradient of the fixed-seed
case in :mod:`tests.heads.default_case`, computed by main at a3e47de. Float results of the same code depend
on the torch build and the CPU (its vendor too: an Intel and an AMD CPU at the same SIMD level give other
bits), so the pin applies to the build and CPU it was made with; elsewhere regenerate it from main (the
command is in default_case.py)."""
import json
import platform

import pytest
import torch

from tests.helpers import cpu_vendor

from .default_case import PATH, compute

SAVED = json.loads(PATH.read_text())


@pytest.mark.skipif((SAVED["torch"], SAVED["machine"], SAVED["cpu_vendor"]) != (torch.__version__, platform.machine(),
                                                                         cpu_vendor()),
                    reason=f"the pinned digests were made with torch {SAVED['torch']} on {SAVED['machine']} "
                           f"({SAVED['cpu_vendor']})")
def test_default_path_is_bit_identical_to_main():
    now = compute()["cases"]
    assert now.keys() == SAVED["cases"].keys()
    bad = [f"{case}:{k}[step {i}]" for case, rec in SAVED["cases"].items() for k, vs in rec.items()
           for i, (a, b) in enumerate(zip(vs, now[case][k])) if a != b]
    assert not bad, f"{len(bad)} values differ from main's, first: {bad[:5]}"
