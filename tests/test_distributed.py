"""Multi-process builds (torchrun via `edgesmith build --nproc 2`, gloo on the CPU) against one process.

One tiny SubDistill + QAT build is made in a single process, then the distributed stages (subspaces, distill, qat)
are rebuilt in two processes into the same cache: same keys, same subspace bases, close accuracies. A fault
injected on rank 1 (the test-only EDGESMITH_TEST_FAULT hook of pipeline/distributed.py) must fail the build with
rank 1's message and leave no cache entry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import distributed
from tests.conftest import EDGESMITH, REPO, tiny_config_dict

DISTRIBUTED_STAGES = ("subspaces", "distill", "qat")


def tiny_distributed_config(output: Path) -> dict:
    """A tiny build whose teacher learns something (so accuracies mean something) in a few seconds; several
    subspace batches (dealt out between the processes) and micro-batches of 8 (gradient accumulation)."""
    cfg = tiny_config_dict(output, **{
        # 250 test images per class: with the tiny config's 20 (80 images, one standard error = 5.6 points) the
        # 1-vs-2-process accuracy check below failed or passed by which seed the build drew (6 images apart).
        "data.train_per_class": 100, "data.test_per_class": 250, "teacher.train.epochs": 6, "teacher.train.lr": 0.01,
        "teacher.train.batch_size": 32, "distill.method": "subdistill", "distill.epochs": 5, "distill.lr": 0.01,
        "subspaces.positions_per_image": 8, "subspaces.batch_size": 24, "distributed.micro_batch": 8,
        # a lazy layer loss: V has no gradient on every other step, which DDP must be told to expect
        "distill.layer_every": 2})
    cfg["qat"] = {"epochs": 1, "calibration_size": 64, "batch_size": 32, "lr": 1e-3}
    return cfg


def build(config: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run([*EDGESMITH, "build", str(config), *args], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "COLUMNS": "200", **(env or {})})
    return result, time.perf_counter() - start


def stage_dir(root: Path, stage: str) -> Path:
    found = [p for p in root.glob(f"{stage}-*") if (p / "stage.json").is_file()]
    assert len(found) == 1, found
    return found[0]


def snapshot(root: Path) -> dict:
    out = {}
    for stage in DISTRIBUTED_STAGES:
        folder = stage_dir(root, stage)
        out[stage] = {"dir": folder.name, "meta": json.loads((folder / "stage.json").read_text())}
    out["subspaces"]["tensors"] = torch.load(stage_dir(root, "subspaces") / "subspaces.pt", weights_only=True)
    return out


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The single-process build, then its distributed stages forced to rebuild in two processes."""
    tmp = tmp_path_factory.mktemp("distributed")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_distributed_config(tmp / "builds")))
    root = tmp / "builds" / "tiny"
    single, single_s = build(config)
    assert single.returncode == 0, single.stdout + single.stderr
    one = snapshot(root)
    forced = [a for s in DISTRIBUTED_STAGES for a in ("--force", s)]
    double, double_s = build(config, "--nproc", "2", *forced)
    assert double.returncode == 0, double.stdout + double.stderr
    two = snapshot(root)
    print(f"\nbuild wall time: 1 process {single_s:.1f} s (all stages), 2 processes {double_s:.1f} s (distributed stages); "
          + ", ".join(f"{s} {one[s]['meta']['wall_time_s']:.1f} s vs {two[s]['meta']['wall_time_s']:.1f} s"
                      for s in DISTRIBUTED_STAGES))
    return {"config": config, "root": root, "one": one, "two": two, "output": double.stdout}


@pytest.mark.slow
def test_two_processes_reuse_the_keys_and_match_one_process(one_and_two):
    one, two = one_and_two["one"], one_and_two["two"]
    for stage in DISTRIBUTED_STAGES:
        # Same folder = same key: the number of processes is not part of it (the global batch is the same).
        assert two[stage]["dir"] == one[stage]["dir"]
        assert two[stage]["meta"]["world_size"] == 2 and "world_size" not in one[stage]["meta"]
    a, b = one["subspaces"]["tensors"], two["subspaces"]["tensors"]
    for i in range(2):
        basis_a, basis_b = a[f"{i}.basis"].double(), b[f"{i}.basis"].double()
        signs = torch.sign((basis_a * basis_b).sum(0))
        assert torch.allclose(basis_a, basis_b * signs, atol=1e-6, rtol=0)
        assert torch.allclose(a[f"{i}.mean"], b[f"{i}.mean"], atol=1e-6, rtol=0)
        assert torch.allclose(a[f"{i}.alpha"], b[f"{i}.alpha"], rtol=1e-6)
    m1, m2 = one["distill"]["meta"]["metrics"], two["distill"]["meta"]["metrics"]
    assert m1["teacher_test_acc"] == m2["teacher_test_acc"]
    assert m2["student_test_acc"] > 0.28                     # the student learned something (chance: 0.25)
    def basis_diff(i):
        signs = torch.sign((a[f"{i}.basis"] * b[f"{i}.basis"]).sum(0))
        return float((a[f"{i}.basis"] - b[f"{i}.basis"] * signs).abs().max())

    print(f"student test acc 1 vs 2 processes: {m1['student_test_acc']:.4f} vs {m2['student_test_acc']:.4f}; "
          f"basis max |diff| {max(basis_diff(i) for i in range(2)):.2e}")
    assert abs(m1["student_test_acc"] - m2["student_test_acc"]) <= 0.05     # 50 of 1000 test images
    # Per-epoch losses are all-reduced: the same loss curve up to BatchNorm running statistics.
    for h1, h2 in zip(m1["history"], m2["history"]):
        assert h2["total"] == pytest.approx(h1["total"], rel=0.05)
    q1, q2 = one["qat"]["meta"]["metrics"], two["qat"]["meta"]["metrics"]
    print(f"int8 test acc 1 vs 2 processes: {q1['int8_test_acc']:.4f} vs {q2['int8_test_acc']:.4f}")
    assert abs(q1["int8_test_acc"] - q2["int8_test_acc"]) <= 0.05
    # Only rank 0 prints the progress log.
    assert one_and_two["output"].count("distill epoch 1/5") == 1


@pytest.mark.slow
def test_a_crash_on_rank_1_fails_the_build_with_its_message_and_no_cache_entry(one_and_two):
    root = one_and_two["root"]
    for stage in ("distill", "qat"):
        shutil.rmtree(stage_dir(root, stage))
    result, _ = build(one_and_two["config"], "--nproc", "2", env={distributed.FAULT_ENV: "distill:1"})
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "failed in process rank 1 of 2" in output and "Test fault injected on rank 1 at distill" in output
    assert not list(root.glob("distill-*")) and not list(root.glob("qat-*"))
    assert not [p for p in (root / ".tmp").iterdir() if p.name.startswith("distill")]
    assert (stage_dir(root, "subspaces") / "stage.json").is_file()    # earlier stages stay cached


def test_a_global_batch_shared_out_gives_the_one_process_mean(monkeypatch):
    """local_chunks: the shares cover the global batch once, and the scaled micro-batch means average (as DDP
    does) to the mean over the whole batch; a process with an empty share runs one image at weight 0."""
    losses = torch.arange(13, dtype=torch.float64) ** 2
    idx = torch.arange(13)
    for world_size, micro in ((1, None), (1, 4), (2, None), (3, 2), (4, 3)):
        seen, averaged = [], 0.0
        for rank in range(world_size):
            monkeypatch.setenv("WORLD_SIZE", str(world_size))
            monkeypatch.setenv("RANK", str(rank))
            chunks = distributed.local_chunks(idx, micro)
            assert all(micro is None or len(c) <= micro for c, _ in chunks)
            seen += [int(i) for c, w in chunks if w > 0 for i in c]
            averaged += sum(w * float(losses[c].mean()) for c, w in chunks) / world_size
        assert sorted(seen) == list(range(13))
        assert averaged == pytest.approx(float(losses.mean()), rel=1e-12)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert [(c.tolist(), w) for c, w in distributed.local_chunks(torch.arange(3))] == [([0], 0.0)]


def test_without_torchrun_the_helpers_are_single_process_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.world() == distributed.World() and not distributed.active()
    assert distributed.row_range(10) == slice(0, 10) and distributed.owns(7)
    assert distributed.device_name("cuda") == "cuda"
    [(chunk, weight)] = distributed.local_chunks(torch.arange(5))
    assert weight == 1.0 and chunk.tolist() == list(range(5))
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.device_name("cuda") == "cuda:1" and distributed.device_name("cpu") == "cpu"


def _collectives_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """One of two gloo processes: gather uneven shares in small pieces, all-reduce streamed moments."""
    from pipeline.distill.subspace import Moments, all_reduce_moments

    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    with distributed.session("cpu", timeout_min=2):
        table = torch.arange(11 * 3, dtype=torch.float64).view(11, 3)
        gathered = distributed.all_gather_rows(table[distributed.row_range(11)], 11, chunk_bytes=2 * 3 * 8)
        g = torch.Generator().manual_seed(0)
        a, c = torch.randn(40, 5, generator=g, dtype=torch.float64) + 2, torch.randn(40, 5, generator=g, dtype=torch.float64)
        moments, own = Moments(5), []
        for number, start in enumerate(range(0, 40, 7)):
            if distributed.owns(number):
                moments.add(a[start:start + 7], c[start:start + 7])
                own.append(number)
        all_reduce_moments(moments, own)
        torch.save({"gathered": gathered, "count": moments.count, "sum_ac": moments.sum_ac, "sum_aa": moments.sum_aa,
                    "sample": torch.cat(moments.sample), "a": a, "c": c}, Path(out) / f"{rank}.pt")


def test_gloo_collectives_rebuild_what_one_process_computes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from pipeline.distill.subspace import Moments

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_collectives_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert torch.equal(got["gathered"], torch.arange(33, dtype=torch.float64).view(11, 3))
        single = Moments(5)
        for start in range(0, 40, 7):
            single.add(got["a"][start:start + 7], got["c"][start:start + 7])
        assert got["count"] == single.count == 40
        assert torch.allclose(got["sum_ac"], single.sum_ac, rtol=1e-12, atol=1e-12)
        assert torch.allclose(got["sum_aa"], single.sum_aa, rtol=1e-12, atol=1e-12)
        assert torch.equal(got["sample"], torch.cat(single.sample))     # the rows one process keeps, in order
