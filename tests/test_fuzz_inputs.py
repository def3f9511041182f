"""Property tests: mangled configs and cache entries give a clear error or a miss, never a crash or a wrong hit.

Configs: every shipped config, truncated, with a byte flipped, with a key added or a value replaced by something
of another type. Loading and the name checks must either accept it or raise an EdgesmithError (the CLI prints those
as one paragraph, exit 2); any other exception would reach the user as a traceback.

Cache entries: a committed stage folder whose stage.json or files were damaged must be a miss (the stage runs
again), never served.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cache import BuildCache, file_list
from pipeline.config import load_config
from pipeline.errors import EdgesmithError
from pipeline.preflight import check_names

from .conftest import REPO, run_cli

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3),
                   st.dictionaries(st.text(max_size=6), st.integers(), max_size=2))


def dotted_keys(node, prefix: str = "") -> list[str]:
    """Every dotted key of a raw config mapping (sections and leaves)."""
    keys = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, dict):
            keys += dotted_keys(value, path + ".")
    return keys


def set_dotted(raw: dict, dotted: str, value) -> dict:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return raw


def accepted_or_clear(path: Path) -> None:
    """The config loads and passes the name checks, or an EdgesmithError says why: nothing else may escape."""
    try:
        check_names(load_config(path))
    except EdgesmithError as exc:
        assert exc.problem, "an error without a message"


@FUZZ
@given(config=st.sampled_from(CONFIGS), data=st.data())
def test_a_mangled_config_text_is_accepted_or_a_clear_error(tmp_path, config, data):
    text = bytearray(config.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    at = data.draw(st.integers(0, len(text) - 1))
    if how == "truncate":
        text = text[:at]
    elif how == "flip":
        text[at] ^= data.draw(st.integers(1, 255))
    else:
        text[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    path = tmp_path / "mangled.yaml"
    path.write_bytes(bytes(text))
    accepted_or_clear(path)


@FUZZ
@given(config=st.sampled_from(CONFIGS), data=st.data())
def test_a_config_with_a_wrong_value_or_an_extra_key_is_accepted_or_a_clear_error(tmp_path, config, data):
    raw = yaml.safe_load(config.read_text())
    target = data.draw(st.sampled_from(dotted_keys(raw)))
    if data.draw(st.booleans()):
        set_dotted(raw, target, data.draw(values))
    else:
        node = raw
        for key in filter(None, target.rpartition(".")[0].split(".")):
            node = node[key]
        if isinstance(node, dict):
            node[data.draw(st.text(min_size=1, max_size=10))] = data.draw(values)
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    accepted_or_clear(path)


@pytest.mark.parametrize("text", ["build: [", "- a list\n- not a mapping\n", "build: {name: 'x y'}\n", "\xff\xfe"])
def test_the_cli_prints_a_message_not_a_traceback(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text.encode("latin-1"))
    result = run_cli("check", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error:" in (result.stdout + result.stderr).lower()


def committed_entry(root: Path) -> tuple[BuildCache, str]:
    cache, key = BuildCache(root), "k" * 64
    with cache.staging("distill", key) as tmp:
        (tmp / "student.pt").write_bytes(bytes(range(256)) * 8)
        (tmp / "metrics.json").write_text(json.dumps({"acc": 0.5}))
        cache.commit(tmp, "distill", key, {"key": key, "files": file_list(tmp), "metrics": {"acc": 0.5}})
    assert cache.lookup("distill", key) is not None
    return cache, key


@FUZZ
@given(data=st.data())
def test_a_damaged_cache_entry_is_a_miss(tmp_path_factory, data):
    cache, key = committed_entry(tmp_path_factory.mktemp("cache"))
    folder = cache.path("distill", key)
    victim = folder / data.draw(st.sampled_from(["student.pt", "metrics.json", BuildCache.STAGE_FILE]))
    content = bytearray(victim.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "delete"]))
    if how == "delete":
        victim.unlink()
    elif how == "truncate":
        victim.write_bytes(bytes(content[:data.draw(st.integers(0, len(content) - 1))]))
    else:
        content[data.draw(st.integers(0, len(content) - 1))] ^= data.draw(st.integers(1, 255))
        victim.write_bytes(bytes(content))
    hit = cache.lookup("distill", key, verify=True)
    if victim.name != BuildCache.STAGE_FILE:
        assert hit is None, f"{how} of {victim.name} was served from the cache"
    elif hit is not None:
        # a stage.json that still parses after the flip: served only if its file list still matches the files
        assert hit["key"] == key and BuildCache.damaged(folder, hit["files"], verify=True) is None
