"""The text of `kubectl engram status`, from MemorySpaces and node Leases. Pure: `now` is given.

One table of spaces (or one space in full) and one table of nodes, laid out like `kubectl get`:
columns padded to their widest cell, `-` where nothing is known yet.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from engram_contract.kubernetes import (
    ANNOTATION_DRAINING,
    ANNOTATION_FENCED,
    ANNOTATION_HTTP,
    LABEL_RACK,
    LABEL_ZONE,
    LEASE_PREFIX,
)

Row = Sequence[str]


def table(header: Row, rows: Iterable[Row]) -> str:
    """Columns left-aligned, three spaces apart, padded to the widest cell (as kubectl)."""
    body = [list(header), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in body) for i in range(len(header))]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in body
    )


def _parse_time(text: object) -> datetime.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def ago(text: object, now: datetime.datetime) -> str:
    """`0.4s ago`, `3m12s ago`, `2h5m ago`; `-` for no time."""
    when = _parse_time(text)
    if when is None:
        return "-"
    secs = max(0.0, (now - when).total_seconds())
    if secs < 60:
        return f"{secs:.1f}s ago"
    mins, s = divmod(int(secs), 60)
    if mins < 60:
        return f"{mins}m{s}s ago"
    hours, m = divmod(mins, 60)
    return f"{hours}h{m}m ago"


def _text(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _secs(value: object) -> str:
    """Seconds of lag with millisecond precision; `-` when not reported."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{float(value):.3f}"


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _members(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(r.get("node")): r for r in status.get("members") or [] if isinstance(r, Mapping)}


def _replica_lag(status: Mapping[str, Any]) -> str:
    """`engram-0 0/0.000s, engram-2 12/0.310s`: lag entries / seconds of each replica, as its
    primary last reported them (`?` for a replica it has not reported)."""
    rows = _members(status)
    parts = []
    for node in status.get("replicas") or []:
        row = rows.get(node)
        if row is None:
            parts.append(f"{node} ?")
            continue
        lag = f"{_text(row.get('lagEntries'))}/{_secs(row.get('lagSeconds'))}s"
        state = str(row.get("state") or "")
        parts.append(f"{node} {lag}" + (f" {state}" if state and state != "Healthy" else ""))
    return ", ".join(parts) or "-"


def spaces_table(spaces: Iterable[Mapping[str, Any]]) -> str:
    rows = []
    for sp in sorted(spaces, key=lambda s: str(_meta(s).get("name", ""))):
        st = sp.get("status") or {}
        rows.append(
            [
                str(_meta(sp).get("name", "")),
                _text(st.get("phase")),
                _text(st.get("primary")),
                _text(st.get("epoch")),
                _text(st.get("ready")),
                _replica_lag(st),
            ]
        )
    header = ["SPACE", "PHASE", "PRIMARY", "EPOCH", "READY", "REPLICA LAG (entries/seconds)"]
    return table(header, rows)


def node_rows(leases: Iterable[Mapping[str, Any]], now: datetime.datetime) -> dict[str, list[str]]:
    """Node name -> [zone, rack, renewed, http address, condition] from its Lease."""
    out: dict[str, list[str]] = {}
    for lease in leases:
        meta = _meta(lease)
        name = str(meta.get("name", ""))
        if not name.startswith(LEASE_PREFIX):
            continue
        labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
        flags = [
            word
            for word, key in (("draining", ANNOTATION_DRAINING), ("fenced", ANNOTATION_FENCED))
            if notes.get(key) == "true"
        ]
        out[name[len(LEASE_PREFIX) :]] = [
            _text(labels.get(LABEL_ZONE)),
            _text(labels.get(LABEL_RACK)),
            ago((lease.get("spec") or {}).get("renewTime"), now),
            _text(notes.get(ANNOTATION_HTTP)),
            ",".join(flags) or "-",
        ]
    return out


def nodes_table(
    leases: Iterable[Mapping[str, Any]],
    spaces: Iterable[Mapping[str, Any]],
    now: datetime.datetime,
) -> str:
    leads: dict[str, int] = {}
    follows: dict[str, int] = {}
    for sp in spaces:
        st = sp.get("status") or {}
        if st.get("primary"):
            leads[str(st["primary"])] = leads.get(str(st["primary"]), 0) + 1
        for r in st.get("replicas") or []:
            follows[r] = follows.get(r, 0) + 1
    rows = node_rows(leases, now)
    for n in set(leads) | set(follows):
        rows.setdefault(n, ["-", "-", "no Lease", "-", "-"])
    header = ["NODE", "ZONE", "RACK", "LEASE RENEWED", "HTTP", "LEADS", "REPLICATES", "FLAGS"]
    out = [
        [n, *cells[:4], str(leads.get(n, 0)), str(follows.get(n, 0)), cells[4]]
        for n, cells in sorted(rows.items())
    ]
    return table(header, out)


def overview(
    namespace: str,
    spaces: Sequence[Mapping[str, Any]],
    leases: Sequence[Mapping[str, Any]],
    now: datetime.datetime,
) -> str:
    """`kubectl engram status`: every space, then every node."""
    if not spaces:
        head = f"No MemorySpaces in namespace {namespace}."
    else:
        head = f"MemorySpaces in namespace {namespace}\n\n{spaces_table(spaces)}"
    return f"{head}\n\nNodes\n\n{nodes_table(leases, spaces, now)}\n"


def _switchover(status: Mapping[str, Any]) -> str:
    sw = status.get("switchover")
    if not isinstance(sw, Mapping) or not sw.get("target"):
        return "none"
    text = f"to {sw.get('target')}: {sw.get('state', '?')}"
    return text + (f" ({sw['reason']})" if sw.get("reason") else "")


def _promotion(status: Mapping[str, Any]) -> str:
    lp = status.get("lastPromotion")
    if not isinstance(lp, Mapping):
        return "none"
    return str(lp.get("summary") or f"{lp.get('winner', '?')} at epoch {lp.get('newEpoch', '?')}")


def detail(
    space: Mapping[str, Any], leases: Sequence[Mapping[str, Any]], now: datetime.datetime
) -> str:
    """`kubectl engram status SPACE`: the space's state, its members and their lag."""
    meta, spec, st = _meta(space), space.get("spec") or {}, space.get("status") or {}
    conditions = {
        str(c.get("type")): c for c in st.get("conditions") or [] if isinstance(c, Mapping)
    }
    ready = conditions.get("Ready", {})
    spec_line = (
        f"ack {spec.get('ackPolicy', 'default')}, {spec.get('replicas', 'default')} replicas"
        + (", paused" if spec.get("paused") else "")
        + (f", targetPrimary {spec['targetPrimary']}" if spec.get("targetPrimary") else "")
    )
    facts = [
        ("Space", f"{meta.get('name', '')} (namespace {meta.get('namespace', '-')})"),
        ("Phase", f"{_text(st.get('phase'))}, Ready {ready.get('status', 'Unknown')}"),
        ("Primary", _text(st.get("primary"))),
        ("Epoch", _text(st.get("epoch"))),
        ("Ready members", _text(st.get("ready"))),
        ("Spec", spec_line),
        ("Switchover", _switchover(st)),
        ("Last promotion", _promotion(st)),
        ("Message", _text(st.get("message"))),
    ]
    width = max(len(k) for k, _ in facts) + 2
    lines = [f"{k + ':':<{width}}{v}" for k, v in facts]
    nodes = node_rows(leases, now)
    rows = _members(st)
    members = [str(st["primary"])] if st.get("primary") else []
    members += [r for r in st.get("replicas") or [] if r not in members]
    out = []
    for node in members:
        row = rows.get(node, {})
        role = "primary" if node == st.get("primary") else "replica"
        zone, _, renewed, _, flags = nodes.get(node, ["-", "-", "no Lease", "-", "-"])
        out.append(
            [
                node,
                role,
                _text(row.get("state")),
                _text(row.get("appliedSequence")),
                _text(row.get("lagEntries")),
                _secs(row.get("lagSeconds")),
                zone,
                renewed,
                flags,
            ]
        )
    header = [
        "NODE",
        "ROLE",
        "STATE",
        "APPLIED",
        "LAG ENTRIES",
        "LAG SECONDS",
        "ZONE",
        "LEASE RENEWED",
        "FLAGS",
    ]
    reported = ago(st.get("membersReportedAt"), now)
    epoch = _text(st.get("membersEpoch"))
    members_head = f"Members (reported by the primary {reported}, epoch {epoch})"
    return "\n".join(lines) + f"\n\n{members_head}\n\n{table(header, out)}\n"
