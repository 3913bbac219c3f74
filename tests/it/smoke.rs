//! `imgbuild smoke --url` against a real Chroma server (PyPI chromadb, the default version),
//! started on loopback by the tests.

use crate::services;
use crate::support::imgbuild;

#[test]
fn smoke_passes_against_a_real_chroma_and_cleans_up_its_collection() {
    let Some(chroma) = services::chroma() else { return };
    let dir = tempfile::tempdir().unwrap();
    // No AWS settings at all: a URL smoke test must not load the AWS config.
    let out = imgbuild(dir.path())
        .env_remove("AWS_REGION")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .args(["--output", "json", "smoke", "--url", &chroma.url])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps: Vec<(&str, bool)> =
        doc["smoke"]["steps"].as_array().unwrap().iter().map(|s| (s["name"].as_str().unwrap(), s["ok"].as_bool().unwrap())).collect();
    assert_eq!(steps, [("heartbeat", true), ("create collection", true), ("add documents", true), ("query", true), ("delete collection", true)]);
    assert!(doc["smoke"]["steps"].as_array().unwrap().iter().all(|s| s["millis"].as_f64().unwrap() > 0.0));
    assert!(err.contains("nearest: b (second document)"), "{err}");

    // Nothing left behind: the server holds no smoke collection.
    let agent = ureq::agent();
    let list: serde_json::Value = agent
        .get(format!("{}/api/v2/tenants/default_tenant/databases/default_database/collections", chroma.url))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert!(list.as_array().unwrap().iter().all(|c| !c["name"].as_str().unwrap().starts_with("imgbuild-smoke-")), "{list}");
}

#[test]
fn smoke_names_the_failing_step_when_the_api_generation_is_wrong() {
    let Some(chroma) = services::chroma() else { return };
    let dir = tempfile::tempdir().unwrap();
    // The article's 0.4.13 speaks /api/v1, which a 1.x server answers with 410 Gone.
    std::fs::write(dir.path().join("imgbuild.yaml"), "chroma:\n  version: 0.4.13\n").unwrap();
    let out = imgbuild(dir.path()).args(["smoke", "--url", &format!("{}/", chroma.url)]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/api/v1"), "{err}");
    assert!(err.contains("FAIL heartbeat") && err.contains("HTTP 410"), "{err}");
}

#[test]
fn smoke_reports_an_unreachable_endpoint_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let started = std::time::Instant::now();
    let out = imgbuild(dir.path()).args(["smoke", "--timeout", "5", "--url", &format!("http://127.0.0.1:{port}")]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FAIL heartbeat"));
}
