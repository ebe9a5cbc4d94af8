#!/usr/bin/env python3
"""Writes the Grafana dashboards of charts/mesh/dashboards/*.json (`just dashboards`).

The JSON files are what ships (the chart's ConfigMaps, `meshctl dashboards export`); this
script is how they are kept uniform: one place for the datasource variable, the template
variables, the panel layout and the PromQL. Edit here, run it, commit both.

Labels the queries rely on:
- from the proxy's /metrics (proxy/src/metrics.rs): direction, authority, target_addr, tls,
  client_id, server_id, status_code, classification, route, reason, policy; and on
  outbound_egress_total network, protocol, decision;
- from the scrape configuration (`meshctl prometheus-config`): namespace, pod, workload,
  workload_kind on every proxy target; job is mesh-proxy, mesh-controller or mesh-injector.
"""

import json
import pathlib

OUT = pathlib.Path(__file__).resolve().parent.parent / "charts" / "mesh" / "dashboards"
RI = "$__rate_interval"


def datasource_var():
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "options": [],
    }


def query_var(name, label, query, include_all=False):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "definition": query,
        "query": {"query": query, "refId": f"{name}-values"},
        "refresh": 2,
        "sort": 1,
        "includeAll": include_all,
        "multi": False,
        "current": {},
        "hide": 0,
        "options": [],
    }


NAMESPACE = query_var("namespace", "Namespace", "label_values(request_total, namespace)")
WORKLOAD = query_var(
    "workload", "Workload", 'label_values(request_total{namespace="$namespace"}, workload)'
)
POD = query_var(
    "pod",
    "Pod",
    'label_values(request_total{namespace="$namespace", workload="$workload"}, pod)',
)
AUTHORITY = query_var(
    "authority",
    "Authority",
    'label_values(request_total{namespace="$namespace", workload="$workload", '
    'direction="outbound"}, authority)',
)
ROUTE_AUTHORITY = query_var(
    "authority",
    "Service",
    'label_values(route_request_total{namespace="$namespace", workload="$workload"}, authority)',
)
ROUTE = query_var(
    "route",
    "Route",
    'label_values(route_request_total{namespace="$namespace", workload="$workload", '
    'authority="$authority"}, route)',
)


def target(expr, legend, ref):
    return {
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
    }


def panel(kind, title, targets, unit=None, description=None, w=12, h=8):
    refs = "ABCDEFGH"
    p = {
        "type": kind,
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "targets": [target(expr, legend, refs[i]) for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {},
        "gridPos": {"w": w, "h": h},
    }
    if unit:
        p["fieldConfig"]["defaults"]["unit"] = unit
    if description:
        p["description"] = description
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area"}
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "line", "lineWidth": 1,
                                                   "fillOpacity": 10, "showPoints": "never"}
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}
    return p


def ts(title, targets, unit=None, description=None, w=12):
    return panel("timeseries", title, targets, unit, description, w=w)


def stat(title, expr, unit=None, description=None):
    return panel("stat", title, [(expr, "")], unit, description, w=6, h=4)


def success(sel, by=""):
    """The share of responses classified as success."""
    group = f" by ({by})" if by else ""
    return (f'sum{group} (rate(response_total{{{sel}, classification="success"}}[{RI}])) / '
            f"sum{group} (rate(response_total{{{sel}}}[{RI}]))")


def quantile(q, sel, by=""):
    group = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) (rate(response_latency_ms_bucket{{{sel}}}[{RI}])))"


def latency_targets(sel, by="", legend_prefix=""):
    return [(quantile(q, sel, by), f"{legend_prefix}{name}")
            for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))]


def tcp_panels(sel, by="direction"):
    return [
        ts("TCP connections open", [(f"sum by ({by}) (tcp_open_connections{{{sel}}})", f"{{{{{by}}}}}")],
           description="Opaque TCP connections the proxy forwards (HTTP traffic is counted per request)."),
        ts("TCP connections opened", [(f"sum by ({by}) (rate(tcp_open_total{{{sel}}}[{RI}]))", f"{{{{{by}}}}}")], "cps"),
        ts("TCP bytes", [
            (f"sum by ({by}) (rate(tcp_read_bytes_total{{{sel}}}[{RI}]))", f"read {{{{{by}}}}}"),
            (f"sum by ({by}) (rate(tcp_write_bytes_total{{{sel}}}[{RI}]))", f"written {{{{{by}}}}}"),
        ], "Bps"),
    ]


def policy_panels(sel, by):
    return [
        ts("Authorization denials", [
            (f"sum by ({by}) (rate(inbound_http_authz_deny_total{{{sel}}}[{RI}]))", f"HTTP {{{{{by}}}}}"),
            (f"sum by ({by}) (rate(inbound_tcp_authz_deny_total{{{sel}}}[{RI}]))", f"TCP {{{{{by}}}}}"),
        ], "reqps", "Requests and connections refused by the inbound policy."),
        ts("Rate limited", [
            (f"sum by ({by}) (rate(inbound_http_ratelimit_total{{{sel}}}[{RI}]))", f"{{{{{by}}}}}"),
        ], "reqps", "Requests refused by a local rate limit."),
    ]


def resilience_panels(sel):
    return [
        ts("Retries", [(f"sum by (route, reason) (rate(route_retry_total{{{sel}}}[{RI}]))",
                        "{{route}} {{reason}}")], "reqps"),
        ts("Endpoint ejections", [(f"sum by (authority) (increase(endpoint_ejection_total{{{sel}}}[{RI}]))",
                                   "{{authority}}")], "short",
           "Endpoints taken out of the balancer by failure accrual (circuit breaking)."),
        ts("Proxy errors", [(f"sum by (direction, reason) (rate(proxy_error_total{{{sel}}}[{RI}]))",
                             "{{direction}} {{reason}}")], "reqps",
           "Errors the proxy produced itself (no endpoints, timeouts, refused by policy, ...)."),
    ]


def dashboard(uid, title, description, variables, panels, tags=()):
    x = y = 0
    row_h = 0
    for i, p in enumerate(panels, start=1):
        p["id"] = i
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y = 0, y + row_h
            row_h = 0
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x += w
        row_h = max(row_h, h)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["mesh", *tags],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": []},
        "links": [{"title": "mesh", "type": "dashboards", "tags": ["mesh"], "asDropdown": True}],
        "templating": {"list": [datasource_var(), *variables]},
        "panels": panels,
    }


EGRESS_NAMESPACE = {
    **query_var("namespace", "Namespace", "label_values(outbound_egress_total, namespace)", True),
    "allValue": ".*",
}


def top_line():
    inbound = 'direction="inbound"'
    return dashboard("mesh-top-line", "Mesh / Top line",
                     "The whole mesh: traffic, success, latency and policy across every namespace.",
                     [], [
        stat("Request rate", f"sum(rate(request_total{{{inbound}}}[{RI}]))", "reqps"),
        stat("Success rate", success(inbound), "percentunit"),
        stat("mTLS share", f'sum(rate(request_total{{{inbound}, tls="true"}}[{RI}])) / '
                           f"sum(rate(request_total{{{inbound}}}[{RI}]))", "percentunit",
             "Share of the requests meshed workloads received over mutual TLS."),
        stat("Meshed pods", 'count(up{job="mesh-proxy"} == 1)', "short"),
        ts("Request rate by namespace",
           [(f"sum by (namespace) (rate(request_total{{{inbound}}}[{RI}]))", "{{namespace}}")], "reqps"),
        ts("Success rate by namespace", [(success(inbound, "namespace"), "{{namespace}}")], "percentunit"),
        ts("Latency", latency_targets(inbound), "ms"),
        ts("p99 latency by namespace", [(quantile(0.99, inbound, "namespace"), "{{namespace}}")], "ms"),
        *tcp_panels("", "namespace"),
        *policy_panels("", "namespace"),
        *resilience_panels(""),
    ], ["top-line"])


def namespace():
    sel = 'namespace="$namespace"'
    inbound = f'{sel}, direction="inbound"'
    return dashboard("mesh-namespace", "Mesh / Namespace",
                     "One namespace, workload by workload.", [NAMESPACE], [
        stat("Request rate", f"sum(rate(request_total{{{inbound}}}[{RI}]))", "reqps"),
        stat("Success rate", success(inbound), "percentunit"),
        stat("p99 latency", quantile(0.99, inbound), "ms"),
        stat("Meshed pods", f'count(up{{job="mesh-proxy", {sel}}} == 1)', "short"),
        ts("Request rate by workload",
           [(f"sum by (workload) (rate(request_total{{{inbound}}}[{RI}]))", "{{workload}}")], "reqps"),
        ts("Success rate by workload", [(success(inbound, "workload"), "{{workload}}")], "percentunit"),
        ts("p95 latency by workload", [(quantile(0.95, inbound, "workload"), "{{workload}}")], "ms"),
        ts("Latency", latency_targets(inbound), "ms"),
        *tcp_panels(sel, "workload"),
        *policy_panels(sel, "workload"),
        *resilience_panels(sel),
    ], ["namespace"])


def workload():
    sel = 'namespace="$namespace", workload="$workload"'
    inbound = f'{sel}, direction="inbound"'
    outbound = f'{sel}, direction="outbound"'
    return dashboard("mesh-workload", "Mesh / Workload",
                     "One workload (deployment, statefulset, daemonset or bare pod): what it serves "
                     "and what it calls.", [NAMESPACE, WORKLOAD], [
        stat("Request rate", f"sum(rate(request_total{{{inbound}}}[{RI}]))", "reqps"),
        stat("Success rate", success(inbound), "percentunit"),
        stat("p99 latency", quantile(0.99, inbound), "ms"),
        stat("Pods", f'count(up{{job="mesh-proxy", {sel}}} == 1)', "short"),
        ts("Inbound request rate by client",
           [(f"sum by (client_id) (rate(request_total{{{inbound}}}[{RI}]))", "{{client_id}}")], "reqps"),
        ts("Inbound success rate", [(success(inbound), "success")], "percentunit"),
        ts("Inbound latency", latency_targets(inbound), "ms"),
        ts("Inbound responses by status",
           [(f"sum by (status_code) (rate(response_total{{{inbound}}}[{RI}]))", "{{status_code}}")], "reqps"),
        ts("Outbound request rate by authority",
           [(f"sum by (authority) (rate(request_total{{{outbound}}}[{RI}]))", "{{authority}}")], "reqps"),
        ts("Outbound success rate by authority", [(success(outbound, "authority"), "{{authority}}")],
           "percentunit"),
        ts("Outbound p95 latency by authority", [(quantile(0.95, outbound, "authority"), "{{authority}}")], "ms"),
        *tcp_panels(sel),
        *policy_panels(sel, "policy"),
        *resilience_panels(sel),
    ], ["workload"])


def pod():
    sel = 'namespace="$namespace", workload="$workload", pod="$pod"'
    inbound = f'{sel}, direction="inbound"'
    outbound = f'{sel}, direction="outbound"'
    return dashboard("mesh-pod", "Mesh / Pod", "One pod: its traffic and its proxy.",
                     [NAMESPACE, WORKLOAD, POD], [
        stat("Inbound request rate", f"sum(rate(request_total{{{inbound}}}[{RI}]))", "reqps"),
        stat("Inbound success rate", success(inbound), "percentunit"),
        stat("Certificate expires in", f"min(identity_cert_expiry_timestamp_seconds{{{sel}}}) - time()", "s"),
        stat("Proxy up", f'max(up{{job="mesh-proxy", {sel}}})', "bool"),
        ts("Request rate", [(f"sum by (direction) (rate(request_total{{{sel}}}[{RI}]))", "{{direction}}")],
           "reqps"),
        ts("Success rate", [(success(sel, "direction"), "{{direction}}")], "percentunit"),
        ts("Inbound latency", latency_targets(inbound), "ms"),
        ts("Outbound latency", latency_targets(outbound), "ms"),
        *tcp_panels(sel),
        *policy_panels(sel, "policy"),
        *resilience_panels(sel),
        ts("Proxy memory", [(f"sum(process_resident_memory_bytes{{{sel}}})", "resident")], "bytes"),
        ts("Proxy CPU", [(f"sum(rate(process_cpu_seconds_total{{{sel}}}[{RI}]))", "cpu")], "percentunit"),
        ts("Proxy open file descriptors", [(f"sum(process_open_fds{{{sel}}})", "fds")], "short"),
    ], ["pod"])


def route():
    sel = 'namespace="$namespace", workload="$workload"'
    rsel = f'{sel}, authority="$authority", route="$route"'
    return dashboard("mesh-route", "Mesh / Route",
                     "One route of a service, as its callers see it: requests, retries, faults and "
                     "ejections.", [NAMESPACE, WORKLOAD, ROUTE_AUTHORITY, ROUTE], [
        stat("Route request rate", f"sum(rate(route_request_total{{{rsel}}}[{RI}]))", "reqps"),
        stat("Retry rate", f'sum(rate(route_retry_total{{{sel}, route="$route"}}[{RI}]))', "reqps"),
        stat("Ejections", f'sum(increase(endpoint_ejection_total{{{sel}, authority="$authority"}}[{RI}]))',
             "short"),
        stat("Fault injections", f"sum(rate(route_fault_injection_total{{{rsel}}}[{RI}]))", "reqps"),
        ts("Requests by route",
           [(f'sum by (route) (rate(route_request_total{{{sel}, authority="$authority"}}[{RI}]))',
             "{{route}}")], "reqps"),
        ts("Retries by outcome",
           [(f'sum by (reason) (rate(route_retry_total{{{sel}, route="$route"}}[{RI}]))', "{{reason}}")],
           "reqps", "`retried`, or `budget exhausted` when the retry budget refused a retry."),
        ts("Fault injections", [(f"sum(rate(route_fault_injection_total{{{rsel}}}[{RI}]))", "injected")],
           "reqps"),
        ts("Ejections by endpoint",
           [(f'sum by (route) (increase(endpoint_ejection_total{{{sel}, authority="$authority"}}[{RI}]))',
             "{{route}}")], "short",
           "Failure accrual ejections; the `route` label names the ejected endpoint."),
        ts("Routes of every service",
           [(f"sum by (authority, route) (rate(route_request_total{{{sel}}}[{RI}]))",
             "{{authority}} {{route}}")], "reqps", w=24),
    ], ["route"])


def authority():
    sel = 'namespace="$namespace", workload="$workload", direction="outbound", authority="$authority"'
    return dashboard("mesh-authority", "Mesh / Authority",
                     "One destination (service and port) as a workload calls it.",
                     [NAMESPACE, WORKLOAD, AUTHORITY], [
        stat("Request rate", f"sum(rate(request_total{{{sel}}}[{RI}]))", "reqps"),
        stat("Success rate", success(sel), "percentunit"),
        stat("p99 latency", quantile(0.99, sel), "ms"),
        stat("mTLS share", f'sum(rate(request_total{{{sel}, tls="true"}}[{RI}])) / '
                           f"sum(rate(request_total{{{sel}}}[{RI}]))", "percentunit"),
        ts("Request rate by server identity",
           [(f"sum by (server_id) (rate(request_total{{{sel}}}[{RI}]))", "{{server_id}}")], "reqps"),
        ts("Success rate", [(success(sel), "success")], "percentunit"),
        ts("Latency", latency_targets(sel), "ms"),
        ts("Responses by status",
           [(f"sum by (status_code, classification) (rate(response_total{{{sel}}}[{RI}]))",
             "{{status_code}} {{classification}}")], "reqps"),
        ts("Request rate by endpoint",
           [(f"sum by (target_addr) (rate(request_total{{{sel}}}[{RI}]))", "{{target_addr}}")], "reqps"),
        ts("Endpoint ejections",
           [(f'sum by (route) (increase(endpoint_ejection_total{{namespace="$namespace", '
             f'workload="$workload", authority="$authority"}}[{RI}]))', "{{route}}")], "short",
           "Failure accrual ejections; the `route` label names the ejected endpoint."),
        *tcp_panels(sel, "target_addr"),
    ], ["authority"])


def egress():
    sel = 'namespace=~"$namespace"'
    egress_rate = f"rate(outbound_egress_total{{{sel}}}[{RI}])"
    denied = f'rate(outbound_egress_total{{{sel}, decision="denied"}}[{RI}])'
    return dashboard("mesh-egress", "Mesh / Egress",
                     "Traffic leaving the mesh that an EgressNetwork (or the mesh-wide default) "
                     "covers: which workloads call out, to which hosts, allowed and denied. HTTP "
                     "is counted per request, TLS and TCP per connection.",
                     [EGRESS_NAMESPACE], [
        stat("Egress rate", f"sum({egress_rate})", "reqps"),
        stat("Denied rate", f"sum({denied})", "reqps"),
        stat("Denied share", f"sum({denied}) / sum({egress_rate})", "percentunit"),
        stat("External hosts", f'count(count by (authority) (increase(outbound_egress_total{{{sel}}}[1h])))',
             "short", "Distinct hosts (or addresses) called in the last hour."),
        ts("Allowed by workload and host",
           [(f'sum by (workload, authority) (rate(outbound_egress_total{{{sel}, decision="allowed"}}[{RI}]))',
             "{{workload}} -> {{authority}}")], "reqps"),
        ts("Denied by workload and host",
           [(f"sum by (workload, authority) ({denied})", "{{workload}} -> {{authority}}")], "reqps",
           "Refused with 403 (HTTP) or a closed connection (TLS, TCP); mesh-error names the "
           "network and why."),
        ts("By network and decision",
           [(f"sum by (network, decision) ({egress_rate})", "{{network}} {{decision}}")], "reqps"),
        ts("By protocol",
           [(f"sum by (protocol, decision) ({egress_rate})", "{{protocol}} {{decision}}")], "reqps"),
    ], ["egress"])


def identity():
    sel = 'namespace=~"$namespace"'
    return dashboard("mesh-identity", "Mesh / Identity and certificates",
                     "Workload certificates, their renewals, the issuer, and who talks to whom over "
                     "mTLS.", [query_var("namespace", "Namespace",
                                         "label_values(identity_cert_expiry_timestamp_seconds, namespace)",
                                         include_all=True)], [
        stat("Soonest proxy certificate expiry",
             f"min(identity_cert_expiry_timestamp_seconds{{{sel}}}) - time()", "s"),
        stat("Issuer certificate expires in",
             "min(mesh_controller_identity_issuer_expiry_timestamp_seconds) - time()", "s",
             "The controller's identity issuer; rotate it before this reaches zero."),
        stat("Certificate renewal failures",
             f"sum(increase(identity_cert_renewal_failures_total{{{sel}}}[1h]))", "short"),
        stat("mTLS share", f'sum(rate(request_total{{{sel}, direction="inbound", tls="true"}}[{RI}])) / '
                           f'sum(rate(request_total{{{sel}, direction="inbound"}}[{RI}]))', "percentunit"),
        ts("Certificate expiry by pod",
           [(f"min by (namespace, pod) (identity_cert_expiry_timestamp_seconds{{{sel}}}) - time()",
             "{{namespace}}/{{pod}}")], "s"),
        ts("Certificate renewals",
           [(f"sum by (namespace) (increase(identity_cert_renewals_total{{{sel}}}[{RI}]))", "{{namespace}} ok"),
            (f"sum by (namespace) (increase(identity_cert_renewal_failures_total{{{sel}}}[{RI}]))",
             "{{namespace}} failed")], "short"),
        ts("Identity.Certify calls by result",
           [(f"sum by (result) (rate(mesh_controller_identity_certify_total[{RI}]))", "{{result}}")], "reqps"),
        ts("mTLS edges (client → server)",
           [(f'sum by (client_id, server_id) (rate(request_total{{{sel}, direction="inbound", tls="true"}}[{RI}]))',
             "{{client_id}} → {{server_id}}")], "reqps", w=24),
        ts("Plaintext requests received",
           [(f'sum by (namespace, workload) (rate(request_total{{{sel}, direction="inbound", tls="false"}}[{RI}]))',
             "{{namespace}}/{{workload}}")], "reqps",
           "Requests meshed workloads received without mutual TLS."),
        ts("Authorization denials by client",
           [(f"sum by (client_id) (rate(inbound_http_authz_deny_total{{{sel}}}[{RI}]))", "{{client_id}}")],
           "reqps"),
    ], ["identity"])


def control_plane():
    c = 'job="mesh-controller"'
    i = 'job="mesh-injector"'
    return dashboard("mesh-control-plane", "Mesh / Control plane",
                     "The controller (discovery, identity, policy) and the injector.", [], [
        stat("Controllers up", f"sum(up{{{c}}})", "short"),
        stat("Injectors up", f"sum(up{{{i}}})", "short"),
        stat("Destination streams", "sum(mesh_controller_destination_streams_active)", "short"),
        stat("Malformed config files", "sum(mesh_controller_files_malformed)", "short"),
        ts("Discovery update latency",
           [(f"histogram_quantile({q}, sum by (le) (rate(mesh_controller_destination_update_latency_seconds_bucket[{RI}])))",
             name) for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))], "s",
           "From the backend seeing a change to the update reaching a stream."),
        ts("Discovery events",
           [(f"sum by (backend, kind, event) (rate(mesh_controller_discovery_events_total[{RI}]))",
             "{{backend}} {{kind}} {{event}}")], "ops"),
        ts("Watch errors",
           [(f"sum by (kind) (rate(mesh_controller_discovery_watch_errors_total[{RI}]))", "{{kind}}")], "ops",
           "Kubernetes watch errors; the watch retries with backoff."),
        ts("Config file parse errors",
           [(f"sum(increase(mesh_controller_file_parse_errors_total[{RI}]))", "parse errors")], "short"),
        ts("Index objects by kind", [("sum by (kind) (mesh_controller_index_objects)", "{{kind}}")], "short"),
        ts("Destination updates",
           [(f"sum by (update) (rate(mesh_controller_destination_updates_total[{RI}]))", "{{update}}")], "ops"),
        ts("Destination calls by outcome",
           [(f"sum by (outcome) (rate(mesh_controller_destination_streams_total[{RI}]))", "{{outcome}}")], "ops"),
        ts("Policy streams", [("sum by (api) (mesh_controller_policy_streams_active)", "{{api}}")], "short"),
        ts("Policy updates",
           [(f"sum by (api) (rate(mesh_controller_policy_updates_total[{RI}]))", "{{api}}")], "ops"),
        ts("Invalid policy objects",
           [("sum by (kind) (mesh_controller_policy_invalid_objects)", "{{kind}}")], "short",
           "Routes and Services whose current version is invalid (the last valid policy is served)."),
        ts("Identity.Certify calls by result",
           [(f"sum by (result) (rate(mesh_controller_identity_certify_total[{RI}]))", "{{result}}")], "ops"),
        ts("Injector admissions by result",
           [(f"sum by (result) (rate(mesh_injector_admission_requests_total[{RI}]))", "{{result}}")], "ops"),
        ts("Injector admission latency",
           [(f"histogram_quantile({q}, sum by (le) (rate(mesh_injector_admission_duration_seconds_bucket[{RI}])))",
             name) for q, name in ((0.5, "p50"), (0.99, "p99"))], "s"),
    ], ["control-plane"])


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, build in [
        ("mesh-top-line", top_line), ("mesh-namespace", namespace), ("mesh-workload", workload),
        ("mesh-pod", pod), ("mesh-route", route), ("mesh-authority", authority),
        ("mesh-egress", egress),
        ("mesh-identity", identity), ("mesh-control-plane", control_plane),
    ]:
        (OUT / f"{name}.json").write_text(json.dumps(build(), indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
