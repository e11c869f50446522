"""Bad input on the command line, as a user types it (the real `main()` in a child process): one line on stderr
saying what is wrong and how to fix it, exit code 2, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_provision_cli import cli
from test_provision_cli import one_line_error as one_line

from thunderops.errors import PlanError
from thunderops.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
INVENTORY = str(ROOT / "examples" / "paper_inventory.yaml")


@pytest.mark.parametrize("args,needles", [
    (["plan", "--budget", "abc"], ["'--budget'", "`thunderops plan --help`"]),
    (["simulate"], ["Missing argument 'PLAN.json'", "`thunderops simulate --help`"]),
    (["plan", "--no-such-flag"], ["No such option: --no-such-flag"]),
    (["no-such-command"], ["No such command 'no-such-command'", "`thunderops --help`"]),
    (["catalog", "list", "--max-price-per-gpu", "cheap"], ["'--max-price-per-gpu'",
                                                           "`thunderops catalog list --help`"]),
    (["serve", "emulator", "--port", "70000"], ["'--port'", "65535"]),  # was: a server that never listened
    (["serve", "router", "--port", "0", "--model", "llama3-8b"], ["'--port'"]),
    (["serve", "commands", "plan.json", "--base-port", "70000"], ["'--base-port'"]),
    (["up", "--dry-run", "--launch-timeout", "0"], ["'--launch-timeout'"]),
    (["up", "--dry-run", "--max-replica-nodes", "0"], ["'--max-replica-nodes'"]),
])
def test_usage_errors_are_one_line_with_where_to_look(args, needles):
    """What the command-line parser refuses (a value that does not parse, a missing or unknown option, an
    unknown command) reads like our own errors, not a multi-line box."""
    one_line(cli(*args), *needles)


def test_up_with_the_default_budget_and_bad_input_is_still_one_line():
    """`up` without --budget says it planned for the default budget, but only once it has a plan."""
    one_line(cli("up", "--dry-run", "--model", "no-such-model"), "unknown model")
    one_line(cli("up", "--dry-run", "--workload", "no-such-workload"), "unknown workload")


def test_help_and_bare_groups_still_show_help():
    ok = cli("plan", "--help")
    assert ok.returncode == 0 and "--budget" in ok.stdout
    bare = cli("serve")
    assert "router" in bare.stdout and "Traceback" not in bare.stderr


def test_plan_refuses_a_time_limit_that_is_no_positive_number():
    one_line(cli("plan", "--inventory", INVENTORY, "--time-limit", "0"), "--time-limit")
    one_line(cli("plan", "--inventory", INVENTORY, "--time-limit", "nan"), "positive number of seconds")


def test_plan_and_up_refuse_an_infinite_budget():
    # before: a traceback (OverflowError) from sizing the pool of instances to rent
    one_line(cli("plan", "--budget", "inf"), "positive, finite $/h", "--budget")
    one_line(cli("up", "--budget", "inf", "--dry-run"), "positive, finite $/h")
    one_line(cli("plan", "--inventory", INVENTORY, "--budget", "inf"), "positive, finite $/h")


def test_plan_out_is_checked_before_the_search(tmp_path):
    missing = tmp_path / "no-such-folder" / "plan.json"
    one_line(cli("plan", "--inventory", INVENTORY, "--out", str(missing)), "does not exist")
    one_line(cli("plan", "--inventory", INVENTORY, "--out", str(tmp_path)), "is a directory")
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no folder made


def test_bandwidth_file_naming_nothing_of_the_inventory_is_refused(tmp_path):
    """A typo in a bandwidth file would otherwise leave that link at its default, silently."""
    typo = tmp_path / "bw.csv"
    typo.write_text("src,dst,gbps\na40-box,rtx3090-box,5\n")  # the inventory names rtx3090ti-box
    one_line(cli("plan", "--inventory", INVENTORY, "--bandwidth", str(typo), "--time-limit", "5"),
             "rtx3090-box", "no instance, host or region", "a40-box, rtx3090ti-box")
    good = tmp_path / "good.csv"
    good.write_text("src,dst,gbps\na40-box,rtx3090ti-box,5\n")
    ok = cli("plan", "--inventory", INVENTORY, "--bandwidth", str(good), "--time-limit", "5", "--json")
    assert ok.returncode == 0, ok.stderr


def test_a_bandwidth_file_naming_no_link_is_refused(tmp_path):
    """A header alone (or an empty JSON matrix) was taken as no measurement at all, silently."""
    for name, text in [("header.csv", "src,dst,gbps\n"), ("other.csv", "x,y\n"), ("empty.json", "{}")]:
        path = tmp_path / name
        path.write_text(text)
        one_line(cli("plan", "--inventory", INVENTORY, "--bandwidth", str(path), "--time-limit", "5"),
                 name, "names no link", "src,dst,gbps")


def test_a_measured_matrix_may_name_nodes_that_are_gone():
    """The controller's full reschedule passes the measured matrix of the whole fleet over the survivors."""
    from thunderops.scheduler import solve
    from thunderops.scheduler.inventory import load_inventory

    inv = load_inventory(INVENTORY)
    links = {("a40-box", "rtx3090ti-box"): 5.0, ("a40-box", "lost-node"): 40.0}
    plan = solve(None, "llama-30b", "conversation", inventory=inv, bandwidth=links, time_limit=5).plan
    assert plan.bandwidth_gbps["a40-box"]["rtx3090ti-box"] == pytest.approx(5.0)


def test_plan_save_to_a_folder_that_is_gone_is_a_plan_error(tmp_path):
    plan = Plan(model="llama3-8b", budget_per_hour=1, cost_per_hour=0, instances=[], groups=[], routing=[])
    with pytest.raises(PlanError, match="cannot write the plan"):
        plan.save(tmp_path / "gone" / "p.json")


def _damaged(plan: dict, how: str) -> dict:
    """`plan` (a plan's JSON) damaged the way a hand edit or a bad merge damages it."""
    import copy

    d = copy.deepcopy(plan)
    g0, i0, r0 = d["groups"][0], d["instances"][0], d["routing"][0]
    if how == "unknown instance":
        g0["stages"][0]["instance"] = "no-such-node"
    elif how == "negative price":
        i0["price_per_hour"] = -5
    elif how == "price not a number":
        i0["price_per_hour"] = "cheap"
    elif how == "route to nowhere":
        r0["decode"] = "gX"
    elif how == "stage GPU disagrees":
        i0["gpu"] = "Z100"
    elif how == "GPU id out of range":
        g0["stages"][0]["gpu_ids"] = [i0["gpus"]]
    elif how == "GPU in two replicas":
        d["groups"].append({**copy.deepcopy(g0), "id": "twin"})
    elif how == "duplicate instance":
        d["instances"].append(copy.deepcopy(i0))
    elif how == "fraction above 1":
        r0["fraction"] = 3.0
    return d


DAMAGE = ["unknown instance", "negative price", "price not a number", "route to nowhere", "stage GPU disagrees",
          "GPU id out of range", "GPU in two replicas", "duplicate instance", "fraction above 1"]


@pytest.fixture(scope="module")
def paper_plan_json(tmp_path_factory) -> dict:
    import json

    from thunderops.scheduler import plan as make_plan

    p = make_plan(None, "llama-30b", "conversation", inventory=INVENTORY, time_limit=5)
    assert p.instances and p.groups and p.routing
    return json.loads(p.to_json())


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_plan_file_is_one_line_wherever_it_is_read(tmp_path, paper_plan_json, how):
    """Before: a route to a replica that does not exist, a negative or textual price, a stage on a node the plan
    lacks were all read as if fine (reports with negative money, simulations of GPUs nobody rents) or crashed
    with a traceback."""
    import json

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_damaged(paper_plan_json, how)))
    first = one_line(cli("report", "--plan", str(path)))
    assert one_line(cli("simulate", str(path), "--workload", "conversation", "-n", "50")) == first
    assert one_line(cli("serve", "commands", str(path))) == first


def test_the_undamaged_plan_reads(tmp_path, paper_plan_json):
    import json

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(paper_plan_json))
    assert cli("report", "--plan", str(path)).returncode == 0


@pytest.mark.parametrize("node,needles", [
    ("{name: a, gpu: A40, gpus: 4, price_per_hr: 3}", ["unknown key 'price_per_hr'", "price_per_hour"]),
    ("{name: a, gpu: A40, gpus: 1.5}", ["gpus must be a whole number"]),
])
def test_inventory_typos_are_refused_not_defaulted(tmp_path, node, needles):
    """A misspelt optional field used to fall back to its default (a node you pay for counted as free)."""
    inv = tmp_path / "inv.yaml"
    inv.write_text(f"nodes:\n  - {node}\n")
    one_line(cli("plan", "--inventory", str(inv), "--time-limit", "3"), *needles)
