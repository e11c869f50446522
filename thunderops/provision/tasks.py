"""Render SkyPilot task configs from `templates/` for plan instances (engine nodes) and the router.

Rendering never splices text: the template is loaded as YAML data, fields are set as data and the result is
dumped with `yaml.safe_dump`. Values reach the setup/run scripts as environment variables (`envs:`) that the
scripts use double-quoted; the only generated script text, the engine command lines, is quoted word by word
with `shlex.quote`. So model names, paths or tags cannot inject YAML or shell.
"""

from __future__ import annotations

import copy
import hashlib
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
ROUTER_MARKER = "# @router"
ROUTER_PORT = 8080
_INFRA_PART = re.compile(r"^[A-Za-z0-9][^/\x00-\x1f]*$")  # Vast regions read like "Texas, US, NA"


@dataclass
class EngineLaunch:
    """One engine process on a node: its argv (e.g. `vllm serve ...`), extra env, and a log name."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    name: str = "engine"
    port: int = 0


def slug(text: str, n: int = 12) -> str:
    """A cloud-safe piece of a name (lower-case letters, digits, '-'); a hash suffix keeps it unique."""
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:n].strip("-") or "x"
    if s != text:
        s = f"{s}-{hashlib.sha1(text.encode()).hexdigest()[:4]}"
    return s


def engine_key_name(deployment: str) -> str:
    """Name under which `thunderops.agent.deployment_token` keeps the deployment's engine API key."""
    return f"{deployment}.engine"


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


def node_ports(launches: list[EngineLaunch], base: Ports) -> list[int]:
    """Ports a node opens: each engine's HTTP and KV (NIXL side channel) port, and the agent's three."""
    ports = {base.agent, base.agent + 1, base.agent + 2}
    for e in launches:
        ports.add(e.port)
        ports.add(e.port + (base.kv - base.engine))
    return sorted(ports)


# Where a node's run script writes the deployment's TLS pair for its engines (relative to $HOME, where the script
# runs): the engines then serve HTTPS with the certificate the agents use, which the router and the controller pin.
ENGINE_TLS_FILES = (".thunderops-tls/cert.pem", ".thunderops-tls/key.pem")


def engine_launches(plan: Plan, instance_id: str, ports: Ports, https: bool = False) -> list[EngineLaunch]:
    """The engine processes of one node: the serving step's `vllm serve` commands of the groups whose
    engine runs here (a pipeline's engine runs where its first stage is). `https`: they serve HTTPS with the
    deployment's TLS pair (ENGINE_TLS_FILES)."""
    from thunderops.serve.ray_cluster import ray_clusters
    from thunderops.serve.vllm import EngineOptions, engine_commands

    opts = EngineOptions(base_port=ports.engine, nixl_port_offset=ports.kv - ports.engine,
                         ssl_files=ENGINE_TLS_FILES if https else None)
    clusters = ray_clusters(plan, ports.ray)
    out = []
    for c in engine_commands(plan, opts):
        if c.instance != instance_id:
            continue
        argv = list(c.argv)
        rc = clusters.get(c.group)
        if rc is not None:  # the engine spans nodes: it runs on the group's own Ray cluster, headed here
            g = plan.group(c.group)
            split = [f"--layers={inst}=" + ",".join(str(s.layers) for s in g.stages if s.instance == inst)
                     for inst, _ in rc.gpus]
            argv = ["thunderops", "serve", "ray-engine", "--port", str(rc.port),
                    "--gpus", ",".join(str(i) for i in rc.gpus_on(instance_id)),
                    "--expect-gpus", str(rc.total_gpus), "--instance", instance_id, *split, "--", *argv]
        out.append(EngineLaunch(argv, dict(c.env), f"engine-{c.group}", c.port))
    return out


def engine_script_lines(launches: list[EngineLaunch]) -> list[str]:
    """Background shell lines for the engines, every word quoted. Each engine runs under `thunderops serve
    supervise`, which restarts it when it exits (thunderops.serve.supervise)."""
    lines = []
    for e in launches:
        env = [shlex.quote(f"{k}={v}") for k, v in e.env.items() if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k)]
        log = "~/thunderops-logs/" + shlex.quote(slug(e.name, 40) + ".log")
        cmd = shlex.join(["thunderops", "serve", "supervise", "--", *e.argv])
        lines.append(f"{' '.join(['env', *env, cmd]) if env else cmd} >> {log} 2>&1 &")
    return lines


def engine_task(plan: Plan, instance: Instance, *, deployment: str, node_id: str, cluster: str,
                accelerator: str | None = None, ports: Ports | None = None, pip_spec: str | None = None,
                launches: list[EngineLaunch] | None = None, agent_token: str | None = None,
                engine_key: str | None = None, agent_tls: tuple[str, str] | None = None,
                wheel: str | Path | None = None) -> dict[str, Any]:
    """The SkyPilot task config (a dict, ready for `sky.Task.from_yaml_config`) for one plan instance.
    `agent_token`, `engine_key` (vLLM's VLLM_API_KEY: engine ports are open, so they need a key) and
    `agent_tls` (the agents' certificate and key, PEM: their API is then HTTPS) go into SkyPilot's `secrets:`
    (redacted in its displays), never into `envs:`. `wheel` (a local thunderops wheel,
    `thunderops.provision.package.build_wheel`) is shipped as a file mount and installed with `[serve]`;
    `pip_spec` overrides it."""
    ports = ports or Ports()
    launches = engine_launches(plan, instance.id, ports, https=agent_tls is not None) if launches is None else launches
    cfg = copy.deepcopy(_template("engine"))
    cfg["name"] = cluster
    res = cfg["resources"]
    res["infra"] = infra(instance.cloud, instance.region, instance.zone)
    res["instance_type"] = instance.instance_type
    res["accelerators"] = {accelerator or instance.gpu: int(instance.gpus)}
    res["use_spot"] = bool(instance.spot)
    res["ports"] = node_ports(launches, ports)
    res["labels"] = {"thunderops-deployment": deployment, "thunderops-instance": slug(instance.id, 40)}
    envs = cfg["envs"]
    envs.update(THUNDEROPS_DEPLOYMENT=deployment, THUNDEROPS_NODE=node_id, THUNDEROPS_INSTANCE=instance.id,
                THUNDEROPS_MODEL=plan.model, THUNDEROPS_AGENT_PORT=str(ports.agent),
                THUNDEROPS_AGENT_GPU=instance.gpu, THUNDEROPS_AGENT_GPUS=str(int(instance.gpus)))
    _install(cfg, pip_spec, wheel, engine_extras(plan))
    cert, key = agent_tls or (None, None)
    secrets = {"THUNDEROPS_AGENT_TOKEN": agent_token, "VLLM_API_KEY": engine_key,
               "THUNDEROPS_AGENT_TLS_CERT": cert, "THUNDEROPS_AGENT_TLS_KEY": key}
    if any(v is not None for v in secrets.values()):
        cfg["secrets"] = {k: v for k, v in secrets.items() if v is not None}
    cfg["run"] = _fill_lines(cfg["run"], engine_script_lines(launches))
    return cfg


ROUTER_ENGINE_CERT = "~/thunderops/engine-cert.pem"  # on the router's node: the certificate HTTPS engines serve


def router_argv(plan: Plan, *, deployment: str, port: int = ROUTER_PORT, ports: Ports | None = None,
                https: bool = False) -> list[str]:
    """`thunderops serve router` for the plan, each group's engine URL from its (provisioned) host; `https`:
    the engines serve HTTPS with the deployment's certificate (ROUTER_ENGINE_CERT)."""
    from thunderops.serve.vllm import EngineOptions, engine_commands

    ports = ports or Ports()
    opts = EngineOptions(base_port=ports.engine, nixl_port_offset=ports.kv - ports.engine,
                         ssl_files=ENGINE_TLS_FILES if https else None)
    argv = ["thunderops", "serve", "router", "--plan", "~/thunderops/plan.json", "--host", "0.0.0.0",
            "--port", str(int(port))]
    if https:
        argv += ["--engine-cert", ROUTER_ENGINE_CERT]
    for c in engine_commands(plan, opts):
        argv += ["--endpoint", f"{c.group}={c.url}"]
    return argv


def router_task(plan: Plan, *, deployment: str, plan_path: str | Path, port: int = ROUTER_PORT,
                pip_spec: str | None = None, api_key: str | None = None,
                wheel: str | Path | None = None, engine_cert: str | Path | None = None) -> dict[str, Any]:
    """The SkyPilot task config for the router, in the cloud/region of the plan's first instance. The plan
    (and `wheel`, as for engine_task, and `engine_cert`, the certificate of engines serving HTTPS) travel as
    file mounts; `api_key` goes into `secrets:` as THUNDEROPS_API_KEY."""
    cfg = copy.deepcopy(_template("router"))
    cfg["name"] = f"{cluster_prefix(deployment)}router-1"
    first = plan.instances[0] if plan.instances else None
    if first and first.cloud != "local":
        cfg["resources"]["infra"] = infra(first.cloud, first.region)
    else:
        del cfg["resources"]["infra"]
    cfg["resources"]["ports"] = [int(port)]
    cfg["resources"]["labels"] = {"thunderops-deployment": deployment}
    cfg["file_mounts"] = {"~/thunderops/plan.json": str(plan_path)}
    if engine_cert is not None:
        cfg["file_mounts"][ROUTER_ENGINE_CERT] = str(engine_cert)
    cfg["envs"].update(THUNDEROPS_DEPLOYMENT=deployment)
    _install(cfg, pip_spec, wheel, "")
    if api_key is not None:
        cfg["secrets"] = {"THUNDEROPS_API_KEY": api_key}
    # '~' must expand, so the plan path word is left unquoted (it is our constant, not a value from the plan)
    words = [w if w in ("~/thunderops/plan.json", ROUTER_ENGINE_CERT) else shlex.quote(w)
             for w in router_argv(plan, deployment=deployment, port=port, https=engine_cert is not None)]
    cfg["run"] = _fill_lines(cfg["run"], [" ".join(words)], ROUTER_MARKER)
    return cfg


def engine_extras(plan: Plan) -> str:
    """thunderops' extras an engine node installs: vLLM with NIXL (`serve`), plus LMCache where the deployment
    compresses KV for transfer with it."""
    from thunderops.serve.vllm import LMCACHE, kv_transfer

    return "serve,lmcache" if kv_transfer(plan) == LMCACHE else "serve"


def _install(cfg: dict[str, Any], pip_spec: str | None, wheel: str | Path | None, extras: str) -> None:
    """What the task's setup pip-installs: `pip_spec` if given, else the shipped `wheel` (mounted under the
    node's home), else thunderops from PyPI, with `extras` either way."""
    from thunderops.provision.package import pip_spec_for, remote_path

    if pip_spec:
        cfg["envs"]["THUNDEROPS_PIP_SPEC"] = pip_spec
    elif wheel is not None:
        cfg.setdefault("file_mounts", {})[remote_path(wheel)] = str(wheel)
        cfg["envs"]["THUNDEROPS_PIP_SPEC"] = pip_spec_for(wheel, extras)
    else:
        cfg["envs"]["THUNDEROPS_PIP_SPEC"] = f"thunderops[{extras}]" if extras else "thunderops"


def _fill_lines(run: str, lines: list[str], marker: str = ENGINES_MARKER) -> str:
    out = []
    for line in run.splitlines():
        if line.strip().startswith(marker):
            out.extend(lines)
        else:
            out.append(line)
    return "\n".join(out) + "\n"


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line scripts as literal blocks (PyYAML falls back to a quoted style
    whenever a block cannot hold the text exactly)."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def render(config: dict[str, Any]) -> str:
    """YAML text of a task config (safe dumping: every string is quoted or escaped as YAML needs)."""
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


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
