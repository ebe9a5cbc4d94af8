use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, PKCS_ECDSA_P256_SHA256};
use time::OffsetDateTime;

use super::generate::ca_params;
use super::*;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

fn past(days_ago_start: u32, days_ago_end: u32) -> Validity {
    let now = SystemTime::now();
    Validity {
        not_before: now - days_ago_start * DAY,
        not_after: now - days_ago_end * DAY,
    }
}

fn generated() -> GeneratedCa {
    GeneratedCa::generate("cluster.local", 365 * DAY, 30 * DAY).expect("generate CA")
}

#[test]
fn generated_ca_loads_and_describes_itself() {
    let ca = generated();
    let issuer = ca.load_issuer().expect("loads");
    assert_eq!(issuer.subject(), "CN=identity.mesh.cluster.local");
    assert_eq!(
        issuer.intermediates(),
        std::slice::from_ref(issuer.certificate())
    );
    assert_eq!(issuer.trust_anchors().certificates().len(), 1);
    assert_eq!(issuer.trust_anchors().pem(), ca.trust_anchor.cert_pem);
    let remaining = issuer
        .not_after()
        .duration_since(SystemTime::now())
        .expect("in the future");
    assert!(remaining > 29 * DAY && remaining <= 30 * DAY);
    assert!(
        ca.trust_anchor
            .key_pem
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    let debug = format!("{ca:?} {issuer:?}");
    assert!(!debug.contains("PRIVATE KEY"), "Debug leaks a key: {debug}");
}

#[test]
fn write_dir_then_from_dir_round_trips() {
    let dir = std::env::temp_dir().join(format!("mesh-ca-{}", rand::random::<u64>()));
    let ca = generated();
    ca.write_dir(&dir).expect("writes");
    let issuer = Issuer::from_dir(&dir).expect("loads from the folder");
    assert_eq!(issuer.subject(), "CN=identity.mesh.cluster.local");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(ISSUER_KEY_FILE))
            .expect("key written")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is readable by its owner only");
    }
    std::fs::remove_file(dir.join(ISSUER_KEY_FILE)).expect("remove key");
    let error = Issuer::from_dir(&dir).expect_err("no key");
    assert!(matches!(&error, LoadError::Read { file, .. } if file.ends_with("tls.key")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_anchor_may_sign_leaves_itself() {
    let anchor = generate_trust_anchor("cluster.local", DAY).expect("anchor");
    let issuer = Issuer::from_pem(&anchor.cert_pem, &anchor.key_pem, &anchor.cert_pem)
        .expect("a root as its own issuer loads");
    assert!(issuer.intermediates().is_empty(), "anchors are never sent");
}

#[test]
fn a_chain_in_tls_crt_is_checked_and_sent() {
    let root = generate_trust_anchor("cluster.local", DAY).expect("root");
    let middle = generate_issuer(&root, "cluster.local", DAY).expect("middle");
    // generate_issuer constrains its output to sign leaves only; make a CA under the
    // root that may sign one more level.
    let middle_key = KeyPair::from_pem(&middle.key_pem).expect("key");
    let root_signer = rcgen::Issuer::from_ca_cert_pem(
        &root.cert_pem,
        KeyPair::from_pem(&root.key_pem).expect("root key"),
    )
    .expect("root signer");
    let middle_cert = ca_params(
        "middle".to_owned(),
        BasicConstraints::Constrained(1),
        Validity::from_now(DAY),
    )
    .signed_by(&middle_key, &root_signer)
    .expect("middle");
    let middle = PemCertificate {
        cert_pem: middle_cert.pem(),
        key_pem: middle.key_pem,
    };
    let leaf_issuer = generate_issuer(&middle, "cluster.local", DAY).expect("issuer");
    let chain_pem = format!("{}{}", leaf_issuer.cert_pem, middle.cert_pem);
    let issuer = Issuer::from_pem(&chain_pem, &leaf_issuer.key_pem, &root.cert_pem).expect("loads");
    assert_eq!(issuer.intermediates().len(), 2);

    let reversed = format!("{}{}", middle.cert_pem, leaf_issuer.cert_pem);
    let error =
        Issuer::from_pem(&reversed, &leaf_issuer.key_pem, &root.cert_pem).expect_err("wrong order");
    assert!(matches!(error, LoadError::BrokenChain { .. }), "{error}");
}

#[test]
fn bad_key_material_is_refused_naming_the_file_and_problem() {
    let ca = generated();
    let other = generated();
    let anchor = &ca.trust_anchor.cert_pem;
    let expired = {
        let issuer =
            generate_issuer(&ca.trust_anchor, "cluster.local", past(2, 1)).expect("expired issuer");
        Issuer::from_pem(&issuer.cert_pem, &issuer.key_pem, anchor)
    };
    let not_yet_valid = {
        let now = SystemTime::now();
        let validity = Validity {
            not_before: now + DAY,
            not_after: now + 2 * DAY,
        };
        let issuer = generate_issuer(&ca.trust_anchor, "cluster.local", validity).expect("future");
        Issuer::from_pem(&issuer.cert_pem, &issuer.key_pem, anchor)
    };
    let not_ca = {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let signer = rcgen::Issuer::from_ca_cert_pem(
            anchor,
            KeyPair::from_pem(&ca.trust_anchor.key_pem).expect("anchor key"),
        )
        .expect("signer");
        let mut params = CertificateParams::new(vec!["leaf.example".to_owned()]).expect("params");
        params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = OffsetDateTime::now_utc() + time::Duration::hours(1);
        let cert = params.signed_by(&key, &signer).expect("leaf");
        Issuer::from_pem(&cert.pem(), &key.serialize_pem(), anchor)
    };
    let expired_anchor = {
        let old = generate_trust_anchor("cluster.local", past(3, 1)).expect("old anchor");
        let issuer = generate_issuer(&old, "cluster.local", DAY).expect("issuer");
        Issuer::from_pem(&issuer.cert_pem, &issuer.key_pem, &old.cert_pem)
    };
    let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIA==\n-----END EC PRIVATE KEY-----\n";

    let cases: Vec<(&str, Result<Issuer, LoadError>, &str)> = vec![
        (
            "expired issuer",
            expired,
            "tls.crt: certificate \"CN=identity.mesh.cluster.local\" expired at",
        ),
        (
            "future issuer",
            not_yet_valid,
            "tls.crt: certificate \"CN=identity.mesh.cluster.local\" is not valid before",
        ),
        (
            "leaf as issuer",
            not_ca,
            "tls.crt: certificate \"CN=rcgen self signed cert\" is not a CA",
        ),
        (
            "expired anchor",
            expired_anchor,
            "ca.crt: certificate \"CN=root.mesh.cluster.local\" expired at",
        ),
        (
            "foreign anchor",
            Issuer::from_pem(
                &ca.issuer.cert_pem,
                &ca.issuer.key_pem,
                &other.trust_anchor.cert_pem,
            ),
            "tls.crt: certificate \"CN=identity.mesh.cluster.local\" (issued by \"CN=root.mesh.cluster.local\") is not signed by any trust anchor in ca.crt",
        ),
        (
            "key of another issuer",
            Issuer::from_pem(&ca.issuer.cert_pem, &other.issuer.key_pem, anchor),
            "tls.key: the private key does not match the certificate in tls.crt",
        ),
        (
            "SEC1 key",
            Issuer::from_pem(&ca.issuer.cert_pem, sec1, anchor),
            "tls.key: unsupported private key: it is a SEC1 'EC PRIVATE KEY'",
        ),
        (
            "no key",
            Issuer::from_pem(&ca.issuer.cert_pem, "", anchor),
            "tls.key: unparsable: no private key PEM block",
        ),
        (
            "garbage certificate",
            Issuer::from_pem(
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                &ca.issuer.key_pem,
                anchor,
            ),
            "tls.crt: unparsable: not an X.509 certificate",
        ),
        (
            "empty certificate file",
            Issuer::from_pem("", &ca.issuer.key_pem, anchor),
            "tls.crt: unparsable: no CERTIFICATE block",
        ),
        (
            "empty bundle",
            Issuer::from_pem(&ca.issuer.cert_pem, &ca.issuer.key_pem, "nothing here"),
            "ca.crt: unparsable: no CERTIFICATE block",
        ),
        (
            "issuer as anchor",
            Issuer::from_pem(
                &ca.issuer.cert_pem,
                &ca.issuer.key_pem,
                &other.issuer.cert_pem,
            ),
            "is not signed by any trust anchor in ca.crt",
        ),
    ];
    for (case, result, want) in cases {
        let error = result.expect_err(case);
        let message = error.to_string();
        assert!(message.contains(want), "{case}: {message:?} lacks {want:?}");
        assert!(
            !message.contains("PRIVATE KEY-----"),
            "{case}: leaks key material"
        );
    }
}

#[test]
fn an_expired_anchor_beside_a_valid_one_only_warns() {
    let old = generate_trust_anchor("cluster.local", past(3, 1)).expect("old anchor");
    let ca = generated();
    let bundle = format!("{}{}", old.cert_pem, ca.trust_anchor.cert_pem);
    let issuer = Issuer::from_pem(&ca.issuer.cert_pem, &ca.issuer.key_pem, &bundle).expect("loads");
    assert_eq!(issuer.trust_anchors().certificates().len(), 2);
}

#[test]
fn invalid_trust_domains_are_refused_by_the_generators() {
    assert!(matches!(
        generate_trust_anchor("Not A Domain", DAY),
        Err(GenerateError::TrustDomain(_))
    ));
    let anchor = generate_trust_anchor("ok", DAY).expect("anchor");
    assert!(matches!(
        generate_issuer(&anchor, "", DAY),
        Err(GenerateError::TrustDomain(_))
    ));
    let broken = PemCertificate {
        cert_pem: anchor.cert_pem.clone(),
        key_pem: "not a key".to_owned(),
    };
    assert!(matches!(
        generate_issuer(&broken, "ok", DAY),
        Err(GenerateError::Anchor(_))
    ));
}

#[tokio::test]
async fn the_shared_issuer_follows_its_folder() {
    let dir = std::env::temp_dir().join(format!("mesh-ca-{}", rand::random::<u64>()));
    let first = generated();
    first.write_dir(&dir).expect("writes");
    let metrics = super::super::IdentityMetrics::new();
    let shared = SharedIssuer::new(Issuer::from_dir(&dir).expect("loads"), &metrics);
    let first_expiry = metrics.issuer_expiry_seconds();
    assert!(first_expiry > 0);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(watch_issuer_dir(
        dir.clone(),
        Duration::from_millis(20),
        shared.clone(),
        async {
            let _ = stop_rx.await;
        },
    ));
    // A half-written rotation (new certificate, old key) keeps the old issuer.
    let second = GeneratedCa::generate("cluster.local", 365 * DAY, 7 * DAY).expect("second");
    std::fs::write(dir.join(ISSUER_CERT_FILE), &second.issuer.cert_pem).expect("write");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        shared.current().certificate(),
        first.load_issuer().expect("loads").certificate()
    );

    second.write_dir(&dir).expect("rotate");
    let want = second.load_issuer().expect("loads").certificate().clone();
    let mut rotated = false;
    for _ in 0..200 {
        if *shared.current().certificate() == want {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(rotated, "the watcher picked up the new issuer");
    assert!(metrics.issuer_expiry_seconds() < first_expiry);
    let _ = stop_tx.send(());
    watcher.await.expect("watcher stops");
    let _ = std::fs::remove_dir_all(&dir);
}
