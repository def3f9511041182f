"""Named random streams (pipeline.seeds): one seed per (build.seed, stream), no arithmetic offsets anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.seeds import STREAMS, seed_for

REPO = Path(__file__).resolve().parent.parent


def test_every_stream_has_its_own_seed_for_every_build_seed():
    seeds = {(base, name): seed_for(base, name) for base in range(4) for name in STREAMS}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds.values())
    assert seed_for(3, "distill.batches") == seed_for(3, "distill.batches")       # a function of its inputs only
    assert seed_for(0, "subspaces.basis.0") != seed_for(0, "subspaces.basis.1")


def test_a_config_gives_its_build_seed(tiny_config):
    from pipeline.config import config_with

    cfg = config_with(tiny_config, {"build.seed": 7})
    assert seed_for(cfg, "data.split") == seed_for(7, "data.split") != seed_for(0, "data.split")


def test_an_unknown_stream_is_refused():
    with pytest.raises(ValueError, match="unknown random stream 'distill.shufle'"):
        seed_for(0, "distill.shufle")


def test_no_seed_arithmetic_is_left_in_the_pipeline():
    """`seed + 2`, `build.seed + i`: an offset names no stream and can collide with another call site's."""
    offsets = []
    for pkg in ("pipeline", "quantize", "exporters"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
                    names = [ast.unparse(side) for side in (node.left, node.right)]
                    if any(n == "seed" or n.endswith(".seed") for n in names):
                        offsets.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not offsets, offsets
