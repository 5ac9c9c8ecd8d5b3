"""What the Kubernetes schemas cannot check in deploy/kubernetes, checked with the real binary.

    python .ci/manifests.py target/debug/impersonate-proxy deploy/kubernetes/*/*.yaml

- Every proxy config shipped in a ConfigMap (`data["config.yaml"]`) passes
  `impersonate-proxy check`.
- Every pod that runs the proxy (`args: [run, --config, PATH]`) mounts PATH's directory from
  that ConfigMap as a directory (a subPath mount never sees an update), and mounts the
  directories of the config's `ca.cert` and `ca.key`.
- Its terminationGracePeriodSeconds covers the preStop pause plus `limits.drain_timeout`.
- A container beside it that sets HTTPS_PROXY gets every variable, with the same value, that
  `impersonate-proxy env --format dotenv` prints for that config (run on a copy whose CA
  paths point into a temporary directory, mapped back afterwards).

Exits 1 naming each problem. Run by .ci/run with the venv that holds kubernetes-validate
(for PyYAML).
"""

import os
import re
import subprocess
import sys
import tempfile

import yaml

PROBLEMS = []
# Proxy containers checked: none at all means the files changed shape, not that all is well.
CHECKED = []


def problem(where, message):
    PROBLEMS.append(f"{where}: {message}")


def duration_secs(text):
    """The config's durations: 90s, 5m, 1h30m, 250ms, or a bare number of seconds."""
    text = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def pod_specs(doc):
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "Pod":
        return [spec]
    return []


def check_config(binary, where, text, tmp):
    path = os.path.join(tmp, "config.yaml")
    with open(path, "w") as f:
        f.write(text)
    out = subprocess.run([binary, "check", "--config", path], capture_output=True, text=True)
    if out.returncode != 0:
        problem(where, f"impersonate-proxy check failed:\n{out.stdout}{out.stderr}")
    else:
        print(f"{where}: impersonate-proxy check: ok")


def dotenv(binary, config, tmp):
    """`env --format dotenv` for `config`, its CA directories mapped to temporary ones."""
    cert_dir = os.path.dirname(config["ca"]["cert"])
    key_dir = os.path.dirname(config["ca"]["key"])
    trust, key = os.path.join(tmp, "trust"), os.path.join(tmp, "key")
    copy = dict(config)
    copy["ca"] = dict(config["ca"])
    copy["ca"]["cert"] = os.path.join(trust, os.path.basename(config["ca"]["cert"]))
    copy["ca"]["key"] = os.path.join(key, os.path.basename(config["ca"]["key"]))
    path = os.path.join(tmp, "env-config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(copy, f)
    out = subprocess.run(
        [binary, "env", "--config", path, "--format", "dotenv"], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"impersonate-proxy env failed:\n{out.stdout}{out.stderr}")
    lines = {}
    for line in out.stdout.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        lines[name] = value.replace(trust, cert_dir).replace(key, key_dir)
    # Printed only where a JDK is installed; the proxy's image has none.
    lines.pop("JAVA_TOOL_OPTIONS", None)
    return lines


def check_pod(binary, where, pod, configs, tmp):
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    containers = pod.get("initContainers", []) + pod.get("containers", [])
    for c in containers:
        args = c.get("args") or []
        if args[:2] != ["run", "--config"]:
            continue
        here = f"{where} container {c['name']}"
        CHECKED.append(here)
        before = len(PROBLEMS)
        config_path = args[2]
        mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts", [])}
        mount = mounts.get(os.path.dirname(config_path))
        if mount is None or "subPath" in mount:
            problem(here, f"{os.path.dirname(config_path)} is not a directory mount")
            continue
        cm = (volumes.get(mount["name"], {}).get("configMap") or {}).get("name")
        if cm not in configs:
            problem(here, f"{config_path} is not from a ConfigMap in these files")
            continue
        config = yaml.safe_load(configs[cm])
        for key in ("cert", "key"):
            d = os.path.dirname(config["ca"][key])
            if d not in mounts:
                problem(here, f"ca.{key} is in {d}, which the container does not mount")
        drain = duration_secs(config.get("limits", {}).get("drain_timeout", "30s"))
        sleep = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {})
        pause = sleep.get("seconds", 0)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace < pause + drain:
            problem(here, f"terminationGracePeriodSeconds {grace} < preStop {pause} s + drain_timeout {drain:g} s")
        clients = [o for o in containers if any(e["name"] == "HTTPS_PROXY" for e in o.get("env", []))]
        if len(PROBLEMS) == before:
            print(f"{here}: mounts, grace period ({grace} s >= {pause} + {drain:g} s): ok")
        want = dotenv(binary, config, tmp) if clients else {}
        for o in clients:
            before = len(PROBLEMS)
            have = {e["name"]: e.get("value") for e in o.get("env", [])}
            for name, value in want.items():
                if have.get(name) != value:
                    problem(f"{where} container {o['name']}", f"env {name}={have.get(name)!r}, but `env` prints {value!r}")
            if len(PROBLEMS) == before:
                print(f"{where} container {o['name']}: has the {len(want)} variables `env --format dotenv` prints: ok")


def main():
    binary, files = sys.argv[1], sys.argv[2:]
    docs = []
    for path in files:
        with open(path) as f:
            docs += [(path, d) for d in yaml.safe_load_all(f) if d]
    configs = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = os.path.realpath(tmp)
        for path, d in docs:
            if d.get("kind") == "ConfigMap" and "config.yaml" in (d.get("data") or {}):
                name = d["metadata"]["name"]
                configs[name] = d["data"]["config.yaml"]
                check_config(binary, f"{path} ConfigMap {name}", configs[name], tmp)
        for path, d in docs:
            for pod in pod_specs(d):
                with tempfile.TemporaryDirectory(dir=tmp) as sub:
                    check_pod(binary, f"{path} {d['kind']} {d['metadata']['name']}", pod, configs, sub)
    if not CHECKED:
        problem("deploy/kubernetes", "no container runs `impersonate-proxy run --config PATH`")
    for p in PROBLEMS:
        print(f"FAILED {p}", file=sys.stderr)
    sys.exit(1 if PROBLEMS else 0)


if __name__ == "__main__":
    main()
