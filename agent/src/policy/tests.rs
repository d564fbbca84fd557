//! Matching semantics (table-driven) and parsing/loading.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use super::*;

const ROOT: &str = DEFAULT_ROOT_NAMESPACE;

/// One policy document; `spec` is the inside of a YAML flow mapping.
fn doc(id: &str, spec: &str) -> String {
    let (ns, name) = id.split_once('/').unwrap();
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {ns}}}\nspec: {{{spec}}}\n---\n"
    )
}

fn dry_run_doc(id: &str, spec: &str) -> String {
    let (ns, name) = id.split_once('/').unwrap();
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata:\n  name: {name}\n  namespace: {ns}\n  annotations:\n    istio.io/dry-run: \"true\"\n\
         spec: {{{spec}}}\n---\n"
    )
}

fn load(text: &str) -> Loaded {
    PolicySet::parse_str("test.yaml", text, ROOT).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn load_err(text: &str) -> PolicyError {
    match PolicySet::parse_str("test.yaml", text, ROOT) {
        Ok(_) => panic!("loaded without error:\n{text}"),
        Err(e) => e,
    }
}

/// A connection. The default is front/web (10.0.0.5) → shop pod labelled app=cart, 10.1.0.9:8080.
#[derive(Clone, Copy)]
struct Conn {
    source: Option<&'static str>,
    source_ip: &'static str,
    namespace: &'static str,
    labels: &'static [(&'static str, &'static str)],
    destination_ip: &'static str,
    port: u16,
}

const WEB: Conn = Conn {
    source: Some("cluster.local/ns/front/sa/web"),
    source_ip: "10.0.0.5",
    namespace: "shop",
    labels: &[("app", "cart"), ("tier", "backend")],
    destination_ip: "10.1.0.9",
    port: 8080,
};
const PLAIN: Conn = Conn {
    source: None,
    ..WEB
};
const ADMIN: Conn = Conn {
    source: Some("cluster.local/ns/ops/sa/admin"),
    source_ip: "192.168.1.1",
    ..WEB
};
const LOCAL: Conn = Conn {
    source: Some("cluster.local/ns/shop/sa/web"),
    ..WEB
};

fn decide(set: &PolicySet, conn: Conn) -> Decision {
    let identity = conn
        .source
        .map(|p| crate::identity::Identity::from_principal(p).unwrap());
    let labels: BTreeMap<String, String> = conn
        .labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    set.evaluate(&Request {
        source: identity.as_ref(),
        source_ip: conn.source_ip.parse::<IpAddr>().unwrap(),
        destination: WorkloadRef {
            namespace: conn.namespace,
            name: "cart-0",
            labels: &labels,
        },
        destination_ip: conn.destination_ip.parse().unwrap(),
        destination_port: conn.port,
    })
}

const ALLOWED_OPEN: &str = "allowed: no ALLOW policy applies";
const DENIED_NO_MATCH: &str = "denied: no ALLOW policy matched";
const ALLOWED_P0: &str = "allowed by policy shop/p rule 0";

/// An ALLOW policy shop/p with one rule.
fn allow(rule: &str) -> String {
    doc("shop/p", &format!("rules: [{rule}]"))
}

fn deny(rule: &str) -> String {
    doc("shop/d", &format!("action: DENY, rules: [{rule}]"))
}

struct Case {
    name: &'static str,
    policies: String,
    conn: Conn,
    /// The decision's Display, which names the deciding policy and rule.
    expect: &'static str,
}

fn case(name: &'static str, policies: String, conn: Conn, expect: &'static str) -> Case {
    Case {
        name,
        policies,
        conn,
        expect,
    }
}

fn cases() -> Vec<Case> {
    let src = |fields: &str| allow(&format!("{{from: [{{source: {{{fields}}}}}]}}"));
    let op = |fields: &str| allow(&format!("{{to: [{{operation: {{{fields}}}}}]}}"));
    let when = |cond: &str| allow(&format!("{{when: [{{{cond}}}]}}"));
    vec![
        // principals
        case(
            "principal exact",
            src(r#"principals: ["cluster.local/ns/front/sa/web"]"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "principal exact, other",
            src(r#"principals: ["cluster.local/ns/front/sa/web"]"#),
            ADMIN,
            DENIED_NO_MATCH,
        ),
        case(
            "principal prefix",
            src(r#"principals: ["cluster.local/ns/front/*"]"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "principal prefix, other",
            src(r#"principals: ["cluster.local/ns/front/*"]"#),
            ADMIN,
            DENIED_NO_MATCH,
        ),
        case(
            "principal suffix",
            src(r#"principals: ["*/sa/web"]"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "principal suffix, other",
            src(r#"principals: ["*/sa/web"]"#),
            ADMIN,
            DENIED_NO_MATCH,
        ),
        case(
            "principal *, authenticated",
            src(r#"principals: ["*"]"#),
            ADMIN,
            ALLOWED_P0,
        ),
        case(
            "principal *, plaintext",
            src(r#"principals: ["*"]"#),
            PLAIN,
            DENIED_NO_MATCH,
        ),
        case(
            "principal list is OR",
            src(r#"principals: ["x/ns/a/sa/b", "cluster.local/ns/ops/sa/admin"]"#),
            ADMIN,
            ALLOWED_P0,
        ),
        case(
            "notPrincipals, listed",
            src(r#"notPrincipals: ["cluster.local/ns/front/sa/web"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "notPrincipals, other",
            src(r#"notPrincipals: ["cluster.local/ns/front/sa/web"]"#),
            ADMIN,
            ALLOWED_P0,
        ),
        case(
            "notPrincipals, plaintext meets it",
            src(r#"notPrincipals: ["cluster.local/ns/front/sa/web"]"#),
            PLAIN,
            ALLOWED_P0,
        ),
        case(
            "DENY notPrincipals * denies plaintext",
            deny(r#"{from: [{source: {notPrincipals: ["*"]}}]}"#),
            PLAIN,
            "denied by policy shop/d rule 0",
        ),
        case(
            "DENY notPrincipals * lets mTLS through",
            deny(r#"{from: [{source: {notPrincipals: ["*"]}}]}"#),
            WEB,
            ALLOWED_OPEN,
        ),
        // namespaces
        case(
            "namespace exact",
            src(r#"namespaces: ["front"]"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "namespace exact, other",
            src(r#"namespaces: ["front"]"#),
            ADMIN,
            DENIED_NO_MATCH,
        ),
        case(
            "namespace prefix",
            src(r#"namespaces: ["fr*"]"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "namespace suffix",
            src(r#"namespaces: ["*ont"]"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "namespace suffix, other",
            src(r#"namespaces: ["*ont"]"#),
            ADMIN,
            DENIED_NO_MATCH,
        ),
        case(
            "namespace, plaintext",
            src(r#"namespaces: ["*"]"#),
            PLAIN,
            DENIED_NO_MATCH,
        ),
        case(
            "notNamespaces, listed",
            src(r#"notNamespaces: ["front"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "notNamespaces, other",
            src(r#"notNamespaces: ["front"]"#),
            ADMIN,
            ALLOWED_P0,
        ),
        case(
            "notNamespaces, plaintext meets it",
            src(r#"notNamespaces: ["front"]"#),
            PLAIN,
            ALLOWED_P0,
        ),
        // serviceAccounts
        case(
            "serviceAccount ns/name",
            src(r#"serviceAccounts: ["front/web"]"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "serviceAccount ns/name, other",
            src(r#"serviceAccounts: ["front/web"]"#),
            ADMIN,
            DENIED_NO_MATCH,
        ),
        case(
            "serviceAccount bare name is in the policy's namespace",
            src(r#"serviceAccounts: ["web"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "serviceAccount bare name, same namespace",
            src(r#"serviceAccounts: ["web"]"#),
            LOCAL,
            ALLOWED_P0,
        ),
        case(
            "serviceAccount, plaintext",
            src(r#"serviceAccounts: ["front/web"]"#),
            PLAIN,
            DENIED_NO_MATCH,
        ),
        case(
            "notServiceAccounts, listed",
            src(r#"notServiceAccounts: ["front/web"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "notServiceAccounts, other",
            src(r#"notServiceAccounts: ["front/web"]"#),
            ADMIN,
            ALLOWED_P0,
        ),
        case(
            "notServiceAccounts, plaintext meets it",
            src(r#"notServiceAccounts: ["front/web"]"#),
            PLAIN,
            ALLOWED_P0,
        ),
        // ipBlocks
        case(
            "ipBlocks v4 CIDR",
            src(r#"ipBlocks: ["10.0.0.0/24"]"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "ipBlocks v4 CIDR, outside",
            src(r#"ipBlocks: ["10.0.1.0/24"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "ipBlocks bare IP",
            src(r#"ipBlocks: ["10.0.0.5"]"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "ipBlocks bare IP, other",
            src(r#"ipBlocks: ["10.0.0.6"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "ipBlocks apply to plaintext",
            src(r#"ipBlocks: ["10.0.0.0/8"]"#),
            PLAIN,
            ALLOWED_P0,
        ),
        case(
            "ipBlocks v6 CIDR",
            src(r#"ipBlocks: ["fd00::/64"]"#),
            Conn {
                source_ip: "fd00::1",
                ..WEB
            },
            ALLOWED_P0,
        ),
        case(
            "ipBlocks v6 CIDR, outside",
            src(r#"ipBlocks: ["fd00::/64"]"#),
            Conn {
                source_ip: "fd00:0:0:1::1",
                ..WEB
            },
            DENIED_NO_MATCH,
        ),
        case(
            "ipBlocks bare v6",
            src(r#"ipBlocks: ["fd00::1"]"#),
            Conn {
                source_ip: "fd00::1",
                ..WEB
            },
            ALLOWED_P0,
        ),
        case(
            "ipBlocks v4 vs v4-mapped source",
            src(r#"ipBlocks: ["10.0.0.0/24"]"#),
            Conn {
                source_ip: "::ffff:10.0.0.5",
                ..WEB
            },
            ALLOWED_P0,
        ),
        case(
            "ipBlocks v4 never match v6",
            src(r#"ipBlocks: ["0.0.0.0/0"]"#),
            Conn {
                source_ip: "fd00::1",
                ..WEB
            },
            DENIED_NO_MATCH,
        ),
        case(
            "notIpBlocks, inside",
            src(r#"notIpBlocks: ["10.0.0.0/8"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "notIpBlocks, outside",
            src(r#"notIpBlocks: ["10.0.0.0/8"]"#),
            ADMIN,
            ALLOWED_P0,
        ),
        // fields of one source are ANDed, entries ORed
        case(
            "source fields AND, one fails",
            src(r#"principals: ["*"], ipBlocks: ["10.9.0.0/16"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "source fields AND, both hold",
            src(r#"principals: ["*"], ipBlocks: ["10.0.0.0/16"]"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "principals and notPrincipals together",
            src(r#"principals: ["cluster.local/*"], notPrincipals: ["*/sa/web"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "from entries OR",
            allow(
                r#"{from: [{source: {namespaces: ["nope"]}}, {source: {ipBlocks: ["10.0.0.5"]}}]}"#,
            ),
            WEB,
            ALLOWED_P0,
        ),
        // ports
        case("ports", op(r#"ports: ["8080"]"#), WEB, ALLOWED_P0),
        case(
            "ports, other",
            op(r#"ports: ["9090"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "ports as YAML integers",
            op("ports: [9090, 8080]"),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "notPorts, listed",
            op(r#"notPorts: ["8080"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "notPorts, other",
            op(r#"notPorts: ["9090"]"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "to entries OR",
            allow(r#"{to: [{operation: {ports: ["1"]}}, {operation: {ports: ["8080"]}}]}"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "from AND to",
            allow(
                r#"{from: [{source: {namespaces: ["front"]}}], to: [{operation: {ports: ["9090"]}}]}"#,
            ),
            WEB,
            DENIED_NO_MATCH,
        ),
        // when
        case(
            "when source.ip",
            when(r#"key: source.ip, values: ["10.0.0.0/24"]"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "when source.ip, outside",
            when(r#"key: source.ip, values: ["10.0.0.0/24"]"#),
            ADMIN,
            DENIED_NO_MATCH,
        ),
        case(
            "when source.ip notValues",
            when(r#"key: source.ip, notValues: ["10.0.0.5"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "when source.namespace prefix",
            when(r#"key: source.namespace, values: ["fro*"]"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "when source.namespace notValues",
            when(r#"key: source.namespace, notValues: ["front"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "when source.namespace, plaintext",
            when(r#"key: source.namespace, values: ["*"]"#),
            PLAIN,
            DENIED_NO_MATCH,
        ),
        case(
            "when source.principal suffix",
            when(r#"key: source.principal, values: ["*/sa/admin"]"#),
            ADMIN,
            ALLOWED_P0,
        ),
        case(
            "when source.principal notValues, plaintext meets it",
            when(r#"key: source.principal, notValues: ["*"]"#),
            PLAIN,
            ALLOWED_P0,
        ),
        case(
            "when source.principal notValues",
            when(r#"key: source.principal, notValues: ["*"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "when destination.ip",
            when(r#"key: destination.ip, values: ["10.1.0.0/16"]"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "when destination.ip notValues",
            when(r#"key: destination.ip, notValues: ["10.1.0.9"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "when destination.ip v6",
            when(r#"key: destination.ip, values: ["fd10::/16"]"#),
            Conn {
                destination_ip: "fd10::9",
                ..WEB
            },
            ALLOWED_P0,
        ),
        case(
            "when destination.port",
            when(r#"key: destination.port, values: ["8080"]"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "when destination.port notValues",
            when(r#"key: destination.port, notValues: ["8080"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "when values AND notValues",
            when(r#"key: source.ip, values: ["10.0.0.0/8"], notValues: ["10.0.0.5"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "when conditions AND",
            allow(
                r#"{when: [{key: destination.port, values: ["8080"]}, {key: source.namespace, values: ["ops"]}]}"#,
            ),
            WEB,
            DENIED_NO_MATCH,
        ),
        // rules and empty semantics
        case(
            "second rule matches",
            doc(
                "shop/p",
                r#"rules: [{to: [{operation: {ports: ["1"]}}]}, {}]"#,
            ),
            WEB,
            "allowed by policy shop/p rule 1",
        ),
        case(
            "ALLOW spec {} allows nothing",
            doc("shop/p", ""),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "ALLOW rules [] allows nothing",
            doc("shop/p", "rules: []"),
            WEB,
            DENIED_NO_MATCH,
        ),
        case("ALLOW rule {} allows all", allow("{}"), PLAIN, ALLOWED_P0),
        case(
            "DENY rule {} denies all",
            deny("{}"),
            WEB,
            "denied by policy shop/d rule 0",
        ),
        case(
            "DENY without rules denies nothing",
            doc("shop/d", "action: DENY"),
            WEB,
            ALLOWED_OPEN,
        ),
        case("no policies", String::new(), WEB, ALLOWED_OPEN),
        // scope
        case(
            "other namespace's policy",
            doc("bank/p", ""),
            WEB,
            ALLOWED_OPEN,
        ),
        case(
            "selector matches",
            doc("shop/p", "selector: {matchLabels: {app: cart}}"),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "selector needs every label",
            doc(
                "shop/p",
                "selector: {matchLabels: {app: cart, tier: front}}",
            ),
            WEB,
            ALLOWED_OPEN,
        ),
        case(
            "selector does not match",
            doc("shop/p", "selector: {matchLabels: {app: web}}"),
            WEB,
            ALLOWED_OPEN,
        ),
        case(
            "namespace selector stays in its namespace",
            doc("bank/p", "selector: {matchLabels: {app: cart}}"),
            WEB,
            ALLOWED_OPEN,
        ),
        case(
            "empty matchLabels selects all",
            doc("shop/p", "selector: {matchLabels: {}}"),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "root namespace is mesh-wide",
            doc("istio-system/lock", ""),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "root namespace with selector",
            doc(
                "istio-system/d",
                "action: DENY, selector: {matchLabels: {app: cart}}, rules: [{}]",
            ),
            WEB,
            "denied by policy istio-system/d rule 0",
        ),
        case(
            "root namespace selector, not selected",
            doc(
                "istio-system/d",
                "action: DENY, selector: {matchLabels: {app: web}}, rules: [{}]",
            ),
            WEB,
            ALLOWED_OPEN,
        ),
        case(
            "root ALLOW plus namespace ALLOW",
            doc("istio-system/lock", "") + &allow("{}"),
            WEB,
            ALLOWED_P0,
        ),
        // precedence
        case(
            "DENY beats ALLOW",
            allow("{}") + &deny(r#"{from: [{source: {namespaces: ["front"]}}]}"#),
            WEB,
            "denied by policy shop/d rule 0",
        ),
        case(
            "DENY not matching leaves ALLOW",
            allow("{}") + &deny(r#"{from: [{source: {namespaces: ["ops"]}}]}"#),
            WEB,
            ALLOWED_P0,
        ),
        case(
            "first DENY in load order is cited",
            deny(r#"{to: [{operation: {ports: ["1"]}}]}, {}"#)
                + &doc("shop/e", "action: DENY, rules: [{}]"),
            WEB,
            "denied by policy shop/d rule 1",
        ),
        // AUDIT and dry-run
        case(
            "AUDIT matched, not enforced",
            doc("shop/a", "action: AUDIT, rules: [{}]"),
            WEB,
            "allowed: no ALLOW policy applies; audit: AUDIT shop/a matched rule 0",
        ),
        case(
            "AUDIT not matched",
            doc(
                "shop/a",
                r#"action: AUDIT, rules: [{to: [{operation: {ports: ["1"]}}]}]"#,
            ),
            WEB,
            "allowed: no ALLOW policy applies; audit: AUDIT shop/a did not match",
        ),
        case(
            "AUDIT is not an ALLOW policy",
            doc("shop/a", "action: AUDIT") + &allow("{}"),
            WEB,
            "allowed by policy shop/p rule 0; audit: AUDIT shop/a did not match",
        ),
        case(
            "dry-run DENY",
            dry_run_doc("shop/x", "action: DENY, rules: [{}]"),
            WEB,
            "allowed: no ALLOW policy applies; dry-run: DENY shop/x matched rule 0",
        ),
        case(
            "dry-run ALLOW does not apply",
            dry_run_doc("shop/x", ""),
            WEB,
            "allowed: no ALLOW policy applies; dry-run: ALLOW shop/x did not match",
        ),
        case(
            "dry-run next to enforced",
            dry_run_doc("shop/x", "rules: [{}]") + &allow(r#"{to: [{operation: {ports: ["1"]}}]}"#),
            WEB,
            "denied: no ALLOW policy matched; dry-run: ALLOW shop/x matched rule 0",
        ),
        // HTTP-only fields
        case(
            "ALLOW rule with methods matches nothing",
            allow(r#"{to: [{operation: {ports: ["8080"], methods: ["GET"]}}]}"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "ALLOW: only the HTTP rule is dropped",
            doc(
                "shop/p",
                r#"rules: [{to: [{operation: {paths: ["/a"]}}]}, {from: [{source: {namespaces: ["front"]}}]}]"#,
            ),
            WEB,
            "allowed by policy shop/p rule 1",
        ),
        case(
            "ALLOW requestPrincipals",
            src(r#"principals: ["*"], requestPrincipals: ["*"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "ALLOW notHosts",
            op(r#"notHosts: ["evil"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "ALLOW HTTP when key",
            when(r#"key: "request.auth.claims[iss]", values: ["x"]"#),
            WEB,
            DENIED_NO_MATCH,
        ),
        case(
            "DENY applies on its L4 part",
            deny(
                r#"{from: [{source: {namespaces: ["front"]}}], to: [{operation: {methods: ["POST"]}}]}"#,
            ),
            WEB,
            "denied by policy shop/d rule 0",
        ),
        case(
            "DENY L4 part not matching",
            deny(
                r#"{from: [{source: {namespaces: ["front"]}}], to: [{operation: {methods: ["POST"]}}]}"#,
            ),
            ADMIN,
            ALLOWED_OPEN,
        ),
        case(
            "DENY HTTP when counts as matched",
            deny(
                r#"{from: [{source: {namespaces: ["front"]}}], when: [{key: "request.headers[x-user]", values: ["bob"]}]}"#,
            ),
            WEB,
            "denied by policy shop/d rule 0",
        ),
        case(
            "DENY with only paths denies all",
            deny(r#"{to: [{operation: {paths: ["/admin*"]}}]}"#),
            ADMIN,
            "denied by policy shop/d rule 0",
        ),
        case(
            "DENY with only remoteIpBlocks denies all",
            deny(r#"{from: [{source: {remoteIpBlocks: ["1.2.3.4"]}}]}"#),
            WEB,
            "denied by policy shop/d rule 0",
        ),
        // CUSTOM fails closed
        case(
            "CUSTOM denies on its L4 part",
            doc(
                "shop/c",
                r#"action: CUSTOM, provider: {name: opa}, rules: [{to: [{operation: {ports: ["8080"]}}]}]"#,
            ),
            WEB,
            "denied by policy shop/c rule 0",
        ),
        case(
            "CUSTOM L4 part not matching",
            doc(
                "shop/c",
                r#"action: CUSTOM, provider: {name: opa}, rules: [{to: [{operation: {ports: ["9090"]}}]}]"#,
            ),
            WEB,
            ALLOWED_OPEN,
        ),
        case(
            "CUSTOM with only paths denies all",
            doc(
                "shop/c",
                r#"action: CUSTOM, provider: {name: opa}, rules: [{to: [{operation: {paths: ["/x"]}}]}]"#,
            ),
            WEB,
            "denied by policy shop/c rule 0",
        ),
    ]
}

#[test]
fn matching_table() {
    let cases = cases();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let set = load(&c.policies).set;
        let got = decide(&set, c.conn).to_string();
        if got != c.expect {
            failures.push(format!(
                "{}: expected {:?}, got {:?}",
                c.name, c.expect, got
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn decision_allowed_follows_reason() {
    let set = load(&deny("{}")).set;
    let d = decide(&set, WEB);
    assert!(!d.allowed());
    assert_eq!(
        d.reason,
        Reason::DeniedBy {
            policy: PolicyId::new("shop", "d"),
            rule: 0
        }
    );
    let d = decide(&PolicySet::default(), WEB);
    assert!(d.allowed());
    assert_eq!(d.reason, Reason::NoAllowPolicy);
}

#[test]
fn root_namespace_is_configurable() {
    let text = doc("mesh-root/lock", "");
    let set = PolicySet::parse_str("t", &text, "mesh-root").unwrap().set;
    assert_eq!(decide(&set, WEB).reason, Reason::NoAllowMatch);
    assert_eq!(
        set.iter().next().unwrap().scope(),
        &Scope::Mesh { selector: None }
    );
    // With the default root, the same policy is only for namespace mesh-root.
    let set = load(&text).set;
    assert_eq!(decide(&set, WEB).reason, Reason::NoAllowPolicy);
}

// ---- parsing and loading ----

const HEADER: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n";

#[test]
fn unknown_field_names_file_line_and_field() {
    let text = format!(
        "{HEADER}metadata:\n  name: p\n  namespace: shop\nspec:\n  rules:\n  - from:\n    - source:\n        notPrincipal: [\"x\"]\n"
    );
    match load_err(&text) {
        PolicyError::UnknownField {
            at, field, path, ..
        } => {
            assert_eq!(at.origin, "test.yaml");
            assert_eq!(at.line, 10, "line of notPrincipal");
            assert_eq!(field, "notPrincipal");
            assert_eq!(path, "spec.rules[0].from[0].source");
        }
        other => panic!("unexpected error {other:?}"),
    }
    let message = load_err(&text).to_string();
    assert!(message.starts_with("test.yaml:10:"), "{message}");
    assert!(message.contains("`notPrincipal`"), "{message}");
}

#[test]
fn unknown_spec_field_is_an_error() {
    let text = format!("{HEADER}metadata: {{name: p, namespace: shop}}\nspec:\n  actions: DENY\n");
    let e = load_err(&text);
    assert!(
        matches!(&e, PolicyError::UnknownField { field, at, .. } if field == "actions" && at.line == 5),
        "{e:?}"
    );
}

#[test]
fn multi_document_errors_carry_the_file_line() {
    let good =
        |name: &str| format!("{HEADER}metadata: {{name: {name}, namespace: shop}}\nspec: {{}}\n");
    // Documents 1 and 2 take lines 1-4 and 6-9 (`---` on 5 and 10); the third starts at line 11.
    let text = format!(
        "{}---\n{}---\n# comment\n{HEADER}metadata: {{name: c, namespace: shop}}\nspec:\n  rules:\n  - to:\n    - operation:\n        method: [GET]\n",
        good("a"),
        good("b")
    );
    let e = load_err(&text);
    let at = e.location().unwrap();
    assert_eq!(at.line, 19, "{e}");
    assert!(e.to_string().starts_with("test.yaml:19:"), "{e}");

    // A syntax error (from libyaml rather than serde) in the second document.
    let text = format!("{}---\n{HEADER}metadata: {{name: b\n", good("a"));
    let e = load_err(&text);
    // libyaml notices at the end of input (line 9) and names the unclosed mapping (line 8), both
    // counted in the file, not from the document's `---` (which would say 4 and 3).
    assert_eq!(e.location().unwrap().line, 9, "{e}");
    assert!(e.to_string().contains("at line 8 column 11"), "{e}");
}

#[test]
fn bad_values_are_located() {
    for (value, needle) in [
        ("ipBlocks: [\"10.0.0.0/33\"]", "not an IP address or CIDR"),
        ("ipBlocks: [\"cart\"]", "not an IP address or CIDR"),
        ("principals: [\"\"]", "empty string"),
        ("serviceAccounts: [\"a/b/c\"]", "namespace/name"),
        ("serviceAccounts: [\"front/*\"]", "wildcards"),
    ] {
        let text = format!(
            "{HEADER}metadata: {{name: p, namespace: shop}}\nspec:\n  rules:\n  - from:\n    - source:\n        {value}\n"
        );
        let e = load_err(&text);
        assert_eq!(e.location().unwrap().line, 8, "{value}: {e}");
        assert!(e.to_string().contains(needle), "{value}: {e}");
    }
    for (value, needle) in [
        ("ports: [\"0\"]", "not a port"),
        ("ports: [\"80-90\"]", "not a port"),
        ("notPorts: [70000]", "not a port"),
    ] {
        let text = format!(
            "{HEADER}metadata: {{name: p, namespace: shop}}\nspec:\n  rules:\n  - to:\n    - operation:\n        {value}\n"
        );
        let e = load_err(&text);
        assert_eq!(e.location().unwrap().line, 8, "{value}: {e}");
        assert!(e.to_string().contains(needle), "{value}: {e}");
    }
}

#[test]
fn invalid_rules_are_errors() {
    for (rule, needle) in [
        ("{from: [{}]}", "spec.rules[0].from[0].source: is required"),
        (
            "{from: [{source: {}}]}",
            "spec.rules[0].from[0].source: must set",
        ),
        (
            "{to: [{operation: {ports: []}}]}",
            "spec.rules[0].to[0].operation: must set",
        ),
        ("{when: [{key: source.ip}]}", "needs values or notValues"),
        (
            "{when: [{key: source.ips, values: [\"1.2.3.4\"]}]}",
            "unknown when key `source.ips`",
        ),
        (
            "{when: [{key: destination.port, values: [\"http\"]}]}",
            "not a port",
        ),
        (
            "{when: [{key: source.ip, notValues: [\"x\"]}]}",
            "not an IP address",
        ),
    ] {
        let e = load_err(&allow(rule));
        assert!(e.to_string().contains(needle), "{rule}: {e}");
        assert!(e.to_string().starts_with("test.yaml:"), "{rule}: {e}");
    }
    let e = load_err(&doc("shop/p", "action: PERMIT"));
    assert!(e.to_string().contains("unknown variant `PERMIT`"), "{e}");
}

#[test]
fn metadata_is_checked_but_lenient() {
    let e = load_err(&format!("{HEADER}metadata: {{name: p}}\nspec: {{}}\n"));
    assert!(
        matches!(&e, PolicyError::Invalid { field, at, .. } if field == "metadata.namespace" && at.line == 1),
        "{e:?}"
    );
    let e = load_err(&format!("{HEADER}metadata: {{namespace: shop}}\n"));
    assert!(e.to_string().contains("metadata.name: is required"), "{e}");
    let e = load_err(&format!("{HEADER}spec: {{}}\n"));
    assert!(e.to_string().contains("metadata: is required"), "{e}");
    // What `kubectl get -o yaml` adds is fine, as is a missing spec (= allow nothing).
    let loaded = load(&format!(
        "{HEADER}metadata:\n  name: p\n  namespace: shop\n  uid: 1234\n  resourceVersion: \"9\"\n  \
         labels: {{team: a}}\n  annotations: {{kubectl.kubernetes.io/last-applied-configuration: \"{{}}\"}}\n  \
         managedFields: [{{manager: kubectl}}]\nstatus: {{}}\n"
    ));
    assert_eq!(loaded.set.len(), 1);
    assert_eq!(decide(&loaded.set, WEB).reason, Reason::NoAllowMatch);
}

#[test]
fn api_versions_and_kinds() {
    let v1beta1 =
        doc("shop/p", "rules: [{}]").replace("security.istio.io/v1", "security.istio.io/v1beta1");
    assert_eq!(load(&v1beta1).set.len(), 1);

    let alpha = doc("shop/p", "").replace("security.istio.io/v1", "security.istio.io/v1alpha1");
    assert!(
        load_err(&alpha).to_string().contains("apiVersion"),
        "{}",
        load_err(&alpha)
    );

    let lower = doc("shop/p", "").replace("AuthorizationPolicy", "Authorizationpolicy");
    assert!(load_err(&lower).to_string().contains("kind"));
    assert!(
        load_err("apiVersion: v1\nkind: List\nitems: []\n")
            .to_string()
            .contains("List")
    );
    assert!(
        load_err("just: a map\n")
            .to_string()
            .contains("kind: is missing")
    );

    // Other kinds are skipped with a warning, even with a spec the policy model would reject.
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d, namespace: shop}}\nspec: {{replicas: 1}}\n---\n{}",
        doc("shop/p", "")
    );
    let loaded = load(&text);
    assert_eq!(loaded.set.len(), 1);
    let warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(warnings.len(), 3, "{warnings:?}"); // two skipped documents + allow-nothing
    assert!(
        warnings[0].starts_with("test.yaml:1: kind Namespace"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].starts_with("test.yaml:5: kind Deployment"),
        "{warnings:?}"
    );
}

#[test]
fn target_refs_are_skipped_with_a_warning() {
    for field in [
        "targetRef: {kind: Gateway, name: gw}",
        "targetRefs: [{kind: Service, name: cart}]",
    ] {
        let loaded = load(&doc(
            "shop/w",
            &format!("action: DENY, {field}, rules: [{{}}]"),
        ));
        assert!(loaded.set.is_empty(), "{field}");
        assert_eq!(loaded.warnings.len(), 1);
        assert_eq!(loaded.warnings[0].policy, Some(PolicyId::new("shop", "w")));
        assert!(loaded.warnings[0].message.contains("targetRef"));
        assert_eq!(decide(&loaded.set, WEB).reason, Reason::NoAllowPolicy);
    }
}

#[test]
fn dry_run_annotation_values() {
    for (value, dry) in [
        ("\"true\"", true),
        ("\"True\"", true),
        ("\"1\"", true),
        ("true", true),
        ("\"false\"", false),
    ] {
        let text = format!(
            "{HEADER}metadata:\n  name: p\n  namespace: shop\n  annotations: {{istio.io/dry-run: {value}}}\n"
        );
        let loaded = load(&text);
        assert_eq!(loaded.set.iter().next().unwrap().dry_run(), dry, "{value}");
        assert!(
            loaded
                .warnings
                .iter()
                .all(|w| !w.message.contains("dry-run")),
            "{value}"
        );
    }
    let text = format!(
        "{HEADER}metadata:\n  name: p\n  namespace: shop\n  annotations: {{istio.io/dry-run: \"yes\"}}\n"
    );
    let loaded = load(&text);
    assert!(!loaded.set.iter().next().unwrap().dry_run());
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.message.contains("istio.io/dry-run"))
    );
}

#[test]
fn unenforceable_fields_are_named_in_warnings() {
    let text = allow(
        r#"{from: [{source: {requestPrincipals: ["*"]}}], to: [{operation: {methods: ["GET"], ports: ["80"]}}], when: [{key: "request.headers[x]", values: ["y"]}]}"#,
    ) + &deny(r#"{to: [{operation: {paths: ["/admin"]}}]}"#)
        + &doc(
            "shop/c",
            "action: CUSTOM, provider: {name: ext-authz}, rules: [{to: [{operation: {ports: [\"80\"], hosts: [\"a\"]}}]}]",
        );
    let loaded = load(&text);
    let p = loaded.set.get(&PolicyId::new("shop", "p")).unwrap();
    let w = p.warnings().join("\n");
    for field in [
        "spec.rules[0].from[0].source.requestPrincipals",
        "spec.rules[0].to[0].operation.methods",
        "spec.rules[0].when[0] (key request.headers[x])",
        "ALLOW rule matches nothing",
    ] {
        assert!(w.contains(field), "missing {field} in {w}");
    }
    let d = loaded
        .set
        .get(&PolicyId::new("shop", "d"))
        .unwrap()
        .warnings()
        .join("\n");
    assert!(
        d.contains("spec.rules[0].to[0].operation.paths") && d.contains("denies every connection"),
        "{d}"
    );
    let c = loaded
        .set
        .get(&PolicyId::new("shop", "c"))
        .unwrap()
        .warnings()
        .join("\n");
    assert!(
        c.contains("CUSTOM (provider ext-authz)") && c.contains("fail closed"),
        "{c}"
    );
    assert!(
        c.contains("operation.hosts") && c.contains("on its L4 part"),
        "{c}"
    );
    // The set-level warnings repeat them with file, line and policy.
    assert!(loaded.warnings.iter().any(|w| {
        w.to_string()
            .starts_with("test.yaml:1: policy shop/p: rule 0 uses HTTP-only")
    }));
}

#[test]
fn duplicate_policies_are_an_error() {
    let e = load_err(&(doc("shop/p", "") + &doc("shop/p", "rules: [{}]")));
    assert!(
        matches!(&e, PolicyError::Duplicate { at, first, .. } if first.line == 1 && at.line == 6),
        "{e:?}"
    );
}

#[test]
fn empty_inputs_load_empty_sets() {
    for text in [
        "",
        "\n",
        "---\n",
        "# only a comment\n---\n---\n",
        "\u{feff}",
    ] {
        let loaded = load(text);
        assert!(
            loaded.set.is_empty() && loaded.warnings.is_empty(),
            "{text:?}"
        );
    }
}

#[test]
fn summary_line() {
    let loaded = load(
        &(doc(
            "istio-system/d",
            "action: DENY, selector: {matchLabels: {app: cart}}, rules: [{}, {}]",
        ) + &dry_run_doc("shop/x", "rules: [{}]")),
    );
    let lines: Vec<String> = loaded.set.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "istio-system/d DENY workloads labelled app=cart in every namespace, 2 rules",
            "shop/x ALLOW (dry-run) namespace shop, 1 rule",
        ]
    );
    let p = loaded.set.iter().next().unwrap();
    assert_eq!(
        (p.location().line, p.rule_count(), p.action()),
        (1, 2, Action::Deny)
    );
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn configmap_directory_reads_each_policy_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // The layout kubelet gives a mounted ConfigMap.
    let data = root.join("..2024_06_01_10_00_00.123");
    std::fs::create_dir(&data).unwrap();
    write(&data.join("b-deny.yaml"), &deny("{}"));
    write(&data.join("a-allow.yml"), &allow("{}"));
    write(&data.join("notes.txt"), "not yaml");
    std::os::unix::fs::symlink("..2024_06_01_10_00_00.123", root.join("..data")).unwrap();
    for name in ["b-deny.yaml", "a-allow.yml", "notes.txt"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), root.join(name)).unwrap();
    }
    // Hidden files are editor/backup noise, not policies.
    write(&root.join(".swp.yaml"), "{{{ not yaml");

    let loaded = PolicySet::load_dir(root, ROOT).unwrap();
    let ids: Vec<String> = loaded.set.iter().map(|p| p.id().to_string()).collect();
    assert_eq!(ids, ["shop/p", "shop/d"], "sorted by file name, each once");
    assert!(
        loaded
            .set
            .iter()
            .next()
            .unwrap()
            .location()
            .origin
            .ends_with("a-allow.yml")
    );
    assert_eq!(
        PolicySet::load_path(root, ROOT).unwrap().set.len(),
        2,
        "load_path takes directories too"
    );
    assert_eq!(
        PolicySet::load_path(&root.join("b-deny.yaml"), ROOT)
            .unwrap()
            .set
            .len(),
        1
    );
}

#[test]
fn directory_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a.yaml"), &allow("{}"));
    write(
        &dir.path().join("b.yaml"),
        &format!("{HEADER}metadata: {{name: q, namespace: shop}}\nspec: {{rule: []}}\n"),
    );
    let e = PolicySet::load_dir(dir.path(), ROOT).unwrap_err();
    let at = e.location().unwrap();
    assert!(at.origin.ends_with("b.yaml") && at.line == 4, "{e}");

    let missing = dir.path().join("absent");
    assert!(matches!(
        PolicySet::load_dir(&missing, ROOT),
        Err(PolicyError::Io { .. })
    ));
    // A dangling symlink (a ConfigMap mid-swap) fails the load instead of dropping policies.
    std::os::unix::fs::symlink("..data/gone.yaml", dir.path().join("c.yaml")).unwrap();
    std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
    assert!(matches!(
        PolicySet::load_dir(dir.path(), ROOT),
        Err(PolicyError::Io { .. })
    ));
}

#[test]
fn lint_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("a.yaml"),
        &(allow("{}") + &doc("shop/x", "rules: [{from: [{source: {namespace: [a]}}]}]")),
    );
    write(
        &dir.path().join("b.yaml"),
        &(doc(
            "shop/y",
            "action: DENY, rules: [{to: [{operation: {methods: [GET]}}]}]",
        ) + &doc("shop/z", ""))
            .replace("name: z, namespace: shop}", "name: z}"),
    );
    let report = lint(dir.path(), ROOT);
    assert_eq!(report.policies, 2, "{report:?}");
    assert_eq!(report.errors.len(), 2, "{report:?}");
    assert!(
        report.errors[0].contains("a.yaml:9:") && report.errors[0].contains("`namespace`"),
        "{report:?}"
    );
    assert!(
        report.errors[1].contains("b.yaml:6: metadata.namespace"),
        "{report:?}"
    );
    assert_eq!(report.warnings.len(), 1, "{report:?}");
    assert!(!report.is_clean());

    let single = dir.path().join("a.yaml");
    assert_eq!(lint(&single, ROOT).errors.len(), 1);
}

#[test]
fn example_policies_lint_clean() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/policies");
    let report = lint(&dir, ROOT);
    assert!(report.is_clean(), "{report:#?}");
    assert!(report.policies >= 4, "{report:?}");
    let set = PolicySet::load_dir(&dir, ROOT).unwrap().set;
    assert!(set.iter().any(|p| p.dry_run()));
    assert!(set.iter().any(|p| matches!(p.scope(), Scope::Mesh { .. })));
}

#[test]
fn fuzz_seeds_load() {
    // The seeds are only useful to the fuzzer if they get past the parser into compilation.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/policy_parse");
    let loaded = PolicySet::load_dir(&dir, ROOT).unwrap();
    assert!(loaded.set.len() >= 5, "{}", loaded.set.len());
}
