"""Render SkyPilot task configs from `templates/` for plan instances (engine nodes) and the router.

Rendering never splices text: the template is loaded as YAML data, fields are set as data and the result is
dumped with `yaml.safe_dump`. Values reach the setup/run scripts as environment variables (`envs:`) that the
scripts use double-quoted; the only generated script text, the engine command lines, is quoted word by word
with `shlex.quote`. So model names, paths or tags cannot inject YAML or shell.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from thunderops.errors import ProvisionError, UserError
from thunderops.plan import Instance, Plan
from thunderops.provision import Ports

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
ENGINES_MARKER = "# @engines"
ROUTER_PORT = 8080
_INFRA_PART = re.compile(r"^[A-Za-z0-9][^/\x00-\x1f]*$")  # Vast regions read like "Texas, US, NA"


@dataclass
class EngineLaunch:
    """One engine process on a node: its argv (e.g. `vllm serve ...`), extra env, and a log name."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    name: str = "engine"


def slug(text: str, n: int = 12) -> str:
    """A cloud-safe piece of a name (lower-case letters, digits, '-'); a hash suffix keeps it unique."""
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:n].strip("-") or "x"
    if s != text:
        s = f"{s}-{hashlib.sha1(text.encode()).hexdigest()[:4]}"
    return s


def cluster_prefix(deployment: str | None) -> str:
    """Every cluster thunderops launches starts with `to-`, and with `to-<deployment>-` for one deployment."""
    return "to-" if deployment is None else f"to-{deployment}-"


def cluster_name(deployment: str, instance_id: str, attempt: int = 1) -> str:
    """The SkyPilot cluster of one launch attempt of a plan instance: `to-<deployment>-<instance>-<attempt>`."""
    return f"{cluster_prefix(deployment)}{slug(instance_id)}-{attempt}"


def deployment_of(cluster: str) -> str | None:
    """The deployment id a thunderops cluster name carries (None for clusters that are not ours)."""
    m = re.match(r"^to-([a-z][a-z0-9]*)-[a-z0-9-]+$", cluster)
    return m.group(1) if m else None


@cache
def _template(name: str) -> dict[str, Any]:
    return yaml.safe_load((TEMPLATES / f"{name}.yaml").read_text())


def infra(cloud: str, region: str, zone: str = "") -> str:
    """SkyPilot's `infra:` string (cloud/region/zone); refuses parts that would change its meaning."""
    parts = [p for p in (cloud, region, zone) if p]
    for p in parts:
        if not _INFRA_PART.match(p):
            raise ProvisionError(f"cloud/region/zone {p!r} is not a valid name; fix the plan or the catalog row")
    return "/".join(parts)


def node_ports(plan: Plan, instance_id: str, base: Ports | None = None) -> list[int]:
    """Ports a node opens: one engine and one KV port per engine it runs, and the agent's."""
    base = base or Ports()
    k = max(1, len(engine_groups(plan, instance_id)))
    return sorted({*(base.engine + i for i in range(k)), *(base.kv + i for i in range(k)), base.agent})


def engine_groups(plan: Plan, instance_id: str) -> list:
    """Groups whose engine runs on this instance (a pipeline's engine runs where its first stage is)."""
    return [g for g in plan.groups if g.stages and g.stages[0].instance == instance_id]


def engine_launches(plan: Plan, instance_id: str, ports: Ports) -> list[EngineLaunch]:
    """The engine processes of one node. The serving step owns the vLLM command line
    (`thunderops.serve.vllm.engine_launches`); until it is there, a plain `vllm serve` per group."""
    try:
        from thunderops.serve import vllm as serve_vllm  # type: ignore[attr-defined]

        build = serve_vllm.engine_launches
    except (ImportError, AttributeError):
        build = None
    if build is not None:
        out = []
        for e in build(plan, instance_id, ports):
            argv = list(getattr(e, "argv", e))
            out.append(EngineLaunch([str(a) for a in argv], {str(k): str(v) for k, v in getattr(e, "env", {}).items()},
                                    str(getattr(e, "name", "engine"))))
        return out
    from thunderops.specs import get_model

    model = get_model(plan.model)
    out = []
    for k, g in enumerate(engine_groups(plan, instance_id)):
        first = g.stages[0]
        argv = ["vllm", "serve", model.hf_id, "--port", str(ports.engine + k),
                "--tensor-parallel-size", str(first.tp), "--pipeline-parallel-size", str(g.pp)]
        if g.phase != "colocated":
            argv += ["--kv-transfer-config", json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"})]
        env = {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(ports.kv + k)}
        if first.gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in first.gpu_ids)
        out.append(EngineLaunch(argv, env, f"engine-{g.id}"))
    return out


def engine_script_lines(launches: list[EngineLaunch]) -> list[str]:
    """Background shell lines for the engines, every word quoted."""
    lines = []
    for e in launches:
        env = [shlex.quote(f"{k}={v}") for k, v in e.env.items() if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k)]
        log = "~/thunderops-logs/" + shlex.quote(slug(e.name, 40) + ".log")
        cmd = " ".join(["env", *env, shlex.join(e.argv)]) if env else shlex.join(e.argv)
        lines.append(f"{cmd} > {log} 2>&1 &")
    return lines


def engine_task(plan: Plan, instance: Instance, *, deployment: str, node_id: str, cluster: str,
                accelerator: str | None = None, ports: Ports | None = None, pip_spec: str | None = None,
                launches: list[EngineLaunch] | None = None) -> dict[str, Any]:
    """The SkyPilot task config (a dict, ready for `sky.Task.from_yaml_config`) for one plan instance."""
    ports = ports or Ports()
    cfg = copy.deepcopy(_template("engine"))
    cfg["name"] = cluster
    res = cfg["resources"]
    res["infra"] = infra(instance.cloud, instance.region, instance.zone)
    res["instance_type"] = instance.instance_type
    res["accelerators"] = {accelerator or instance.gpu: int(instance.gpus)}
    res["use_spot"] = bool(instance.spot)
    res["ports"] = node_ports(plan, instance.id, ports)
    res["labels"] = {"thunderops-deployment": deployment, "thunderops-instance": slug(instance.id, 40)}
    envs = cfg["envs"]
    envs.update(THUNDEROPS_DEPLOYMENT=deployment, THUNDEROPS_NODE=node_id, THUNDEROPS_INSTANCE=instance.id,
                THUNDEROPS_MODEL=plan.model, THUNDEROPS_AGENT_PORT=str(ports.agent),
                THUNDEROPS_ENGINE_PORT=str(ports.engine), THUNDEROPS_KV_PORT=str(ports.kv),
                VLLM_NIXL_SIDE_CHANNEL_PORT=str(ports.kv))
    if pip_spec:
        envs["THUNDEROPS_PIP_SPEC"] = pip_spec
    launches = engine_launches(plan, instance.id, ports) if launches is None else launches
    cfg["run"] = _fill_engines(cfg["run"], engine_script_lines(launches))
    return cfg


def router_task(plan: Plan, *, deployment: str, plan_path: str | Path, port: int = ROUTER_PORT,
                pip_spec: str | None = None) -> dict[str, Any]:
    """The SkyPilot task config for the router, placed in the cloud/region of the plan's first instance."""
    cfg = copy.deepcopy(_template("router"))
    cfg["name"] = f"{cluster_prefix(deployment)}router-1"
    first = plan.instances[0] if plan.instances else None
    cfg["resources"]["infra"] = infra(first.cloud, first.region) if first and first.cloud != "local" else None
    if cfg["resources"]["infra"] is None:
        del cfg["resources"]["infra"]
    cfg["resources"]["ports"] = [int(port)]
    cfg["resources"]["labels"] = {"thunderops-deployment": deployment}
    cfg["file_mounts"] = {"~/thunderops/plan.json": str(plan_path)}
    cfg["envs"].update(THUNDEROPS_DEPLOYMENT=deployment, THUNDEROPS_ROUTER_PORT=str(int(port)))
    if pip_spec:
        cfg["envs"]["THUNDEROPS_PIP_SPEC"] = pip_spec
    return cfg


def _fill_engines(run: str, lines: list[str]) -> str:
    out = []
    for line in run.splitlines():
        if line.strip().startswith(ENGINES_MARKER):
            out.extend(lines)
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def render(config: dict[str, Any]) -> str:
    """YAML text of a task config (safe_dump: every string is quoted or escaped as YAML needs)."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=1000)


def accelerator_names(plan: Plan) -> dict[str, str]:
    """SkyPilot accelerator name per plan instance, from the catalog offer it came from (else the GPU name)."""
    from thunderops.catalog import load_offers, offer_key

    out: dict[str, str] = {i.id: i.gpu for i in plan.instances}
    try:
        offers = load_offers()
    except UserError:  # a broken catalog must not stop a dry run; the GPU name is a fine fallback
        return out
    by_key = {offer_key(r): r["accelerator"] for _, r in offers.iterrows() if r.get("accelerator")}
    for inst in plan.instances:
        key = offer_key({"cloud": inst.cloud, "region": inst.region, "zone": inst.zone,
                         "instance_type": inst.instance_type})
        if by_key.get(key):
            out[inst.id] = str(by_key[key])
    return out
