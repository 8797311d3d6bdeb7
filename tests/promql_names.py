"""The metric names a PromQL expression reads (a small tokenizer, enough for our own
dashboards and rules: strings, label matchers, ranges and label lists are removed first,
then every identifier that is not a function, keyword or aggregation is a metric)."""

from __future__ import annotations

import re

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "atan2", "inf", "nan",
    # aggregations (also used as `sum by (x) (...)`, so not always followed by "(")
    "sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?")


def metric_names(expr: str) -> set[str]:
    """Metric names read by `expr` (Grafana's `label_values(m, label)` included)."""
    lv = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr, re.S)
    if lv:
        expr = lv.group(1)
    e = _STRING.sub('""', expr)
    e = _MATCHERS.sub("", e)
    e = _RANGE.sub("", e)
    e = _LABEL_LIST.sub(" ", e)
    names = set()
    for m in _IDENT.finditer(e):
        word, call = m.group(1), m.group(2)
        if call or word in KEYWORDS:
            continue  # a function call, an aggregation or a keyword
        names.add(word)
    return names
