"""The evaluation pipeline's pieces: each module imports alone (no import cycle), the plan, the
store round trip of a family's records, merging, and the schema's upgrade of version-1 files."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from medrobust.evaluation import SCHEMA_VERSION, read_results, upgrade
from medrobust.evaluation.budgets import parse_budgets
from medrobust.evaluation.families import FAMILIES, MIN_NORM_KEY, merge_records
from medrobust.evaluation.plan import CLEAN_UNIT, build_attack_specs, make_plan

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(
    "medrobust.evaluation." + str(p.relative_to(REPO / "src/medrobust/evaluation"))
    .removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    for p in (REPO / "src/medrobust/evaluation").rglob("*.py")
)


def _imports(path: Path, package: str) -> set[str]:
    """The medrobust.evaluation modules ``path`` imports (anywhere in the file, lazy imports
    included; ``if TYPE_CHECKING:`` blocks excluded: they never run)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out.update(n for n in names if n in MODULES and n != package)
    return out


def test_no_import_cycle_between_evaluation_modules() -> None:
    """The import graph of the evaluation package (every import, lazy ones included) has no
    cycle; only the package's ``__init__`` modules re-export."""
    graph = {}
    for p in (REPO / "src/medrobust/evaluation").rglob("*.py"):
        mod = "medrobust." + str(p.relative_to(REPO / "src/medrobust")).removesuffix(".py") \
            .replace("/", ".").removesuffix(".__init__")
        if p.name == "__init__.py":
            continue
        graph[mod] = _imports(p, mod)
    assert "medrobust.evaluation.engine" in graph and len(graph) > 10
    # the packages' __init__ only re-export: resolve an import of a package to its modules
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, " -> ".join(path + [m])
        state[m] = 1
        for dep in graph.get(m, ()):
            visit(dep, path + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])
    # nothing but the package re-exports the engine
    assert not [m for m, deps in graph.items() if "medrobust.evaluation.engine" in deps]


def test_plan_has_one_unit_per_family_budget() -> None:
    budgets = parse_budgets("0,1/255,2/255")
    specs = build_attack_specs(["fgsm", "deepfool"], "linf", None)
    assert [s.kind for s in specs] == ["fixed-budget", "minimum-norm"]
    assert all(s.kind in FAMILIES for s in specs)
    plan = make_plan(specs, budgets, None, n=10, batch_size=4)
    assert plan.batches == 3 and len(plan) == 3 * (1 + 3 + 1)
    units = plan.units(2)
    assert units[0].name == CLEAN_UNIT and units[0].spec is None
    assert [u.eps_key for u in units[1:4]] == [b.key for b in budgets]
    assert units[-1].eps_key == MIN_NORM_KEY and units[-1].budget is None
    assert plan.slice(2) == slice(8, 10)


def test_merge_records_concatenates_samples_and_sums_costs() -> None:
    a = {"idx": np.array([0, 1]), "pred": np.array([1, 0]), "cost_forward": np.array([3.0, 1.0]),
         "time_s": np.array([0.5])}
    b = {"idx": np.array([1]), "pred": np.array([1]), "cost_forward": np.array([2.0, 2.0]),
         "time_s": np.array([0.25])}
    m = merge_records([a, b], [0, 4])
    assert m["idx"].tolist() == [0, 1, 5] and m["pred"].tolist() == [1, 0, 1]
    assert m["cost_forward"].tolist() == [5.0, 3.0] and m["time_s"].tolist() == [0.75]


def _v1_doc() -> dict:
    p = {"value": 0.5, "ci_low": 0.2, "ci_high": 0.8, "k": 5, "n": 10}
    e = {"eps": 0.0, "eps_label": "0", "robust_accuracy": p, "success_rate": p, "per_class": []}
    return {
        "schema_version": 1, "kind": "medrobust-evaluation", "medrobust_version": "0.1.0",
        "config_hash": "x", "seed": 0, "config": {"eps": [0.0]}, "model": {}, "data": {},
        "clean": {}, "attacks": {"pgd": {"per_eps": [dict(e)], "large_eps": dict(e)}},
        "worst_case": [dict(e)],
        "sanity": {"passed": True, "failed": [], "checks": [
            {"id": "monotonic:pgd", "status": "warn"}]},
        "gallery": [], "run": {},
    }


def test_version_1_files_are_read_in_the_current_layout(tmp_path: Path) -> None:
    doc = _v1_doc()
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    new = read_results(path)
    assert SCHEMA_VERSION == 2 and new["schema_version_read"] == 1
    e = new["attacks"]["pgd"]["per_eps"][0]
    assert "success_rate" not in e and e["success_on_correct"]["k"] == 5
    assert new["attacks"]["pgd"]["large_eps"]["success_on_correct"]["k"] == 5
    assert new["worst_case"][0]["success_on_correct"]["value"] == 0.5
    assert new["sanity"]["warnings"] == ["monotonic:pgd"]
    assert new["headline"][0]["reliable"] and new["headline"][0]["quote_value"] == 0.5
    assert doc["worst_case"][0]["success_rate"]["k"] == 5  # the input is not modified
    # a current document passes unchanged
    assert upgrade(new)["attacks"] == new["attacks"]
    newer = dict(doc, schema_version=SCHEMA_VERSION + 1)
    path.write_text(json.dumps(newer))
    with pytest.raises(ValueError, match="newer"):
        read_results(path)
