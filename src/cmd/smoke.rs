//! `imgbuild smoke`: the acceptance test over HTTP (`--url`, no AWS) or API Gateway test-invoke.

use std::time::Duration;

use serde_json::json;

use super::*;
use crate::cli::SmokeArgs;
use crate::config::Context;
use crate::error::{Error, Result};
use crate::smoke;
use crate::ui::Ui;

pub(super) fn smoke_cmd(args: SmokeArgs, ctx: &Context, ui: Ui) -> Result<()> {
    let profile = profile_of(&ctx.config)?;
    let report = match &args.url {
        // A URL needs no AWS: the config is not loaded at all.
        Some(url) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::Invalid(format!("--url: `{url}` is not an http:// or https:// URL")));
            }
            // api.auth: iam: API Gateway refuses unsigned requests (403), so these are signed
            // with the same credentials chain as every other command.
            let signer = if ctx.config.api.auth == crate::config::ApiAuth::Iam { Some(block_on(signer(ctx))?) } else { None };
            smoke::over_http_signed(url, profile, Duration::from_secs(args.timeout), &run_token(), signer)
        }
        None => {
            let name = ctx.config.stack_name().to_string();
            with_clients(ctx, |clients| async move {
                let st = crate::stack::describe(&clients.cfn, &name)
                    .await?
                    .ok_or_else(|| Error::Invalid(format!("stack {name} is not deployed; deploy it, or pass --url")))?;
                let outputs = crate::stack::outputs_of(&st);
                let api = outputs.get("ApiId").ok_or_else(|| Error::Invalid(format!("stack {name} has no ApiId output: is it an imgbuild stack?")))?;
                smoke::through_api_gateway(&clients, api, profile).await
            })?
        }
    };
    print_smoke(ui, &report);
    let result = if report.ok() {
        Ok(())
    } else {
        let failed: Vec<_> = report.steps.iter().filter(|s| !s.ok).map(|s| format!("{}: {}", s.name, s.detail)).collect();
        Err(Error::SmokeFailed(format!("smoke test against {} failed: {}", report.target, failed.join("; "))))
    };
    if ui.json() {
        let mut doc = json!({ "ok": report.ok(), "smoke": report });
        if let Err(e) = &result {
            doc["error"] = crate::ui::error_json(e);
        }
        ui.emit_json(&doc);
    }
    result
}

fn print_smoke(ui: Ui, report: &smoke::Report) {
    ui.info(format!("smoke test against {}", report.target));
    for s in &report.steps {
        ui.info(format!(
            "  {} {:<18} {:>8.1} ms  {}{}",
            if s.ok { "ok  " } else { "FAIL" },
            s.name,
            s.millis,
            s.status.map(|c| format!("HTTP {c}  ")).unwrap_or_default(),
            s.detail
        ));
    }
}

async fn signer(ctx: &Context) -> Result<smoke::Signer> {
    use aws_credential_types::provider::ProvideCredentials;
    let conf = crate::aws::load(&aws_settings(ctx)).await?;
    let provider =
        conf.credentials_provider().ok_or_else(|| Error::Invalid("api.auth: iam: smoke signs its requests, and no AWS credentials are configured".into()))?;
    let credentials = provider
        .provide_credentials()
        .await
        .map_err(|e| Error::Invalid(format!("api.auth: iam: smoke signs its requests, and the AWS credentials could not be loaded: {e}")))?;
    let region =
        conf.region().map(|r| r.to_string()).ok_or_else(|| Error::Invalid("api.auth: iam: signing needs the API's region: set region: or --region".into()))?;
    Ok(smoke::Signer { credentials, region })
}
