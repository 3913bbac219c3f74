//! `imgbuild smoke`: the acceptance test. With a URL it talks HTTP to Chroma (heartbeat, create
//! a temporary collection, add documents with given embeddings, query, delete) and times each
//! step; without one it calls API Gateway's test-invoke on the `{proxy+}` method.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

use crate::aws::{self, Clients};
use crate::chroma::{ApiVersions, Profile};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: String,
    pub ok: bool,
    pub status: Option<u16>,
    pub millis: f64,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub target: String,
    pub steps: Vec<Step>,
}

impl Report {
    pub fn ok(&self) -> bool {
        !self.steps.is_empty() && self.steps.iter().all(|s| s.ok)
    }
}

/// Where the API lives under a URL: a stage URL ends in `/api` (the stage name; the
/// integration adds `/api` itself), a server root does not.
pub fn api_base(url: &str, profile: &Profile) -> String {
    let url = url.trim_end_matches('/');
    let version = match profile.api {
        ApiVersions::V1Only => "v1",
        _ => "v2",
    };
    if url.ends_with("/api") { format!("{url}/{version}") } else { format!("{url}/api/{version}") }
}

/// Collection paths differ between the generations: v2 nests them under tenant and database.
fn collections_path(profile: &Profile) -> &'static str {
    match profile.api {
        ApiVersions::V1Only => "/collections",
        _ => "/tenants/default_tenant/databases/default_database/collections",
    }
}

/// Signs requests to a private API whose method is AWS_IAM (`api.auth: iam`): Signature
/// Version 4 for the service `execute-api` ("Control access to a REST API with IAM
/// permissions", API Gateway Developer Guide), with the CLI's own credentials.
pub struct Signer {
    pub credentials: aws_credential_types::Credentials,
    pub region: String,
}

impl Signer {
    /// The headers that sign this exact request at `time` (Authorization, X-Amz-Date and, with
    /// temporary credentials, X-Amz-Security-Token).
    pub fn headers(&self, method: &str, url: &str, body: &[u8], time: std::time::SystemTime) -> std::result::Result<Vec<(String, String)>, String> {
        use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
        let identity = self.credentials.clone().into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("execute-api")
            .time(time)
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| format!("signing {method} {url}: {e}"))?
            .into();
        let request = SignableRequest::new(method, url, std::iter::empty(), SignableBody::Bytes(body)).map_err(|e| format!("signing {method} {url}: {e}"))?;
        let (instructions, _) = sign(request, &params).map_err(|e| format!("signing {method} {url}: {e}"))?.into_parts();
        Ok(instructions.headers().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }
}

struct Http {
    agent: ureq::Agent,
    base: String,
    signer: Option<Signer>,
}

impl Http {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> std::result::Result<(u16, Value), String> {
        let url = format!("{}{path}", self.base);
        // The bytes signed are the bytes sent.
        let bytes = body.map(|b| serde_json::to_vec(b).expect("JSON values serialise")).unwrap_or_default();
        let signed = match &self.signer {
            Some(s) => s.headers(method, &url, &bytes, std::time::SystemTime::now())?,
            None => Vec::new(),
        };
        let res = match method {
            "GET" | "DELETE" => {
                let mut req = if method == "GET" { self.agent.get(&url) } else { self.agent.delete(&url) };
                for (k, v) in &signed {
                    req = req.header(k, v);
                }
                req.call()
            }
            _ => {
                let mut req = self.agent.post(&url);
                for (k, v) in &signed {
                    req = req.header(k, v);
                }
                if body.is_some() { req.header("content-type", "application/json").send(&bytes[..]) } else { req.send_empty() }
            }
        };
        let mut res = res.map_err(|e| format!("{method} {url}: {e}"))?;
        let status = res.status().as_u16();
        let text = res.body_mut().read_to_string().map_err(|e| format!("{method} {url}: reading the answer: {e}"))?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }
}

/// Runs the HTTP smoke test. The collection it creates is deleted whatever happens after.
pub fn over_http(url: &str, profile: &Profile, timeout: Duration, run_id: &str) -> Report {
    over_http_signed(url, profile, timeout, run_id, None)
}

/// `over_http`, each request signed by `signer` when there is one.
pub fn over_http_signed(url: &str, profile: &Profile, timeout: Duration, run_id: &str, signer: Option<Signer>) -> Report {
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build().into();
    let http = Http { agent, base: api_base(url, profile), signer };
    let mut report = Report { target: http.base.clone(), steps: Vec::new() };
    let mut step =
        |name: &str, method: &str, path: &str, body: Option<&Value>, expect: &dyn Fn(u16, &Value) -> std::result::Result<String, String>| -> Option<Value> {
            let t = Instant::now();
            let res = http.call(method, path, body);
            let millis = t.elapsed().as_secs_f64() * 1000.0;
            let (ok, status, detail, value) = match res {
                Ok((status, value)) => match expect(status, &value) {
                    Ok(d) => (true, Some(status), d, Some(value)),
                    Err(d) => (false, Some(status), d, None),
                },
                Err(e) => (false, None, e, None),
            };
            report.steps.push(Step { name: name.into(), ok, status, millis, detail });
            value
        };
    let success = |status: u16| (200..300).contains(&status);

    let hb = step("heartbeat", "GET", "/heartbeat", None, &|s, v| {
        if success(s) { Ok(format!("{v}")) } else { Err(format!("HTTP {s}: {v}")) }
    });
    if hb.is_none() {
        return report;
    }
    let name = format!("imgbuild-smoke-{run_id}");
    let coll = collections_path(profile);
    let created =
        step("create collection", "POST", coll, Some(&json!({ "name": name, "get_or_create": false })), &|s, v| match v.get("id").and_then(Value::as_str) {
            Some(id) if success(s) => Ok(format!("{name} ({id})")),
            _ => Err(format!("HTTP {s}: {v}")),
        });
    let Some(id) = created.as_ref().and_then(|v| v.get("id")).and_then(Value::as_str).map(String::from) else {
        return report;
    };
    // Three points on the unit circle; the query sits next to the second.
    let add = json!({
        "ids": ["a", "b", "c"],
        "embeddings": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        "documents": ["first document", "second document", "third document"],
    });
    let added = step("add documents", "POST", &format!("{coll}/{id}/add"), Some(&add), &|s, v| {
        if success(s) { Ok("3 documents with embeddings".into()) } else { Err(format!("HTTP {s}: {v}")) }
    });
    if added.is_some() {
        let query = json!({ "query_embeddings": [[0.1, 0.9, 0.0]], "n_results": 2, "include": ["documents", "distances"] });
        step("query", "POST", &format!("{coll}/{id}/query"), Some(&query), &|s, v| {
            let nearest = v.pointer("/ids/0/0").and_then(Value::as_str);
            match nearest {
                Some("b") if success(s) => Ok(format!("nearest: b ({})", v.pointer("/documents/0/0").and_then(Value::as_str).unwrap_or("?"))),
                _ => Err(format!("HTTP {s}: expected b nearest, got {v}")),
            }
        });
    }
    step("delete collection", "DELETE", &format!("{coll}/{name}"), None, &|s, v| {
        if success(s) { Ok(format!("{name} deleted")) } else { Err(format!("HTTP {s}: {v}")) }
    });
    report
}

/// The smoke test through API Gateway's test-invoke: no network path to the private API needed.
pub async fn through_api_gateway(clients: &Clients, rest_api_id: &str, profile: &Profile) -> Result<Report> {
    let resources = clients
        .apigw
        .get_resources()
        .rest_api_id(rest_api_id)
        .limit(500)
        .send()
        .await
        .map_err(|e| aws::err("GetResources", format!("REST API {rest_api_id}"), e))?;
    let proxy = resources
        .items()
        .iter()
        .find(|r| r.path() == Some("/{proxy+}"))
        .and_then(|r| r.id())
        .ok_or_else(|| Error::Invalid(format!("REST API {rest_api_id} has no /{{proxy+}} resource: is it the imgbuild stack's API?")))?
        .to_string();
    let version = if profile.api == ApiVersions::V1Only { "v1" } else { "v2" };
    // Test-invoke runs the API's current methods, not the deployed stage, and skips the VPC
    // endpoint and the resource policy: it proves the method, its integration, the VPC link,
    // the NLB and Chroma, and says so.
    let mut report = Report {
        target: format!(
            "API {rest_api_id}, resource {proxy} (test-invoke: method, integration, VPC link, NLB, Chroma; not the endpoint, resource policy or deployed stage)"
        ),
        steps: Vec::new(),
    };
    for (name, path) in [("heartbeat", format!("/{version}/heartbeat")), ("list collections", format!("/{version}{}", collections_path(profile)))] {
        let t = Instant::now();
        // The verb a client sends: the ANY method answers it and the HTTP_PROXY integration passes
        // it on. "ANY" itself is no HTTP verb a client sends, nor one Chroma serves.
        let out = clients.apigw.test_invoke_method().rest_api_id(rest_api_id).resource_id(&proxy).http_method("GET").path_with_query_string(&path).send().await;
        let millis = t.elapsed().as_secs_f64() * 1000.0;
        let step = match out {
            Ok(o) => {
                let status = u16::try_from(o.status()).ok();
                let ok = status == Some(200);
                let body = o.body().unwrap_or_default();
                Step { name: name.into(), ok, status, millis, detail: format!("GET {path}: {}", body.chars().take(200).collect::<String>()) }
            }
            Err(e) => return Err(aws::err("TestInvokeMethod", format!("REST API {rest_api_id}"), e)),
        };
        report.steps.push(step);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chroma::{parse_version, profile};

    #[test]
    fn stage_urls_and_server_roots_reach_the_same_api() {
        let v2 = profile(&parse_version("1.5.9").unwrap()).unwrap();
        let v1 = profile(&parse_version("0.4.13").unwrap()).unwrap();
        assert_eq!(api_base("https://abc.execute-api.us-east-1.amazonaws.com/api", v2), "https://abc.execute-api.us-east-1.amazonaws.com/api/v2");
        assert_eq!(api_base("http://127.0.0.1:8000/", v2), "http://127.0.0.1:8000/api/v2");
        assert_eq!(api_base("http://127.0.0.1:8000", v1), "http://127.0.0.1:8000/api/v1");
    }
}
