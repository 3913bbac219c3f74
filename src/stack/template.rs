//! The CloudFormation template: the stack of the reference design, embedded from `infra/`, and
//! the one change deploy makes to it (the launch template's user-data).

use serde_yaml::Value;

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
            _ => None,
        }
    }

    fn user_data_slot(&self, logical_id: &str) -> Option<&Value> {
        self.doc.get("Resources")?.get(logical_id)?.get("Properties")?.get("LaunchTemplateData")?.get("UserData")
    }

    /// Sets every launch template's user-data to `base64` (already encoded, as EC2 takes it).
    /// Returns how many launch templates were set.
    pub fn set_user_data(&mut self, base64: &str) -> usize {
        let ids = self.launch_templates();
        for id in &ids {
            let data = self.doc["Resources"][id.as_str()]["Properties"]["LaunchTemplateData"]
                .as_mapping_mut()
                .expect("launch templates have LaunchTemplateData (cfn-lint checks it)");
            data.insert(Value::String("UserData".into()), Value::String(base64.into()));
        }
        ids.len()
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
