"""Choosing labels and bringing them back: `edgesmith suggest-labels` (TypiClust without labels; uncertainty and
teacher-student disagreement with them) and data.labels_file (exactly the file's images labelled, the rest pooled),
with the errors for bad counts and bad labels files."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
import yaml

from pipeline.config import load_config, parse_config
from pipeline.data import load_dataset
from pipeline.data.for_config import subtask_data
from pipeline.errors import ConfigError, DataError
from pipeline.preflight import check_data
from pipeline.progress import ProgressDisplay
from pipeline.runner import Build
from pipeline.suggest import check_count, suggest

from .conftest import run_cli, tiny_config_dict

CLASSES = ["T-shirt/top", "Pullover", "Coat", "Shirt"]


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_labels(path, rows, header="image,label"):
    path.write_text(header + "\n" + "".join(f"{image},{label}\n" for image, label in rows))
    return path


def true_labels(cfg, ids):
    """The dataset's labels playing the annotator: subtask classes by name, any other image left unlabelled."""
    dataset = load_dataset(cfg.data)
    names = [dataset.class_names[c] for c in dataset.train.labels[[int(i) for i in ids]]]
    return [(i, n if n in CLASSES else "") for i, n in zip(ids, names)]


def stage_folders(root):
    return [p.name for p in root.glob("*-*") if p.is_dir()] if root.exists() else []


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """suggest-labels on the tiny config without labels, through the CLI."""
    tmp = tmp_path_factory.mktemp("suggest")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tmp / "builds")))
    result = run_cli("suggest-labels", config, "--count", 60, "--out", tmp / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp, config


def test_cold_start_ranks_typical_images_of_distinct_clusters(cold):
    tmp, config = cold
    rows = read_rows(tmp / "out" / "suggestions.csv")
    assert list(rows[0]) == ["image", "rank", "score", "why", "label"]
    assert len(rows) == 60 and len({r["image"] for r in rows}) == 60
    assert [int(r["rank"]) for r in rows] == list(range(1, 61))
    clusters = [re.match(r"typical of cluster (\d+) \((\d+) images, no label yet\)", r["why"]) for r in rows]
    assert all(clusters) and len({m.group(1) for m in clusters}) == 60        # one image from each cluster
    sizes = [int(m.group(2)) for m in clusters]
    assert sizes == sorted(sizes, reverse=True)                                # largest clusters first
    assert (tmp / "out" / "suggestions.png").stat().st_size > 5000
    # deterministic: the same config ranks the same images (here in-process, the teacher from the cache)
    again, _ = suggest(load_config(config), 60, ProgressDisplay(enabled=False))
    assert [s.image for s in again] == [r["image"] for r in rows]


def test_a_count_outside_the_pool_is_refused_before_anything_is_built(tmp_path, write_config):
    config = write_config()
    result = run_cli("suggest-labels", config, "--count", 401)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--count 401 asks for more images than the unlabelled pool holds (400)" in result.stdout
    assert stage_folders(tmp_path / "builds" / "tiny") == []
    with pytest.raises(ConfigError, match="at least one image"):
        check_count(0, 400)


BAD_FILES = {
    "unknown class": ("image,label\n0,Coats\n", r"line 2: 'Coats' is not a subtask class. Did you mean 'Coat'\?"),
    "missing image": ("image,label\n4000,Coat\n", r"line 2: image '4000' is not a training image"),
    "two classes": ("image,label\n1,Coat\n1,Shirt\n", r"line 3: image '1' is labelled 'Shirt', but line 2 labels it 'Coat'"),
    "empty": ("", r"is empty"),
    "no label column": ("image,class\n1,Coat\n", r"line 1: the header .* lacks the column label"),
    "short row": ("image,label\n1\n", r"malformed: line 2 has 1 field"),
    "too few": ("image,label\n0,Coat\n", r"at least 2 labelled images .* 'T-shirt/top' has 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_labels_file_names_file_line_and_fix(tmp_path, case):
    text, message = BAD_FILES[case]
    path = tmp_path / "labels.csv"
    path.write_text(text)
    raw = tiny_config_dict(tmp_path / "builds")
    raw["data"]["labels_file"] = str(path)
    with pytest.raises(DataError, match=message) as info:
        subtask_data(parse_config(raw))
    assert str(path) in info.value.message and "\n" not in info.value.message


def test_labels_file_and_budget_exclude_each_other_and_the_cli_refuses_a_bad_file(tmp_path, write_config):
    with pytest.raises(ConfigError, match="labels_per_class and labels_file both say"):
        parse_config(tiny_config_dict(tmp_path, **{"data.labels_per_class": 8, "data.labels_file": "x.csv"}))
    bad = write_labels(tmp_path / "labels.csv", [(0, "Coats")])
    config = write_config(**{"data.labels_file": str(bad)})
    with pytest.raises(DataError, match="'Coats' is not a subtask class"):     # what `edgesmith check` runs
        check_data(load_config(config))
    result = run_cli("build", config)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"data.labels_file {bad} has 1 problem: line 2: 'Coats' is not a subtask class" in \
        " ".join(result.stdout.split())
    assert stage_folders(tmp_path / "builds" / "tiny") == []


def test_suggested_labels_come_back_as_exactly_the_labelled_set(cold):
    tmp, _ = cold
    ids = [r["image"] for r in read_rows(tmp / "out" / "suggestions.csv")]
    raw = tiny_config_dict(tmp / "builds")
    labels = true_labels(parse_config(raw), ids)
    path = write_labels(tmp / "labels.csv", labels + [(ids[0], labels[0][1])])   # a repeated row counts once
    raw["data"]["labels_file"] = str(path)
    config = tmp / "labelled.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config)
    data = subtask_data(cfg)
    dataset = data.dataset
    labelled = {int(i): name for i, name in labels if name}
    got = np.concatenate([data.train.images, data.val.images])
    assert len(got) == len(labelled) and len(data.pool) == len(dataset.train) - len(labelled)
    want = {dataset.train.images[i].tobytes(): CLASSES.index(n) for i, n in labelled.items()}
    assert {im.tobytes(): int(c) for im, c in zip(got, np.concatenate([data.train.labels, data.val.labels]))} == want
    result = run_cli("build", config)
    assert result.returncode == 0, result.stdout + result.stderr
    distill = next(r for r in Build(cfg).status() if r[0] == "distill")
    assert distill[2]                                          # built and cached
    # the file's content is in the stage keys: another labelling is another build
    before, built = {p.stage.name: p.key for p in Build(cfg).plan()}, path.read_text()
    write_labels(path, labels)                                 # without the repeated row
    after = {p.stage.name: p.key for p in Build(load_config(config)).plan()}
    assert before["adapt"] != after["adapt"] and before["distill"] != after["distill"]
    path.write_text(built)                                     # back to the labelling that was built
    assert {p.stage.name: p.key for p in Build(load_config(config)).plan()} == before

    # with labels: the pool is ranked, the labelled images never suggested, covered clusters by uncertainty
    more = run_cli("suggest-labels", config, "--count", 20, "--out", tmp / "more")
    assert more.returncode == 0, more.stdout + more.stderr
    rows = read_rows(tmp / "more" / "suggestions.csv")
    assert len(rows) == 20 and not {r["image"] for r in rows} & {str(i) for i in labelled}
    assert all(r["why"].startswith(("typical of cluster", "uncertain in cluster")) for r in rows)
    assert any("teacher margin" in r["why"] for r in rows)
