//! The commands: one file per subcommand, each turning its arguments (from `cli`) into a call of
//! the domain layers below (config, render, check, stack, bake, smoke) and the result into output
//! (`ui`). The only layer that knows both the command line and AWS; nothing below imports it.

mod backup;
mod bake;
mod continue_rollback;
mod deploy;
mod destroy;
pub mod doctor;
mod fleet;
mod gc;
mod images;
mod init;
mod logs;
mod render;
mod restore;
mod smoke;
mod status;
mod upgrade;
mod validate;

pub use backup::backup_flow;
pub use bake::{PREREQS_TEMPLATE, bake_flow};
pub use deploy::{deploy_flow, plain_deploy_args, stack_parameters};
pub use fleet::{fleet_deploy_flow, fleet_destroy_flow, fleet_status_flow};
pub use logs::{follow_flow, logs_flow};
pub use restore::{reattach_context, restore_flow};
pub use upgrade::{after_smoke, rollback_flow, rollback_path, upgrade_flow};

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::aws::{self, Clients};
use crate::check::userdata::Tools;
use crate::chroma;
use crate::cli::{Cli, Command, GlobalArgs, ToolArgs, WaitArgs};
use crate::config::{self, Config, Context};
use crate::error::{Error, Result};
use crate::stack::Waits;
use crate::stack::changeset::{self, Cleanup};
use crate::ui::Ui;
use crate::ui::progress::Progress;

pub fn run(cli: Cli, ui: Ui) -> Result<()> {
    match cli.command {
        // init, completions and man must work where the config is missing or broken.
        Command::Init(args) => init::init(args, &cli.global, ui),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            // clap_complete panics when its writer fails; a closed stdout must not.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "imgbuild", &mut script);
            std::io::stdout().lock().write_all(&script).map_err(|e| Error::io("writing", "stdout", e))
        }
        Command::Man => {
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut std::io::stdout()).map_err(|e| Error::io("writing", "stdout", e))
        }
        Command::Doctor => doctor::run(&context(&cli.global)?, ui),
        Command::RenderUserdata(args) => render::render_userdata(args, &context(&cli.global)?, ui),
        Command::Validate(args) => validate::validate_all(args, &context(&cli.global)?, ui),
        Command::Deploy(args) => deploy::deploy(args, &context(&cli.global)?, ui),
        Command::Status(args) => status::status(args, &context(&cli.global)?, ui),
        Command::Destroy(args) => destroy::destroy(args, &context(&cli.global)?, ui),
        Command::Smoke(args) => smoke::smoke_cmd(args, &context(&cli.global)?, ui),
        Command::Bake(args) => bake::bake(args, &context(&cli.global)?, ui),
        Command::Images(cmd) => images::images_cmd(cmd, &context(&cli.global)?, ui),
        Command::Fleet(cmd) => fleet::fleet_cmd(cmd, &context(&cli.global)?, ui),
        Command::Backup(args) => backup::backup_cmd(args, &context(&cli.global)?, ui),
        Command::Restore(args) => restore::restore_cmd(args, &context(&cli.global)?, ui),
        Command::Upgrade(args) => upgrade::upgrade_cmd(args, &context(&cli.global)?, ui),
        Command::Rollback(args) => upgrade::rollback_cmd(args, &context(&cli.global)?, ui),
        Command::ContinueRollback(args) => continue_rollback::continue_rollback(args, &context(&cli.global)?, ui),
        Command::Gc(args) => gc::gc(args, &context(&cli.global)?, ui),
        Command::Logs(args) => logs::logs(args, &context(&cli.global)?, ui),
    }
}

/// The validated context every config-reading command works from: the config file (or the
/// built-in defaults) and the global flags, each checked.
pub fn context(global: &GlobalArgs) -> Result<Context> {
    let mut ctx = Context::load(global.config.as_deref(), global.region.as_deref(), global.profile.as_deref(), global.endpoint_url.as_deref())?;
    if let Some(p) = global.prices {
        ctx.config.prices = p;
    }
    Ok(ctx)
}

pub fn tools(args: &ToolArgs) -> Tools {
    if args.no_tools {
        Tools::Off
    } else if args.require_tools {
        Tools::Required
    } else {
        Tools::IfInstalled
    }
}

/// Where `init` writes: its argument, else `--config`, else `./imgbuild.yaml`.
pub fn init_path(arg: Option<PathBuf>, global: &GlobalArgs) -> PathBuf {
    arg.or_else(|| global.config.clone()).unwrap_or_else(|| PathBuf::from(config::DEFAULT_FILE))
}

/// The AWS settings of a context, as the AWS layer takes them: plain values, no config types.
pub fn aws_settings(ctx: &Context) -> aws::Settings {
    let a = &ctx.config.aws;
    aws::Settings {
        profile: ctx.profile.clone(),
        region: ctx.region.clone(),
        endpoint_url: ctx.endpoint_url.clone(),
        adaptive_retries: a.retry_mode == config::RetryMode::Adaptive,
        max_attempts: a.max_attempts,
        operation_timeout: Duration::from_secs(a.operation_timeout_secs),
    }
}

/// Ctrl-C, heard from the moment this is called (tokio's `ctrl_c()` would only listen once first
/// polled, and a signal before that would kill the process without its cleanup or message).
pub fn interrupt_listener() -> Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        let mut sig =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).map_err(|e| Error::Tool(format!("could not listen for Ctrl-C: {e}")))?;
        Ok(async move {
            sig.recv().await;
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// Asks on the terminal, or ends with Ctrl-C: once `interrupt` listens, SIGINT no longer stops
/// the process by itself, so a prompt that does not race it would ignore Ctrl-C.
async fn confirm_or_interrupt(question: &str, interrupt: &mut (impl Future<Output = ()> + Unpin)) -> Result<bool> {
    use crate::stack::changeset::Confirmer;
    tokio::select! {
        answer = crate::stack::changeset::TtyConfirmer.confirm(question) => answer,
        _ = interrupt => Err(Error::Interrupted { cleaned: Vec::new() }),
    }
}

/// The stack `imgbuild bake` deploys for its prerequisites when the config names none.
pub(crate) fn bake_prereqs_stack(config: &Config) -> String {
    format!("{}-bake", config.name)
}

/// Refuses to prompt without a terminal (CI, pipes) with the way forward this command has; the
/// shared prompt's own refusal speaks of deploy's flags.
fn need_terminal(way_forward: &str) -> Result<()> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() { Ok(()) } else { Err(Error::Invalid(format!("refusing to prompt: standard input is not a terminal; {way_forward}"))) }
}

/// Runs `f` to completion on a fresh runtime. The runtime is shut down without waiting for
/// blocking tasks: after Ctrl-C at a prompt, the thread reading the terminal never returns, and
/// waiting for it would hang the exit.
pub fn block_on<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Tool(format!("could not start the async runtime: {e}")))?;
    let result = rt.block_on(f);
    rt.shutdown_background();
    result
}

/// Runs `f` with clients built from the context, on a fresh runtime.
fn with_clients<T, F, Fut>(ctx: &Context, f: F) -> Result<T>
where
    F: FnOnce(Clients) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    block_on(async {
        let conf = aws::load(&aws_settings(ctx)).await?;
        f(Clients::from_conf(&conf)).await
    })
}

/// Ctrl-C as a flow takes it: heard from before the AWS config loads.
pub type Interrupt = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The shell of every command that changes something in AWS: listen for Ctrl-C first, load the
/// AWS config once, hand the flow its clients, region and the interrupt, then print the flow's
/// JSON document when asked for one.
fn run_flow<F, Fut>(ctx: &Context, ui: Ui, flow: F) -> Result<()>
where
    F: FnOnce(Clients, String, Interrupt) -> Fut,
    Fut: Future<Output = Result<serde_json::Value>>,
{
    let doc = block_on(async {
        let interrupt: Interrupt = Box::pin(interrupt_listener()?);
        let conf = aws::load(&aws_settings(ctx)).await?;
        let region = conf.region().map(|r| r.to_string()).unwrap_or_default();
        flow(Clients::from_conf(&conf), region, interrupt).await
    })?;
    if ui.json() {
        ui.emit_json(&doc);
    }
    Ok(())
}

pub fn waits(config: &Config, args: &WaitArgs) -> Waits {
    Waits { timeout: Duration::from_secs(args.timeout.unwrap_or(config.aws.stack_timeout_secs)), poll: Duration::from_secs(config.aws.poll_interval_secs) }
}

/// Unique enough for a change set name and a client token: seconds and nanoseconds now.
pub fn run_token() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}-{:09}", now.as_secs(), now.subsec_nanos())
}

/// A UUID-shaped token (StartAutomationExecution's ClientToken must be one), unique per run.
pub fn uuid_token() -> String {
    use sha2::{Digest, Sha256};
    let seed = format!("{}-{}", run_token(), std::process::id());
    let h = crate::render::hex(&Sha256::digest(seed.as_bytes()));
    format!("{}-{}-4{}-a{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

fn profile_of(config: &Config) -> Result<&'static chroma::Profile> {
    let v = chroma::parse_version(&config.chroma.version).map_err(Error::Invalid)?;
    chroma::profile(&v).map_err(Error::Invalid)
}

/// After a failure or Ctrl-C: remove what this run created and not yet handed over, and say so.
async fn clean_after(clients: &Clients, cleanup: &Cleanup, progress: &Progress, err: Error) -> Error {
    let executed = cleanup.lock().expect("cleanup lock").executed;
    let cleaned = changeset::remove_created(&clients.for_cleanup(), cleanup).await;
    match (err, cleaned) {
        (Error::Interrupted { .. }, Ok(mut cleaned)) => {
            if executed {
                cleaned.push("nothing to remove: the change set was already executing, and the stack operation goes on in CloudFormation (check on it with `imgbuild status`)".into());
            }
            Error::Interrupted { cleaned }
        }
        (e, Ok(cleaned)) => {
            for c in cleaned {
                progress.line(&format!("cleanup: {c}"));
            }
            e
        }
        (e, Err(ce)) => {
            progress.line(&format!("cleanup failed, remove it by hand: {ce}"));
            e
        }
    }
}

fn print_outputs(ui: Ui, outputs: &BTreeMap<String, String>) {
    if outputs.is_empty() {
        return;
    }
    let width = outputs.keys().map(String::len).max().unwrap_or(0);
    ui.info("outputs:");
    for (k, v) in outputs {
        ui.info(format!("  {k:<width$}  {v}"));
    }
}

pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, bytes)
}

/// Writes a regular file through a temporary file in the same directory, so a failure never
/// leaves half a file. Anything else that already exists (a device such as /dev/stdout, a FIFO,
/// a symlink) is written in place: renaming over it would replace it.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let in_place = std::fs::symlink_metadata(path).is_ok_and(|m| !m.file_type().is_file());
    if in_place {
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(path).map_err(|e| Error::io("writing", path, e))?;
        return f.write_all(bytes).map_err(|e| Error::io("writing", path, e));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // What imgbuild writes (a config, user-data, the bake manifest) holds no secret, so a new
    // file gets the mode any program's would (0666 less the umask), and a replaced one keeps its
    // own; tempfile's default, 0600, would make every file private whatever the user asked for.
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder.tempfile_in(dir).map_err(|e| Error::io("writing", path, e))?;
    if let Ok(existing) = std::fs::metadata(path) {
        tmp.as_file().set_permissions(existing.permissions()).map_err(|e| Error::io("writing", path, e))?;
    }
    tmp.write_all(bytes).map_err(|e| Error::io("writing", path, e))?;
    tmp.persist(path).map_err(|e| Error::io("writing", path, e.error))?;
    Ok(())
}
