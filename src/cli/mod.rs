//! The command line: parse, run the command on this thread, report errors as one line.
//!
//! Exit codes: 0 success, 2 invalid input or usage (bad image, bad model folder, bad
//! arguments), 1 any other failure. Errors are one line on stderr starting with `error:`.

mod args;
mod bench;
mod cache;
mod cancel;
mod eval;
mod generate;
mod preview;
mod session;
mod unitune;

use std::panic::{self, AssertUnwindSafe};

use clap::Parser;
use clap::error::ErrorKind;

pub use crate::recipe::Recipe;
pub use args::{Cli, Command};

use crate::engine::EngineError;
use crate::imaging::ImagingError;
use crate::model_files::ModelFilesError;

/// A mistake in how the program was called (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_INVALID_INPUT: i32 = 2;
/// Stopped with Ctrl-C (the shell convention, 128 + SIGINT).
pub const EXIT_INTERRUPTED: i32 = 130;

/// Runs the program with the process's arguments and returns its exit code.
pub fn main_with_exit_code() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return report_clap_error(error),
    };
    let Some(command) = &cli.command else {
        // No command: the desktop editor, which reports its own errors in its window.
        let loras = match session::lora_choices(&cli.global) {
            Ok(loras) => loras,
            Err(error) => {
                eprintln!("error: {}", error_line(&error));
                return EXIT_INVALID_INPUT;
            }
        };
        let options = crate::gui::EditorOptions {
            loras,
            ..crate::gui::EditorOptions::new(
                &cli.global.model,
                cli.global.device,
                cli.global.offline,
                cli.photo.clone(),
            )
        };
        return match crate::gui::run(options) {
            Ok(()) => EXIT_OK,
            Err(error) => {
                eprintln!("error: {}", error_line(&error));
                EXIT_FAILURE
            }
        };
    };
    // A panic is a bug, but the user still gets one line, not a backtrace.
    panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal error ({message}{location}); please report this");
    }));
    let cancel = cancel::CancelFlag::on_ctrl_c();
    match panic::catch_unwind(AssertUnwindSafe(|| run(&cli.global, command, &cancel))) {
        Ok(Ok(())) => EXIT_OK,
        Ok(Err(error)) if is_cancelled(&error) => {
            eprintln!("error: cancelled; no output was written");
            EXIT_INTERRUPTED
        }
        Ok(Err(error)) => {
            eprintln!("error: {}", error_line(&error));
            exit_code(&error)
        }
        Err(_) => EXIT_FAILURE,
    }
}

fn run(
    global: &args::GlobalOptions,
    command: &Command,
    cancel: &cancel::CancelFlag,
) -> anyhow::Result<()> {
    match command {
        Command::Generate(args) => generate::generate_command(global, args, cancel),
        Command::Tune(args) => unitune::tune_command(global, args, cancel),
        Command::Edit(args) => unitune::edit_command(global, args, cancel),
        Command::Grid(args) => unitune::grid_command(global, args, cancel),
        Command::ExportLora(args) => unitune::export_lora_command(global, args, cancel),
        Command::Cache(args) => cache::cache_command(args),
        Command::Bench(args) => bench::bench_command(global, args, cancel),
        Command::Eval(args) => eval::eval_command(global, args, cancel),
        Command::World(args) => crate::world::write_dataset(&args.out, args.count, args.seed),
    }
}

fn is_cancelled(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<EngineError>(),
            Some(EngineError::Cancelled)
        )
    })
}

/// clap's multi-line usage errors become one `error:` line; help and version print as usual.
fn report_clap_error(error: clap::Error) -> i32 {
    match error.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = error.print();
            if error.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                EXIT_INVALID_INPUT
            } else {
                EXIT_OK
            }
        }
        _ => {
            // clap's first paragraph is the message (a missing argument is named on the
            // line after the message); usage and tips follow after a blank line.
            let rendered = error.render().to_string();
            let message: Vec<&str> = rendered
                .lines()
                .skip_while(|l| l.trim().is_empty())
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let message = message.join(" ");
            let message = message.trim_start_matches("error: ");
            eprintln!("error: {message} (see `unitune --help`)");
            EXIT_INVALID_INPUT
        }
    }
}

/// The error and its causes on one line, without repeating a cause already quoted.
fn error_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    crate::imaging::one_line(&line)
}

/// 2 when any error in the chain blames the input, else 1.
pub fn exit_code(error: &anyhow::Error) -> i32 {
    let invalid = error.chain().any(|cause| {
        if cause.is::<UsageError>() {
            return true;
        }
        if let Some(e) = cause.downcast_ref::<EngineError>() {
            return e.is_invalid_input();
        }
        if let Some(e) = cause.downcast_ref::<ImagingError>() {
            return e.is_invalid_input();
        }
        if let Some(e) = cause.downcast_ref::<ModelFilesError>() {
            return e.is_invalid_input();
        }
        false
    });
    if invalid {
        EXIT_INVALID_INPUT
    } else {
        EXIT_FAILURE
    }
}
