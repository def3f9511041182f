"""The report opens with the verdict as a matrix: artifacts (x runtime, x target) by budgets, missed rows first."""

from html.parser import HTMLParser

from pipeline.validation.budgets import Verdict
from pipeline.validation.matrix import short_matrix_text, verdict_matrix
from pipeline.validation.sections import verdict_section

HOSTILE = '<img src=x onerror="alert(1)">.onnx'


class Tables(HTMLParser):
    """Each <table> as rows of (text, class) cells."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ["", dict(attrs).get("class", "")]

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(tuple(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data


def local(artifact, runtime, budget, measured, allowed, ok, target="local"):
    return Verdict(target, artifact, runtime, budget, measured, allowed, ok)


VERDICTS = [
    local("model.onnx", "onnxruntime", "min_accuracy", 0.865, 0.84, True),
    local("model.onnx", "onnxruntime", "max_p99_ms", 0.12, 10.0, True),
    local("model.onnx", "onnxruntime", "max_size_mb", 0.41, 1.0, True),
    local(HOSTILE, "onnxruntime", "min_accuracy", 0.80, 0.84, False),
    local(HOSTILE, "onnxruntime", "max_p99_ms", 0.10, 10.0, True),
    local("tflm/model.int8.tflite", "tflm", "min_accuracy", 0.868, 0.84, True),
    local("tflm/model.int8.tflite", "tflm", "max_p99_ms", 12.5, 10.0, False),
    local("tflm/model.int8.tflite", "tflm", "max_arena_kb", 40.0, 64.0, True),
]


def matrix_table(html: str) -> list[list[tuple[str, str]]]:
    parser = Tables()
    parser.feed(html)
    return parser.tables[0]


def test_missed_rows_come_first_in_check_order():
    matrix = verdict_matrix(VERDICTS)
    assert [r.label for r in matrix.rows] == [f"{HOSTILE} (onnxruntime)", "tflm/model.int8.tflite (tflm)",
                                              "model.onnx (onnxruntime)"]
    assert [r.failed for r in matrix.rows] == [True, True, False]
    assert matrix.columns == ("min_accuracy", "max_p99_ms", "max_size_mb", "max_arena_kb")  # the Budgets' order


def test_report_opens_with_the_matrix_cells_styled_and_escaped():
    section = verdict_section(VERDICTS)
    assert HOSTILE not in section.html and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;.onnx" in section.html
    assert "FAILED: 2 of 8 checks missed" in section.html
    head, *rows = matrix_table(section.html)
    assert [text for text, _ in head] == ["artifact (runtime)", "top-1≥ 0.84", "p99 ms≤ 10", "size MiB≤ 1",
                                          "arena KiB≤ 64"]
    assert rows[0] == [(f"{HOSTILE} (onnxruntime)", "l fail"), ("0.8", "miss"), ("0.1", "pass"), ("—", "na"),
                       ("—", "na")]
    assert rows[1] == [("tflm/model.int8.tflite (tflm)", "l fail"), ("0.868", "pass"), ("12.5", "miss"),
                       ("—", "na"), ("40", "pass")]
    assert rows[2][0] == ("model.onnx (onnxruntime)", "l ok") and [c for _, c in rows[2][1:]] == ["pass"] * 3 + ["na"]
    # the full list of checks follows the matrix
    assert section.html.index('class="matrix"') < section.html.index("<h3>Every check</h3>")


def test_several_targets_get_a_target_column_and_a_per_target_limit_per_cell():
    verdicts = [local("model.onnx", "onnxruntime", "max_p99_ms", 0.2, 1.0, True),
                local("model.onnx", "onnxruntime", "max_p99_ms", 3.0, 2.0, False, target="ssh://pi@board"),
                Verdict("ssh://pi@board", "-", "-", "device tests", "0 failed", "0 failed", True)]
    head, *rows = matrix_table(verdict_section(verdicts).html)
    assert [text for text, _ in head] == ["target", "artifact (runtime)", "p99 ms", "device tests"]  # limits differ
    assert [[text for text, _ in r] for r in rows] == [["ssh://pi@board", "model.onnx (onnxruntime)", "3", "—"],
                                                       ["local", "model.onnx (onnxruntime)", "0.2", "—"],
                                                       ["ssh://pi@board", "whole target", "—", "0 failed"]]


def test_markdown_marks_misses():
    md = verdict_section(VERDICTS).markdown
    assert "| tflm/model.int8.tflite (tflm) | 0.868 | 12.5 ✗ | — | 40 |" in md


def test_the_log_gets_the_matrix_only_when_it_fits_a_terminal():
    text = short_matrix_text(VERDICTS[5:])
    assert text is not None and text.splitlines()[2].split() == ["tflm/model.int8.tflite", "(tflm)", "0.868",
                                                                  "12.5", "✗", "40"]
    wide = [local(f"model{i}.onnx", "onnxruntime", "min_accuracy", 0.9, 0.8, True) for i in range(13)]
    assert short_matrix_text(wide) is None  # 13 rows: report.html has it


def test_no_checks_no_matrix():
    assert 'class="matrix"' not in verdict_section([]).html
