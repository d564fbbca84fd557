//! L4 authorization on the real datapath: Istio AuthorizationPolicy files enforced by the destination
//! node's agent, reloaded live.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use ferry_e2e::{Agent, DENY_SHOP, Node, Pod, Proc, ShopAndLab, World, dial, testapp};

struct Mesh {
    world: World,
    n2: Node,
    client: Pod,
    intruder: Pod,
    server: Pod,
    a2: Agent,
    _app: Proc,
}

const ALLOW_FRONTEND: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cart-from-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]
    to: [{operation: {ports: [\"8080\"]}}]
";

fn mesh() -> Result<Mesh> {
    let ShopAndLab {
        world,
        n1,
        n2,
        client,
        intruder,
        server,
    } = ShopAndLab::new()?;
    n2.write_policy("cart.yaml", ALLOW_FRONTEND)?;
    let _a1 = world.start_agent(&n1)?;
    let a2 = world.start_agent(&n2)?;
    let mut srv = server.command(testapp());
    srv.args([
        "serve",
        "--listen",
        "0.0.0.0:8080,0.0.0.0:9090",
        "--tag",
        "cart",
    ]);
    let app = world.spawn(srv, "cart")?;
    app.wait_for_output("listening", Duration::from_secs(5))?;
    std::mem::forget(_a1);
    Ok(Mesh {
        world,
        n2,
        client,
        intruder,
        server,
        a2,
        _app: app,
    })
}

fn to(m: &Mesh, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(m.server.ip4), port)
}

#[test]
fn allowed_and_denied_connections_and_explain() -> Result<()> {
    let m = mesh()?;
    let d = dial(m.client.command(testapp()), to(&m, 8080), "ok")?;
    assert!(
        d.ok && d.echo == "ok",
        "frontend may reach cart:8080: {d:?}"
    );
    let d = dial(m.intruder.command(testapp()), to(&m, 8080), "x")?;
    assert!(
        !d.ok && d.greeting.is_empty(),
        "the intruder is refused: {d:?}"
    );
    let d = dial(m.client.command(testapp()), to(&m, 9090), "x")?;
    assert!(!d.ok, "port 9090 is not allowed: {d:?}");
    let denied = m.a2.wait_for(
        |l| {
            l.is_access()
                && l.field("result").as_deref() == Some("refused")
                && l.field("src")
                    .is_some_and(|s| s.starts_with(&m.intruder.ip4.to_string()))
        },
        Duration::from_secs(5),
    )?;
    assert!(
        denied
            .field("reason")
            .unwrap_or_default()
            .contains("no ALLOW policy matched"),
        "{}",
        denied.0
    );

    let e = m.n2.cli(&[
        "explain",
        "--from",
        "lab/intruder",
        "--to",
        "shop/server:8080",
    ])?;
    assert_eq!(e["allowed"], false, "{e}");
    let e = m.n2.cli(&[
        "explain",
        "--from",
        "spiffe://cluster.local/ns/shop/sa/frontend",
        "--to",
        "shop/server:8080",
    ])?;
    assert_eq!(e["allowed"], true, "{e}");
    assert_eq!(e["policy"], "shop/cart-from-frontend");
    assert_eq!(e["rule"], 0);
    let p = m.n2.cli(&["policies"])?;
    assert_eq!(p[0]["id"], "shop/cart-from-frontend", "{p}");
    Ok(())
}

#[test]
fn a_reload_that_denies_closes_live_connections_and_a_bad_reload_keeps_the_old_set() -> Result<()> {
    let m = mesh()?;
    let mut hold = m.client.command(testapp());
    hold.args(["hold", "--to", &to(&m, 8080).to_string(), "--seconds", "20"]);
    let h = m.world.spawn(hold, "hold")?;
    h.wait_for_output("connected", Duration::from_secs(5))?;

    // A malformed file: reported with file and line, and the last good set stays in force.
    m.n2.write_policy("broken.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: b, namespace: shop}\nspec:\n  acton: DENY\n")?;
    let err = m.a2.wait_for(
        |l| l.msg().starts_with("policies rejected"),
        Duration::from_secs(5),
    )?;
    let text = err.field("error").unwrap_or_default();
    assert!(
        text.contains("broken.yaml") && text.contains("acton") && text.contains("5"),
        "{text}"
    );
    let status = m.n2.cli(&["status"])?;
    assert_eq!(status["last_reload"]["ok"], false, "{status}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !h.output().contains("\"ok\":"),
        "the live connection survived the bad reload: {}",
        h.output()
    );
    let d = dial(m.client.command(testapp()), to(&m, 8080), "still")?;
    assert!(d.ok, "{d:?}");

    // A good reload that denies the client: the live connection is closed, new ones refused.
    std::fs::remove_file(m.n2.policies_dir().join("broken.yaml"))?;
    m.n2.write_policy("deny.yaml", DENY_SHOP)?;
    m.a2.wait_for(
        |l| l.msg() == "live connection closed: the new policies deny it",
        Duration::from_secs(5),
    )?;
    h.wait_for_output("\"ok\":false", Duration::from_secs(5))?;
    let d = dial(m.client.command(testapp()), to(&m, 8080), "x")?;
    assert!(!d.ok, "{d:?}");
    let line = m.a2.wait_for(
        |l| {
            l.is_access()
                && l.field("reason")
                    .is_some_and(|r| r.contains("shop/deny-frontend"))
        },
        Duration::from_secs(5),
    )?;
    assert!(
        line.field("reason").unwrap_or_default().contains("rule 0"),
        "{}",
        line.0
    );
    Ok(())
}

#[test]
fn dry_run_policies_are_logged_not_enforced() -> Result<()> {
    let m = mesh()?;
    m.n2.write_policy(
        "dry.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: would-deny\n  namespace: shop\n  annotations: {istio.io/dry-run: \"true\"}\nspec:\n  action: DENY\n  rules: [{}]\n",
    )?;
    m.a2.wait_for(|l| l.msg() == "policies reloaded", Duration::from_secs(5))?;
    let d = dial(m.client.command(testapp()), to(&m, 8080), "dry")?;
    assert!(d.ok, "dry-run does not enforce: {d:?}");
    let line = m.a2.wait_for(
        |l| l.is_access() && l.field("result").as_deref() == Some("closed"),
        Duration::from_secs(5),
    )?;
    let decision = line.field("decision").unwrap_or_default();
    assert!(
        decision.contains("dry-run") && decision.contains("shop/would-deny"),
        "{decision}"
    );
    let (_, metrics) = m.n2.http_get("/metrics")?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ferry_policy_decisions_total")
                && l.contains("dry_run_deny")
                && l.contains("shop/would-deny")
                && !l.ends_with(" 0")),
        "{metrics}"
    );
    Ok(())
}
