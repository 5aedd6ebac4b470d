//! The command line: parse, map the command onto the edit service ([`crate::service`]) on
//! this thread, report errors as one line. With no command it starts the editor
//! ([`crate::gui::run`]) with the same global flags.
//!
//! Exit codes: 0 success, 2 invalid input or usage (bad image, bad model folder, bad
//! arguments), 1 any other failure. Errors are one line on stderr starting with `error:`.

mod args;
mod bench;
mod cache;
mod cancel;
mod checks;
mod edit;
mod eval;
mod generate;
mod model;
mod outputs;
mod preview;
mod progress;
mod tune;

use std::panic::{self, AssertUnwindSafe};

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};

pub use args::{Cli, CliCommand, GlobalOptions};
pub use model::model_request;

use crate::engine::EngineError;
use crate::imaging::ImagingError;
use crate::model_files::ModelFilesError;
use crate::service::ServiceError;

/// A mistake in how the program was called (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_INVALID_INPUT: i32 = 2;
/// Stopped with Ctrl-C, or asked to stop by SIGTERM or SIGHUP (`kill`, `timeout`, a closing
/// terminal), which stop the same way (the shell convention for SIGINT, 128 + 2).
pub const EXIT_INTERRUPTED: i32 = 130;

/// Runs the program with the process's arguments and returns its exit code.
pub fn main_with_exit_code() -> i32 {
    let matches = match Cli::command().try_get_matches() {
        Ok(matches) => matches,
        Err(error) => {
            if let Some(line) = unknown_command() {
                eprintln!("error: {line}");
                return EXIT_INVALID_INPUT;
            }
            return report_clap_error(error);
        }
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => return report_clap_error(error),
    };
    let Some(command) = &cli.command else {
        // A photo that is not there is more often a mistyped command than a photo: say so
        // here rather than open a window about it.
        if let Some(photo) = cli.photo.as_ref().filter(|p| !p.exists()) {
            let commands: Vec<String> = Cli::command()
                .get_subcommands()
                .filter(|c| !c.is_hide_set())
                .map(|c| c.get_name().to_owned())
                .collect();
            eprintln!(
                "error: there is no photo or command called {}; the commands are {} (see `unitune --help`)",
                photo.display(),
                commands.join(", ")
            );
            return EXIT_INVALID_INPUT;
        }
        // No command: the desktop editor, which reports its own errors in its window.
        let options = match editor_options(&cli.global, cli.photo.clone()) {
            Ok(options) => options,
            Err(error) => {
                eprintln!("error: {}", error_line(&error));
                return EXIT_INVALID_INPUT;
            }
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
    let given = |id: &str| given_on_command_line(&matches, id);
    match panic::catch_unwind(AssertUnwindSafe(|| {
        run(&cli.global, command, &given, &cancel)
    })) {
        // A stop asked for during the last write: what was written is whole, and the run
        // still ends as stopped.
        Ok(Ok(())) if cancel.is_set() => {
            eprintln!("error: {}", stopped_line());
            EXIT_INTERRUPTED
        }
        Ok(Ok(())) => EXIT_OK,
        Ok(Err(error)) if is_cancelled(&error) => {
            eprintln!("error: {}", stopped_line());
            EXIT_INTERRUPTED
        }
        Ok(Err(error)) => {
            eprintln!("error: {}", error_line(&error));
            exit_code(&error)
        }
        Err(_) => EXIT_FAILURE,
    }
}

/// The editor's start: every global flag, as the command line's commands get them.
pub fn editor_options(
    global: &GlobalOptions,
    photo: Option<std::path::PathBuf>,
) -> anyhow::Result<crate::gui::EditorOptions> {
    let request = model_request(global)?;
    if let Some(lora) = request.loras.iter().find(|l| !l.path.is_file()) {
        return Err(UsageError(format!(
            "--lora {}: there is no such file",
            lora.path.display()
        ))
        .into());
    }
    Ok(crate::gui::EditorOptions {
        precision_override: global.precision,
        ..crate::gui::EditorOptions::new(request, photo)
    })
}

/// Whether the argument `id` of the command was given on the command line rather than left at
/// its default.
fn given_on_command_line(matches: &ArgMatches, id: &str) -> bool {
    let sub = matches.subcommand().map(|(_, m)| m).unwrap_or(matches);
    sub.try_get_raw(id).is_ok_and(|v| v.is_some())
        && sub.value_source(id) == Some(ValueSource::CommandLine)
}

fn run(
    global: &args::GlobalOptions,
    command: &CliCommand,
    given: edit::Given,
    cancel: &cancel::CancelFlag,
) -> anyhow::Result<()> {
    match command {
        CliCommand::Generate(args) => generate::generate_command(global, args, cancel),
        CliCommand::Tune(args) => tune::tune_command(global, args, cancel),
        CliCommand::Edit(args) => edit::edit_command(global, args, given, cancel),
        CliCommand::Grid(args) => edit::grid_command(global, args, cancel),
        CliCommand::ExportLora(args) => tune::export_lora_command(global, args, cancel),
        CliCommand::Cache(args) => cache::cache_command(args),
        CliCommand::Bench(args) => bench::bench_command(global, args, cancel),
        CliCommand::Eval(args) => eval::eval_command(global, args, cancel),
        CliCommand::World(args) => crate::world::write_dataset(&args.out, args.count, args.seed),
    }
}

/// What a stopped run kept, in one line.
fn stopped_line() -> String {
    match outputs::written() {
        0 => "cancelled; no output was written".to_owned(),
        1 => "cancelled; the one file printed above was written whole, nothing else".to_owned(),
        n => format!("cancelled; the {n} files printed above were written whole, nothing else"),
    }
}

fn is_cancelled(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<EngineError>(),
            Some(EngineError::Cancelled)
        ) || cause
            .downcast_ref::<ServiceError>()
            .is_some_and(ServiceError::is_cancelled)
    })
}

/// The global options that take a value (the value is not a command).
const GLOBAL_VALUES: [&str; 6] = [
    "--model",
    "--vae",
    "--prediction-type",
    "--device",
    "--precision",
    "--lora",
];

/// When the command line's first word is neither a command nor a photo that exists while
/// more words follow (`unitune edti photo.png --prompt x`): the sentence that says so. clap
/// would take the typo for the editor's photo and complain about what follows it.
fn unknown_command() -> Option<String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let is_option_value = |i: usize| i > 0 && GLOBAL_VALUES.contains(&args[i - 1].as_str());
    let mut words = args
        .iter()
        .enumerate()
        .filter(|(i, a)| !a.starts_with('-') && !is_option_value(*i));
    let (_, first) = words.next()?;
    words.next()?;
    let known: Vec<String> = Cli::command()
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name().to_owned())
        .collect();
    if known.contains(first) || std::path::Path::new(first).exists() {
        return None;
    }
    Some(format!(
        "unknown command {first}; the commands are {} (see `unitune --help`)",
        known.join(", ")
    ))
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
        if let Some(e) = cause.downcast_ref::<ServiceError>() {
            return e.is_invalid_input();
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
