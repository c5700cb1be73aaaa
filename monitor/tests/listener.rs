//! The listener beyond loopback (issue #19), against a daemon watching the axum fixture:
//! basic auth guards the data and leaves /healthz open, TLS and client certificates are
//! required when configured, and oversized requests and surplus connections are bounded
//! while the daemon keeps serving. Certificates are made here (rcgen), never committed.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use leakscope_testkit::types::TasksResponse;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use support::*;

/// One test's files, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("leakscope-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What came back on a connection, until the server closed it.
#[derive(Debug)]
struct Response {
    raw: String,
}

impl Response {
    /// The status, or 0 when the answer is not HTTP.
    fn status(&self) -> u16 {
        self.raw
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3)?.parse().ok())
            .unwrap_or(0)
    }

    fn header(&self, name: &str) -> Option<&str> {
        let head = self.raw.split("\r\n\r\n").next()?;
        head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    fn body(&self) -> &str {
        self.raw.split_once("\r\n\r\n").map_or("", |(_, body)| body)
    }
}

/// Writes `request` and reads until the server closes. A write the server cut short (it
/// answered an oversized request without reading all of it) still reads the answer.
fn exchange(stream: &mut (impl Read + Write), request: &[u8]) -> std::io::Result<Response> {
    let written = stream.write_all(request).and_then(|()| stream.flush());
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A close without TLS close_notify, or a reset after the answer.
            Err(_) if !raw.is_empty() => break,
            Err(err) => return Err(written.err().unwrap_or(err)),
        }
    }
    Ok(Response {
        raw: String::from_utf8_lossy(&raw).into_owned(),
    })
}

/// A GET that closes the connection after the answer, with `headers`.
fn get(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: leakscope\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Connection: close\r\n\r\n");
    request.into_bytes()
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    stream.set_write_timeout(Some(Duration::from_secs(15)))?;
    Ok(stream)
}

fn plain(addr: SocketAddr, request: &[u8]) -> std::io::Result<Response> {
    exchange(&mut connect(addr)?, request)
}

fn tls(addr: SocketAddr, config: &Arc<ClientConfig>, request: &[u8]) -> std::io::Result<Response> {
    let connection =
        rustls::ClientConnection::new(config.clone(), ServerName::IpAddress(addr.ip().into()))
            .map_err(std::io::Error::other)?;
    exchange(
        &mut rustls::StreamOwned::new(connection, connect(addr)?),
        request,
    )
}

fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

/// A certificate authority for the test.
fn authority(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

/// A certificate and key (PEM) for `names`, signed by `issuer`, for `purpose`.
fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    names: &[&str],
    purpose: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.extended_key_usages = vec![purpose];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A client trusting `ca` (PEM), presenting `identity` (certificate and key PEM) if given.
fn client(ca: &str, identity: Option<&(String, String)>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    Arc::new(match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    })
}

/// Waits until `send` gets the fixture's pid listed as attached, then returns `/metrics`
/// as `send` gets it: the daemon's real data, not only its liveness.
fn attached_metrics(
    pid: u32,
    headers: &[(&str, &str)],
    send: impl Fn(&[u8]) -> std::io::Result<Response>,
) -> String {
    eventually(
        &format!("pid {pid} attached"),
        Duration::from_secs(30),
        || {
            let response = send(&get("/api/v1/tasks", headers)).map_err(|e| e.to_string())?;
            let tasks: TasksResponse =
                serde_json::from_str(response.body()).map_err(|e| format!("{e}: {response:?}"))?;
            tasks
                .processes
                .iter()
                .any(|p| p.pid == pid && p.attached)
                .then_some(())
                .ok_or(format!("processes: {:?}", tasks.processes))
        },
    );
    let metrics = send(&get("/metrics", headers)).expect("GET /metrics");
    assert_eq!(metrics.status(), 200, "{metrics:?}");
    assert!(
        metrics.body().contains(&format!("pid=\"{pid}\"")),
        "no series of pid {pid}: {metrics:?}"
    );
    metrics.body().to_string()
}

fn daemon_args(pid: u32, web_config: &str) -> Vec<String> {
    vec![
        "--pid".into(),
        pid.to_string(),
        "--web-config".into(),
        web_config.into(),
    ]
}

#[test]
fn basic_auth_guards_the_data_and_leaves_healthz_open() {
    if !ebpf_available("basic auth") {
        return;
    }
    let dir = TempDir::new("basic-auth");
    // Cost 10, as operators hash them: the daemon's cache is what keeps scrapes cheap.
    let hash = bcrypt::hash("correct horse", 10).unwrap();
    let web = dir.write(
        "web.yml",
        &format!(
            "basic_auth_users:\n  prometheus: {hash}\nhttp_server_config:\n  headers:\n    \
             X-Content-Type-Options: nosniff\n"
        ),
    );
    let (app, _) = start_fixture(&fixture("axum-app"), &[]);
    // Ready when /healthz answers without credentials.
    let (_daemon, addr) = start_daemon(&daemon_args(app.pid(), &web));
    let send = |request: &[u8]| plain(addr, request);

    for (what, headers) in [
        ("no credentials", vec![]),
        (
            "a wrong password",
            vec![("Authorization", basic("prometheus", "battery staple"))],
        ),
        (
            "an unknown user",
            vec![("Authorization", basic("grafana", "correct horse"))],
        ),
        (
            "another scheme",
            vec![("Authorization", "Bearer correct horse".to_string())],
        ),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        for path in ["/metrics", "/api/v1/tasks", "/api/v1/suspects"] {
            let response = send(&get(path, &headers)).unwrap();
            assert_eq!(response.status(), 401, "{what}, {path}: {response:?}");
            assert!(
                response
                    .header("WWW-Authenticate")
                    .is_some_and(|v| v.starts_with("Basic realm=")),
                "{what}: {response:?}"
            );
            assert!(
                !response.body().contains("leakscope_") && !response.body().contains("pid"),
                "{what}: {response:?}"
            );
            assert_eq!(response.header("X-Content-Type-Options"), Some("nosniff"));
        }
    }
    let healthz = send(&get("/healthz", &[])).unwrap();
    assert_eq!(
        (healthz.status(), healthz.body()),
        (200, "ok\n"),
        "{healthz:?}"
    );

    let authorization = basic("prometheus", "correct horse");
    let metrics = attached_metrics(
        app.pid(),
        &[("Authorization", authorization.as_str())],
        send,
    );
    assert!(
        metrics.contains("leakscope_attached_processes 1"),
        "{metrics}"
    );
}

#[test]
fn tls_is_required_when_configured() {
    if !ebpf_available("tls") {
        return;
    }
    let dir = TempDir::new("tls");
    let (ca, issuer) = authority("leakscope test CA");
    let (cert, key) = leaf(
        &issuer,
        &["127.0.0.1", "localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    dir.write("server.crt", &cert);
    dir.write("server.key", &key);
    // Relative paths: relative to the web config.
    let web = dir.write(
        "web.yml",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n",
    );
    let trusting = client(&ca, None);
    let (app, _) = start_fixture(&fixture("axum-app"), &[]);
    let (_daemon, addr) = start_daemon_until(&daemon_args(app.pid(), &web), |addr| {
        match tls(addr, &trusting, &get("/healthz", &[])) {
            Ok(response) if response.status() == 200 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // Plain HTTP to the TLS port: no HTTP answer, no data.
    if let Ok(response) = plain(addr, &get("/metrics", &[])) {
        assert_eq!(response.status(), 0, "{response:?}");
        assert!(!response.raw.contains("leakscope_"), "{response:?}");
    }
    // A client that does not trust the test CA refuses the daemon's certificate.
    let (other_ca, _) = authority("some other CA");
    let stranger = tls(addr, &client(&other_ca, None), &get("/healthz", &[]));
    assert!(stranger.is_err(), "{stranger:?}");

    let send = |request: &[u8]| tls(addr, &trusting, request);
    attached_metrics(app.pid(), &[], send);

    // A renewal (here from a new CA) is served without a restart. Swapped in by rename,
    // as a Secret volume updates.
    let (renewed_ca, renewed_issuer) = authority("leakscope renewed CA");
    let (cert, key) = leaf(
        &renewed_issuer,
        &["127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    for (name, text) in [("server.key", key), ("server.crt", cert)] {
        let staged = dir.write(&format!("{name}.new"), &text);
        std::fs::rename(staged, dir.0.join(name)).unwrap();
    }
    let renewed = client(&renewed_ca, None);
    eventually(
        "the renewed certificate is served",
        Duration::from_secs(10),
        || match tls(addr, &renewed, &get("/healthz", &[])) {
            Ok(response) if response.status() == 200 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
}

#[test]
fn client_certificates_are_required_when_configured() {
    if !ebpf_available("mutual tls") {
        return;
    }
    let dir = TempDir::new("mtls");
    let (ca, issuer) = authority("leakscope test CA");
    let (cert, key) = leaf(&issuer, &["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let (clients_ca, clients) = authority("leakscope test clients CA");
    let prometheus = leaf(
        &clients,
        &["prometheus"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    // Signed by the server's CA, not the clients': not a client of this daemon.
    let impostor = leaf(
        &issuer,
        &["prometheus"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    dir.write("server.crt", &cert);
    dir.write("server.key", &key);
    dir.write("clients-ca.crt", &clients_ca);
    let web = dir.write(
        "web.yml",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  \
         client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: clients-ca.crt\n",
    );
    let allowed = client(&ca, Some(&prometheus));
    let (app, _) = start_fixture(&fixture("axum-app"), &[]);
    let (_daemon, addr) = start_daemon_until(&daemon_args(app.pid(), &web), |addr| {
        match tls(addr, &allowed, &get("/healthz", &[])) {
            Ok(response) if response.status() == 200 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    for (what, config) in [
        ("no client certificate", client(&ca, None)),
        ("a certificate of another CA", client(&ca, Some(&impostor))),
    ] {
        // With TLS 1.3 the client may finish its side before the server refuses it: then
        // the refusal arrives as an alert instead of an answer.
        match tls(addr, &config, &get("/metrics", &[])) {
            Err(_) => {}
            Ok(response) => assert_eq!(response.status(), 0, "{what}: {response:?}"),
        }
    }
    let send = |request: &[u8]| tls(addr, &allowed, request);
    attached_metrics(app.pid(), &[], send);
}

#[test]
fn oversized_requests_are_refused_and_the_daemon_keeps_serving() {
    if !ebpf_available("oversized requests") {
        return;
    }
    let (app, _) = start_fixture(&fixture("axum-app"), &[]);
    let (_daemon, addr) = watch(app.pid(), &[]);

    // Four times the limit: enough to be refused, and small enough to sit in loopback's
    // buffers whole, so the client finishes writing before it reads the answer.
    let padding = "x".repeat(64 * 1024);
    let huge_header = format!(
        "GET /metrics HTTP/1.1\r\nHost: leakscope\r\nX-Padding: {padding}\r\n\
         Connection: close\r\n\r\n"
    );
    let response = plain(addr, huge_header.as_bytes()).unwrap();
    assert_eq!(response.status(), 431, "{response:?}");

    // The body is declared, never sent: the answer comes from the header alone.
    let huge_body = "GET /metrics HTTP/1.1\r\nHost: leakscope\r\nContent-Length: 1073741824\r\n\
                     Connection: close\r\n\r\n{\"x\":";
    let response = plain(addr, huge_body.as_bytes()).unwrap();
    assert_eq!(response.status(), 413, "{response:?}");

    // Still serving, with the data.
    attached_metrics(app.pid(), &[], |request| plain(addr, request));
}

#[test]
fn connections_beyond_the_limit_wait_for_a_slot() {
    if !ebpf_available("connection limit") {
        return;
    }
    let (app, _) = start_fixture(&fixture("axum-app"), &[]);
    let (_daemon, addr) = watch(app.pid(), &[]);
    let limit = leakscope::daemon::listener::Limits::default().max_connections;

    // Connections that send nothing hold every slot (until the header timeout, 10 s).
    let idle: Vec<TcpStream> = (0..limit).map(|_| connect(addr).unwrap()).collect();
    let (answered, answer) = std::sync::mpsc::channel();
    let waiting = std::thread::spawn(move || {
        let _ = answered.send(plain(addr, &get("/healthz", &[])).map(|r| r.status()));
    });
    // Accepted in order, so this one is behind all of them: it waits, unanswered and not
    // refused, while they are held...
    let early = answer.recv_timeout(Duration::from_secs(1));
    assert!(
        early.is_err(),
        "answered while every slot was held: {early:?}"
    );
    // ...and is served once they go.
    drop(idle);
    let status = answer
        .recv_timeout(Duration::from_secs(10))
        .expect("served once the slots were free");
    assert_eq!(status.unwrap(), 200);
    waiting.join().unwrap();
}

#[test]
fn a_web_config_mistake_is_one_line_before_anything_starts() {
    let dir = TempDir::new("bad-web-config");
    let web = dir.write(
        "web.yml",
        "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
    );
    let config = dir.write(
        "leakscope.toml",
        "web_config = \"web.yml\"\n[targets]\nall = true\n",
    );
    let leakscope = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_leakscope"))
            .args(args)
            .output()
            .unwrap()
    };
    let expected = format!(
        "web config {web}: tls_server_config.cert_file: {}: cannot read it",
        dir.0.join("missing.crt").display()
    );
    // Refused before any probe is loaded or port bound, so this needs no root.
    for args in [
        vec!["daemon", "--config", config.as_str()],
        vec!["check-config", config.as_str()],
    ] {
        let out = leakscope(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(&expected), "{args:?}: {stderr}");
    }
    let typo = dir.write("typo.yml", "tls_server_config:\n  cert_fle: a\n");
    let out = leakscope(&["check-config", "--web-config", &typo]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("typo.yml: tls_server_config: unknown field `cert_fle`"),
        "{stderr}"
    );
}
