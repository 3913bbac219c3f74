//! The CloudFormation template: the stack of the reference design, embedded from `infra/`, and
//! the one change deploy makes to it (the launch template's user-data).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value as J;
use serde_yaml::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The reference stack. It carries the default full-mode user-data, so plain
/// `aws cloudformation deploy` works with it as it is.
pub const STACK_TEMPLATE: &str = include_str!("../../infra/stack.yaml");
pub const STACK_TEMPLATE_NAME: &str = "infra/stack.yaml";

/// CloudFormation's limit on a template passed inline (`TemplateBody`).
pub const BODY_LIMIT: usize = 51_200;

#[derive(Debug, Clone)]
pub struct Template {
    pub name: String,
    doc: Value,
    lines: crate::config::lines::LineIndex,
}

impl Template {
    pub fn parse(text: &str, name: &str) -> Result<Self> {
        let doc: Value = serde_yaml::from_str(text).map_err(|e| {
            let at = e.location().map(|l| format!(" at line {}", l.line())).unwrap_or_default();
            Error::Invalid(format!("{name}{at}: not a valid YAML template: {e}"))
        })?;
        if !doc.get("Resources").is_some_and(Value::is_mapping) {
            return Err(Error::Invalid(format!("{name}: not a CloudFormation template (no Resources mapping)")));
        }
        Ok(Self { name: name.into(), doc, lines: crate::config::lines::LineIndex::new(text) })
    }

    /// The file at `path`, or the embedded reference stack.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Error::Invalid(format!("template {} does not exist", p.display())),
                    _ => Error::io("reading template", p, e),
                })?;
                Self::parse(&text, &p.display().to_string())
            }
            None => Ok(Self::reference()),
        }
    }

    /// Where a guard finding points: the first `/Resources/...` path in its text, as a dotted
    /// field and its line in the template file. Rendered like `line 12, `Resources.X.Type``.
    pub fn locate(&self, detail: &str) -> Option<String> {
        let start = detail.find("/Resources/")?;
        let path: String = detail[start + 1..].chars().take_while(|c| !matches!(c, '[' | ']' | ' ' | ',' | '"')).collect();
        // `SecurityGroupIngress/1/CidrIp`: numbers are list positions.
        let mut field = String::new();
        for part in path.trim_end_matches('/').split('/') {
            if !field.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                field.push_str(&format!("[{part}]"));
            } else {
                if !field.is_empty() {
                    field.push('.');
                }
                field.push_str(part);
            }
        }
        Some(match self.lines.line_of(&field) {
            Some(l) => format!("line {l}, `{field}`"),
            None => format!("`{field}`"),
        })
    }

    /// Security policies (cfn-guard) on the template as it will be sent; every failure named.
    pub fn check_policies(&self) -> Result<Vec<crate::check::guard::RuleOutcome>> {
        let outcomes = crate::check::guard::evaluate(&self.name, self.document())?;
        let failed: Vec<String> = outcomes
            .iter()
            .filter(|o| o.verdict == crate::check::guard::Verdict::Fail)
            .map(|o| format!("{}{}: {} ({}): {}", self.name, self.locate(&o.detail).map(|l| format!(":{l}")).unwrap_or_default(), o.rule, o.file, o.detail))
            .collect();
        if failed.is_empty() {
            Ok(outcomes)
        } else {
            Err(Error::Validation(format!(
                "{} breaks {} security polic{}:\n  {}",
                self.name,
                failed.len(),
                if failed.len() == 1 { "y" } else { "ies" },
                failed.join("\n  ")
            )))
        }
    }

    pub fn reference() -> Self {
        Self::parse(STACK_TEMPLATE, STACK_TEMPLATE_NAME).expect("the embedded template parses (tested)")
    }

    pub fn document(&self) -> &Value {
        &self.doc
    }

    /// The names of the template's parameters, in template order.
    pub fn parameter_names(&self) -> Vec<String> {
        self.doc.get("Parameters").and_then(Value::as_mapping).map(|m| m.keys().filter_map(|k| k.as_str().map(String::from)).collect()).unwrap_or_default()
    }

    /// Logical ids of the launch templates, whose user-data deploy sets.
    pub fn launch_templates(&self) -> Vec<String> {
        self.resources_of_type("AWS::EC2::LaunchTemplate")
    }

    pub fn resources_of_type(&self, kind: &str) -> Vec<String> {
        self.doc
            .get("Resources")
            .and_then(Value::as_mapping)
            .map(|m| m.iter().filter(|(_, r)| r.get("Type").and_then(Value::as_str) == Some(kind)).filter_map(|(k, _)| k.as_str().map(String::from)).collect())
            .unwrap_or_default()
    }

    /// The user-data text a launch template carries as `Fn::Base64: <text>`, if any.
    pub fn embedded_user_data(&self, logical_id: &str) -> Option<String> {
        let ud = self.user_data_slot(logical_id)?;
        match ud {
            Value::Tagged(t) if t.tag == "!Base64" => t.value.as_str().map(String::from),
            Value::Mapping(m) => m.get("Fn::Base64").and_then(Value::as_str).map(String::from),
            // Already encoded, as EC2 takes it: base64, of gzip when it starts with gzip's magic.
            Value::String(b64) => {
                use base64::Engine;
                let bytes = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
                let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
                    let mut out = Vec::new();
                    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut out).ok()?;
                    out
                } else {
                    bytes
                };
                String::from_utf8(bytes).ok()
            }
            _ => None,
        }
    }

    fn user_data_slot(&self, logical_id: &str) -> Option<&Value> {
        self.doc.get("Resources")?.get(logical_id)?.get("Properties")?.get("LaunchTemplateData")?.get("UserData")
    }

    /// Sets every launch template's user-data to `base64` (already encoded, as EC2 takes it).
    /// Returns how many launch templates were set.
    pub fn set_user_data(&mut self, base64: &str) -> Result<usize> {
        let ids = self.launch_templates();
        for id in &ids {
            // A user's template is read before cfn-lint sees it: a launch template without a
            // `LaunchTemplateData` mapping is refused by name, not a panic.
            let Some(data) =
                self.doc["Resources"][id.as_str()].get_mut("Properties").and_then(|p| p.get_mut("LaunchTemplateData")).and_then(Value::as_mapping_mut)
            else {
                return Err(Error::Invalid(format!(
                    "template {}: launch template `{id}` has no `Properties.LaunchTemplateData` mapping to carry the user-data",
                    self.name
                )));
            };
            data.insert(Value::String("UserData".into()), Value::String(base64.into()));
        }
        Ok(ids.len())
    }

    /// With instance metadata tags enabled, EC2 refuses to launch an instance that has a tag key
    /// with a space or `/`, or one that is `.`, `..` or `_index` ("View tags for your EC2
    /// instances using instance metadata", EC2 user guide): every launch of the group would
    /// fail. The keys that reach the instance: the launch templates' instance tags, the group's
    /// tags propagated at launch, and the stack's tags (CloudFormation puts them on the group,
    /// which propagates them). Refused here, before anything is created, with the reason.
    pub fn check_instance_tags(&self, stack_tags: &BTreeMap<String, String>) -> Result<()> {
        let doc = crate::check::guard::long_form(&self.doc);
        let Some(resources) = doc.get("Resources").and_then(J::as_object) else { return Ok(()) };
        let with_imds_tags = resources.iter().any(|(_, r)| {
            r.get("Type").and_then(J::as_str) == Some("AWS::EC2::LaunchTemplate")
                && r.pointer("/Properties/LaunchTemplateData/MetadataOptions/InstanceMetadataTags").and_then(J::as_str) == Some("enabled")
        });
        if !with_imds_tags {
            return Ok(());
        }
        let mut keys: Vec<(String, String)> = stack_tags.keys().map(|k| (k.clone(), "the stack's tags".to_string())).collect();
        for (id, r) in resources {
            let props = r.get("Properties");
            match r.get("Type").and_then(J::as_str) {
                Some("AWS::EC2::LaunchTemplate") => {
                    for spec in props.and_then(|p| p.pointer("/LaunchTemplateData/TagSpecifications")).and_then(J::as_array).into_iter().flatten() {
                        if spec.get("ResourceType").and_then(J::as_str) == Some("instance") {
                            for tag in spec.get("Tags").and_then(J::as_array).into_iter().flatten() {
                                keys.extend(tag.get("Key").and_then(J::as_str).map(|k| (k.to_string(), format!("Resources.{id} instance TagSpecifications"))));
                            }
                        }
                    }
                }
                Some("AWS::AutoScaling::AutoScalingGroup") => {
                    for tag in props.and_then(|p| p.get("Tags")).and_then(J::as_array).into_iter().flatten() {
                        if matches!(tag.get("PropagateAtLaunch"), Some(J::Bool(true))) || tag.get("PropagateAtLaunch").and_then(J::as_str) == Some("true") {
                            keys.extend(tag.get("Key").and_then(J::as_str).map(|k| (k.to_string(), format!("Resources.{id}.Properties.Tags"))));
                        }
                    }
                }
                _ => {}
            }
        }
        let bad: Vec<String> = keys
            .iter()
            .filter(|(k, _)| k.contains(' ') || k.contains('/') || matches!(k.as_str(), "." | ".." | "_index"))
            .map(|(k, from)| format!("{k:?} (from {from})"))
            .collect();
        if bad.is_empty() {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "{}: instance metadata tags are enabled, and EC2 refuses to launch an instance with a tag key that contains a space or '/' (or is '.', '..' or '_index'), so every launch would fail: {}; rename the tag",
            self.name,
            bad.join(", ")
        )))
    }

    /// The resources CloudFormation holds until they signal (`CreationPolicy.ResourceSignal`),
    /// with the timeout in seconds (ISO 8601 `PT#H#M#S`, CloudFormation's format; default 12h).
    pub fn signal_waits(&self) -> Vec<(String, u64)> {
        let Some(resources) = self.doc.get("Resources").and_then(Value::as_mapping) else { return Vec::new() };
        resources
            .iter()
            .filter_map(|(k, r)| {
                let signal = r.get("CreationPolicy")?.get("ResourceSignal")?;
                let secs = signal.get("Timeout").and_then(Value::as_str).map_or(Some(12 * 3600), iso_duration_secs)?;
                Some((k.as_str()?.to_string(), secs))
            })
            .collect()
    }

    /// Gives each API Gateway deployment a logical id derived from everything that feeds the
    /// API: the definitions of the resources it reaches through references (the REST API, its
    /// resources and methods, the VPC link, the NLB behind it, ...), the conditions they use and
    /// the values of the parameters they read. A deployment is a snapshot: CloudFormation
    /// updates the API's methods in place but the stage keeps serving the old snapshot until a
    /// new Deployment resource exists ("Updates to REST APIs that require redeployment", API
    /// Gateway developer guide). The same inputs keep the same id, so an unchanged deploy stays
    /// "no changes". Returns (old id, new id) per deployment renamed.
    pub fn pin_api_deployments(&mut self, parameters: &BTreeMap<String, String>) -> Vec<(String, String)> {
        let doc = crate::check::guard::long_form(&self.doc);
        let mut renamed = Vec::new();
        for id in self.resources_of_type("AWS::ApiGateway::Deployment") {
            let inputs = api_inputs(&doc, &id, parameters);
            let digest = Sha256::digest(serde_json::to_vec(&inputs).expect("JSON values serialise"));
            let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
            let new = format!("{id}{hex}");
            rename_resource(&mut self.doc, &id, &new);
            renamed.push((id, new));
        }
        renamed
    }

    /// The body sent to CloudFormation; refuses what CloudFormation would refuse for size.
    ///
    /// JSON, not YAML: CloudFormation reads YAML 1.1, where a plain `off`, `on`, `yes` or `no`
    /// is a boolean, while serde_yaml writes YAML 1.2 and leaves such strings unquoted (aws-cli
    /// PR #5257, rain issue #480). In JSON every string is quoted, so the body means to
    /// CloudFormation exactly what the file means; short-form tags become their long forms.
    pub fn body(&self) -> Result<String> {
        let body = serde_json::to_string(&crate::check::guard::long_form(&self.doc)).map_err(|e| Error::Invalid(format!("{}: {e}", self.name)))?;
        if body.len() > BODY_LIMIT {
            return Err(Error::Invalid(format!(
                "{}: the template is {} bytes with the user-data in it, over CloudFormation's {BODY_LIMIT}-byte limit for an inline template",
                self.name,
                body.len()
            )));
        }
        Ok(body)
    }
}

/// What a deployment's snapshot depends on: every resource, condition and parameter reachable
/// from it through references, except the stages that point at it. Keys sorted, so the digest
/// does not depend on the order of the file.
fn api_inputs(doc: &J, deployment: &str, parameters: &BTreeMap<String, String>) -> J {
    let resources = doc.get("Resources").and_then(J::as_object);
    let conditions = doc.get("Conditions").and_then(J::as_object);
    let declared = doc.get("Parameters").and_then(J::as_object);
    let is_stage = |id: &str| resources.and_then(|r| r.get(id)).and_then(|r| r.get("Type")).and_then(J::as_str) == Some("AWS::ApiGateway::Stage");
    // The API's own resources feed the snapshot even when the deployment names only the REST API.
    let mut todo: Vec<String> = vec![deployment.to_string()];
    if let Some(r) = resources {
        todo.extend(
            r.iter()
                .filter(|(_, v)| {
                    v.get("Type").and_then(J::as_str).is_some_and(|t| {
                        t.starts_with("AWS::ApiGateway::")
                            && !matches!(t, "AWS::ApiGateway::Stage" | "AWS::ApiGateway::Deployment" | "AWS::ApiGateway::Account")
                    })
                })
                .map(|(k, _)| k.clone()),
        );
    }
    let (mut seen_r, mut seen_c, mut seen_p) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let mut todo_c: Vec<String> = Vec::new();
    while !todo.is_empty() || !todo_c.is_empty() {
        let (node, is_resource) = match todo.pop() {
            Some(r) => (r, true),
            None => (todo_c.pop().expect("one of the two is not empty"), false),
        };
        let def = if is_resource {
            if is_stage(&node) || !seen_r.insert(node.clone()) {
                continue;
            }
            resources.and_then(|r| r.get(&node))
        } else {
            if !seen_c.insert(node.clone()) {
                continue;
            }
            conditions.and_then(|c| c.get(&node))
        };
        let Some(def) = def else { continue };
        let mut names = Vec::new();
        let mut conds = Vec::new();
        references(def, &mut names, &mut conds);
        for n in names {
            if resources.is_some_and(|r| r.contains_key(&n)) {
                todo.push(n);
            } else if declared.is_some_and(|p| p.contains_key(&n)) {
                seen_p.insert(n);
            }
        }
        todo_c.extend(conds);
    }
    let mut out = serde_json::Map::new();
    let pick = |section: Option<&serde_json::Map<String, J>>, keys: &BTreeSet<String>| {
        J::Object(keys.iter().filter_map(|k| section.and_then(|s| s.get(k)).map(|v| (k.clone(), canonical(v)))).collect())
    };
    out.insert("conditions".into(), pick(conditions, &seen_c));
    out.insert("resources".into(), pick(resources, &seen_r));
    let values: serde_json::Map<String, J> = seen_p
        .iter()
        .map(|p| {
            let given = parameters.get(p).cloned().map(J::String);
            let default = declared.and_then(|d| d.get(p)).and_then(|d| d.get("Default")).cloned();
            (p.clone(), given.or(default).unwrap_or(J::Null))
        })
        .collect();
    out.insert("parameters".into(), J::Object(values));
    J::Object(out)
}

/// Names a definition refers to: resources and parameters (`Ref`, `Fn::GetAtt`, `Fn::Sub`,
/// `DependsOn`) into `names`, conditions (`Fn::If`, `Condition`) into `conds`.
fn references(v: &J, names: &mut Vec<String>, conds: &mut Vec<String>) {
    match v {
        J::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("Ref", J::String(s)) => names.push(s.clone()),
                    ("Fn::GetAtt", J::Array(a)) => names.extend(a.first().and_then(J::as_str).map(String::from)),
                    ("Fn::GetAtt", J::String(s)) => names.push(s.split('.').next().unwrap_or_default().to_string()),
                    ("Fn::Sub", _) => {
                        let text = match x {
                            J::String(s) => Some(s.as_str()),
                            J::Array(a) => a.first().and_then(J::as_str),
                            _ => None,
                        };
                        for part in text.unwrap_or_default().split("${").skip(1) {
                            let name = part.split('}').next().unwrap_or_default();
                            if !name.starts_with('!') {
                                names.push(name.split('.').next().unwrap_or_default().to_string());
                            }
                        }
                    }
                    ("DependsOn", J::String(s)) => names.push(s.clone()),
                    ("DependsOn", J::Array(a)) => names.extend(a.iter().filter_map(J::as_str).map(String::from)),
                    ("Condition", J::String(s)) => conds.push(s.clone()),
                    ("Fn::If", J::Array(a)) => conds.extend(a.first().and_then(J::as_str).map(String::from)),
                    _ => {}
                }
                references(x, names, conds);
            }
        }
        J::Array(a) => a.iter().for_each(|x| references(x, names, conds)),
        _ => {}
    }
}

fn canonical(v: &J) -> J {
    match v {
        J::Object(m) => {
            let sorted: BTreeMap<&String, &J> = m.iter().collect();
            J::Object(sorted.into_iter().map(|(k, v)| (k.clone(), canonical(v))).collect())
        }
        J::Array(a) => J::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// Renames resource `old` to `new` and every reference to it (`Ref`, `GetAtt`, `Sub`,
/// `DependsOn`), short or long form, keeping the resources' order.
fn rename_resource(doc: &mut Value, old: &str, new: &str) {
    if let Some(resources) = doc.get_mut("Resources").and_then(Value::as_mapping_mut) {
        let taken = std::mem::take(resources);
        for (k, v) in taken {
            let k = if k.as_str() == Some(old) { Value::String(new.into()) } else { k };
            resources.insert(k, v);
        }
    }
    rename_refs(doc, old, new);
}

fn rename_refs(v: &mut Value, old: &str, new: &str) {
    let attr = |s: &str| s.strip_prefix(old).filter(|rest| rest.starts_with('.')).map(|rest| format!("{new}{rest}"));
    let sub = |s: &str| s.replace(&format!("${{{old}}}"), &format!("${{{new}}}")).replace(&format!("${{{old}."), &format!("${{{new}."));
    match v {
        Value::Tagged(t) => {
            let tag = t.tag.to_string();
            match (tag.trim_start_matches('!'), &mut t.value) {
                ("Ref", Value::String(s)) if s == old => *s = new.into(),
                ("GetAtt", Value::String(s)) => {
                    if let Some(r) = attr(s) {
                        *s = r;
                    }
                }
                ("Sub", Value::String(s)) => *s = sub(s),
                _ => {}
            }
            rename_refs(&mut t.value, old, new);
        }
        Value::Mapping(m) => {
            for (k, x) in m.iter_mut() {
                match (k.as_str(), &mut *x) {
                    (Some("Ref" | "DependsOn"), Value::String(s)) if s == old => *s = new.into(),
                    (Some("Fn::Sub"), Value::String(s)) => *s = sub(s),
                    (Some("Fn::GetAtt"), Value::String(s)) => {
                        if let Some(r) = attr(s) {
                            *s = r;
                        }
                    }
                    (Some("Fn::GetAtt" | "DependsOn"), Value::Sequence(seq)) => {
                        if let Some(Value::String(s)) = seq.first_mut().filter(|s| s.as_str() == Some(old)) {
                            *s = new.into();
                        }
                        if k.as_str() == Some("DependsOn") {
                            for s in seq.iter_mut() {
                                if s.as_str() == Some(old) {
                                    *s = Value::String(new.into());
                                }
                            }
                        }
                    }
                    _ => {}
                }
                rename_refs(x, old, new);
            }
        }
        Value::Sequence(seq) => seq.iter_mut().for_each(|x| rename_refs(x, old, new)),
        _ => {}
    }
}

/// `PT1H30M`, `PT20M`, `PT90S` in seconds; None for anything else.
fn iso_duration_secs(text: &str) -> Option<u64> {
    let mut rest = text.strip_prefix("PT")?;
    let mut total = 0u64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = rest[..digits].parse().ok()?;
        let unit = match &rest[digits..digits + 1] {
            "H" => 3600,
            "M" => 60,
            "S" => 1,
            _ => return None,
        };
        total += n * unit;
        rest = &rest[digits + 1..];
    }
    Some(total)
}
