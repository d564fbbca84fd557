//! Aligned tables of the admin socket's answers, for people (`-o json` is for scripts).
use serde_json::Value;

use crate::admin::api::Request;

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn ago(secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if secs >= now {
        format!("in {}", human(secs - now))
    } else {
        format!("{} ago", human(now - secs))
    }
}

fn human(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// Columns padded to their widest cell.
fn grid(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

fn rows(data: &Value, cols: &[&str]) -> Vec<Vec<String>> {
    data.as_array()
        .map(|a| {
            a.iter()
                .map(|r| cols.iter().map(|c| s(&r[*c])).collect())
                .collect()
        })
        .unwrap_or_default()
}

pub fn render(request: &Request, data: &Value) -> String {
    match request {
        Request::Status => {
            let mut out = String::new();
            let kv = |k: &str, v: String| format!("{k:<22}{v}\n");
            out += &kv("node", s(&data["node"]));
            out += &kv("version", s(&data["version"]));
            out += &kv("uptime", human(data["uptime_secs"].as_u64().unwrap_or(0)));
            out += &kv("ready", s(&data["ready"]));
            out += &kv("programs", s(&data["programs"]));
            out += &kv("enrolled pods", s(&data["enrolled_pods"]));
            out += &kv("live connections", s(&data["live_connections"]));
            out += &kv(
                "soonest cert expiry",
                data["soonest_cert_expiry"]
                    .as_u64()
                    .map(ago)
                    .unwrap_or_else(|| "-".into()),
            );
            out += &kv("config generation", s(&data["config_generation"]));
            let reload = &data["last_reload"];
            let last = if reload.is_null() {
                "-".into()
            } else {
                format!(
                    "{} {} {}{}",
                    s(&reload["config"]),
                    if reload["ok"].as_bool() == Some(true) {
                        "ok"
                    } else {
                        "FAILED"
                    },
                    reload["at"].as_u64().map(ago).unwrap_or_default(),
                    reload["error"]
                        .as_str()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )
            };
            out += &kv("last reload", last);
            let k = &data["kubernetes"];
            if !k.is_null() {
                let api = if k["connected"].as_bool() == Some(true) {
                    format!(
                        "connected {}",
                        k["since"].as_u64().map(ago).unwrap_or_default()
                    )
                } else {
                    format!(
                        "DISCONNECTED {} (serving the last known state; {} disconnects){}",
                        k["since"].as_u64().map(ago).unwrap_or_default(),
                        s(&k["disconnects"]),
                        k["last_error"]
                            .as_str()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    )
                };
                out += &kv("kubernetes api", api);
                out += &kv(
                    "kubernetes pods",
                    format!(
                        "{} pods, {} namespaces{}{}",
                        s(&k["pods"]),
                        s(&k["namespaces"]),
                        if k["synced"].as_bool() == Some(true) {
                            ""
                        } else {
                            " (not listed yet)"
                        },
                        match k["waiting_for_netns"].as_u64() {
                            Some(n) if n > 0 => format!(", {n} waiting for their netns"),
                            _ => String::new(),
                        }
                    ),
                );
            }
            if let Some(c) = data["capture_counters"].as_object() {
                let counters: Vec<String> = c.iter().map(|(k, v)| format!("{k}={v}")).collect();
                out += &kv("capture counters", counters.join(" "));
            }
            out
        }
        Request::Workloads => grid(
            &[
                "NAMESPACE",
                "NAME",
                "NODE",
                "IPS",
                "PROTOCOL",
                "ENROLLED",
                "IDENTITY",
            ],
            rows(
                data,
                &[
                    "namespace",
                    "name",
                    "node",
                    "ips",
                    "protocol",
                    "enrolled",
                    "identity",
                ],
            ),
        ),
        Request::Conns => grid(
            &[
                "ID",
                "DIR",
                "SOURCE",
                "DESTINATION",
                "ROUTE",
                "SRC IDENTITY",
                "DST IDENTITY",
                "SENT",
                "RECEIVED",
                "AGE",
            ],
            data.as_array()
                .map(|a| {
                    a.iter()
                        .map(|r| {
                            let end = |w: &str, a: &str| match r[w].as_str() {
                                Some(w) => format!("{w} ({})", s(&r[a])),
                                None => s(&r[a]),
                            };
                            vec![
                                s(&r["id"]),
                                s(&r["direction"]),
                                end("src_workload", "src"),
                                end("dst_workload", "dst"),
                                s(&r["route"]),
                                s(&r["src_identity"]),
                                s(&r["dst_identity"]),
                                s(&r["bytes_sent"]),
                                s(&r["bytes_received"]),
                                format!("{:.1}s", r["age_secs"].as_f64().unwrap_or(0.0)),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default(),
        ),
        Request::Certs => grid(
            &["IDENTITY", "GENERATION", "EXPIRES", "RENEWS"],
            data.as_array()
                .map(|a| {
                    a.iter()
                        .map(|r| {
                            vec![
                                s(&r["identity"]),
                                s(&r["generation"]),
                                r["not_after"].as_u64().map(ago).unwrap_or_default(),
                                r["renew_at"].as_u64().map(ago).unwrap_or_default(),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default(),
        ),
        Request::Policies => grid(
            &["POLICY", "ACTION", "DRY-RUN", "RULES", "SCOPE", "FILE"],
            rows(
                data,
                &["id", "action", "dry_run", "rules", "scope", "location"],
            ),
        ),
        Request::Explain { .. } => {
            let mut out = format!(
                "{}\n",
                if data["allowed"].as_bool() == Some(true) {
                    "ALLOWED"
                } else {
                    "DENIED"
                }
            );
            out += &format!("  {}\n", s(&data["decision"]));
            if let Some(id) = data["source_identity"].as_str() {
                out += &format!("  source identity: {id}\n");
            }
            out
        }
        Request::ConfigDump => serde_json::to_string_pretty(data).unwrap_or_default() + "\n",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell() {
        let out = grid(
            &["A", "B"],
            vec![
                vec!["long-value".into(), "x".into()],
                vec!["s".into(), "y".into()],
            ],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "A           B");
        assert_eq!(lines[1], "long-value  x");
        assert_eq!(lines[2], "s           y");
    }

    #[test]
    fn status_shows_a_lost_kubernetes_api_and_what_is_served() {
        let data = serde_json::json!({
            "node": "n1", "ready": true,
            "kubernetes": {"connected": false, "since": 0, "last_error": "connection refused",
                           "disconnects": 2, "synced": true, "pods": 12, "namespaces": 3,
                           "waiting_for_netns": 1}
        });
        let out = render(&Request::Status, &data);
        let api = out
            .lines()
            .find(|l| l.starts_with("kubernetes api"))
            .unwrap();
        assert!(api.contains("DISCONNECTED"), "{api}");
        assert!(
            api.contains("last known state") && api.contains("2 disconnects"),
            "{api}"
        );
        assert!(api.ends_with(": connection refused"), "{api}");
        let pods = out
            .lines()
            .find(|l| l.starts_with("kubernetes pods"))
            .unwrap();
        assert!(
            pods.contains("12 pods, 3 namespaces, 1 waiting for their netns"),
            "{pods}"
        );
        // Without a Kubernetes source the lines are absent.
        let plain = render(&Request::Status, &serde_json::json!({"node": "n1"}));
        assert!(!plain.contains("kubernetes"), "{plain}");
    }
}
