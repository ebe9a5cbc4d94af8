//! The identity CA as the controller serves it: `run()` with the file backend and an identity
//! folder serves `Identity.Certify` on its gRPC port, authenticating with the tokens the
//! folder's ServiceAccounts declare (and following edits to them); without an identity folder
//! the service is not served at all.

use std::path::PathBuf;
use std::time::Duration;

use mesh_controller::identity::{GeneratedCa, TOKEN_ANNOTATION};
use mesh_controller::{Config, Discovery, IdentityOptions};
use mesh_proto::identity::CertifyRequest;
use mesh_proto::identity::identity_client::IdentityClient;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Channel;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

const WAIT: Duration = Duration::from_secs(10);
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

struct Controller {
    grpc: std::net::SocketAddr,
    dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), mesh_controller::Error>>,
}

impl Controller {
    async fn start(name: &str, config_yaml: &str, with_identity: bool) -> Controller {
        let dir = std::env::temp_dir().join(format!(
            "mesh-controller-identity-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let config_dir = dir.join("config");
        std::fs::create_dir_all(&config_dir).expect("create the config folder");
        std::fs::write(config_dir.join("objects.yaml"), config_yaml).expect("write the objects");
        let mut config = Config::new(Discovery::File {
            dir: config_dir,
            poll_interval: Duration::from_millis(20),
        });
        if with_identity {
            let identity_dir = dir.join("identity");
            GeneratedCa::generate(
                "cluster.local",
                Duration::from_secs(3600),
                Duration::from_secs(3600),
            )
            .expect("generate a CA")
            .write_dir(&identity_dir)
            .expect("write the CA in cert-manager's layout");
            config.identity = Some(IdentityOptions {
                leaf_lifetime: Duration::from_secs(600),
                ..IdentityOptions::new(identity_dir)
            });
        }
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gRPC");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind admin");
        let grpc_addr = grpc.local_addr().expect("gRPC address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(mesh_controller::run(config, grpc, admin, async move {
            let _ = stopped.await;
        }));
        Controller {
            grpc: grpc_addr,
            dir,
            stop: Some(stop),
            task,
        }
    }

    async fn client(&self) -> IdentityClient<Channel> {
        IdentityClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connect to the controller")
    }

    fn rewrite_objects(&self, yaml: &str) {
        let dir = self.dir.join("config");
        std::fs::write(dir.join(".objects.tmp"), yaml).expect("write a temp file");
        std::fs::rename(dir.join(".objects.tmp"), dir.join("objects.yaml"))
            .expect("rename into place");
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the controller stops promptly")
            .expect("the controller task does not panic")
            .expect("the controller stops cleanly");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn service_account(token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: web\n  namespace: shop\n  \
         annotations:\n    {TOKEN_ANNOTATION}: {token}\n"
    )
}

fn request(token: &str) -> CertifyRequest {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate a P-256 key");
    let csr = CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .serialize_request(&key)
        .expect("serialise the CSR");
    CertifyRequest {
        identity: WEB.to_owned(),
        token: token.as_bytes().to_vec(),
        certificate_signing_request: csr.der().to_vec(),
    }
}

/// Certifies until the answer has `want` as its code (the first scan may not have run yet).
async fn certify_until(
    client: &mut IdentityClient<Channel>,
    token: &str,
    want: Code,
) -> Result<mesh_proto::identity::CertifyResponse, tonic::Status> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let result = client.certify(request(token)).await.map(|r| r.into_inner());
        let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        if code == want || tokio::time::Instant::now() > deadline {
            return result;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_controller_certifies_with_the_file_backends_service_account_tokens() {
    let controller = Controller::start("certify", &service_account("secret-1"), true).await;
    let mut client = controller.client().await;

    let response = certify_until(&mut client, "secret-1", Code::Ok)
        .await
        .expect("a token declared by the ServiceAccount proves its identity");
    let (_, leaf) =
        X509Certificate::from_der(&response.leaf_certificate).expect("the leaf is X.509 DER");
    let uris: Vec<String> = leaf
        .subject_alternative_name()
        .expect("SAN extension parses")
        .expect("the leaf has a SAN")
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec![WEB.to_owned()]);
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!(
        (540..=720).contains(&lifetime),
        "the configured 10 min leaf lifetime (plus clock skew allowance), got {lifetime} s"
    );

    let wrong = client
        .certify(request("not-a-token"))
        .await
        .expect_err("an unknown token is refused");
    assert_eq!(wrong.code(), Code::Unauthenticated);

    // The token changes in the files: the old one stops working, the new one works.
    controller.rewrite_objects(&service_account("secret-2"));
    certify_until(&mut client, "secret-2", Code::Ok)
        .await
        .expect("the rotated token is accepted once the files are reread");
    let old = client
        .certify(request("secret-1"))
        .await
        .expect_err("the replaced token is refused");
    assert_eq!(old.code(), Code::Unauthenticated);

    controller.stop().await;
}

#[tokio::test]
async fn without_an_identity_folder_the_identity_service_is_not_served() {
    let controller = Controller::start("absent", &service_account("secret-1"), false).await;
    let mut client = controller.client().await;
    let status = client
        .certify(request("secret-1"))
        .await
        .expect_err("no Identity service");
    assert_eq!(status.code(), Code::Unimplemented);
    controller.stop().await;
}

#[tokio::test]
async fn a_bad_identity_folder_fails_the_start_naming_it() {
    let dir = std::env::temp_dir().join(format!(
        "mesh-controller-identity-bad-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("config")).expect("create the config folder");
    let mut config = Config::new(Discovery::File {
        dir: dir.join("config"),
        poll_interval: Duration::from_millis(20),
    });
    config.identity = Some(IdentityOptions::new(dir.join("no-such-identity")));
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind gRPC");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind admin");
    let error = tokio::time::timeout(
        WAIT,
        mesh_controller::run(config, grpc, admin, std::future::pending()),
    )
    .await
    .expect("fails at once")
    .expect_err("a missing identity folder is an error");
    assert!(
        error.to_string().contains("no-such-identity"),
        "names the folder: {error}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
