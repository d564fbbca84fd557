//! Tests of minting and the certificate store (spiffe and ca have their own).

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    client::verify_server_cert_signed_by_trust_anchor,
    pki_types::UnixTime,
    server::{ParsedCertificate, WebPkiClientVerifier},
};
use x509_parser::{extensions::GeneralName, oid_registry};

use super::{
    CertStore, ManualClock, MintError, Minter, TrustBundle, WorkloadCert,
    testutil::{DAY, TestPki, id},
    x509::{CLOCK_SKEW_ALLOWANCE, parse_cert},
};

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const HTTPBIN: &str = "spiffe://cluster.local/ns/default/sa/httpbin";

/// A fixed, whole-second instant so expected validity bounds are exact.
fn t0() -> SystemTime {
    truncate(SystemTime::now())
}

fn truncate(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).expect("after epoch").as_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn unix(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).expect("after epoch"))
}

fn mint(minter: &Minter, identity: &str) -> WorkloadCert {
    minter.mint(&id(identity), t0(), 1).expect("mint")
}

#[test]
fn leaf_has_the_shape_hbone_peers_expect() {
    let pki = TestPki::new("cluster.local");
    let minter = pki.minter();
    let now = t0();
    let wc = minter.mint(&id(SLEEP), now, 7).expect("mint");
    assert_eq!(wc.identity(), &id(SLEEP));
    assert_eq!(wc.generation(), 7);
    assert_eq!(wc.chain().len(), 2);

    let leaf = parse_cert(wc.leaf()).expect("leaf parses");
    assert_eq!(leaf.subject().iter().count(), 0, "subject must be empty");
    let san = leaf
        .subject_alternative_name()
        .expect("san")
        .expect("present");
    assert!(san.critical, "SAN must be critical with an empty subject");
    assert_eq!(san.value.general_names, vec![GeneralName::URI(SLEEP)]);

    let eku = leaf
        .extended_key_usage()
        .expect("eku")
        .expect("present")
        .value;
    assert!(eku.server_auth && eku.client_auth);
    let ku = leaf.key_usage().expect("ku").expect("present").value;
    assert!(ku.digital_signature() && ku.key_agreement());
    assert!(!ku.key_cert_sign());
    let bc = leaf
        .basic_constraints()
        .expect("bc")
        .expect("present")
        .value;
    assert!(!bc.ca);

    let spki = leaf.public_key();
    assert_eq!(
        spki.algorithm.algorithm,
        oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    assert_eq!(curve, Some(oid_registry::OID_EC_P256));

    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    let now_s = now.duration_since(UNIX_EPOCH).expect("epoch").as_secs() as i64;
    assert_eq!(nb, now_s - CLOCK_SKEW_ALLOWANCE.as_secs() as i64);
    assert_eq!(na, now_s + DAY.as_secs() as i64);
    assert_eq!(wc.not_before(), now - CLOCK_SKEW_ALLOWANCE);
    assert_eq!(wc.not_after(), now + DAY);

    let node = parse_cert(&wc.chain()[1]).expect("node parses");
    assert_eq!(leaf.issuer(), node.subject());
    leaf.verify_signature(Some(node.public_key()))
        .expect("leaf signed by the node key");
    assert_eq!(
        wc.certified_key().keys_match().map_err(|e| e.to_string()),
        Ok(())
    );
}

#[test]
fn chain_verifies_for_server_and_client_auth() {
    let pki = TestPki::new("cluster.local");
    let wc = mint(&pki.minter(), SLEEP);
    let bundle = pki.bundle();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let now = unix(SystemTime::now());

    let parsed = ParsedCertificate::try_from(wc.leaf()).expect("parse");
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &bundle.root_store(),
        &wc.chain()[1..],
        now,
        provider.signature_verification_algorithms.all,
    )
    .expect("serverAuth chain");

    let client = WebPkiClientVerifier::builder_with_provider(bundle.root_store(), provider)
        .build()
        .expect("verifier");
    client
        .verify_client_cert(wc.leaf(), &wc.chain()[1..], now)
        .expect("clientAuth chain");
}

#[test]
fn refuses_identities_of_another_trust_domain() {
    let pki = TestPki::new("cluster.local");
    let err = pki
        .minter()
        .mint(&id("spiffe://evil.example/ns/default/sa/sleep"), t0(), 1)
        .expect_err("foreign trust domain");
    assert!(matches!(err, MintError::ForeignTrustDomain { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("spiffe://evil.example/ns/default/sa/sleep") && msg.contains("cluster.local")
    );
}

#[test]
fn ttl_is_configurable_and_capped_by_the_node_cert() {
    let pki = TestPki::new("cluster.local");
    let minter = pki
        .minter()
        .with_ttl(Duration::from_secs(3600))
        .expect("ttl");
    let wc = mint(&minter, SLEEP);
    assert_eq!(wc.not_after(), t0() + Duration::from_secs(3600));
    assert!(matches!(
        pki.minter().with_ttl(Duration::from_secs(1)),
        Err(MintError::BadTtl { .. })
    ));

    let short = TestPki::with_node_validity("cluster.local", Duration::from_secs(7200));
    let minter = short.minter();
    let wc = mint(&minter, SLEEP);
    assert_eq!(wc.not_after(), minter.node_not_after());
    assert!(wc.not_after() < t0() + DAY);

    let err = minter
        .mint(&id(SLEEP), minter.node_not_after(), 1)
        .expect_err("node expired");
    assert!(matches!(err, MintError::NodeExpired));
}

#[test]
fn minter_rejects_inconsistent_node_material() {
    let pki = TestPki::new("cluster.local");
    let other = TestPki::new("cluster.local");

    let err = Minter::new(&pki.node_cert_pem, &other.node_key_pem, pki.bundle())
        .expect_err("key of another node");
    assert!(matches!(err, MintError::NodeKeyMismatch), "{err}");

    let err = Minter::new(&other.node_cert_pem, &other.node_key_pem, pki.bundle())
        .expect_err("node of another CA");
    assert!(matches!(err, MintError::NodeNotTrusted(_)), "{err}");

    let err = Minter::new(&pki.bundle_pem, &pki.node_key_pem, pki.bundle())
        .expect_err("root is not the node cert");
    assert!(matches!(err, MintError::NodeKeyMismatch), "{err}");

    let err = Minter::new("nonsense", &pki.node_key_pem, pki.bundle()).expect_err("no pem");
    assert!(matches!(err, MintError::BadNodeCertificate { .. }), "{err}");

    let err = Minter::new(&pki.node_cert_pem, "nonsense", pki.bundle()).expect_err("no key");
    assert!(matches!(err, MintError::BadNodeKey(_)), "{err}");

    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let leaf_pem = rcgen::CertificateParams::default()
        .self_signed(&leaf_key)
        .expect("leaf")
        .pem();
    let err = Minter::new(&leaf_pem, &pki.node_key_pem, pki.bundle()).expect_err("leaf");
    assert!(err.to_string().contains("not a CA"), "{err}");
}

#[test]
fn minter_loads_a_node_directory() {
    let td = super::TrustDomain::new("cluster.local").expect("td");
    let dir = tempfile::tempdir().expect("tempdir");
    super::ca_init(&td, dir.path(), DAY).expect("ca");
    let node = dir.path().join("node");
    super::issue_node(dir.path(), "n1", &node, DAY).expect("node");
    let minter = Minter::load(&node, td.clone()).expect("load");
    assert_eq!(minter.trust_domain(), &td);
    mint(&minter, SLEEP);

    std::fs::remove_file(node.join("node.key")).expect("rm");
    let err = Minter::load(&node, td).expect_err("missing key");
    assert!(err.to_string().contains("node.key"), "{err}");
}

#[test]
fn bundle_rejects_empty_and_garbage() {
    let td = super::TrustDomain::new("cluster.local").expect("td");
    let err = TrustBundle::from_pem(td.clone(), "", "b.pem").expect_err("empty");
    assert!(err.to_string().contains("b.pem") && err.to_string().contains("no certificate"));
    let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    let err = TrustBundle::from_pem(td.clone(), garbage, "b.pem").expect_err("garbage");
    assert!(err.to_string().contains("certificate #0"), "{err}");
    let err =
        TrustBundle::load(td, std::path::Path::new("/nonexistent/b.pem")).expect_err("missing");
    assert!(err.to_string().contains("/nonexistent/b.pem"));
}

fn store_at(pki: &TestPki, start: SystemTime) -> (CertStore, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(start));
    (pki.store_with_clock(clock.clone()), clock)
}

#[test]
fn store_renews_at_half_life_and_not_before() {
    let pki = TestPki::new("cluster.local");
    let start = t0();
    let (store, clock) = store_at(&pki, start);
    let sleep = id(SLEEP);

    let first = store.get(&sleep).expect("mint");
    assert_eq!(first.generation(), 1);
    // Half-life counts from issuance, not from the back-dated not_before.
    let half_life = start + DAY / 2;
    assert_eq!(first.renew_at(), half_life);

    clock.set(half_life - Duration::from_secs(1));
    let again = store.get(&sleep).expect("cached");
    assert!(Arc::ptr_eq(&first, &again), "renewed before half-life");
    assert_eq!(again.generation(), 1);

    clock.set(half_life);
    let renewed = store.get(&sleep).expect("renewed");
    assert_eq!(renewed.generation(), 2);
    assert_ne!(renewed.leaf(), first.leaf());
    assert_eq!(renewed.not_before(), half_life - CLOCK_SKEW_ALLOWANCE);
    // The old certificate is still intact for whoever holds it.
    assert_eq!(first.generation(), 1);

    clock.advance(Duration::from_secs(60));
    assert!(Arc::ptr_eq(&renewed, &store.get(&sleep).expect("cached")));
}

#[test]
fn generations_are_monotonic_across_identities() {
    let pki = TestPki::new("cluster.local");
    let (store, clock) = store_at(&pki, t0());
    let a = store.get(&id(SLEEP)).expect("a");
    let b = store.get(&id(HTTPBIN)).expect("b");
    assert_eq!((a.generation(), b.generation()), (1, 2));
    clock.advance(DAY);
    let a2 = store.get(&id(SLEEP)).expect("a2");
    assert_eq!(a2.generation(), 3);
}

#[test]
fn store_renews_when_clock_steps_back_before_not_before() {
    let pki = TestPki::new("cluster.local");
    let start = t0();
    let (store, clock) = store_at(&pki, start);
    let first = store.get(&id(SLEEP)).expect("mint");
    clock.set(start - Duration::from_secs(30));
    assert!(Arc::ptr_eq(
        &first,
        &store.get(&id(SLEEP)).expect("within back-dating")
    ));
    clock.set(start - Duration::from_secs(3600));
    assert_eq!(store.get(&id(SLEEP)).expect("re-mint").generation(), 2);
}

#[test]
fn store_failure_leaves_cache_and_generation_untouched() {
    let pki = TestPki::new("cluster.local");
    let (store, _clock) = store_at(&pki, t0());
    let err = store
        .get(&id("spiffe://other.td/ns/a/sa/b"))
        .expect_err("foreign");
    assert!(matches!(err, MintError::ForeignTrustDomain { .. }));
    assert!(store.list().is_empty());
    assert_eq!(store.get(&id(SLEEP)).expect("mint").generation(), 1);
}

#[test]
fn store_listing_expiry_renew_due_and_remove() {
    let pki = TestPki::new("cluster.local");
    let start = t0();
    let (store, clock) = store_at(&pki, start);
    assert_eq!(store.soonest_expiry(), None);
    assert_eq!(store.next_renewal(), None);

    let s = store.get(&id(SLEEP)).expect("sleep");
    clock.advance(Duration::from_secs(3600));
    let h = store.get(&id(HTTPBIN)).expect("httpbin");
    let listed: Vec<String> = store
        .list()
        .iter()
        .map(|c| c.identity().to_string())
        .collect();
    assert_eq!(listed, vec![HTTPBIN.to_owned(), SLEEP.to_owned()]);
    assert_eq!(store.soonest_expiry(), Some(s.not_after()));
    assert_eq!(store.next_renewal(), Some(s.renew_at()));

    clock.set(s.renew_at());
    assert!(store.renew_due().is_empty());
    let gens: Vec<(String, u64)> = store
        .list()
        .iter()
        .map(|c| (c.identity().to_string(), c.generation()))
        .collect();
    assert_eq!(
        gens,
        vec![(HTTPBIN.to_owned(), h.generation()), (SLEEP.to_owned(), 3)]
    );

    assert!(store.remove(&id(SLEEP)));
    assert!(!store.remove(&id(SLEEP)));
    assert_eq!(store.list().len(), 1);
    assert_eq!(store.soonest_expiry(), Some(h.not_after()));
}

#[test]
fn store_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CertStore>();
    assert_send_sync::<WorkloadCert>();

    let pki = TestPki::new("cluster.local");
    let store = pki.store();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || store.get(&id(SLEEP)).map(|c| c.generation()))
        })
        .collect();
    for h in handles {
        let generation = h.join().expect("thread").expect("get");
        assert_eq!(generation, 1, "concurrent first gets must share one mint");
    }
}
