"""Operating points chosen on one split and measured on another, and a method's frontier over seeds.

Pure functions over points: dicts with at least `layer_saving` and `metric` (as
`rule_points.evaluate_rule` returns them). A knob is chosen on validation for a stated target, and
only then read on test, so that no reported point is tuned on the split it is reported on.
"""
from __future__ import annotations

import math
import statistics

EPS = 1e-9  # values closer than this are equal (float noise in savings and metrics)


def pareto_optimal(point: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    """(metric, saving): no other point is at least as good on both and better on one."""
    return not any(o[0] >= point[0] and o[1] >= point[1] and (o[0] > point[0] or o[1] > point[1]) for o in others)


def value_at_saving(curve: list[dict], saving: float, key: str = "metric") -> float | None:
    """A curve's `key` at layer saving `saving`, linearly interpolated between its two nearest points.

    Where several points have the same saving, the best value among them counts (what the rule can
    reach there). Outside the savings the curve's points cover, None: a rule is not credited with a
    point its knobs never reach."""
    best: dict[float, float] = {}
    for point in curve:
        value = point[key]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        same = next((s for s in best if abs(s - point["layer_saving"]) <= EPS), point["layer_saving"])
        best[same] = max(best.get(same, -math.inf), value)
    savings = sorted(best)
    if not savings or saving < savings[0] - EPS or saving > savings[-1] + EPS:
        return None
    for low, high in zip(savings, savings[1:]):
        if low - EPS <= saving <= high + EPS:
            if abs(saving - low) <= EPS:
                return best[low]
            if abs(saving - high) <= EPS:
                return best[high]
            return best[low] + (best[high] - best[low]) * (saving - low) / (high - low)
    return best[savings[0]]  # a curve of one saving, asked at that saving


def best_within(points: list[dict], reference: float, tolerance: float) -> dict | None:
    """The point with the largest saving whose metric is within `tolerance` of `reference` (ties: the
    better metric), or None when no point is."""
    candidates = [p for p in points if p["metric"] >= reference - tolerance - EPS]
    return max(candidates, key=lambda p: (p["layer_saving"], p["metric"])) if candidates else None


def choose_on_split(points: list[dict], reference: float, tolerance: float) -> tuple[dict, bool]:
    """The point `best_within` picks, and True; where no point is within `tolerance` of `reference`, the point
    of the best metric (ties: the most saving), and False, so that the miss is reported rather than hidden."""
    point = best_within(points, reference, tolerance)
    if point is not None:
        return point, True
    return max(points, key=lambda p: (p["metric"], p["layer_saving"])), False


def choose_setting(members: list[dict], reference: float, tolerance: float, split: str = "validation",
                   reported: str = "test", match=None) -> dict:
    """One operating point for every seed: the setting (e.g. (alpha, tau)) whose mean `split` point over the seeds
    `choose_on_split` picks, then each seed at the same leading knobs (alpha) with its `split` layer saving
    matched to that mean's. `match(seed, setting, saving)` -> {"setting", <split>: point, <reported>: point} sets
    a seed's last knob for the saving (`policy_grid.saving_matcher`: exactly, from the seed's policy); without
    it, the seed's member whose saving is nearest on the grid (ties: the last knob nearest the chosen one).
    Returns {"setting", "within_target", <split>: the mean point, "seeds": [{"seed", "setting", <split>,
    <reported>}], <reported>: mean and spread (max - min) over seeds of metric and layer saving}.

    Letting each seed choose on its own metric would make every seed read its own share of the split's label
    noise: the seed whose validation metric happens to sit high somewhere takes more saving. One tau for every
    seed does not hold the point either, because each policy's exit probabilities have their own scale: at one
    tau, policies that agree closely save a few points apart. The layer saving on the choosing split reads no
    label, so matching it calibrates each seed's tau without reading the noise."""
    if not members:
        raise ValueError("no members to choose from: the policy grid trained nothing (method.frontier.alphas is empty?)")
    means = [{**row[split], "setting": row["setting"]} for row in seed_settings(members, (split,))]
    point, within = choose_on_split(means, reference, tolerance)
    setting, saving = point["setting"], point["layer_saving"]

    def nearest_on_grid(seed, setting, saving) -> dict:
        mine = [m for m in members if m["seed"] == seed and m["setting"][:-1] == setting[:-1]]
        return min(mine, key=lambda m: (abs(m[split]["layer_saving"] - saving), abs(m["setting"][-1] - setting[-1])))

    rows = []
    for seed in sorted({m["seed"] for m in members}):
        pick = (match or nearest_on_grid)(seed, setting, saving)
        rows.append({"seed": seed, "setting": tuple(pick["setting"]), split: pick[split], reported: pick[reported]})
    summary = {}
    for key in ("metric", "layer_saving"):
        values = [row[reported][key] for row in rows]
        summary[key] = statistics.mean(values)
        summary[f"{key}_spread"] = max(values) - min(values)
    return {"setting": setting, "within_target": within, split: {k: point[k] for k in ("metric", "layer_saving")},
            "seeds": rows, reported: summary}


def target_text(tolerance: float) -> str:
    return f"the most validation layer saving within {100 * tolerance:g} points of the full model's validation metric"


def choose_points(chosen_on: list[dict], reported_on: list[dict], full_metric: float, tolerance: float,
                  chosen_split: str = "validation", set_knobs: dict | None = None) -> list[dict]:
    """Per rule, the knob whose point on the choosing split (`chosen_on`: every rule at every knob) has the
    most layer saving within `tolerance` of the full model's metric there (`full_metric`), then that
    same knob's point on the reported split (`reported_on`). Rules without a knob (oracle, full) are
    left out. `set_knobs` ({rule: knob value text}) holds knobs already chosen on the same split for the same
    target by a larger choice (the policy's tau, by the frontier over RL seeds): those rows are at that knob.
    Each row keeps both points and says which split chose it, for what target."""
    rows = []
    for rule in dict.fromkeys(p["rule"] for p in chosen_on):
        if rule in ("oracle", "full"):
            continue
        mine = [p for p in chosen_on if p["rule"] == rule]
        if set_knobs and rule in set_knobs:
            pick = next((p for p in mine if p["value"] == set_knobs[rule]), None)
            if pick is None:
                raise ValueError(f"{rule}'s knob {set_knobs[rule]!r} was chosen but is not on the choosing split's grid")
        else:
            pick = best_within(mine, full_metric, tolerance)
        if pick is None:
            continue
        reported = next((p for p in reported_on if p["rule"] == rule and p["value"] == pick["value"]), None)
        if reported is None:
            raise ValueError(f"{rule} at {pick['value']!r} was chosen but has no point on the reported split")
        rows.append({**{k: reported[k] for k in ("rule", "knob", "value", "metric", "avg_exit_layer", "layer_saving",
                                                  "speedup") if k in reported},
                     "chosen_on": chosen_split, "target": target_text(tolerance),
                     "chosen_metric": pick["metric"], "chosen_layer_saving": pick["layer_saving"],
                     **({"set": True} if set_knobs and rule in set_knobs else {})})
    return rows


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def seed_settings(members: list[dict], splits=("validation", "test")) -> list[dict]:
    """Members (one trained policy at one knob setting each: {"setting": hashable, "seed", <split>: point})
    -> one row per setting with the mean and standard deviation over seeds of metric and layer saving
    on every split ({"setting", "seeds", <split>: {"metric", "metric_sd", "layer_saving", "layer_saving_sd"}})."""
    groups: dict = {}
    for member in members:
        groups.setdefault(member["setting"], []).append(member)
    rows = []
    for setting, mine in groups.items():
        row = {"setting": setting, "seeds": sorted(m["seed"] for m in mine)}
        for split in splits:
            metric, metric_sd = mean_sd([m[split]["metric"] for m in mine])
            saving, saving_sd = mean_sd([m[split]["layer_saving"] for m in mine])
            row[split] = {"metric": metric, "metric_sd": metric_sd, "layer_saving": saving, "layer_saving_sd": saving_sd}
        rows.append(row)
    return rows


def frontier(rows: list[dict], chosen_on: str = "validation") -> list[dict]:
    """The rows (`seed_settings`) whose mean point on `chosen_on` no other row dominates, by saving.

    The frontier's settings are picked on the choosing split, so their other splits' points are an
    honest measure of it (picking the test envelope would flatter the method)."""
    points = [(r[chosen_on]["metric"], r[chosen_on]["layer_saving"]) for r in rows]
    kept, seen = [], set()
    for row, point in zip(rows, points):
        if pareto_optimal(point, points) and point not in seen:  # settings that tie: the first stands for all
            seen.add(point)
            kept.append(row)
    return sorted(kept, key=lambda r: r[chosen_on]["layer_saving"])


def curve_at_savings(curve: list[dict], savings: list[float], key: str = "metric") -> list[float | None]:
    """`value_at_saving` at each of `savings`."""
    return [value_at_saving(curve, s, key) for s in savings]


def gaps_at_savings(at_savings: list[dict], curves: dict[str, dict[str, list[dict]]], baseline: str = "entropy") -> list[dict]:
    """The policy at set savings (`policy_grid.frontier_at_savings` rows) beside the rules: per row and split of
    `curves` ({split: {rule: points}}), each rule's metric at the policy's mean saving there, the seeds' metrics
    ("policy"), and each seed's gap to `baseline` at that seed's own saving ("gap"; None where the baseline is not
    among the rules or a seed's saving lies outside its curve: a tau set on one split lands a little off the saving
    on another)."""
    rows = []
    for point in at_savings:
        row = {"saving": point["saving"], "alpha": point["alpha"]}
        for split, rules in curves.items():
            row[split] = {rule: value_at_saving(curve, point[split]["layer_saving"]) for rule, curve in rules.items()}
            at_baseline = [value_at_saving(rules[baseline], seed[split]["layer_saving"]) if baseline in rules else None
                           for seed in point["seeds"]]
            row[split]["policy"] = [seed[split]["metric"] for seed in point["seeds"]]
            row[split]["gap"] = (None if None in at_baseline else
                                 [seed[split]["metric"] - value for seed, value in zip(point["seeds"], at_baseline)])
        rows.append(row)
    return rows
