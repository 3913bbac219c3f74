//! Caller identity on the private API (issue 15, item 6): `api.auth: iam` puts AWS_IAM on the
//! proxy method and the configured principals in the resource policy, and `smoke --url` signs
//! its requests with SigV4. The signature is checked by an independent implementation
//! (botocore's SigV4Auth, from the project's venv) over the exact request the stub received.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use imgbuild::bake::images::{Choice, Source};
use imgbuild::config::Config;
use imgbuild::render::Mode;
use imgbuild::stack::template::Template;

use crate::support::{imgbuild, tool_in_venv};

#[derive(Debug, Clone)]
struct Received {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// A loopback HTTP/1.1 server that records each request: 200 with a heartbeat for GET, 403 for
/// anything else (what API Gateway answers a request it does not authorize), which ends the
/// smoke test after its second step.
fn stub() -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or_default().to_string());
                let mut headers = BTreeMap::new();
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap();
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
                let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                let (status, answer) = if method == "GET" { ("200 OK", "{\"nanosecond heartbeat\": 1}") } else { ("403 Forbidden", "{\"message\":\"stop\"}") };
                keep.lock().unwrap().push(Received { method, path, headers, body });
                let reply = format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}", answer.len());
                if conn.write_all(reply.as_bytes()).is_err() {
                    break;
                }
            }
        }
    });
    (url, seen)
}

const KEY: &str = "AKIDEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const TOKEN: &str = "FwoGZXIvYXdzEXAMPLETOKEN";

/// botocore's signature of the request as received, over the headers the Authorization header
/// says were signed, at the X-Amz-Date it carries.
fn botocore_signature(base: &str, r: &Received) -> String {
    let auth = &r.headers["authorization"];
    let signed: Vec<&str> = auth.split("SignedHeaders=").nth(1).unwrap().split(',').next().unwrap().split(';').collect();
    let headers: BTreeMap<&str, &str> = signed.iter().map(|h| (*h, r.headers[*h].as_str())).collect();
    let input = serde_json::json!({
        "method": r.method,
        "url": format!("{base}{}", r.path),
        "headers": headers,
        "body": String::from_utf8(r.body.clone()).unwrap(),
        "amz_date": r.headers["x-amz-date"],
    });
    let script = r#"
import json, sys
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
d = json.load(sys.stdin)
req = AWSRequest(method=d["method"], url=d["url"], data=d["body"].encode() if d["body"] else None)
for k, v in d["headers"].items():
    req.headers[k] = v
auth = SigV4Auth(Credentials(sys.argv[1], sys.argv[2], sys.argv[3]), "execute-api", "us-east-1")
req.context["timestamp"] = d["amz_date"]
print(auth.signature(auth.string_to_sign(req, auth.canonical_request(req)), req))
"#;
    let python = tool_in_venv("python3").expect("python3 with botocore (the venv tests/run makes)");
    let mut child = std::process::Command::new(python)
        .args(["-c", script, KEY, SECRET, TOKEN])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// With AWS_IAM on the method, API Gateway accepts only requests signed with Signature Version
/// 4 for the service `execute-api` ("Control access to a REST API with IAM permissions", API
/// Gateway Developer Guide; temporary credentials add X-Amz-Security-Token). Each request smoke
/// sends carries a signature that botocore computes identically from what arrived, body included.
#[test]
fn smoke_with_api_auth_iam_signs_each_request_as_botocore_does() {
    let (url, seen) = stub();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("imgbuild.yaml");
    std::fs::write(&config, "api:\n  auth: iam\n  allowed_principals: [\"arn:aws:iam::123456789012:role/rag-app\"]\n").unwrap();
    let out = imgbuild(dir.path())
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_SESSION_TOKEN", TOKEN)
        .env("AWS_REGION", "us-east-1")
        .args(["--config", config.to_str().unwrap(), "smoke", "--url", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "the stub refuses the second step: {}", String::from_utf8_lossy(&out.stderr));

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.iter().map(|r| r.method.as_str()).collect::<Vec<_>>(), ["GET", "POST"]);
    assert!(!seen[1].body.is_empty(), "the create step sends a body, and it is signed");
    for r in &seen {
        let auth = &r.headers["authorization"];
        assert!(auth.starts_with(&format!("AWS4-HMAC-SHA256 Credential={KEY}/")), "{auth}");
        assert!(auth.contains("/us-east-1/execute-api/aws4_request"), "{auth}");
        assert_eq!(r.headers.get("x-amz-security-token").map(String::as_str), Some(TOKEN));
        let sent = auth.split("Signature=").nth(1).unwrap();
        assert_eq!(sent, botocore_signature(&url, r), "{} {}", r.method, r.path);
    }
}

/// `api.auth: none` (the default) sends nothing of the kind: the article's setup is unchanged.
#[test]
fn smoke_without_api_auth_sends_no_signature() {
    let (url, seen) = stub();
    let dir = tempfile::tempdir().unwrap();
    let out = imgbuild(dir.path()).env_remove("AWS_ACCESS_KEY_ID").args(["smoke", "--url", &url]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|r| !r.headers.contains_key("authorization") && !r.headers.contains_key("x-amz-date")));
}

fn config(yaml: &str) -> Config {
    serde_yaml::from_str(yaml).unwrap()
}

#[test]
fn api_auth_iam_needs_valid_principals_and_none_takes_none() {
    let fields = |c: &Config| c.check().into_iter().map(|(f, _)| f).collect::<Vec<_>>();
    assert_eq!(fields(&config("api:\n  auth: iam\n")), ["api.allowed_principals"]);
    assert_eq!(fields(&config("api:\n  allowed_principals: [\"123456789012\"]\n")), ["api.allowed_principals"]);
    assert_eq!(
        fields(&config("api:\n  auth: iam\n  allowed_principals: [\"arn:aws:iam::123456789012:role/*\", \"rag-app\", \"123456789012\"]\n")),
        ["api.allowed_principals[0]", "api.allowed_principals[1]"]
    );
    assert!(
        fields(&config("api:\n  auth: iam\n  allowed_principals: [\"arn:aws:iam::123456789012:role/rag-app\", \"arn:aws:iam::210987654321:root\"]\n"))
            .is_empty()
    );
}

/// The stack gets AWS_IAM and the principals as parameters; the template puts them on the proxy
/// method and in the resource policy's Allow statement, keeping the Deny of every caller outside
/// the VPC endpoint. Resource policy and authorization type both feed the API deployment, so
/// switching auth makes a new one (REFERENCE: "Updates to REST APIs that require redeployment").
#[test]
fn api_auth_iam_reaches_the_method_and_the_resource_policy() {
    let cfg = config("api:\n  auth: iam\n  allowed_principals: [\"arn:aws:iam::123456789012:role/rag-app\", \"210987654321\"]\n");
    let mut template = Template::load(None).unwrap();
    let choice = Choice { ami: "ami-0123456789abcdef0".into(), source: Source::Flag, mode: Mode::Full };
    let params = imgbuild::cmd::stack_parameters(&template, &cfg, &choice).unwrap();
    assert_eq!(params["ApiAuth"], "AWS_IAM");
    assert_eq!(params["ApiAllowedPrincipals"], "arn:aws:iam::123456789012:role/rag-app,210987654321");
    let default_params = imgbuild::cmd::stack_parameters(&template, &Config::default(), &choice).unwrap();
    assert_eq!(default_params["ApiAuth"], "NONE");

    let body: serde_json::Value = serde_json::from_str(&template.body().unwrap()).unwrap();
    let res = &body["Resources"];
    assert_eq!(res["ProxyMethod"]["Properties"]["AuthorizationType"], serde_json::json!({ "Ref": "ApiAuth" }));
    let statements = &res["RestApi"]["Properties"]["Policy"]["Statement"];
    assert_eq!(statements[0]["Effect"], "Allow");
    assert_eq!(statements[0]["Principal"], serde_json::json!({ "Fn::If": ["IamAuth", { "AWS": { "Ref": "ApiAllowedPrincipals" } }, "*"] }));
    assert_eq!(statements[1]["Effect"], "Deny");
    assert_eq!(body["Conditions"]["IamAuth"], serde_json::json!({ "Fn::Equals": [{ "Ref": "ApiAuth" }, "AWS_IAM"] }));

    let none = template.clone().pin_api_deployments(&default_params);
    let iam = template.pin_api_deployments(&params);
    assert_ne!(none, iam, "the deployment's name follows the auth settings");
}
