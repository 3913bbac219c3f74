//! `imgbuild logs`: diagnostics without SSH (`backup::diagnose`). Each part is read on its own: a
//! part that cannot be read (no running instance, no permission) is reported as such and the
//! others still come. Everything shown or written passes the redaction first.

use serde_json::json;

use super::*;
use crate::backup::runcommand;
use crate::backup::{diagnose, follow};
use crate::cli::LogsArgs;
use crate::config::Context;
use crate::error::{Error, Result};
use crate::ui::Ui;

pub(super) fn logs(args: LogsArgs, ctx: &Context, ui: Ui) -> Result<()> {
    let config = ctx.config.clone();
    if args.follow {
        // Like run_flow, but the output is the stream itself: no document at the end.
        return block_on(async {
            let interrupt: Interrupt = Box::pin(interrupt_listener()?);
            let conf = aws::load(&aws_settings(ctx)).await?;
            follow_flow(&Clients::from_conf(&conf), &config, &args, ui, interrupt, &mut std::io::stdout()).await
        })
        .map(|_| ());
    }
    let doc = with_clients(ctx, |clients| async move { logs_flow(&clients, &config, &args, ui).await })?;
    if ui.json() {
        ui.emit_json(&doc);
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(text_report(&doc).as_bytes()).map_err(|e| Error::io("writing", "stdout", e))?;
    }
    Ok(())
}

/// Collects every part and writes the bundle when asked; returns the redacted report.
pub async fn logs_flow(clients: &Clients, config: &Config, args: &LogsArgs, ui: Ui) -> Result<serde_json::Value> {
    check_instance_arg(args)?;
    let stack = config.stack_name().to_string();
    let mut notes: Vec<String> = Vec::new();

    let mut instance_doc = json!(null);
    let instance = match &args.instance {
        Some(i) => Some(i.clone()),
        None => match diagnose::stack_instances(clients, &stack).await {
            Ok(ids) => {
                if ids.len() > 1 {
                    notes.push(format!("stack {stack} has {} running instances ({}); collected from the newest", ids.len(), ids.join(", ")));
                }
                ids.into_iter().next()
            }
            Err(e) => {
                notes.push(format!("instance: {e}"));
                None
            }
        },
    };
    if let Some(id) = &instance {
        ui.info(format!("collecting from {id} through SSM Run Command (AWS-RunShellScript)"));
        let token = run_token();
        let poll = Duration::from_secs(config.aws.poll_interval_secs);
        let commands = diagnose::diagnose_commands(config, &token, args.lines);
        match runcommand::run(clients, id, commands, &format!("imgbuild logs {token}"), Duration::from_secs(args.timeout), poll).await {
            Ok(inv) => {
                let (sections, complete) = diagnose::sections(&inv.stdout, &token);
                if !complete {
                    notes.push("the instance's output was cut short (Run Command returns at most 24,000 characters): pass a smaller --lines".into());
                }
                let sections: serde_json::Map<String, serde_json::Value> =
                    sections.into_iter().map(|(k, v)| (k, serde_json::Value::String(diagnose::redact(&v)))).collect();
                instance_doc = json!({ "instance": id, "command_id": inv.command_id, "complete": complete, "sections": sections });
            }
            Err(e) => notes.push(format!("instance {id}: {}", diagnose::redact(&e.to_string()))),
        }
    }

    let stack_failure = match diagnose::first_failed_event(clients, &stack, 5).await {
        Ok(f) => f.map(|f| FailedRedacted::event(&f)),
        Err(e) => {
            notes.push(format!("stack events: {e}"));
            None
        }
    };
    let bake_failure = match diagnose::failed_bake(clients, &crate::bake::document_name(config)).await {
        Ok(b) => b.map(|b| FailedRedacted::bake(&b)),
        Err(e) => {
            notes.push(format!("bake executions: {e}"));
            None
        }
    };
    let mut doc = json!({
        "ok": true,
        "stack": stack,
        "instance": instance_doc,
        "stack_failure": stack_failure,
        "bake_failure": bake_failure,
        "notes": notes,
        "bundle": null,
    });
    if let Some(dir) = &args.out {
        doc["bundle"] = json!(dir.display().to_string());
        write_bundle(dir, &doc)?;
        ui.info(format!("bundle written to {} (credentials and tokens masked; read it before you share it)", dir.display()));
    }
    Ok(doc)
}

fn check_instance_arg(args: &LogsArgs) -> Result<()> {
    if let Some(id) = &args.instance {
        let hex = id.strip_prefix("i-").unwrap_or_default();
        if !(matches!(hex.len(), 8 | 17) && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))) {
            return Err(Error::Invalid(format!("--instance: `{id}` is not an EC2 instance id (i- and 8 or 17 hex digits)")));
        }
    }
    Ok(())
}

/// `logs --follow`: Chroma's container log on the stack's newest running instance (or
/// `--instance`), new lines as they come, redacted like the bundle, on `out`: as text, or one
/// JSON object a line (NDJSON) with `--output json`. Ends at Ctrl-C (`interrupt`), `--for`, or a
/// closed output; a poll in flight is cancelled. What is not the log goes to stderr.
pub async fn follow_flow(
    clients: &Clients,
    config: &Config,
    args: &LogsArgs,
    ui: Ui,
    interrupt: impl Future<Output = ()>,
    out: &mut dyn Write,
) -> Result<follow::Ended> {
    check_instance_arg(args)?;
    let instance = match &args.instance {
        Some(i) => i.clone(),
        None => diagnose::stack_instances(clients, config.stack_name()).await?.into_iter().next().expect("stack_instances returns at least one"),
    };
    let opts = follow::Options {
        interval: Duration::from_secs(args.interval),
        until: args.duration,
        tail: args.lines,
        command_timeout: Duration::from_secs(args.timeout),
        invocation_poll: Duration::from_secs(1),
    };
    ui.info(format!(
        "following Chroma's container log on {instance} through SSM Run Command, a poll every {}s; {} stops",
        args.interval,
        match args.duration {
            Some(d) => format!("Ctrl-C or the end of {}s", d.as_secs()),
            None => "Ctrl-C".into(),
        }
    ));
    let json = ui.json();
    let write = |out: &mut dyn Write, text: String| {
        let r = out.write_all(text.as_bytes()).and_then(|_| out.flush());
        let ok = r.is_ok();
        crate::ui::note_write(r);
        ok
    };
    let ended = follow::follow(clients, &instance, &opts, interrupt, |event| match event {
        follow::Event::Lines(lines) => {
            let mut text = String::new();
            for l in lines {
                let line = diagnose::redact(&l.line);
                if json {
                    text.push_str(&json!({ "instance": instance, "time": l.time, "line": line }).to_string());
                } else if l.time.is_empty() {
                    text.push_str(&line);
                } else {
                    text.push_str(&format!("{} {line}", l.time));
                }
                text.push('\n');
            }
            write(out, text)
        }
        follow::Event::PollFailed { attempt, error, retry_in } => {
            let error = diagnose::redact(&error);
            ui.warn(format!("poll {attempt} of at most {} in a row failed, retrying in {}s: {error}", follow::MAX_FAILED_POLLS, retry_in.as_secs()));
            !json || write(out, json!({ "instance": instance, "error": error, "attempt": attempt, "retry_in_secs": retry_in.as_secs() }).to_string() + "\n")
        }
    })
    .await?;
    if let Some(id) = &ended.cancelled {
        match &ended.cancel_error {
            None => ui.info(format!("cancelled the poll in flight (Run Command {id})")),
            Some(e) => ui.warn(format!("could not cancel Run Command {id}; it ends at its own timeout ({}s): {e}", args.timeout)),
        }
    }
    ui.info(format!("stopped following ({})", ended.reason));
    Ok(ended)
}

struct FailedRedacted;

impl FailedRedacted {
    fn event(f: &diagnose::FailedEvent) -> serde_json::Value {
        json!({ "logical_id": f.logical_id, "resource_type": f.resource_type, "status": f.status, "reason": diagnose::redact(&f.reason), "time": f.time })
    }

    fn bake(b: &diagnose::FailedBake) -> serde_json::Value {
        json!({
            "execution": b.execution, "status": b.status, "step": b.step, "action": b.action,
            "failure": diagnose::redact(&b.failure), "output": diagnose::redact(&b.output),
        })
    }
}

/// The report as text: each section under its name, then the stack's and the bake's failure.
fn text_report(doc: &serde_json::Value) -> String {
    let mut s = String::new();
    if let Some(id) = doc["instance"]["instance"].as_str() {
        s.push_str(&format!("## instance {id} (Run Command {})\n", doc["instance"]["command_id"].as_str().unwrap_or("?")));
        if let Some(sections) = doc["instance"]["sections"].as_object() {
            for (name, text) in sections {
                s.push_str(&format!("\n### {name}\n{}", text.as_str().unwrap_or_default()));
            }
        }
    }
    s.push_str("\n## first failing stack event\n");
    match doc["stack_failure"].as_object() {
        Some(f) => s.push_str(&format!(
            "{} {} ({}) at {}: {}\n",
            f["status"].as_str().unwrap_or_default(),
            f["logical_id"].as_str().unwrap_or_default(),
            f["resource_type"].as_str().unwrap_or_default(),
            f["time"].as_str().unwrap_or_default(),
            f["reason"].as_str().unwrap_or_default()
        )),
        None => s.push_str("none in the latest operation\n"),
    }
    s.push_str("\n## failed bake\n");
    match doc["bake_failure"].as_object() {
        Some(b) => s.push_str(&format!(
            "execution {} {}: step {} ({}): {}\n{}\n",
            b["execution"].as_str().unwrap_or_default(),
            b["status"].as_str().unwrap_or_default(),
            b["step"].as_str().unwrap_or_default(),
            b["action"].as_str().unwrap_or_default(),
            b["failure"].as_str().unwrap_or_default(),
            b["output"].as_str().unwrap_or_default()
        )),
        None => s.push_str("the latest bake did not fail (or there was none)\n"),
    }
    if let Some(notes) = doc["notes"].as_array().filter(|n| !n.is_empty()) {
        s.push_str("\n## could not read\n");
        for n in notes {
            s.push_str(&format!("- {}\n", n.as_str().unwrap_or_default()));
        }
    }
    s
}

/// The bundle: the report as text and as JSON, in a directory only its owner can read (logs
/// name hosts, paths and collection ids even with credentials masked).
fn write_bundle(dir: &Path, doc: &serde_json::Value) -> Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| Error::io("creating", dir, e))?;
    let json = serde_json::to_string_pretty(doc).map_err(|e| Error::Tool(format!("could not encode the report: {e}")))?;
    for (name, content) in [("logs.txt", text_report(doc)), ("logs.json", json + "\n")] {
        let path = dir.join(name);
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&path).map_err(|e| Error::io("writing", &path, e))?;
        // Masked once more as a whole: nothing unmasked reaches the disk.
        f.write_all(diagnose::redact(&content).as_bytes()).map_err(|e| Error::io("writing", &path, e))?;
    }
    Ok(())
}
