//! The deployment files (deploy/): every Kubernetes manifest parses (serde_yaml), and its
//! probes, ports, memory limit and grace period agree with the daemon's configuration as the
//! daemon itself reads it; the systemd unit agrees with its example configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nixl_agent::config::{ServeConfig, DEFAULT_HTTP_LISTEN};
use serde::Deserialize;
use serde_yaml::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of every manifest, with its file name.
fn manifests() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(deploy().join("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.ends_with(".yaml"),
            "only YAML in deploy/kubernetes: {name}"
        );
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            for key in ["apiVersion", "kind", "metadata"] {
                assert!(!v[key].is_null(), "{name}: no {key}");
            }
            out.push((name.clone(), v));
        }
    }
    out
}

fn kind<'a>(all: &'a [(String, Value)], k: &str) -> &'a Value {
    &all.iter()
        .find(|(_, v)| v["kind"] == k)
        .unwrap_or_else(|| panic!("no {k} manifest"))
        .1
}

/// A Kubernetes quantity of bytes ("4608Mi", "5Gi", "1000000").
fn bytes(q: &str) -> u64 {
    let (n, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: u64 = n.parse().unwrap();
    n * match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "K" | "k" => 1000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        u => panic!("unit {u}"),
    }
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn kubernetes_manifests_agree_with_the_daemon_config() {
    let all = manifests();
    let cm = kind(&all, "ConfigMap");
    let toml = cm["data"]["agent.toml"]
        .as_str()
        .expect("agent.toml in the ConfigMap");
    let cfg = ServeConfig::from_toml(toml).expect("the ConfigMap's TOML is a valid config");
    let d = &cfg.daemon;
    let port = u64::from(d.http_listen.port());
    assert_eq!(
        port,
        port_of(DEFAULT_HTTP_LISTEN),
        "the default metrics port"
    );
    assert!(cfg.etcd.is_some(), "a fleet publishes in etcd");

    let ds = kind(&all, "DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"],
        ds["spec"]["template"]["metadata"]["labels"]
    );
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["hostIPC"], true);
    let c = &spec["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let at = args.iter().position(|a| *a == "serve").expect("runs serve");
    assert_eq!(args[at + 1], "--config");
    // The config path is the ConfigMap's key under its mount.
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "config")
        .expect("config mounted");
    let cm_vol = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .unwrap();
    assert_eq!(cm_vol["configMap"]["name"], cm["metadata"]["name"]);
    assert_eq!(
        args[at + 2],
        format!("{}/agent.toml", mount["mountPath"].as_str().unwrap())
    );
    // The control socket's directory is shared with the node.
    let run_mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| {
            d.control_socket
                .starts_with(m["mountPath"].as_str().unwrap())
        })
        .expect("the control socket's directory is mounted");
    let run_vol = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == run_mount["name"])
        .unwrap();
    assert!(run_vol["hostPath"]["path"].is_string(), "from the host");

    // Ports and probes.
    let ports = c["ports"].as_sequence().unwrap();
    let metrics = ports
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a metrics port");
    assert_eq!(metrics["containerPort"].as_u64(), Some(port));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let g = &c[probe]["httpGet"];
        assert_eq!(g["path"], path, "{probe}");
        assert!(
            g["port"].as_u64() == Some(port) || g["port"] == "metrics",
            "{probe} port"
        );
    }
    // IPC_LOCK, a memory limit that holds the pool, a grace period that covers the drain.
    let caps = &c["securityContext"]["capabilities"]["add"];
    assert!(caps.as_sequence().unwrap().iter().any(|x| x == "IPC_LOCK"));
    let limit = bytes(c["resources"]["limits"]["memory"].as_str().unwrap());
    assert!(
        limit >= d.pool_size + (256 << 20),
        "memory limit {limit} must hold pool_size {} and the agent",
        d.pool_size
    );
    let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        Duration::from_secs(grace) >= d.drain_timeout + Duration::from_secs(pre_stop + 5),
        "grace {grace} s < preStop {pre_stop} s + drain {:?} + 5 s",
        d.drain_timeout
    );

    // Scraping: the Service and the PodMonitor select the pods and name the metrics port.
    let svc = kind(&all, "Service");
    assert_eq!(
        svc["spec"]["selector"],
        ds["spec"]["selector"]["matchLabels"]
    );
    let sp = &svc["spec"]["ports"][0];
    assert_eq!(sp["port"].as_u64(), Some(port));
    assert_eq!(sp["targetPort"], "metrics");
    let pm = kind(&all, "PodMonitor");
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"],
        ds["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["path"], "/metrics");
    // Everything in one namespace.
    for (f, v) in &all {
        assert_eq!(v["metadata"]["namespace"], "nixl", "{f}");
    }
}

#[test]
fn the_systemd_unit_agrees_with_its_config() {
    let dir = deploy().join("systemd");
    let unit = std::fs::read_to_string(dir.join("nixl-agent.service")).unwrap();
    let cfg = ServeConfig::from_file(&dir.join("agent.toml")).expect("the example config is valid");
    let mut section = String::new();
    let mut keys = std::collections::HashMap::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not KEY=VALUE: {line}"));
        keys.insert(format!("{section}{k}"), v.to_owned());
    }
    let get = |k: &str| keys.get(k).unwrap_or_else(|| panic!("no {k}")).as_str();
    assert!(get("[Service]ExecStart").contains("serve --config /etc/nixl/agent.toml"));
    assert_eq!(get("[Service]LimitMEMLOCK"), "infinity");
    assert_eq!(get("[Service]KillSignal"), "SIGTERM");
    assert_eq!(
        get("[Service]RestartPreventExitStatus"),
        "2",
        "config errors exit 2"
    );
    let stop: u64 = get("[Service]TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(Duration::from_secs(stop) > cfg.daemon.drain_timeout + Duration::from_secs(5));
    assert!(cfg
        .daemon
        .control_socket
        .starts_with(format!("/run/{}", get("[Service]RuntimeDirectory"))));
    assert_eq!(get("[Install]WantedBy"), "multi-user.target");
}
