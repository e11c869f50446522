"""Plans shared by the serving tests (imported by test_serve.py and test_vllm_cmd.py)."""

from __future__ import annotations

from thunderops.plan import Group, Instance, Plan, Route, Stage


def node(i: str, gpu: str = "A100", gpus: int = 1, host: str | None = "127.0.0.1") -> Instance:
    return Instance(id=i, cloud="local", region="local", zone="local", instance_type="local", gpu=gpu, gpus=gpus,
                    spot=False, price_per_hour=1.0, source="test", as_of="2026-11-25", host=host)


def pd_plan(fractions: tuple[float, float, float, float] = (0.4, 0.1, 0.2, 0.3), max_model_len: int = 4096) -> Plan:
    """Two prefill and two decode groups (one A100 each), four routes with the given fractions."""
    groups = [Group("p0", "prefill", [Stage("n0", "A100", 1, 32)]), Group("p1", "prefill", [Stage("n1", "A100", 1, 32)]),
              Group("d0", "decode", [Stage("n2", "A100", 1, 32)]), Group("d1", "decode", [Stage("n3", "A100", 1, 32)])]
    pairs = [("p0", "d0"), ("p0", "d1"), ("p1", "d0"), ("p1", "d1")]
    routes = [Route(p, d, f) for (p, d), f in zip(pairs, fractions, strict=True)]
    return Plan(model="llama3-8b", budget_per_hour=10, cost_per_hour=4, instances=[node(f"n{i}") for i in range(4)],
                groups=groups, routing=routes, inputs={"max_model_len": max_model_len})


def test_pd_plan_round_trips_through_json():
    plan = pd_plan((0.25, 0.25, 0.25, 0.25))
    again = Plan.from_json(plan.to_json())
    assert [g.id for g in again.groups] == ["p0", "p1", "d0", "d1"]
    assert sum(r.fraction for r in again.routing) == 1.0
