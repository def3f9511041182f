"""The report's "How the student was chosen" section: the choice and why, the fronts, the closest rivals."""

from __future__ import annotations

import json
from pathlib import Path

from ..report import Section, esc, figure_html, html_table, md_table
from ..validation.targets import timed_label
from . import choose


def search_section(search_dir: Path) -> Section:
    folder = Path(search_dir)
    chosen = json.loads((folder / "chosen.json").read_text())
    table = json.loads((folder / "trials.json").read_text())
    rows = [choose.Row.from_json(r) for r in table]
    fronts = choose.front_trials(rows)
    front = set(fronts["macs"]) | set(fronts["p99_ms"])
    shown = sorted([r for r in table if r["finalist"] or r["trial"] in front],
                   key=lambda r: (-(r["full_val_acc"] or r["proxy_val_acc"] or 0), r["macs"]))
    target = chosen.get("latency_target", "local")
    mcu = any(r.get("arena_kb") is not None for r in table)     # the MCU budgets were set: their columns
    headers = ["candidate", "MACs", "params", "INT8 KiB", *(["arena KiB", "flash KiB"] if mcu else []),
               f"p99 ms (median, {timed_label(target)})", "proxy val", "full val", "finalist", "budgets missed"]
    body = [[f"{r['arch']}@{r['resolution']}", r["macs"], r["params"], r["size_kb"],
             *([r.get("arena_kb"), r.get("flash_kb")] if mcu else []), r["p99_median_ms"],
             r["proxy_val_acc"], r["full_val_acc"], "yes" if r["finalist"] else "", "; ".join(r["misses"])]
            for r in shown]
    marks = ["pass" if r["trial"] == chosen["trial"] else "" for r in shown]
    states = {s: sum(r["state"] == s for r in table) for s in ("complete", "pruned", "skipped")}
    intro = (f"Chosen: {chosen['arch']} at {chosen['resolution']} px, the {chosen['why']}. {len(table)} candidates: "
             f"{states['complete']} trained on the proxy schedule, {states['pruned']} stopped early by successive "
             f"halving, {states['skipped']} over the MACs or parameter budget and never trained. Below: the finalists "
             "and the candidates on a front (no other one is both more accurate and cheaper).")
    figure = figure_html(choose.fronts_figure(rows, fronts), "accuracy against MACs and p99")
    html = (f"<p>{esc(intro)}</p>" + html_table(headers, body, marks) + figure)
    return Section("How the student was chosen", html, intro + "\n\n" + md_table(headers, body))
