"""The cluster configs under clusters/: they load, and hold what the pipeline relies on (no Ray is started)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import build_parser, parse_quantize_args

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
FILES = ["aws-gpu.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "cronjob-requantize.yaml", "runtime-env.yaml"]
CREDENTIAL_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|SESSION_KEY", re.I)
LOOKS_LIKE_KEY = [re.compile(p) for p in (
    r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",                 # AWS access key id
    r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])",  # AWS secret access key
    r"\b[0-9a-f]{64}\b",                            # Ray auth token and other hex secrets
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
)]


def load(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((CLUSTERS / name).read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), name
    return docs


def one(name: str, kind: str | None = None) -> dict[str, Any]:
    docs = [d for d in load(name) if kind is None or d.get("kind") == kind]
    assert len(docs) == 1, f"{name}: expected one {kind or 'document'}, found {len(docs)}"
    return docs[0]


def walk(obj: Any):
    """Every dict, list and scalar inside ``obj``."""
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v)


def option(argv: list[str], name: str) -> str | None:
    """Value of ``--name V`` or ``--name=V`` in argv."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    return None


def containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    cs = pod_template["spec"]["containers"]
    assert cs, "pod template without containers"
    return cs


def gpu_limit(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


# ---- cron -------------------------------------------------------------------------------------------------------------

_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def valid_cron(expr: str) -> bool:
    """A standard 5-field cron expression (numbers, *, ranges, steps, lists; no names or macros)."""
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (lo, hi) in zip(fields, _CRON_RANGES, strict=True):
        for part in field.split(","):
            m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            if not m:
                return False
            if m.group(4) is not None and int(m.group(4)) < 1:
                return False
            if m.group(2) is not None:
                a = int(m.group(2))
                b = int(m.group(3)) if m.group(3) is not None else a
                if not lo <= a <= b <= hi:
                    return False
    return True


@pytest.mark.parametrize("expr,ok", [("0 */6 * * *", True), ("15 2,14 * * 1-5", True), ("*/5 * * * *", True),
                                     ("0 */6 * *", False), ("61 * * * *", False), ("0 24 * * *", False),
                                     ("0 */0 * * *", False), ("@hourly", False), ("0 5-3 * * *", False)])
def test_cron_validator(expr, ok):
    assert valid_cron(expr) is ok


# ---- pipeline.quantize invocations ------------------------------------------------------------------------------------

ELLIPSIS = "..."  # "more options": the command is abbreviated
FILL_REQUIRED = {"--model": "s3://bucket/model", "--output": "s3://bucket/out", "--calib": "calib.txt"}


def quantize_argvs_in_text(text: str) -> list[list[str]]:
    """The arguments of every ``python -m pipeline.quantize`` command in a text (backslash continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", text)
    argvs = []
    for line in text.splitlines():
        for m in re.finditer(r"python3? -m pipeline\.quantize\b", line):
            argvs.append(_cut(shlex.split(line[m.end():], comments=True)))
    return argvs


def _cut(tokens: list[str]) -> list[str]:
    out = []
    for t in tokens:
        if t in {"&&", "||", ";", "|", ">", "2>&1"} or t.startswith("`"):
            break
        out.append(t)
    return out


def quantize_argvs(name: str) -> list[list[str]]:
    text = (CLUSTERS / name).read_text()
    if name.endswith(".md"):  # commands in fenced code blocks (prose mentions are not commands)
        return [a for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S) for a in quantize_argvs_in_text(block)]
    # YAML: command lines in comments, string values, command lists
    comments = [ln.strip().lstrip("#").strip() for ln in text.splitlines() if ln.strip().startswith("#")]
    argvs = quantize_argvs_in_text("\n".join(c for c in comments if c.startswith(("python", "ray "))))
    for doc in load(name):
        for node in walk(doc):
            if isinstance(node, str):
                argvs += quantize_argvs_in_text(node)
            elif isinstance(node, list) and all(isinstance(x, str) for x in node) and "pipeline.quantize" in node:
                i = node.index("pipeline.quantize")
                assert node[i - 1] == "-m", node
                argvs.append(_cut(node[i + 1:]))
    return argvs


def complete(argv: list[str]) -> list[str]:
    """An abbreviated command (with ``...``) gets the required options it leaves out; a complete one is unchanged."""
    if ELLIPSIS not in argv:
        return argv
    argv = [a for a in argv if a != ELLIPSIS]
    for opt, value in FILL_REQUIRED.items():
        if option(argv, opt) is None:
            argv += [opt, value]
    return argv


def test_quantize_commands_parse_with_the_real_cli():
    found = {name: quantize_argvs(name) for name in [*FILES, "README.md"]}
    assert found["kuberay-rayjob.yaml"] and found["README.md"], found
    assert ELLIPSIS not in found["kuberay-rayjob.yaml"][0], "the RayJob's entrypoint is run as is"
    for name, argvs in found.items():
        for argv in argvs:
            try:
                build_parser().parse_args(complete(argv))
                parse_quantize_args(complete(argv))  # and the checks on top of argparse (bits, group size, ...)
            except SystemExit as e:
                pytest.fail(f"{name}: python -m pipeline.quantize {shlex.join(argv)}\n  does not parse ({e})")


def test_quantize_command_check_fires():
    assert quantize_argvs_in_text("python -m pipeline.quantize --model a \\\n  --output b --calib c && echo") == [
        ["--model", "a", "--output", "b", "--calib", "c"]]
    assert complete(["..."]) == ["--model", "s3://bucket/model", "--output", "s3://bucket/out", "--calib", "calib.txt"]
    for bad in (["--model", "a", "--output", "b"], ["--model", "a", "--output", "b", "--calib", "c", "--wbits", "9"],
                complete(["--method", "omniquant", "..."])):
        with pytest.raises(SystemExit):
            parse_quantize_args(bad)


# ---- the individual files ---------------------------------------------------------------------------------------------

def test_all_files_present_and_load():
    names = sorted(p.name for p in CLUSTERS.glob("*.yaml"))
    assert names == sorted(FILES)
    for name in FILES:
        load(name)
    assert (CLUSTERS / "README.md").is_file()


def test_launcher_gpu_workers_and_loopback_head():
    cfg = one("aws-gpu.yaml")
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types
    assert types[head].get("resources", {}).get("GPU", 0) == 0, "the head node is CPU-only"
    workers = {n: t for n, t in types.items() if n != head}
    gpu_workers = {n: t for n, t in workers.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_workers, "no worker type declares a GPU in resources"
    for t in gpu_workers.values():
        assert t["resources"].get("CPU", 0) >= 1 and t["max_workers"] >= 1
        assert t["max_workers"] <= cfg["max_workers"]
    assert cfg["max_workers"] >= 1 and cfg["idle_timeout_minutes"] > 0

    heads = [shlex.split(c) for c in cfg["head_start_ray_commands"] if "ray start" in c]
    assert len(heads) == 1
    argv = heads[0][heads[0].index("start") + 1:]
    assert "--head" in argv
    assert option(argv, "--port") == "6379"
    assert option(argv, "--dashboard-host") == "127.0.0.1", "the job API must not listen on a public interface"
    assert "--disable-usage-stats" in argv
    assert option(argv, "--autoscaling-config")
    workers_start = [shlex.split(c) for c in cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(workers_start) == 1 and option(workers_start[0], "--address") == "$RAY_HEAD_IP:6379"

    setup = " ; ".join(cfg["setup_commands"])
    assert re.search(r"pip install [^;]*torch", setup)
    assert "torch==2.13.0" not in setup, "2.13.0 is the local CPU build"
    assert re.search(r"ray\[default\]==\d", setup), "pin Ray to the submitter's version"
    assert "pip install ~/lsiq" in setup, "install this package (and its dependencies) on every node"


def _gpu_worker_groups(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [g for g in spec.get("workerGroupSpecs", []) if any(gpu_limit(c) >= 1 for c in containers(g["template"]))]


def test_raycluster_has_a_gpu_worker_group():
    rc = one("kuberay-raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    spec = rc["spec"]
    assert "rayStartParams" in spec["headGroupSpec"] and containers(spec["headGroupSpec"]["template"])
    assert all(gpu_limit(c) == 0 for c in containers(spec["headGroupSpec"]["template"]))
    groups = _gpu_worker_groups(spec)
    assert groups, "no worker group requests nvidia.com/gpu"
    for g in groups:
        assert "rayStartParams" in g and g["maxReplicas"] >= g["minReplicas"] >= 0
        for c in containers(g["template"]):
            assert c["image"] and c["resources"]["requests"] and c["resources"]["limits"]


def _credential_envs_from_secrets(pod_template: dict[str, Any]) -> set[str]:
    names = set()
    for c in containers(pod_template):
        for e in c.get("env", []):
            if e["name"] in {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}:
                ref = e.get("valueFrom", {}).get("secretKeyRef", {})
                assert "value" not in e and ref.get("name") and ref.get("key"), e
                names.add(e["name"])
    return names


def test_rayjob_runs_quantize_s3_to_s3_with_secret_credentials():
    job = one("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    tokens = shlex.split(spec["entrypoint"])
    assert tokens[:3] == ["python", "-m", "pipeline.quantize"]
    argv = tokens[3:]
    assert option(argv, "--model").startswith("s3://") and option(argv, "--output").startswith("s3://")
    assert option(argv, "--model") != option(argv, "--output")
    assert option(argv, "--device") == "cuda"

    cluster = spec["rayClusterSpec"]
    assert _gpu_worker_groups(cluster), "the job's cluster has no GPU worker group"
    # The driver (head) and the reader/writer actors (any node) all touch S3.
    assert _credential_envs_from_secrets(cluster["headGroupSpec"]["template"]) == {"AWS_ACCESS_KEY_ID",
                                                                                   "AWS_SECRET_ACCESS_KEY"}
    for g in cluster["workerGroupSpecs"]:
        assert _credential_envs_from_secrets(g["template"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_cronjob_runs_schedule_once_without_overlap():
    cj = one("cronjob-requantize.yaml", kind="CronJob")
    assert cj["apiVersion"] == "batch/v1"
    spec = cj["spec"]
    assert valid_cron(spec["schedule"]), spec["schedule"]
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]
    assert pod["spec"]["restartPolicy"] in {"Never", "OnFailure"}
    (c,) = containers(pod)
    cmd = c["command"] + c.get("args", [])
    assert cmd[:3] == ["python", "-m", "pipeline.schedule"]
    argv = cmd[3:]
    assert "--once" in argv
    assert option(argv, "--source").startswith("s3://") and option(argv, "--output").startswith("s3://")
    assert re.fullmatch(r"http://[a-z0-9.-]+:8265", option(argv, "--address"))
    _credential_envs_from_secrets(pod)

    # --config is a file of a mounted ConfigMap, which this file defines; its keys are pipeline.quantize options.
    config = Path(option(argv, "--config"))
    mount = next(m for m in c["volumeMounts"] if config.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    cm = one("cronjob-requantize.yaml", kind="ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    settings = yaml.safe_load(cm["data"][str(config.relative_to(mount["mountPath"]))])
    known = {s for a in build_parser()._actions for s in a.option_strings}
    assert settings and all(f"--{k}" in known for k in settings), sorted(f"--{k}" for k in settings if f"--{k}" not in known)
    assert not {"model", "output"} & set(settings), "model and output come from --source / --output"
    from pipeline.schedule import quantize_args

    assert "--calib" in quantize_args(settings)  # what the scheduler itself accepts


def test_runtime_env_is_valid_and_small():
    from ray.runtime_env import RuntimeEnv

    env = one("runtime-env.yaml")
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    assert {".git", "/fixtures", "/runs", "/bench_out"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "Ray wants string env var values"
    assert env["env_vars"]["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] == "0"


def test_no_literal_secrets():
    for name in [*FILES, "README.md"]:
        text = (CLUSTERS / name).read_text()
        for pat in LOOKS_LIKE_KEY:
            assert not pat.search(text), f"{name}: something that looks like a key: {pat.search(text).group(0)!r}"
        if name.endswith(".yaml"):
            for doc in load(name):
                for node in walk(doc):
                    if isinstance(node, dict) and isinstance(node.get("name"), str) and CREDENTIAL_ENV.search(node["name"]):
                        assert "value" not in node, f"{name}: {node['name']} has a literal value; use valueFrom.secretKeyRef"
                if isinstance(doc.get("env_vars"), dict):  # a runtime env
                    bad = [k for k in doc["env_vars"] if CREDENTIAL_ENV.search(k)]
                    assert not bad, f"{name}: credentials in env_vars: {bad}"


def test_secret_detectors_fire():
    # The patterns above must catch the real shapes (AWS's documented example key pair).
    assert LOOKS_LIKE_KEY[0].search("AKIAIOSFODNN7EXAMPLE")
    assert LOOKS_LIKE_KEY[1].search("key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert not any(p.search("image: REGISTRY/lsiq:TAG") for p in LOOKS_LIKE_KEY)
