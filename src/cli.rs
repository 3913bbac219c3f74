//! The raw command line, exactly as typed: clap's structs and nothing else. `cmd` turns them into
//! validated plans and domain calls; no layer below `cmd` imports this module.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::render::{Format, Mode};
pub use crate::ui::OutputFormat;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the operation failed (I/O, an external tool, AWS)
  2  usage error or invalid input (flags, config, rendered output that fails validation)
  3  the stack operation failed and CloudFormation rolled it back
  130  interrupted (Ctrl-C); what was cleaned up is said";

#[derive(Debug, Parser)]
#[command(
    name = "imgbuild",
    version,
    about = "Render, bake and deploy a private ChromaDB on AWS: Amazon Linux 2023, Docker, EFS, NLB, private API Gateway.",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Config file [default: ./imgbuild.yaml when present, else built-in defaults].
    #[arg(long, global = true, env = "IMGBUILD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// AWS shared-config profile.
    #[arg(long, global = true, env = "AWS_PROFILE", value_name = "NAME")]
    pub profile: Option<String>,

    /// AWS region; wins over `region:` in the config.
    #[arg(long, global = true, value_name = "REGION")]
    pub region: Option<String>,

    /// Send AWS API calls to this endpoint (an emulator such as moto, or a VPC endpoint).
    #[arg(long, global = true, env = "AWS_ENDPOINT_URL", value_name = "URL")]
    pub endpoint_url: Option<String>,

    /// `json` prints one machine-readable document on stdout; human text goes to stderr.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// More detail on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Prices of the monthly cost deploy, bake, fleet deploy and images prune show: `auto` asks
    /// the AWS Price List API (bounded to a few seconds) and takes the dated table shipped with
    /// imgbuild for what it does not answer; `table` makes no call [default: `prices:` in the
    /// config, else auto].
    #[arg(long, global = true, value_enum, value_name = "SOURCE")]
    pub prices: Option<crate::config::PriceSource>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a commented starter imgbuild.yaml.
    Init(InitArgs),
    /// Render the cloud-init user-data, validate it, and print it.
    #[command(name = "render-userdata")]
    RenderUserdata(RenderArgs),
    /// Check the config, every user-data variant it renders, and the stack template.
    Validate(ValidateArgs),
    /// Deploy the stack: change set, diff with its monthly cost, confirm, execute, follow events, print outputs.
    /// An update is watched by the stack's CloudWatch alarms: one in ALARM rolls it back (alarms.*).
    Deploy(DeployArgs),
    /// Show the stack: state, outputs, its CloudWatch alarms' states, recent events, instance and target health.
    Status(StatusArgs),
    /// Delete the stack. The EFS file system and its data stay unless --delete-data.
    Destroy(DestroyArgs),
    /// The acceptance test: heartbeat, create a collection, add, query, delete.
    Smoke(SmokeArgs),
    /// Bake the bootstrap into an AMI through SSM Automation (reused when its digest matches); says what its snapshots cost a month.
    Bake(BakeArgs),
    /// List or prune the images bake made.
    #[command(subcommand)]
    Images(ImagesCommand),
    /// The same stack in many accounts and regions, as one CloudFormation StackSet.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Back up Chroma's data consistently: stop Chroma only while its data is copied on EFS
    /// (through SSM Run Command), then an AWS Backup job of the file system. `backup list` shows
    /// the recovery points.
    Backup(BackupArgs),
    /// Restore a recovery point into a new file system (never over the live one), move the
    /// restored data into place, then deploy onto it with the usual diff and confirmation. The
    /// old file system is kept and named.
    Restore(RestoreArgs),
    /// Upgrade Chroma: refuse a downgrade of the data, take a consistent backup, bake (for baked
    /// images), deploy the new version, run smoke; on failure `imgbuild rollback` goes back.
    Upgrade(UpgradeArgs),
    /// Go back from the last upgrade: the previous image and the pre-upgrade recovery point,
    /// restored into a new file system and deployed together.
    Rollback(RollbackArgs),
    /// Check this machine and account before a deploy: credentials, region, account, network,
    /// the AL2023 parameter, quotas. Says what to do about each problem.
    Doctor,
    /// Get a stack out of UPDATE_ROLLBACK_FAILED: lists the resources the rollback could not put
    /// back, asks, and continues the rollback (ContinueUpdateRollback), skipping those named. A
    /// stack `deploy --disable-rollback` left in CREATE_FAILED/UPDATE_FAILED is rolled back
    /// (RollbackStack, keeping retained resources).
    #[command(name = "continue-rollback")]
    ContinueRollback(ContinueRollbackArgs),
    /// Find, by the project's tags, what earlier runs left behind in the region (build instances,
    /// snapshots without an image, unexecuted change sets, empty REVIEW_IN_PROGRESS stacks, file
    /// systems destroy kept) and remove what you confirm. Run with --dry-run first.
    Gc(GcArgs),
    /// Diagnostics without SSH: cloud-init, chroma.service's journal, compose and the container,
    /// the EFS mount, the writer lock and the boot guard (through SSM Run Command), the first
    /// failing stack event and a failed bake's failing step. --out DIR writes a bundle for a bug
    /// report, credentials and tokens masked. --follow follows Chroma's container log instead.
    Logs(LogsArgs),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `imgbuild man | man -l -`.
    Man,
}

#[derive(Debug, Args)]
pub struct BakeArgs {
    /// Bake even when an image with this digest exists.
    #[arg(long)]
    pub force: bool,
    /// Read the base image from AWS's public parameter again instead of the recorded one.
    #[arg(long)]
    pub update_base: bool,
    /// Print the plan (base image, digest, cached or not, the document) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// More regions to copy the image to (comma-separated), besides bake.regions.
    #[arg(long, value_delimiter = ',', value_name = "REGION,...")]
    pub regions: Vec<String>,
    /// When a step fails, stop the build instance instead of terminating it, and print its id and
    /// the command that removes it, to look at what went wrong (a cancel still terminates it).
    #[arg(long)]
    pub keep_on_failure: bool,
    /// Longest the automation may run, in seconds [default: bake.timeout_secs, else the runbook's
    /// own success budget].
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    #[command(flatten)]
    pub tools: ToolArgs,
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Create or update the StackSet and its instances: shows what each target gets and what each new one costs a month, asks, runs.
    Deploy(FleetDeployArgs),
    /// Each stack instance: status and reason, drift, image, the last operation.
    Status(FleetStatusArgs),
    /// Remove the stack instances (each file system is kept), then the StackSet.
    Destroy(FleetDestroyArgs),
}

#[derive(Debug, Args)]
pub struct FleetTargetArgs {
    /// Target accounts (comma-separated) instead of fleet.accounts.
    #[arg(long, value_delimiter = ',', value_name = "ID,...")]
    pub accounts: Vec<String>,
    /// Target organizational units (comma-separated) instead of fleet.organizational_units.
    #[arg(long, value_delimiter = ',', value_name = "OU,...")]
    pub organizational_units: Vec<String>,
    /// Regions, in deployment order (comma-separated), instead of fleet.regions.
    #[arg(long, value_delimiter = ',', value_name = "REGION,...")]
    pub regions: Vec<String>,
    /// Targets at once per region: a count or a percentage [default: fleet.max_concurrent].
    #[arg(long, value_name = "N|N%")]
    pub max_concurrent: Option<String>,
    /// Failed targets per region before CloudFormation stops: a count or a percentage
    /// [default: fleet.failure_tolerance].
    #[arg(long, value_name = "N|N%")]
    pub failure_tolerance: Option<String>,
    /// Deploy the regions in parallel instead of one after another.
    #[arg(long)]
    pub parallel_regions: bool,
    /// Longest wait for each operation, in seconds [default: aws.stack_timeout_secs].
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

#[derive(Debug, Args)]
pub struct FleetDeployArgs {
    #[command(flatten)]
    pub targets: FleetTargetArgs,
    /// Deploy this template instead of the embedded infra/stack.yaml.
    #[arg(long, value_name = "FILE")]
    pub template: Option<PathBuf>,
    /// Run without asking.
    #[arg(long, short = 'y', conflicts_with_all = ["dry_run", "no_execute"])]
    pub yes: bool,
    /// Show what each target would get and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Like deploy's: show the plan (and put it in --output json) but start nothing, for review;
    /// a StackSet has no change set to leave behind, so nothing is made either.
    #[arg(long)]
    pub no_execute: bool,
    #[command(flatten)]
    pub tools: ToolArgs,
}

#[derive(Debug, Args)]
pub struct FleetStatusArgs {
    /// Run drift detection (DetectStackSetDrift) first and wait for it.
    #[arg(long)]
    pub drift: bool,
    /// Longest wait for drift detection, in seconds [default: aws.stack_timeout_secs].
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

#[derive(Debug, Args)]
pub struct FleetDestroyArgs {
    #[command(flatten)]
    pub targets: FleetTargetArgs,
    /// Delete without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Keep the image's launch and create-volume permissions for the accounts removed (by
    /// default they are revoked where no remaining stack instance of that account uses the image).
    #[arg(long)]
    pub keep_sharing: bool,
    /// Keep the KMS grants to the removed accounts' Auto Scaling service-linked role (by default
    /// revoked where no remaining stack instance of that account needs the key).
    #[arg(long)]
    pub keep_grants: bool,
}

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// The images bake made for this project, newest first, with the ones in use marked.
    List,
    /// Deregister all but the newest N images and delete their snapshots (saying what that saves a month). Never an image in use.
    Prune(PruneArgs),
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// How many of the newest images to keep.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub keep: usize,
    /// Prune without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Say what would be pruned, prune nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// If the stack is busy with another operation, wait for it instead of refusing.
    #[arg(long)]
    pub wait: bool,
    /// Longest wait for the stack, in seconds [default: aws.stack_timeout_secs].
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// Boot this AMI [default: the AMI `imgbuild bake` handed over, else stock AL2023].
    #[arg(long, value_name = "AMI_ID")]
    pub ami: Option<String>,
    /// User-data mode [default: baked for a baked or given AMI, full for stock AL2023].
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Deploy this template instead of the embedded infra/stack.yaml.
    #[arg(long, value_name = "FILE")]
    pub template: Option<PathBuf>,
    /// Execute without asking.
    #[arg(long, short = 'y', conflicts_with = "no_execute")]
    pub yes: bool,
    /// Create the change set and show the diff, but leave it for review.
    #[arg(long)]
    pub no_execute: bool,
    /// With stock AL2023: move to the AMI AWS publishes now instead of the one the stack runs
    /// (which replaces the instance).
    #[arg(long)]
    pub update_base: bool,
    /// If the stack operation fails, keep what it made (failed resources included) instead of
    /// rolling back, to debug it; `aws cloudformation rollback-stack` rolls back afterwards.
    #[arg(long)]
    pub disable_rollback: bool,
    /// Skip drift detection before an update (by default deploy warns about drifted resources
    /// the change set would overwrite).
    #[arg(long)]
    pub no_drift_check: bool,
    /// Do not make the stack's alarms this update's rollback triggers (by default an alarm in
    /// ALARM during the update, or alarms.rollback_monitoring_minutes after it, rolls it back):
    /// for the update that fixes what an alarm is about.
    #[arg(long)]
    pub no_rollback_triggers: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub tools: ToolArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// How many recent stack events to show.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub events: usize,
    /// Run drift detection (DetectStackDrift) and show what changed outside CloudFormation.
    #[arg(long)]
    pub drift: bool,
    /// Longest wait for drift detection, in seconds [default: aws.stack_timeout_secs].
    #[arg(long, value_name = "SECS", requires = "drift")]
    pub timeout: Option<u64>,
}

#[derive(Debug, Args)]
pub struct DestroyArgs {
    /// Delete without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Also delete the EFS file system, and with it every collection Chroma stored.
    #[arg(long)]
    pub delete_data: bool,
    /// Delete the bake's prerequisites stack (`<name>-bake`, which `imgbuild bake` deploys when
    /// the config names no subnet, security group, profile and role) instead of the product's.
    #[arg(long, conflicts_with = "delete_data")]
    pub bake_prereqs: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct SmokeArgs {
    /// Talk HTTP to this Chroma endpoint (a stage URL ending in /api, or a server's root URL)
    /// instead of API Gateway's test-invoke. With api.auth: iam each request is signed (SigV4)
    /// with the CLI's AWS credentials.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Per-request timeout, in seconds.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Where to write [default: --config, else ./imgbuild.yaml].
    #[arg(value_name = "FILE")]
    pub path: Option<PathBuf>,
    /// Overwrite an existing file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// `full` installs everything at boot; `baked` is the boot-time part for a baked AMI.
    #[arg(long, value_enum, default_value_t = Mode::Full)]
    pub mode: Mode,
    /// `cloud-config` (one document) or `mime` (multipart with script parts).
    #[arg(long, value_enum, default_value_t = Format::CloudConfig)]
    pub format: Format,
    /// Compress with gzip (cloud-init inflates it); for user-data near the 16 KB limit.
    #[arg(long)]
    pub gzip: bool,
    /// Print base64, as the EC2 and CloudFormation APIs take user-data.
    #[arg(long)]
    pub base64: bool,
    /// Write the user-data to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub tools: ToolArgs,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Check this stack template instead of the embedded infra/stack.yaml.
    #[arg(long, value_name = "FILE")]
    pub template: Option<PathBuf>,
    /// Check this automation document (as registered, script included) instead of the one bake
    /// makes from images/bake.yaml.
    #[arg(long, value_name = "FILE")]
    pub document: Option<PathBuf>,
    #[command(flatten)]
    pub tools: ToolArgs,
}

#[derive(Debug, Args)]
pub struct ToolArgs {
    /// Fail when cloud-init or shellcheck is not installed, instead of skipping them.
    #[arg(long, conflicts_with = "no_tools")]
    pub require_tools: bool,
    /// Run only the built-in checks, not cloud-init or shellcheck.
    #[arg(long)]
    pub no_tools: bool,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub command: Option<BackupCommand>,
    /// Return once the backup job has started instead of waiting for it to complete.
    #[arg(long)]
    pub no_wait: bool,
    /// After the job: restore the recovery point into a throw-away file system, serve it with a
    /// throw-away Chroma and compare collections and counts; the point is tagged verified only
    /// when they match. The throw-away file system is deleted afterwards.
    #[arg(long, conflicts_with = "no_wait")]
    pub verify: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// This project's recovery points, newest first: time, size, Chroma version, consistent or
    /// scheduled.
    List,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The recovery point's ARN (`imgbuild backup list` shows them).
    #[arg(value_name = "RECOVERY_POINT")]
    pub recovery_point: String,
    /// Deploy onto the restored file system without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Boot this AMI on the restored file system [default: as deploy chooses].
    #[arg(long, value_name = "AMI_ID")]
    pub ami: Option<String>,
    /// User-data mode for `--ami` [default: baked]: `full` for a stock AL2023 image, which
    /// installs Docker and pulls Chroma at boot. (`imgbuild rollback` sets it from its record.)
    #[arg(long, value_enum, requires = "ami")]
    pub mode: Option<Mode>,
    /// Before anything switches: mount the restored copy read-only, serve it with a throw-away
    /// Chroma of the same version, and compare collections and counts with what the backup
    /// recorded. Any difference stops the restore.
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// The Chroma release to upgrade to (e.g. 1.5.9).
    #[arg(long, value_name = "VERSION")]
    pub to: String,
    /// Say what would happen, how long Chroma would be down and what the extra recovery point
    /// costs; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Deploy without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// Deploy without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct ContinueRollbackArgs {
    /// Resources (logical ids, comma-separated) the rollback should skip: only ones in
    /// UPDATE_FAILED, and only after fixing them by hand, since CloudFormation marks them rolled
    /// back without touching them.
    #[arg(long, value_delimiter = ',', value_name = "LOGICAL_ID,...")]
    pub skip: Vec<String>,
    /// Continue without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Longest wait for the rollback, in seconds [default: aws.stack_timeout_secs].
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Say what was left behind, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove without asking (file systems still need --delete-data).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Also delete the file systems destroy kept, and with them every collection Chroma stored
    /// on them. Without it they are listed and kept.
    #[arg(long)]
    pub delete_data: bool,
    /// Only file systems created longer ago than this count as left behind (30d, 12h, 45m, 90s).
    #[arg(long, default_value = "30d", value_name = "AGE", value_parser = parse_age)]
    pub older_than: std::time::Duration,
}

fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    crate::bake::gc::parse_age(text)
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Also write everything into DIR (created, private to you) for a bug report.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// How many lines of each log.
    #[arg(long, default_value_t = 200, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=5000))]
    pub lines: u32,
    /// Collect from this instance [default: the stack's running instance, the newest of several].
    #[arg(long, value_name = "INSTANCE_ID")]
    pub instance: Option<String>,
    /// Longest wait for the Run Command on the instance, in seconds (with --follow: each poll's).
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub timeout: u64,
    /// Follow Chroma's container log (the last --lines first, then new lines as they come) through
    /// SSM Run Command until Ctrl-C or --for; with --output json, one JSON object a line.
    #[arg(long, short = 'f', conflicts_with = "out")]
    pub follow: bool,
    /// With --follow: seconds between polls (each poll is one Run Command).
    #[arg(long, default_value_t = 5, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=300), requires = "follow")]
    pub interval: u64,
    /// With --follow: stop after this long (90s, 10m, 2h) instead of at Ctrl-C.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration, requires = "follow")]
    pub duration: Option<std::time::Duration>,
}

/// `90`, `90s`, `10m` or `2h`: a positive whole number of seconds, minutes or hours, at most a day.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (n, unit) = match s.trim().char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.trim().split_at(i),
        None => (s.trim(), "s"),
    };
    let n: u64 = n.parse().map_err(|_| format!("`{s}` is not a duration (a whole number and s, m or h: 90s, 10m, 2h)"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("`{s}`: the unit must be s, m or h (90s, 10m, 2h)")),
    };
    if secs == 0 || secs > 86_400 {
        return Err(format!("`{s}`: between 1 second and 24 hours"));
    }
    Ok(std::time::Duration::from_secs(secs))
}
