//! Certificates for the benchmark: one test CA is the controller's issuer (so the proxies'
//! leaves come from the real Identity service) and signs HAProxy's server and client
//! certificates, so both meshes do mutual TLS 1.3 with ECDSA P-256 keys.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A trust anchor and the issuer below it.
pub struct TestCa {
    /// The anchor, PEM: what every party trusts.
    pub anchor_pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A leaf certificate with its chain and key, PEM.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The leaf followed by the issuer.
    pub chain_pem: String,
    /// The private key, PKCS#8.
    pub key_pem: String,
}

fn ca_params(cn: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after =
        now + time::Duration::seconds(i64::try_from(lifetime.as_secs()).unwrap_or(86_400));
}

impl TestCa {
    /// A new anchor and issuer.
    pub fn new() -> Result<Self> {
        let anchor =
            CertifiedIssuer::self_signed(ca_params("mesh-bench root")?, KeyPair::generate()?)
                .context("self-signing the anchor")?;
        let issuer = CertifiedIssuer::signed_by(
            ca_params("mesh-bench issuer")?,
            KeyPair::generate()?,
            &anchor,
        )
        .context("signing the issuer")?;
        Ok(Self {
            anchor_pem: anchor.pem(),
            issuer,
        })
    }

    /// A leaf for a DNS name, usable as TLS server and client (HAProxy's hops).
    pub fn leaf(&self, dns_name: &str) -> Result<Leaf> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![dns_name.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, dns_name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params, Duration::from_secs(86_400));
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.issuer.pem()),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes the issuer in the layout `mesh-controller --identity-dir` reads (cert-manager's:
    /// `tls.crt`, `tls.key`, `ca.crt`).
    pub fn write_issuer_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (file, pem) in [
            ("tls.crt", self.issuer.pem()),
            ("tls.key", self.issuer.key().serialize_pem()),
            ("ca.crt", self.anchor_pem.clone()),
        ] {
            let path = dir.join(file);
            std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}
