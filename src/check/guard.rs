//! The cfn-guard policies in `infra/guard/`, embedded and run by `imgbuild validate`.

use serde::Serialize;
use serde_yaml::Value;

use crate::error::{Error, Result};

/// The policy files, embedded so the binary checks templates with no files around it.
pub const RULE_FILES: &[(&str, &str)] = &[
    ("api_gateway.guard", include_str!("../../infra/guard/api_gateway.guard")),
    ("efs.guard", include_str!("../../infra/guard/efs.guard")),
    ("launch_template.guard", include_str!("../../infra/guard/launch_template.guard")),
    ("security_groups.guard", include_str!("../../infra/guard/security_groups.guard")),
    ("service.guard", include_str!("../../infra/guard/service.guard")),
    ("alarms.guard", include_str!("../../infra/guard/alarms.guard")),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    /// The template has nothing the rule applies to.
    Skip,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleOutcome {
    pub file: &'static str,
    pub rule: String,
    pub verdict: Verdict,
    /// For failures: what guard found, path by path.
    pub detail: String,
}

/// Runs every embedded rule on a template document; `name` says which template in messages.
pub fn evaluate(name: &str, document: &Value) -> Result<Vec<RuleOutcome>> {
    let mut doc = long_form(document);
    // No policy reads user-data, and guard's reports quote the values they fail on: a launch
    // template's kilobytes of user-data would only bloat them (and cfn-guard 3.2.1 returns a
    // report over 8 KiB cut short).
    if let Some(resources) = doc.get_mut("Resources").and_then(|r| r.as_object_mut()) {
        for r in resources.values_mut() {
            if let Some(ud) = r.pointer_mut("/Properties/LaunchTemplateData/UserData") {
                *ud = serde_json::Value::String("<user-data>".into());
            }
        }
    }
    let data = serde_json::to_string(&doc).expect("JSON values serialise");
    let mut out = Vec::new();
    for (file, rules) in RULE_FILES {
        let report = cfn_guard::run_checks(
            cfn_guard::ValidateInput { content: &data, file_name: name },
            cfn_guard::ValidateInput { content: rules, file_name: file },
            false,
        )
        .map_err(|e| Error::Tool(format!("cfn-guard could not evaluate {file} on {name}: {e}")))?;
        let report: serde_json::Value =
            serde_json::from_str(&report).map_err(|e| Error::Tool(format!("cfn-guard gave an unreadable report for {file}: {e}")))?;
        for name in names(&report["compliant"]) {
            out.push(RuleOutcome { file, rule: name, verdict: Verdict::Pass, detail: String::new() });
        }
        for name in names(&report["not_applicable"]) {
            out.push(RuleOutcome { file, rule: name, verdict: Verdict::Skip, detail: "nothing in the template it applies to".into() });
        }
        for failed in report["not_compliant"].as_array().into_iter().flatten() {
            let rule = failed.pointer("/Rule/name").and_then(|n| n.as_str()).unwrap_or("?").to_string();
            let mut messages = Vec::new();
            collect_messages(failed, &mut messages);
            messages.dedup();
            out.push(RuleOutcome { file, rule, verdict: Verdict::Fail, detail: messages.join("; ") });
        }
    }
    Ok(out)
}

fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|n| n.as_str().map(String::from)).collect()
}

/// The custom and error messages anywhere in a guard failure tree.
fn collect_messages(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for key in ["custom_message", "error_message"] {
                if let Some(s) = m.get(key).and_then(|s| s.as_str()) {
                    out.push(s.trim().to_string());
                }
            }
            for (k, child) in m {
                if k != "custom_message" && k != "error_message" {
                    collect_messages(child, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|c| collect_messages(c, out)),
        _ => {}
    }
}

/// CloudFormation's short-form tags (`!Ref x`, `!GetAtt a.b`) in their long form, as JSON: the
/// form guard rules (and the CloudFormation API) read.
pub fn long_form(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Null => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Number(n) => serde_json::to_value(n).unwrap_or(J::Null),
        Value::String(s) => J::String(s.clone()),
        Value::Sequence(seq) => J::Array(seq.iter().map(long_form).collect()),
        Value::Mapping(m) => J::Object(m.iter().map(|(k, v)| (key_text(k), long_form(v))).collect()),
        Value::Tagged(t) => {
            let tag = t.tag.to_string();
            let name = tag.trim_start_matches('!');
            let inner = long_form(&t.value);
            match name {
                "Ref" | "Condition" => serde_json::json!({ name: inner }),
                "GetAtt" => match inner {
                    J::String(s) => {
                        let (res, attr) = s.split_once('.').unwrap_or((&s, ""));
                        serde_json::json!({ "Fn::GetAtt": [res, attr] })
                    }
                    other => serde_json::json!({ "Fn::GetAtt": other }),
                },
                _ => serde_json::json!({ format!("Fn::{name}"): inner }),
            }
        }
    }
}

fn key_text(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other).unwrap_or_default().trim().to_string(),
    }
}
