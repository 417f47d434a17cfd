"""Self-contained HTML reports: one per run (``report.html`` next to its ``sinks.json``) and one per sweep.

A report is a single HTML file with inline CSS and no scripts; figures and JSON files are linked by paths
relative to the report, so the folder can be copied or served as it is. :func:`linked_files` lists every link of a
report (the tests check that each one exists).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}img{max-width:100%;
border:1px solid #eee;margin:0.3em 0}figure{margin:1em 0}figcaption{font-size:13px;color:#555}
pre{background:#f7f7f7;padding:0.8em;overflow-x:auto;font-size:12px;max-height:30em}.note{color:#555;font-size:13px}"""


def esc(x) -> str:
  return html.escape(str(x))


def fmt(x, spec: str = ".4g") -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "—"
  if isinstance(x, bool):
    return "yes" if x else "no"
  if isinstance(x, (int, float)):
    return format(x, spec)
  return str(x)


def table(header: Sequence[str], rows: Sequence[Sequence], spec: str = ".4g") -> str:
  head = "".join(f"<th>{esc(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{esc(fmt(c, spec))}</td>" for c in r) + "</tr>" for r in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def markdown_table(md: str) -> str:
  """The Markdown tables of ``md`` as HTML tables; other lines as paragraphs."""
  out, rows = [], []

  def flush():
    if rows:
      cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows if not re.fullmatch(r"\|[-|: ]+\|?",
                                                                                                         r.strip())]
      out.append(table(cells[0], cells[1:]))
      rows.clear()

  for line in md.splitlines():
    if line.strip().startswith("|"):
      rows.append(line)
      continue
    flush()
    if line.strip():
      text = esc(line.strip())
      bold = re.sub(r"[*][*](.+?)[*][*]", r"<b>\1</b>", text)
      out.append(f"<p>{bold}</p>")
  flush()
  return "\n".join(out)


def figure(src: str, caption: str) -> str:
  return f'<figure><a href="{esc(src)}"><img src="{esc(src)}" alt="{esc(caption)}"></a>' \
         f"<figcaption>{esc(caption)}</figcaption></figure>"


def links(items: Sequence[tuple[str, str]]) -> str:
  return "<ul>" + "".join(f'<li><a href="{esc(href)}">{esc(label)}</a></li>' for label, href in items) + "</ul>"


def pre(text: str) -> str:
  return f"<pre>{esc(text)}</pre>"


def page(title: str, body: Sequence[str]) -> str:
  return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
          f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def write(path: str, title: str, body: Sequence[str]) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w") as f:
    f.write(page(title, body))
  os.replace(path + ".tmp", path)
  return path


def linked_files(path: str) -> list[str]:
  """Every local ``href``/``src`` target of the report at ``path``, as paths relative to its folder."""
  with open(path) as f:
    text = f.read()
  targets = re.findall(r'(?:href|src)="([^"]+)"', text)
  return sorted({html.unescape(t) for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")})


def read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def rel(path: str, start: str) -> str:
  return os.path.relpath(path, start).replace(os.sep, "/")


def existing(base: str, names: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
  """``(label, path)`` for the files among ``names`` that exist, paths relative to ``base``."""
  return [(label, rel(p, base)) for label, p in names if os.path.exists(p)]


METRIC_NAMES = {
    "sink_rate_proxy": "Sink_1^eps, Gu proxy (% of heads)", "sink_rate_raw": "Sink_1^eps, raw weights (% of heads)",
    "first_token_attn_proxy": "weight on token 1, proxy (0-1)", "first_token_attn_raw": "weight on token 1, raw (0-1)",
    "row_mass": "raw row mass (1 = normalised)", "sink_mass": "weight on the learned sink (0-1)",
    "value_norm_ratio": "‖v_1‖ / mean ‖v_t‖ (value drain)", "massive_ratio": "max over layers ‖h_1‖ / mean ‖h_t‖",
    "top_to_median": "max over layers top |h| / median |h| (Sun et al.)"}


def summary_table(reports: Mapping[str, Mapping | None]) -> str:
  """Summary metrics side by side, one column per probe variant (``{"with BOS": report, ...}``)."""
  cols = [(name, r) for name, r in reports.items() if r]
  keys = list(dict.fromkeys(k for _, r in cols for k in r.get("summary", {})))
  rows = [[METRIC_NAMES.get(k, k)] + [r["summary"].get(k) for _, r in cols] for k in keys]
  ce = list(dict.fromkeys(k for _, r in cols for k in r.get("probe_loss", {})))
  names = {"ce": "probe CE (nats/token)", "ce_masked": "probe CE, masked queries (BB: bigram)",
           "ce_unmasked": "probe CE, other queries (BB: backcopy)"}
  rows += [[names.get(k, k)] + [r.get("probe_loss", {}).get(k) for _, r in cols] for k in ce]
  return table(["metric"] + [n for n, _ in cols], rows)


def massive_table(report: Mapping) -> str:
  rows = []
  for i, h in enumerate(report.get("hidden", [])):
    rows.append([f"{i} ({'embeddings' if i == 0 else f'after block {i}'})", h["top_abs"][0], h["median_abs"],
                 h.get("top_to_median"), h.get("massive"), int(h["top_position"][0]) + 1, int(h["top_channel"][0]),
                 h["norm_ratio"]])
  return table(["residual state", "top |h|", "median |h|", "top / median", "massive (Sun et al.)",
                "position of top (1-based)", "channel of top", "‖h_1‖ / mean ‖h_t‖"], rows)
