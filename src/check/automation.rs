//! Static checks on an SSM Automation document (schemaVersion 0.3), run by `imgbuild validate`
//! and before every bake: a broken reference or step target otherwise shows up only minutes into
//! a paid-for execution.

use std::collections::{BTreeMap, BTreeSet};

use serde_yaml::Value;

/// Inputs an action cannot run without (the SSM Automation action reference).
fn required_inputs(action: &str) -> Option<&'static [&'static str]> {
    Some(match action {
        "aws:executeAwsApi" => &["Service", "Api"],
        "aws:waitForAwsResourceProperty" | "aws:assertAwsResourceProperty" => &["Service", "Api", "PropertySelector", "DesiredValues"],
        "aws:runCommand" => &["DocumentName"],
        "aws:changeInstanceState" => &["InstanceIds", "DesiredState"],
        "aws:createImage" => &["InstanceId", "ImageName"],
        "aws:copyImage" => &["SourceImageId", "SourceRegion", "ImageName"],
        "aws:deleteImage" => &["ImageId"],
        "aws:createTags" => &["ResourceIds", "Tags"],
        "aws:runInstances" => &["ImageId"],
        "aws:branch" => &["Choices"],
        "aws:sleep" => &[],
        "aws:pause" => &[],
        "aws:approve" => &["Approvers"],
        "aws:executeScript" => &["Runtime", "Handler"],
        "aws:executeAutomation" => &["DocumentName"],
        "aws:invokeLambdaFunction" => &["FunctionName"],
        "aws:createStack" | "aws:deleteStack" => &["StackName"],
        _ => return None,
    })
}

/// Outputs an action has without declaring them.
fn builtin_outputs(action: &str) -> &'static [&'static str] {
    match action {
        "aws:runInstances" => &["InstanceIds", "InstanceStates"],
        "aws:createImage" | "aws:copyImage" => &["ImageId", "ImageState"],
        "aws:runCommand" => &["CommandId", "Status", "ResponseCode", "Output"],
        "aws:executeScript" => &["OutputPayload"],
        "aws:invokeLambdaFunction" => &["StatusCode", "FunctionError", "Payload", "LogResult"],
        "aws:createStack" => &["StackId", "StackStatus", "StackStatusReason"],
        "aws:executeAutomation" => &["Output", "ExecutionId", "Status"],
        _ => &[],
    }
}

/// The system variables ("Automation system variables": `global:` ones and the one
/// `automation:` variable). Anything else SSM leaves unresolved or rejects.
const GLOBALS: &[&str] = &["ACCOUNT_ID", "AWS_PARTITION", "REGION", "DATE", "DATE_TIME"];
const AUTOMATION_VARIABLES: &[&str] = &["EXECUTION_ID"];

/// Actions that cannot be the target of an onCancel (Automation actions reference, "Properties
/// shared by all actions", onCancel).
const NOT_CANCEL_TARGETS: &[&str] =
    &["aws:approve", "aws:copyImage", "aws:createImage", "aws:createStack", "aws:createTags", "aws:pause", "aws:runInstances", "aws:sleep"];

/// A step's `timeoutSeconds` as a number (SSM accepts it quoted or not).
fn seconds(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The longest an execution of the document may take on its success path, as the service bounds
/// it: every step from the first, following nextStep (or the next step in order) until isEnd,
/// each at most `timeoutSeconds` times `maxAttempts`. A step without timeoutSeconds has no bound,
/// so neither has the path.
pub fn success_budget(text: &str) -> std::result::Result<u64, String> {
    let doc: Value = serde_yaml::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    let steps = doc.get("mainSteps").and_then(Value::as_sequence).ok_or("no mainSteps")?;
    let index = |name: &str| steps.iter().position(|s| s.get("name").and_then(Value::as_str) == Some(name));
    let mut at = 0;
    let mut total: u64 = 0;
    for _ in 0..steps.len() {
        let step = &steps[at];
        let name = step.get("name").and_then(Value::as_str).unwrap_or("?");
        let timeout = seconds(step.get("timeoutSeconds")).ok_or_else(|| format!("step {name} has no timeoutSeconds"))?;
        let attempts = seconds(step.get("maxAttempts")).unwrap_or(1).max(1);
        total = total.saturating_add(timeout.saturating_mul(attempts));
        if step.get("isEnd").and_then(Value::as_bool) == Some(true) {
            return Ok(total);
        }
        at = match step.get("nextStep").and_then(Value::as_str) {
            Some(next) => index(next).ok_or_else(|| format!("step {name}: nextStep {next} does not exist"))?,
            None if at + 1 < steps.len() => at + 1,
            None => return Ok(total),
        };
    }
    Err("the success path loops".into())
}

/// One problem, located by step (or document section), field path and line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub at: String,
    /// Dotted path in the document, e.g. `mainSteps[3].onFailure`.
    pub field: String,
    pub line: Option<usize>,
    pub message: String,
}

/// Every `{{ ... }}` reference in a value, trimmed.
fn references(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(start) = rest.find("{{") {
                let after = &rest[start + 2..];
                let Some(end) = after.find("}}") else { break };
                out.push(after[..end].trim().to_string());
                rest = &after[end + 2..];
            }
        }
        Value::Sequence(seq) => seq.iter().for_each(|x| references(x, out)),
        Value::Mapping(m) => m.values().for_each(|x| references(x, out)),
        Value::Tagged(t) => references(&t.value, out),
        _ => {}
    }
}

pub fn check(text: &str) -> Vec<Finding> {
    let lines = crate::config::lines::LineIndex::new(text);
    let mut found = Vec::new();
    let mut bad = |at: &str, field: String, message: String| {
        let line = lines.line_of(&field);
        found.push(Finding { at: at.to_string(), field, line, message })
    };
    let doc: Value = match serde_yaml::from_str(text) {
        Ok(d) => d,
        Err(e) => {
            let line = e.location().map(|l| l.line().min(text.lines().count().max(1)));
            let message = e.to_string();
            let message = message.split(" at line ").next().unwrap_or(&message).to_string();
            found.push(Finding { at: "document".into(), field: String::new(), line, message: format!("not valid YAML: {message}") });
            return found;
        }
    };
    if doc.get("schemaVersion").and_then(Value::as_str) != Some("0.3") {
        bad("schemaVersion", "schemaVersion".into(), "Automation documents need schemaVersion '0.3'".into());
    }
    let params: BTreeSet<String> =
        doc.get("parameters").and_then(Value::as_mapping).map(|m| m.keys().filter_map(|k| k.as_str().map(String::from)).collect()).unwrap_or_default();
    let Some(steps) = doc.get("mainSteps").and_then(Value::as_sequence).filter(|s| !s.is_empty()) else {
        bad("mainSteps", "mainSteps".into(), "no steps".into());
        return found;
    };

    let names: Vec<String> = steps.iter().map(|s| s.get("name").and_then(Value::as_str).unwrap_or_default().to_string()).collect();
    let all: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    // Outputs each step offers, known once the step is reached in order.
    let mut outputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let check_ref = |r: &str, outputs: &BTreeMap<String, BTreeSet<String>>| -> Option<String> {
        if let Some(g) = r.strip_prefix("global:") {
            return (!GLOBALS.contains(&g)).then(|| format!("`{{{{ {r} }}}}` is not a global variable ({})", GLOBALS.join(", ")));
        }
        if let Some(a) = r.strip_prefix("automation:") {
            return (!AUTOMATION_VARIABLES.contains(&a)).then(|| format!("`{{{{ {r} }}}}` is not an automation variable (automation:EXECUTION_ID)"));
        }
        if r.starts_with("ssm:") || r.starts_with("ssm-secure:") {
            return None;
        }
        match r.split_once('.') {
            Some((step, out)) => match outputs.get(step) {
                Some(o) if o.contains(out) => None,
                Some(o) => Some(format!("`{{{{ {r} }}}}`: step {step} has no output {out} (it has: {})", o.iter().cloned().collect::<Vec<_>>().join(", "))),
                None if all.contains(step) => Some(format!("`{{{{ {r} }}}}` names step {step}, which has not run yet at this point")),
                None => Some(format!("`{{{{ {r} }}}}` names no parameter and no step")),
            },
            None if params.contains(r) => None,
            None => Some(format!("`{{{{ {r} }}}}` is not a parameter of the document")),
        }
    };

    let mut refs = Vec::new();
    references(doc.get("assumeRole").unwrap_or(&Value::Null), &mut refs);
    for r in refs {
        if let Some(m) = check_ref(&r, &outputs) {
            bad("assumeRole", "assumeRole".into(), m);
        }
    }
    let action_of = |name: &str| {
        steps.iter().find(|s| s.get("name").and_then(Value::as_str) == Some(name)).and_then(|s| s.get("action")).and_then(Value::as_str).unwrap_or_default()
    };
    let mut seen = BTreeSet::new();
    for (i, step) in steps.iter().enumerate() {
        let name = &names[i];
        let at = if name.is_empty() { format!("mainSteps[{i}]") } else { format!("step {name}") };
        let f = |key: &str| format!("mainSteps[{i}].{key}");
        if name.is_empty() {
            bad(&at, format!("mainSteps[{i}]"), "has no name".into());
        } else if !seen.insert(name.clone()) {
            bad(&at, f("name"), "the name is used by an earlier step too".into());
        }
        let action = step.get("action").and_then(Value::as_str).unwrap_or_default();
        let inputs = step.get("inputs").cloned().unwrap_or(Value::Null);
        match required_inputs(action) {
            None => bad(&at, f("action"), format!("unknown action `{action}`")),
            Some(req) => {
                for r in req {
                    if inputs.get(*r).is_none() {
                        bad(&at, f("inputs"), format!("{action} needs the input {r}"));
                    }
                }
                if action == "aws:runCommand" && inputs.get("InstanceIds").is_none() && inputs.get("Targets").is_none() {
                    bad(&at, f("inputs"), "aws:runCommand needs InstanceIds or Targets".into());
                }
            }
        }
        let mut refs = Vec::new();
        references(&inputs, &mut refs);
        for r in refs {
            if let Some(m) = check_ref(&r, &outputs) {
                bad(&at, f("inputs"), m);
            }
        }
        for key in ["onFailure", "onCancel"] {
            if let Some(v) = step.get(key).and_then(Value::as_str) {
                match v.strip_prefix("step:") {
                    Some(target) if !all.contains(target) => bad(&at, f(key), format!("{key} goes to step {target}, which does not exist")),
                    Some(target) if key == "onCancel" && NOT_CANCEL_TARGETS.contains(&action_of(target)) => {
                        bad(&at, f(key), format!("onCancel goes to step {target}, but a {} step cannot run on the cancel path", action_of(target)))
                    }
                    Some(_) => {}
                    None if v == "Abort" => {}
                    None if v == "Continue" && key == "onFailure" => {}
                    None if key == "onCancel" => bad(&at, f(key), format!("onCancel `{v}` is not Abort or step:<name>")),
                    None => bad(&at, f(key), format!("{key} `{v}` is not Abort, Continue or step:<name>")),
                }
            }
        }
        // The step's own bound must outlast the command's, or the step gives up on a command
        // that may still succeed.
        if action == "aws:runCommand"
            && let (Some(step_secs), Some(command_secs)) =
                (seconds(step.get("timeoutSeconds")), seconds(inputs.get("Parameters").and_then(|p| p.get("executionTimeout"))))
            && step_secs <= command_secs
        {
            bad(
                &at,
                f("timeoutSeconds"),
                format!("timeoutSeconds {step_secs} is not larger than the command's executionTimeout {command_secs}: the step would time out first"),
            );
        }
        // A block device mapping that names a key must ask for encryption too: "If KmsKeyId is
        // specified, the encrypted state must be true" (EbsBlockDevice, EC2 API Reference), or
        // the launch fails once the instance is asked for, an hour into nothing.
        for (j, m) in inputs.get("BlockDeviceMappings").and_then(Value::as_sequence).into_iter().flatten().enumerate() {
            if let Some(ebs) = m.get("Ebs")
                && ebs.get("KmsKeyId").is_some()
                && ebs.get("Encrypted").and_then(Value::as_bool) != Some(true)
            {
                bad(&at, f(&format!("inputs.BlockDeviceMappings[{j}].Ebs")), "KmsKeyId is set but Encrypted is not true (EC2 requires both)".into());
            }
        }
        if let Some(next) = step.get("nextStep").and_then(Value::as_str)
            && !all.contains(next)
        {
            bad(&at, f("nextStep"), format!("nextStep {next} does not exist"));
        }
        let mut offered: BTreeSet<String> = builtin_outputs(action).iter().map(|s| s.to_string()).collect();
        for o in step.get("outputs").and_then(Value::as_sequence).into_iter().flatten() {
            match o.get("Name").and_then(Value::as_str) {
                Some(n) => {
                    offered.insert(n.to_string());
                    if o.get("Selector").is_none() && action == "aws:executeAwsApi" {
                        bad(&at, f("outputs"), format!("output {n} has no Selector"));
                    }
                }
                None => bad(&at, f("outputs"), "an output has no Name".into()),
            }
        }
        outputs.insert(name.clone(), offered);
    }
    let last_is_end = steps.last().is_some_and(|s| s.get("isEnd").and_then(Value::as_bool) == Some(true) || s.get("nextStep").is_none());
    if !last_is_end {
        bad("mainSteps", "mainSteps".into(), "the last step neither ends the document (isEnd) nor is last without a nextStep".into());
    }
    for o in doc.get("outputs").and_then(Value::as_sequence).into_iter().flatten() {
        let text = o.as_str().unwrap_or_default();
        let ok = text.split_once('.').is_some_and(|(s, out)| outputs.get(s).is_some_and(|set| set.contains(out)));
        if !ok {
            bad("outputs", "outputs".into(), format!("document output `{text}` is not an output of any step"));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
schemaVersion: '0.3'
assumeRole: '{{ Role }}'
parameters:
  Role: {type: String}
  Ami: {type: String}
mainSteps:
  - name: launch
    action: aws:runInstances
    onFailure: Abort
    inputs: {ImageId: '{{ Ami }}'}
    outputs: [{Name: InstanceId, Selector: '$.InstanceIds[0]', Type: String}]
  - name: image
    action: aws:createImage
    onFailure: step:stop
    onCancel: step:stop
    inputs: {InstanceId: '{{ launch.InstanceId }}', ImageName: 'x-{{ global:DATE_TIME }}'}
  - name: stop
    action: aws:changeInstanceState
    isEnd: true
    inputs: {InstanceIds: ['{{ launch.InstanceId }}'], DesiredState: terminated}
outputs: [image.ImageId]
"#;

    #[test]
    fn a_sound_document_has_no_findings() {
        assert_eq!(check(GOOD), Vec::<Finding>::new());
    }

    fn findings(edit: (&str, &str)) -> Vec<String> {
        let doc = GOOD.replacen(edit.0, edit.1, 1);
        assert_ne!(doc, GOOD, "the edit {edit:?} must apply");
        check(&doc).into_iter().map(|f| format!("{}: {}", f.at, f.message)).collect()
    }

    #[test]
    fn a_key_without_encryption_is_named() {
        let with = |ebs: &str| {
            GOOD.replacen(
                "inputs: {ImageId: '{{ Ami }}'}",
                &format!("inputs: {{ImageId: '{{{{ Ami }}}}', BlockDeviceMappings: [{{DeviceName: /dev/xvda, Ebs: {ebs}}}]}}"),
                1,
            )
        };
        assert_eq!(check(&with("{Encrypted: true, KmsKeyId: alias/fleet}")), Vec::<Finding>::new());
        let f = check(&with("{KmsKeyId: alias/fleet}"));
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].field, "mainSteps[0].inputs.BlockDeviceMappings[0].Ebs");
        assert!(f[0].message.contains("Encrypted is not true"), "{f:?}");
    }

    #[test]
    fn findings_carry_the_line_of_the_field() {
        let doc = GOOD.replacen("onFailure: step:stop", "onFailure: step:halt", 1);
        let f = &check(&doc)[0];
        assert_eq!(f.field, "mainSteps[1].onFailure");
        let line = doc.lines().position(|l| l.contains("step:halt")).unwrap() + 1;
        assert_eq!(f.line, Some(line));
    }

    #[test]
    fn each_kind_of_mistake_is_named() {
        let cases = [
            (("'{{ Ami }}'", "'{{ Amy }}'"), "step launch: `{{ Amy }}` is not a parameter of the document"),
            (
                ("'{{ launch.InstanceId }}', ImageName", "'{{ launch.Instance }}', ImageName"),
                "step image: `{{ launch.Instance }}`: step launch has no output Instance",
            ),
            (
                ("ImageId: '{{ Ami }}'", "ImageId: '{{ image.ImageId }}'"),
                "step launch: `{{ image.ImageId }}` names step image, which has not run yet at this point",
            ),
            (("onFailure: step:stop", "onFailure: step:halt"), "step image: onFailure goes to step halt, which does not exist"),
            (("onCancel: step:stop", "onCancel: Retry"), "step image: onCancel `Retry` is not Abort or step:<name>"),
            // onCancel has no Continue, and some actions cannot run on the cancel path
            // (Automation actions reference, "Properties shared by all actions", onCancel).
            (("onCancel: step:stop", "onCancel: Continue"), "step image: onCancel `Continue` is not Abort or step:<name>"),
            (("onCancel: step:stop", "onCancel: step:launch"), "step image: onCancel goes to step launch, but a aws:runInstances step cannot run"),
            // Only the documented variables ("Automation system variables").
            (("{{ global:DATE_TIME }}", "{{ global:EXECUTION_ID }}"), "step image: `{{ global:EXECUTION_ID }}` is not a global variable"),
            (("{{ global:DATE_TIME }}", "{{ global:AWS_REGION }}"), "step image: `{{ global:AWS_REGION }}` is not a global variable"),
            (("{{ global:DATE_TIME }}", "{{ automation:EXECUTIONID }}"), "step image: `{{ automation:EXECUTIONID }}` is not an automation variable"),
            (("ImageName: 'x-{{ global:DATE_TIME }}'", "Name: x"), "step image: aws:createImage needs the input ImageName"),
            (("{{ global:DATE_TIME }}", "{{ global:NOW }}"), "step image: `{{ global:NOW }}` is not a global variable"),
            (("outputs: [image.ImageId]", "outputs: [image.AmiId]"), "outputs: document output `image.AmiId` is not an output of any step"),
            (("action: aws:changeInstanceState", "action: aws:changeInstanceStat"), "step stop: unknown action `aws:changeInstanceStat`"),
            (("name: stop", "name: image"), "step image: the name is used by an earlier step too"),
            (("schemaVersion: '0.3'", "schemaVersion: '2.2'"), "schemaVersion: Automation documents need schemaVersion '0.3'"),
            (("assumeRole: '{{ Role }}'", "assumeRole: '{{ Rolle }}'"), "assumeRole: `{{ Rolle }}` is not a parameter of the document"),
        ];
        for (edit, expected) in cases {
            let got = findings(edit);
            assert!(got.iter().any(|g| g.starts_with(expected)), "{edit:?}: expected {expected:?} in {got:?}");
        }
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    const DOC: &str = r#"
schemaVersion: '0.3'
mainSteps:
  - {name: a, action: aws:sleep, timeoutSeconds: 100, maxAttempts: 3, nextStep: c, inputs: {}}
  - {name: b, action: aws:sleep, timeoutSeconds: 7000, inputs: {}}
  - {name: c, action: aws:runCommand, timeoutSeconds: '50', inputs: {DocumentName: X, InstanceIds: [i], Parameters: {executionTimeout: '40'}}}
  - {name: d, action: aws:sleep, timeoutSeconds: 5, isEnd: true, inputs: {}}
  - {name: e, action: aws:sleep, timeoutSeconds: 9999, isEnd: true, inputs: {}}
"#;

    #[test]
    fn the_success_budget_follows_next_step_and_counts_every_attempt() {
        // a (3 x 100) -> c (50, skipping b) -> d (5, isEnd); e is off the path.
        assert_eq!(success_budget(DOC), Ok(355));
        let loops = DOC.replace("isEnd: true, inputs: {}}\n  - {name: e", "nextStep: a, inputs: {}}\n  - {name: e");
        assert!(success_budget(&loops).is_err());
        assert!(success_budget(&DOC.replace("timeoutSeconds: 5,", "")).unwrap_err().contains("step d has no timeoutSeconds"));
    }

    #[test]
    fn a_run_command_step_must_outlast_its_command() {
        assert!(check(DOC).iter().all(|f| !f.message.contains("executionTimeout")), "{:?}", check(DOC));
        let f = check(&DOC.replace("executionTimeout: '40'", "executionTimeout: '50'"));
        assert!(f.iter().any(|f| f.at == "step c" && f.message.contains("not larger than the command's executionTimeout 50")), "{f:?}");
    }
}
