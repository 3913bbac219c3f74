//! `api:`: who may call the private API. Chroma 1.x has no authentication of its own
//! (chroma-core/chroma#4965, #5363), so with `auth: none` anyone in the client security group
//! reaches every collection; `auth: iam` makes API Gateway check SigV4 signatures (AWS_IAM on
//! the proxy method) and the resource policy name the principals allowed.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ApiAuth {
    /// The article's setup: the VPC endpoint and its security group decide.
    #[default]
    None,
    /// SigV4-signed requests from the principals in `allowed_principals` only.
    Iam,
}

impl ApiAuth {
    /// The method's AuthorizationType.
    pub fn authorization_type(self) -> &'static str {
        match self {
            ApiAuth::None => "NONE",
            ApiAuth::Iam => "AWS_IAM",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub auth: ApiAuth,
    /// With `auth: iam`: account ids or IAM role/user ARNs the resource policy allows.
    pub allowed_principals: Vec<String>,
}

/// A principal a resource policy takes: a 12-digit account id, or an IAM root, role or user ARN.
fn check_principal(p: &str) -> Result<(), String> {
    let account = |a: &str| a.len() == 12 && a.bytes().all(|b| b.is_ascii_digit());
    if account(p) {
        return Ok(());
    }
    let parts: Vec<&str> = p.splitn(6, ':').collect();
    let ok = parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "iam"
        && parts[3].is_empty()
        && account(parts[4])
        && (parts[5] == "root" || parts[5].strip_prefix("role/").or_else(|| parts[5].strip_prefix("user/")).is_some_and(|n| !n.is_empty() && !n.contains('*')));
    if ok { Ok(()) } else { Err(format!("`{p}` is not an account id or an IAM root, role or user ARN (arn:aws:iam::123456789012:role/NAME)")) }
}

pub(super) fn check(api: &ApiConfig) -> Vec<(String, String)> {
    let mut out = Vec::new();
    match api.auth {
        ApiAuth::Iam if api.allowed_principals.is_empty() => {
            out.push(("api.allowed_principals".to_string(), "auth: iam needs at least one principal, or no signed request is allowed either".to_string()))
        }
        ApiAuth::None if !api.allowed_principals.is_empty() => out.push((
            "api.allowed_principals".to_string(),
            "applies only with api.auth: iam; with auth: none every caller through the endpoint is allowed".to_string(),
        )),
        _ => {}
    }
    for (i, p) in api.allowed_principals.iter().enumerate() {
        if let Err(m) = check_principal(p) {
            out.push((format!("api.allowed_principals[{i}]"), m));
        }
    }
    out
}
