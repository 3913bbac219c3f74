//! `imgbuild doctor`: what a deploy and a bake need from this machine and account, checked
//! read-only, each problem with what to do about it.

use aws_credential_types::provider::ProvideCredentials;
use serde::Serialize;
use serde_json::json;

use crate::aws::{self, Clients};
use crate::bake::images;
use crate::config::Context;
use crate::error::{Error, Result};
use crate::ui::Ui;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do, when it is not ok.
    pub fix: Option<String>,
}

fn ok(check: &'static str, detail: impl Into<String>) -> Finding {
    Finding { check, verdict: Verdict::Ok, detail: detail.into(), fix: None }
}

fn problem(check: &'static str, verdict: Verdict, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding { check, verdict, detail: detail.into(), fix: Some(fix.into()) }
}

/// What went wrong loading credentials, in the user's terms: the SDK's own wording ("the
/// credential provider was not enabled") names its internals, not what is missing.
fn credentials_problem(e: &aws_credential_types::provider::error::CredentialsError) -> String {
    use aws_credential_types::provider::error::CredentialsError;
    match e {
        CredentialsError::CredentialsNotLoaded(_) => {
            "no AWS credentials found: none in the environment (AWS_ACCESS_KEY_ID), the shared files (~/.aws/credentials, ~/.aws/config), \
             an SSO session, or a container or instance role"
                .into()
        }
        CredentialsError::ProviderTimedOut(_) => "loading AWS credentials timed out (an SSO, container or instance-role endpoint did not answer)".into(),
        CredentialsError::InvalidConfiguration(_) => {
            format!("the AWS profile's credential settings are invalid: {}", aws_smithy_types::error::display::DisplayErrorContext(e))
        }
        _ => format!("could not load AWS credentials: {}", aws_smithy_types::error::display::DisplayErrorContext(e)),
    }
}

fn subnet_missing(subnet: &str) -> Finding {
    problem(
        "build subnet",
        Verdict::Fail,
        format!("{subnet} does not exist here"),
        "fix bake.subnet_id, or remove the four bake.* prerequisites so bake makes them",
    )
}

/// The checks, in order. Later checks need earlier ones (no credentials: no account).
pub async fn checks(conf: &aws_config::SdkConfig, clients: &Clients, ctx: &Context, sts: &aws_sdk_sts::Client) -> Vec<Finding> {
    let mut out = Vec::new();
    let config = &ctx.config;
    match conf.region() {
        Some(r) => out.push(ok("region", r.to_string())),
        None => {
            out.push(problem("region", Verdict::Fail, "no region", "pass --region, set `region:` in imgbuild.yaml, or set AWS_REGION"));
            return out;
        }
    }
    match conf.credentials_provider() {
        None => {
            out.push(problem("credentials", Verdict::Fail, "no credentials provider", "run `aws configure`, `aws sso login`, or set AWS_PROFILE"));
            return out;
        }
        Some(p) => match p.provide_credentials().await {
            // The key id is public; the secret never leaves the provider.
            Ok(c) => out.push(ok("credentials", format!("found (access key {}...)", &c.access_key_id()[..c.access_key_id().len().min(4)]))),
            Err(e) => {
                out.push(problem(
                    "credentials",
                    Verdict::Fail,
                    credentials_problem(&e),
                    "run `aws configure`, `aws sso login --profile <name>`, or set AWS_PROFILE",
                ));
                return out;
            }
        },
    }
    match sts.get_caller_identity().send().await {
        Ok(id) => out.push(ok("account", format!("{} as {}", id.account().unwrap_or("?"), id.arn().unwrap_or("?")))),
        Err(e) => {
            let e = aws::err("GetCallerIdentity", "the caller", e);
            out.push(problem("account", Verdict::Fail, e.to_string(), "the credentials are not accepted: refresh them (`aws sso login`) or check the clock"));
            return out;
        }
    }

    let arch = images::arch_of(&config.stack.instance_type);
    let parameter = images::base_parameter(arch);
    match images::get_parameter(clients, parameter).await {
        Ok(Some(ami)) => out.push(ok("AL2023 image", format!("{parameter} = {ami}"))),
        Ok(None) => out.push(problem(
            "AL2023 image",
            Verdict::Fail,
            format!("{parameter} does not exist here"),
            "use a region with Amazon Linux 2023, or pin bake.base_ami and deploy --ami",
        )),
        Err(e) => out.push(problem("AL2023 image", Verdict::Fail, e.to_string(), "allow ssm:GetParameter on /aws/service/ami-amazon-linux-latest/*")),
    }
    match images::get_parameter(clients, &images::handoff_parameter(config)).await {
        Ok(Some(ami)) => out.push(ok("baked image", format!("{ami} (deploy boots it)"))),
        Ok(None) => out.push(problem(
            "baked image",
            Verdict::Warn,
            "none handed over yet",
            "`imgbuild bake` for fast identical boots; without it deploy boots stock AL2023 with the full bootstrap",
        )),
        Err(e) => out.push(problem("baked image", Verdict::Warn, e.to_string(), "allow ssm:GetParameter on /imgbuild/*")),
    }

    // Where the build instance runs.
    match &config.bake.subnet_id {
        Some(subnet) => match clients.ec2.describe_subnets().subnet_ids(subnet).send().await {
            Ok(s) if !s.subnets().is_empty() => out.push(ok("build subnet", format!("{subnet} (bake.subnet_id)"))),
            // EC2 answers an unknown id with this code (EC2 API reference, "Error codes").
            Ok(_) => out.push(subnet_missing(subnet)),
            Err(e) if e.as_service_error().and_then(aws::code) == Some("InvalidSubnetID.NotFound") => out.push(subnet_missing(subnet)),
            // Anything else (no permission, throttling) says nothing about the subnet.
            Err(e) => out.push(problem(
                "build subnet",
                Verdict::Warn,
                format!("could not check {subnet}: {}", aws::err("DescribeSubnets", format!("subnet {subnet}"), e)),
                "allow ec2:DescribeSubnets, then run doctor again",
            )),
        },
        None => out.push(ok("build subnet", format!("bake makes its own (stack {}-bake) when first needed", config.name))),
    }

    // Quotas a deploy needs: a VPC, and an Elastic IP per NAT gateway.
    let nats = match config.stack.nat_gateways {
        crate::config::NatGateways::One => 1,
        crate::config::NatGateways::PerAz => 2,
    };
    let vpcs = clients.ec2.describe_vpcs().send().await.map(|v| v.vpcs().len());
    let eips = clients.ec2.describe_addresses().send().await.map(|a| a.addresses().len());
    match vpcs {
        // 5 VPCs per region is the default quota (L-F678F1CE); the stack adds one (bake's, two).
        Ok(n) if n + 2 > 5 => out.push(problem(
            "VPC quota",
            Verdict::Warn,
            format!("{n} VPCs in this region; the default quota is 5 and deploy (and bake's prerequisites) add one each"),
            "request more VPCs in Service Quotas (Amazon VPC, L-F678F1CE) or remove unused ones",
        )),
        Ok(n) => out.push(ok("VPC quota", format!("{n} VPCs in use, room for the stack's"))),
        Err(e) => out.push(problem("VPC quota", Verdict::Warn, aws::err("DescribeVpcs", "this region", e).to_string(), "allow ec2:DescribeVpcs")),
    }
    match eips {
        // 5 Elastic IPs per region is the default quota (L-0263D0A3); each NAT gateway takes one.
        Ok(n) if n + nats > 5 => out.push(problem(
            "Elastic IP quota",
            Verdict::Warn,
            format!("{n} Elastic IPs in use; the stack needs {nats} more, the default quota is 5"),
            "request more in Service Quotas (Amazon EC2, L-0263D0A3), release unused addresses, or use stack.nat_gateways: one",
        )),
        Ok(n) => out.push(ok("Elastic IP quota", format!("{n} in use, the stack needs {nats}"))),
        Err(e) => {
            out.push(problem("Elastic IP quota", Verdict::Warn, aws::err("DescribeAddresses", "this region", e).to_string(), "allow ec2:DescribeAddresses"))
        }
    }
    match crate::stack::describe(&clients.cfn, config.stack_name()).await {
        Ok(Some(s)) => {
            let status = crate::stack::status_of(&s);
            match crate::stack::phase(&status) {
                crate::stack::Phase::Failed => out.push(problem(
                    "stack",
                    Verdict::Warn,
                    format!("{} is {status}", config.stack_name()),
                    "see `imgbuild status`; a *_FAILED stack needs fixing in the CloudFormation console before deploy",
                )),
                _ => out.push(ok("stack", format!("{} is {status}", config.stack_name()))),
            }
        }
        Ok(None) => out.push(ok("stack", format!("{} is not deployed yet", config.stack_name()))),
        Err(e) => out.push(problem("stack", Verdict::Fail, e.to_string(), "allow cloudformation:DescribeStacks")),
    }
    out
}

pub fn run(ctx: &Context, ui: Ui) -> Result<()> {
    let findings = super::block_on(async {
        let conf = match aws::load(&super::aws_settings(ctx)).await {
            Ok(c) => c,
            Err(Error::Invalid(m)) => {
                return Ok(vec![problem("region", Verdict::Fail, m, "pass --region, set `region:` in imgbuild.yaml, or set AWS_REGION")]);
            }
            Err(e) => return Err(e),
        };
        let clients = Clients::from_conf(&conf);
        let sts = aws_sdk_sts::Client::new(&conf);
        Ok(checks(&conf, &clients, ctx, &sts).await)
    })?;
    let failed = findings.iter().filter(|f| f.verdict == Verdict::Fail).count();
    let result = if failed == 0 { Ok(()) } else { Err(Error::Tool(format!("doctor found {failed} problem(s) that stop a deploy; each says what to do"))) };
    if ui.json() {
        let mut doc = json!({ "ok": failed == 0, "checks": findings });
        if let Err(e) = &result {
            doc["error"] = crate::ui::error_json(e);
        }
        ui.emit_json(&doc);
    } else {
        for f in &findings {
            let mark = match f.verdict {
                Verdict::Ok => "ok  ",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
            };
            ui.info(format!("{mark} {:<17} {}", f.check, f.detail));
            if let Some(fix) = &f.fix {
                ui.info(format!("     {:<17} -> {fix}", ""));
            }
        }
    }
    result
}
