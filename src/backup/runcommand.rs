//! SSM Run Command on the Chroma instance (AWS-RunShellScript): send, then poll the invocation
//! until it ends, bounded. No SSH: the instance's role already has AmazonSSMManagedInstanceCore.

use std::time::{Duration, Instant};

use crate::aws::{self, Clients};
use crate::error::{Error, Result};

/// One finished invocation's output.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub command_id: String,
    pub stdout: String,
}

/// Runs `commands` with AWS-RunShellScript on `instance` and waits for the end, at most
/// `timeout` plus a minute for delivery. A status other than Success is an error carrying the
/// script's own stderr, so the reason the instance gave reaches the user.
pub async fn run(clients: &Clients, instance: &str, commands: Vec<String>, comment: &str, timeout: Duration, poll: Duration) -> Result<Invocation> {
    let command_id = send(clients, instance, commands, comment, timeout).await?;
    wait(clients, instance, &command_id, timeout, poll).await
}

/// Sends `commands` and returns the command's id at once, so a caller can cancel it.
pub async fn send(clients: &Clients, instance: &str, commands: Vec<String>, comment: &str, timeout: Duration) -> Result<String> {
    let secs = timeout.as_secs().max(30);
    let sent = clients
        .ssm
        .send_command()
        .instance_ids(instance)
        .document_name("AWS-RunShellScript")
        .parameters("commands", commands)
        .parameters("executionTimeout", vec![secs.to_string()])
        .timeout_seconds(i32::try_from(secs.min(2_592_000)).unwrap_or(3600))
        .comment(comment.chars().take(100).collect::<String>())
        .send()
        .await
        .map_err(|e| aws::err("SendCommand", instance.to_string(), e))?;
    Ok(sent.command().and_then(|c| c.command_id()).ok_or_else(|| Error::Tool("SendCommand answered without a CommandId".into()))?.to_string())
}

/// Polls a sent command's invocation until it ends, at most `timeout` plus a minute for delivery.
pub async fn wait(clients: &Clients, instance: &str, command_id: &str, timeout: Duration, poll: Duration) -> Result<Invocation> {
    let command_id = command_id.to_string();
    let secs = timeout.as_secs().max(30);
    let deadline = Duration::from_secs(secs + 60);
    let started = Instant::now();
    loop {
        match clients.ssm.get_command_invocation().command_id(&command_id).instance_id(instance).send().await {
            Ok(out) => {
                let status = out.status().map(|s| s.as_str().to_string()).unwrap_or_default();
                match status.as_str() {
                    "Success" => return Ok(Invocation { command_id, stdout: out.standard_output_content().unwrap_or_default().to_string() }),
                    "Pending" | "InProgress" | "Delayed" | "" => {}
                    _ => {
                        let stderr = out.standard_error_content().unwrap_or_default().trim().to_string();
                        let stdout = out.standard_output_content().unwrap_or_default().trim().to_string();
                        return Err(Error::Tool(format!(
                            "Run Command {command_id} on {instance} ended {status} (exit {}): {}",
                            out.response_code(),
                            if stderr.is_empty() { stdout } else { stderr }
                        )));
                    }
                }
            }
            // Right after SendCommand the invocation may not be registered yet.
            Err(e) if aws::code(&e) == Some("InvocationDoesNotExist") => {}
            Err(e) => return Err(aws::err("GetCommandInvocation", format!("{command_id} on {instance}"), e)),
        }
        if started.elapsed() + poll > deadline {
            return Err(Error::Timeout {
                what: format!("Run Command {command_id} on {instance}"),
                secs: deadline.as_secs(),
                hint: "see its output with `aws ssm get-command-invocation`".into(),
            });
        }
        tokio::time::sleep(poll).await;
    }
}

/// Cancels a command still running on the instance (CancelCommand): nothing imgbuild started may
/// outlive it. AWS does not promise the command stops; the request is what can be made.
pub async fn cancel(clients: &Clients, instance: &str, command_id: &str) -> Result<()> {
    clients
        .ssm
        .cancel_command()
        .command_id(command_id)
        .instance_ids(instance)
        .send()
        .await
        .map_err(|e| aws::err("CancelCommand", format!("{command_id} on {instance}"), e))?;
    Ok(())
}
