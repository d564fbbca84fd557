//! Real handshakes over in-memory pipes.

use std::{
    io,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    ClientConfig, HandshakeKind, ProtocolVersion, ServerConfig,
    pki_types::{CertificateDer, ServerName},
    sign::CertifiedKey,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::{
    ManualClock,
    testutil::{TestPki, id},
};

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const HTTPBIN: &str = "spiffe://cluster.local/ns/default/sa/httpbin";
const OTHER: &str = "spiffe://cluster.local/ns/default/sa/other";

/// What one side observed after a completed handshake and a one-byte round trip.
#[derive(Debug)]
struct Seen {
    peer: Identity,
    peer_leaf: CertificateDer<'static>,
    alpn: Option<Vec<u8>>,
    version: Option<ProtocolVersion>,
    suite: Option<rustls::CipherSuite>,
    kind: Option<HandshakeKind>,
    sni: Option<String>,
}

fn seen(conn: &rustls::CommonState, sni: Option<&str>) -> io::Result<Seen> {
    let certs = conn.peer_certificates().unwrap_or(&[]);
    Ok(Seen {
        peer: peer_identity(certs).map_err(io::Error::other)?,
        peer_leaf: certs
            .first()
            .cloned()
            .ok_or_else(|| io::Error::other("no peer cert"))?,
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        version: conn.protocol_version(),
        suite: conn.negotiated_cipher_suite().map(|s| s.suite()),
        kind: conn.handshake_kind(),
        sni: sni.map(str::to_owned),
    })
}

async fn handshake_named(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> (io::Result<Seen>, io::Result<Seen>) {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server_side = async move {
        let mut tls = TlsAcceptor::from(server).accept(server_io).await?;
        // In TLS 1.3 the client finishes before the server has judged its certificate; the
        // round trip makes the server's verdict visible to the client.
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?;
        tls.write_all(&byte).await?;
        tls.flush().await?;
        let (_, conn) = tls.get_ref();
        seen(conn, conn.server_name())
    };
    let client_side = async move {
        let mut tls = TlsConnector::from(client).connect(name, client_io).await?;
        tls.write_all(b"x").await?;
        tls.flush().await?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?;
        seen(tls.get_ref().1, None)
    };
    let both = async { tokio::join!(server_side, client_side) };
    tokio::time::timeout(Duration::from_secs(10), both)
        .await
        .expect("handshake timed out")
}

async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (io::Result<Seen>, io::Result<Seen>) {
    let dst = IpAddr::V4(Ipv4Addr::new(10, 10, 1, 2));
    handshake_named(server, client, ServerName::from(dst)).await
}

fn rustls_error(err: &io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

fn own(pki: &TestPki, identity: &str) -> Arc<CertifiedKey> {
    pki.store()
        .get(&id(identity))
        .expect("mint")
        .certified_key()
}

#[tokio::test]
async fn mutual_tls_succeeds_and_both_sides_see_the_peer() {
    let pki = TestPki::new("cluster.local");
    let store = pki.store();
    let server = server_config_for_workload(Arc::clone(&store), id(HTTPBIN)).expect("server");
    let sleep_cert = store.get(&id(SLEEP)).expect("mint").certified_key();
    let client = client_config(&pki.bundle(), sleep_cert, id(HTTPBIN)).expect("client");

    let (s, c) = handshake(server, client).await;
    let s = s.expect("server side");
    let c = c.expect("client side");
    assert_eq!(s.peer, id(SLEEP));
    assert_eq!(c.peer, id(HTTPBIN));
    assert_eq!(s.alpn.as_deref(), Some(ALPN_H2));
    assert_eq!(c.alpn.as_deref(), Some(ALPN_H2));
    assert_eq!(s.version, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(c.version, Some(ProtocolVersion::TLSv1_3));
    assert!(matches!(
        c.suite,
        Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384)
            | Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    ));
    assert_eq!(s.sni, None, "client must not send SNI");
}

#[tokio::test]
async fn no_sni_even_when_connecting_by_dns_name() {
    let pki = TestPki::new("cluster.local");
    let server = server_config_with_cert(&pki.bundle(), own(&pki, HTTPBIN)).expect("server");
    let client = client_config(&pki.bundle(), own(&pki, SLEEP), id(HTTPBIN)).expect("client");
    let name = ServerName::try_from("httpbin.default.svc").expect("dns name");
    let (s, c) = handshake_named(server, client, name).await;
    assert_eq!(s.expect("server").sni, None);
    c.expect("client: DNS names are not checked against the certificate");
}

#[tokio::test]
async fn sessions_are_never_resumed() {
    let pki = TestPki::new("cluster.local");
    let server = server_config_with_cert(&pki.bundle(), own(&pki, HTTPBIN)).expect("server");
    let client = client_config(&pki.bundle(), own(&pki, SLEEP), id(HTTPBIN)).expect("client");
    for _ in 0..2 {
        let (s, c) = handshake(Arc::clone(&server), Arc::clone(&client)).await;
        assert_eq!(s.expect("server").kind, Some(HandshakeKind::Full));
        assert_eq!(c.expect("client").kind, Some(HandshakeKind::Full));
    }
}

#[tokio::test]
async fn client_with_foreign_ca_certificate_is_refused() {
    let pki = TestPki::new("cluster.local");
    let foreign = TestPki::new("cluster.local");
    let server = server_config_with_cert(&pki.bundle(), own(&pki, HTTPBIN)).expect("server");
    // The impostor CA has the same names as ours (webpki then reports a bad signature rather
    // than an unknown issuer), and the impostor trusts our roots, so only the server's check
    // can stop it.
    let client = client_config(&pki.bundle(), own(&foreign, SLEEP), id(HTTPBIN)).expect("client");

    let (s, c) = handshake(server, client).await;
    let err = s.expect_err("server must refuse");
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature
            ))
        ),
        "{err}"
    );
    c.expect_err("client must see the refusal");
}

#[tokio::test]
async fn server_with_foreign_ca_certificate_is_refused() {
    let pki = TestPki::new("cluster.local");
    let foreign = TestPki::new("cluster.local");
    let server =
        server_config_with_cert(&foreign.bundle(), own(&foreign, HTTPBIN)).expect("server");
    let client = client_config(&pki.bundle(), own(&pki, SLEEP), id(HTTPBIN)).expect("client");

    let (s, c) = handshake(server, client).await;
    let err = c.expect_err("client must refuse");
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature
            ))
        ),
        "{err}"
    );
    s.expect_err("server must see the refusal");
}

#[tokio::test]
async fn server_with_wrong_identity_is_refused_naming_both() {
    let pki = TestPki::new("cluster.local");
    let server = server_config_with_cert(&pki.bundle(), own(&pki, OTHER)).expect("server");
    let client = client_config(&pki.bundle(), own(&pki, SLEEP), id(HTTPBIN)).expect("client");

    let (s, c) = handshake(server, client).await;
    let err = c.expect_err("client must refuse");
    let verdict = rustls_error(&err)
        .and_then(verification_error)
        .unwrap_or_else(|| panic!("expected Ferry's verdict, got {err}"));
    match verdict {
        TlsError::IdentityMismatch {
            expected,
            presented,
        } => {
            assert_eq!(expected, &vec![id(HTTPBIN)]);
            assert_eq!(presented, &vec![OTHER.to_owned()]);
        }
        other => panic!("unexpected verdict {other}"),
    }
    let msg = verdict.to_string();
    assert!(msg.contains(HTTPBIN) && msg.contains(OTHER), "{msg}");
    assert!(err.to_string().contains(HTTPBIN) && err.to_string().contains(OTHER));
    s.expect_err("server must see the refusal");
}

#[tokio::test]
async fn any_of_several_expected_identities_is_accepted() {
    let pki = TestPki::new("cluster.local");
    let server = server_config_with_cert(&pki.bundle(), own(&pki, HTTPBIN)).expect("server");
    let client = client_config_any_of(
        &pki.bundle(),
        own(&pki, SLEEP),
        vec![id(OTHER), id(HTTPBIN)],
    )
    .expect("client");
    let (s, c) = handshake(server, client).await;
    s.expect("server");
    assert_eq!(c.expect("client").peer, id(HTTPBIN));

    assert!(matches!(
        client_config_any_of(&pki.bundle(), own(&pki, SLEEP), vec![]),
        Err(TlsError::NoExpectedIdentity)
    ));
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let pki = TestPki::new("cluster.local");
    let server = server_config_with_cert(&pki.bundle(), own(&pki, HTTPBIN)).expect("server");
    let provider = crypto_provider();
    let verifier = SpiffeServerVerifier::new(&pki.bundle(), vec![id(HTTPBIN)], provider.clone())
        .expect("verifier");
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN_H2.to_vec()];

    let (s, c) = handshake(server, Arc::new(client)).await;
    let err = s.expect_err("server must refuse");
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::NoCertificatesPresented)
        ),
        "{err}"
    );
    c.expect_err("client must see the refusal");
}

#[tokio::test]
async fn client_of_another_trust_domain_signed_by_our_ca_is_refused() {
    let pki = TestPki::new("cluster.local");
    let rogue = pki
        .minter_for_foreign_domain("evil.example")
        .mint(
            &id("spiffe://evil.example/ns/default/sa/sleep"),
            SystemTime::now(),
            1,
        )
        .expect("mint");
    let server = server_config_with_cert(&pki.bundle(), own(&pki, HTTPBIN)).expect("server");
    let client = client_config(&pki.bundle(), rogue.certified_key(), id(HTTPBIN)).expect("client");

    let (s, c) = handshake(server, client).await;
    let err = s.expect_err("server must refuse");
    let verdict = rustls_error(&err).and_then(verification_error);
    assert!(
        matches!(verdict, Some(TlsError::ForeignTrustDomain { expected, presented })
            if expected.as_str() == "cluster.local"
                && presented.to_string() == "spiffe://evil.example/ns/default/sa/sleep"),
        "{err}"
    );
    c.expect_err("client must see the refusal");
}

#[tokio::test]
async fn server_of_another_trust_domain_signed_by_our_ca_is_refused() {
    let pki = TestPki::new("cluster.local");
    let rogue = pki
        .minter_for_foreign_domain("evil.example")
        .mint(
            &id("spiffe://evil.example/ns/default/sa/httpbin"),
            SystemTime::now(),
            1,
        )
        .expect("mint");
    let server = server_config_with_cert(&pki.bundle(), rogue.certified_key()).expect("server");
    let client = client_config(&pki.bundle(), own(&pki, SLEEP), id(HTTPBIN)).expect("client");
    let (_, c) = handshake(server, client).await;
    let err = c.expect_err("client must refuse");
    assert!(
        matches!(
            rustls_error(&err).and_then(verification_error),
            Some(TlsError::IdentityMismatch { .. })
        ),
        "{err}"
    );
}

/// A TLS 1.2-only peer, possible in tests because the dev build enables rustls' `tls12`.
fn tls12_only_client(pki: &TestPki) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = SpiffeServerVerifier::new(&pki.bundle(), vec![id(HTTPBIN)], provider.clone())
        .expect("verifier");
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(own(
            pki, SLEEP,
        ))));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

#[tokio::test]
async fn tls12_client_is_refused_by_server() {
    let pki = TestPki::new("cluster.local");
    let server = server_config_with_cert(&pki.bundle(), own(&pki, HTTPBIN)).expect("server");
    let (s, c) = handshake(server, tls12_only_client(&pki)).await;
    let err = s.expect_err("server must refuse TLS 1.2");
    assert!(
        matches!(rustls_error(&err), Some(rustls::Error::PeerIncompatible(_))),
        "{err}"
    );
    c.expect_err("client must fail");
}

#[tokio::test]
async fn tls12_server_is_refused_by_client() {
    let pki = TestPki::new("cluster.local");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(own(
            &pki, HTTPBIN,
        ))));
    server.alpn_protocols = vec![ALPN_H2.to_vec()];
    let client = client_config(&pki.bundle(), own(&pki, SLEEP), id(HTTPBIN)).expect("client");
    let (s, c) = handshake(Arc::new(server), client).await;
    let err = c.expect_err("client must refuse TLS 1.2");
    assert!(rustls_error(&err).is_some(), "{err}");
    s.expect_err("server must fail");
}

#[tokio::test]
async fn client_not_offering_h2_is_refused() {
    let pki = TestPki::new("cluster.local");
    let server = server_config_with_cert(&pki.bundle(), own(&pki, HTTPBIN)).expect("server");
    let base = client_config(&pki.bundle(), own(&pki, SLEEP), id(HTTPBIN)).expect("client");
    let mut client = (*base).clone();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (s, c) = handshake(server, Arc::new(client)).await;
    let err = s.expect_err("server must refuse");
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::NoApplicationProtocol)
        ),
        "{err}"
    );
    c.expect_err("client must fail");
}

#[tokio::test]
async fn server_config_picks_up_renewed_certificates() {
    let pki = TestPki::new("cluster.local");
    // Start in the past so both the first and the renewed certificate are valid now: the
    // handshake verifies against the real clock, renewal follows the injected one.
    let start = SystemTime::now() - Duration::from_secs(13 * 3600);
    let clock = Arc::new(ManualClock::new(start));
    let store = Arc::new(pki.store_with_clock(clock.clone()));
    let server = server_config_for_workload(Arc::clone(&store), id(HTTPBIN)).expect("server");
    let client_for = |store: &CertStore| {
        let own = store.get(&id(SLEEP)).expect("mint").certified_key();
        client_config(&pki.bundle(), own, id(HTTPBIN)).expect("client")
    };

    let (s, c) = handshake(Arc::clone(&server), client_for(&store)).await;
    s.expect("server");
    let first = store.get(&id(HTTPBIN)).expect("cached");
    assert_eq!(c.expect("client").peer_leaf, *first.leaf());

    clock.set(first.renew_at() - Duration::from_secs(1));
    let (_, c) = handshake(Arc::clone(&server), client_for(&store)).await;
    assert_eq!(
        c.expect("client").peer_leaf,
        *first.leaf(),
        "renewed too early"
    );

    clock.set(first.renew_at());
    let (s, c) = handshake(Arc::clone(&server), client_for(&store)).await;
    s.expect("server");
    let renewed = store.get(&id(HTTPBIN)).expect("cached");
    assert!(renewed.generation() > first.generation());
    assert_eq!(c.expect("client").peer_leaf, *renewed.leaf());
    assert_ne!(renewed.leaf(), first.leaf());
}

#[tokio::test]
async fn server_without_a_certificate_fails_the_handshake() {
    let pki = TestPki::new("cluster.local");
    let store = pki.store();
    // The store refuses to mint outside its trust domain, so the resolver has nothing to offer.
    let server = server_config_for_workload(store, id("spiffe://other.td/ns/a/sa/b")).expect("cfg");
    let client = client_config(&pki.bundle(), own(&pki, SLEEP), id(HTTPBIN)).expect("client");
    let (s, c) = handshake(server, client).await;
    s.expect_err("server has no certificate");
    c.expect_err("client must fail");
}

mod peer_identity_tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn cert_with_sans(sans: Vec<SanType>) -> CertificateDer<'static> {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).expect("cert").der().clone()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().expect("ia5"))
    }

    #[test]
    fn extracts_the_single_spiffe_id() {
        let cert = cert_with_sans(vec![
            SanType::DnsName("example.com".try_into().expect("ia5")),
            uri("https://example.com/x"),
            uri(SLEEP),
        ]);
        assert_eq!(peer_identity(&[cert]).expect("identity"), id(SLEEP));
    }

    #[test]
    fn rejects_missing_ambiguous_and_malformed() {
        assert!(matches!(
            peer_identity(&[]),
            Err(TlsError::NoPeerCertificate)
        ));
        assert!(matches!(
            peer_identity(&[CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01])]),
            Err(TlsError::BadCertificate { .. })
        ));
        let dns_only = cert_with_sans(vec![SanType::DnsName("a.b".try_into().expect("ia5"))]);
        assert!(matches!(
            peer_identity(&[dns_only]),
            Err(TlsError::NoSpiffeId)
        ));
        assert!(matches!(
            peer_identity(&[cert_with_sans(vec![])]),
            Err(TlsError::NoSpiffeId)
        ));
        let two = cert_with_sans(vec![uri(SLEEP), uri(HTTPBIN)]);
        let err = peer_identity(&[two]).expect_err("ambiguous");
        assert!(matches!(err, TlsError::AmbiguousSpiffeId { .. }));
        assert!(err.to_string().contains(SLEEP) && err.to_string().contains(HTTPBIN));
        let bad = cert_with_sans(vec![uri("spiffe://cluster.local/ns/a/sa/b/extra")]);
        assert!(matches!(
            peer_identity(&[bad]),
            Err(TlsError::BadSpiffeId(_))
        ));
    }

    #[test]
    fn only_the_leaf_counts() {
        let leaf = cert_with_sans(vec![uri(SLEEP)]);
        let issuer = cert_with_sans(vec![uri(HTTPBIN)]);
        assert_eq!(peer_identity(&[leaf, issuer]).expect("identity"), id(SLEEP));
    }
}
