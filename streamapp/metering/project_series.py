"""The meter's per-project Prometheus series, with bounded label cardinality.

Per-project series exist only for the ``top_n`` projects by current rate; everything else is
summed into ``project="other"`` (``BoundedProjectCounters``), so the number of series is
bounded whatever the number of projects. ``project_families`` renders them, with the top
projects' shed state, rates and quotas, from the meter at scrape time (``streamapp.metrics``
registers the collector that calls it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .service import Meter

#: Label value of the bucket that sums every project without a series of its own. A real project
#: called "other" is always counted in the bucket (it never gets a label of its own).
OTHER = "other"
#: Per-project counters the meter keeps (``Meter.counters()``).
PROJECT_OUTCOMES = ("received", "admitted", "diverted", "dropped")
DEFAULT_TOP_N = 20
_TOTALS = "\x00totals"  # key of the all-projects totals in BoundedProjectCounters._last (never a project id)


class BoundedProjectCounters:
    """Per-project counters with at most ``top_n`` project label values plus ``other``.

    ``update`` is given the meter's cumulative counters of every local project and the
    ids of the current top projects. It adds each project's increase since the previous
    update to the series of that project if it is in the top now, else to ``other``.
    So every exported series only ever grows (a valid Prometheus counter), a project
    that enters the top starts its own series from then on (its history stays in
    ``other``), and a project that leaves the top loses its series (its later
    increases go to ``other``). A cumulative count that went down (state rebuilt) is
    treated as a counter reset: its new value is the increase.
    """

    def __init__(self, top_n: int = DEFAULT_TOP_N, outcomes: Iterable[str] = (*PROJECT_OUTCOMES, "bytes")) -> None:
        if top_n < 0:
            raise ValueError(f"top_n must be >= 0, got {top_n}")
        self.top_n = top_n
        self.outcomes = tuple(outcomes)
        self._last: dict[str, tuple[int, ...]] = {}
        self.totals: dict[str, list[float]] = {OTHER: [0.0] * len(self.outcomes)}
        # Every increase of every project, unlabelled: exact totals even after series were dropped.
        self.all_projects: list[float] = [0.0] * len(self.outcomes)

    def labelled(self, top: Iterable[str]) -> list[str]:
        out: list[str] = []
        for project_id in top:
            if len(out) >= self.top_n:
                break
            if project_id != OTHER and project_id not in out:
                out.append(project_id)
        return out

    def _evict_unlabelled(self, labelled: list[str]) -> set[str]:
        """Drop the series of projects no longer labelled (``other`` stays); returns the labelled set."""
        keep = set(labelled)
        for label in list(self.totals):
            if label != OTHER and label not in keep:
                del self.totals[label]
        return keep

    def update(self, counters: Mapping[str, Mapping[str, Any]], top: Iterable[str]) -> list[str]:
        """Fold the current cumulative ``counters`` in; returns the labelled projects."""
        labelled = self.labelled(top)
        keep = self._evict_unlabelled(labelled)
        outcomes = self.outcomes
        last = self._last
        totals = self.totals
        other = totals[OTHER]
        grand = self.all_projects
        seen: dict[str, tuple[int, ...]] = {}
        for project_id, values in counters.items():
            now = tuple(int(values.get(name, 0) or 0) for name in outcomes)
            seen[project_id] = now
            before = last.get(project_id)
            if before == now:
                if project_id in keep and project_id not in totals:
                    totals[project_id] = [0.0] * len(outcomes)
                continue
            if project_id in keep:
                acc = totals.get(project_id)
                if acc is None:
                    acc = totals[project_id] = [0.0] * len(outcomes)
            else:
                acc = other
            for i, value in enumerate(now):
                previous = before[i] if before is not None else 0
                increase = value - previous if value >= previous else value
                acc[i] += increase
                grand[i] += increase
        for project_id in keep:
            totals.setdefault(project_id, [0.0] * len(outcomes))
        # Projects no longer reported (partition revoked) are forgotten; their counts stay where they were.
        self._last = seen
        return labelled

    def update_totals(
        self, totals: Mapping[str, Any], counters: Mapping[str, Mapping[str, Any]], top: Iterable[str]
    ) -> list[str]:
        """Like ``update``, in O(labels) rather than O(projects): ``totals`` are the cumulative
        counters summed over every project, ``counters`` those of the projects near the top (a few
        more than are labelled), all of one moment.

        A labelled project's series grows by its increase since the previous scrape, or by its
        whole count when it was not near the top then; ``other`` grows by the totals' increase
        minus those (never below 0: a project that climbs from far below the top brings counts
        that were in ``other`` already, and both keep them). A total that went down (a partition
        revoked) is a new baseline: nothing is added for it in that scrape.
        """
        labelled = self.labelled(top)
        self._evict_unlabelled(labelled)
        outcomes = self.outcomes
        now_totals = tuple(int(totals.get(name, 0) or 0) for name in outcomes)
        before_totals = self._last.get(_TOTALS)
        if before_totals is None:
            increase = list(now_totals)
        else:
            increase = [
                now - before if now >= before else 0 for now, before in zip(now_totals, before_totals, strict=True)
            ]
        seen: dict[str, tuple[int, ...]] = {_TOTALS: now_totals}
        for project_id, values in counters.items():
            seen[project_id] = tuple(int(values.get(name, 0) or 0) for name in outcomes)
        other = list(increase)
        for project_id in labelled:
            now = seen.get(project_id) or (0,) * len(outcomes)
            acc = self.totals.setdefault(project_id, [0.0] * len(outcomes))
            before = self._last.get(project_id)
            for i, value in enumerate(now):
                previous = before[i] if before is not None else 0
                own = value - previous if value >= previous else value
                acc[i] += own
                other[i] -= own
        acc = self.totals[OTHER]
        for i in range(len(outcomes)):
            acc[i] += max(0, other[i])
            self.all_projects[i] += increase[i]
        self._last = seen
        return labelled

    def families(self) -> list[Metric]:
        out = []
        for i, outcome in enumerate(self.outcomes):
            if outcome == "bytes":
                family = CounterMetricFamily(
                    "streamapp_project_bytes",
                    'Bytes received per project (top projects by rate, the rest in project="other")',
                    labels=["project"],
                )
            else:
                family = CounterMetricFamily(
                    f"streamapp_project_events_{outcome}",
                    f'Events {outcome} per project (top projects by rate, the rest in project="other")',
                    labels=["project"],
                )
            for label, values in self.totals.items():
                family.add_metric([label], values[i])
            out.append(family)
            total = CounterMetricFamily(
                f"streamapp_all_projects_{'bytes' if outcome == 'bytes' else 'events_' + outcome}",
                f"{'Bytes received' if outcome == 'bytes' else 'Events ' + outcome} over all projects of this worker",
            )
            total.add_metric([], self.all_projects[i])
            out.append(total)
        return out


def project_families(meter: Meter, projects: BoundedProjectCounters) -> list[Metric]:
    """Per-project counters (bounded by ``projects``), and the top projects' shed state, rates
    and quotas, read from ``meter`` now."""
    top = meter.top(projects.top_n)
    ids = [p["project_id"] for p in top]
    if hasattr(meter, "metrics_snapshot"):  # O(top): the meter keeps totals over every project
        totals, counters = meter.metrics_snapshot()  # of one moment: "other" stays exact
        labelled = projects.update_totals(totals, counters, [p for p in ids if p in counters])
    else:
        labelled = projects.update(meter.counters(), ids)
    out = projects.families()
    by_id = {p["project_id"]: p for p in top}
    shed = GaugeMetricFamily(
        "streamapp_project_shed",
        "1 while a top project is shed (label-bounded like the counters)",
        labels=["project", "mode"],
    )
    rate = GaugeMetricFamily(
        "streamapp_project_rate_events_per_second",
        "Current event rate of a top project",
        labels=["project", "horizon"],
    )
    quota = GaugeMetricFamily("streamapp_project_quota_events_per_second", "Quota of a top project", labels=["project"])
    for project_id in labelled:
        entry = by_id.get(project_id, {})
        shed.add_metric([project_id, str(entry.get("mode") or "")], 1.0 if entry.get("state") == "shed" else 0.0)
        rate.add_metric([project_id, "burst"], float(entry.get("eps_burst") or 0.0))
        rate.add_metric([project_id, "sustained"], float(entry.get("eps_sustained") or 0.0))
        if entry.get("quota_eps") is not None:
            quota.add_metric([project_id], float(entry["quota_eps"]))
    shed_now = meter.shed().get("shed", [])
    count = GaugeMetricFamily("streamapp_projects_shed", "Projects of this worker's partitions currently shed")
    count.add_metric([], float(sum(1 for s in shed_now if s.get("state", "shed") == "shed")))
    return [*out, shed, rate, quota, count]
