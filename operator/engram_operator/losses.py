"""What a failover cost, measured after the fact (pure: views in, records out).

A promotion record's `entriesPossiblyLost` is an estimate made at decision time from what the
control plane last heard. Once the deposed primary rejoins and follows the new one, log matching
has cut exactly the entries the new primary never had (acknowledged ones included), and the node
shows each cut in its space view (`truncations`): `entriesLost` is that count, or 0 when its log
proved identical. Both control planes complete their records with it: local mode its decision
list in cluster.json, the Kubernetes operator status.lastPromotion.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def measure_losses(decisions: list[dict[str, Any]], views: Mapping[str, Mapping[str, Any]]) -> bool:
    """Complete promotion records with what each failover cost, once it is known.

    `views` maps node -> its view of this space (`GET /v1/spaces/{space}`). A record's old
    primary, once it follows a primary of the record's epoch or later, either cut a divergent
    tail (its `truncations` say how many entries: under `async` every acknowledged write the
    failover lost is among them) or holds nothing the new primary lacks (`matched_sequence`
    equals its `last_sequence`): `entriesLost` is then that count, or 0. `entriesPossiblyLost`
    stays the estimate made at decision time. Returns whether any record changed.
    """
    changed = False
    for d in decisions:
        if d.get("winner") is None or d.get("entriesLost") is not None:
            continue
        view = views.get(str(d.get("oldPrimary")))
        epoch = int(d.get("newEpoch") or 0)
        if not view or not epoch:
            continue
        cuts = [t for t in view.get("truncations") or [] if int(t.get("epoch", 0)) >= epoch]
        if cuts:
            d["entriesLost"] = int(cuts[0]["dropped"])
            changed = True
            continue
        matched, last = view.get("matched_sequence"), view.get("last_sequence")
        if (
            view.get("role") == "replica"
            and int(view.get("epoch") or 0) >= epoch
            and isinstance(matched, int)
            and matched > 0
            and matched == last
        ):
            d["entriesLost"] = 0
            changed = True
    return changed
