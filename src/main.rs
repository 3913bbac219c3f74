use std::process::ExitCode;

use clap::Parser;
use imgbuild::cli::Cli;
use imgbuild::ui::Ui;

fn main() -> ExitCode {
    // clap prints usage errors itself and exits with 2.
    let cli = Cli::parse();
    let ui = Ui::new(cli.global.output, cli.global.verbose, cli.global.quiet);
    match imgbuild::cmd::run(cli, ui) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            ui.error(&err);
            ExitCode::from(err.exit_code())
        }
    }
}
