//! The `moe` command-line tool: argument parsing and printing; the work is done by the library
//! crates.

mod inspect;
mod model_cmds;
mod train_cmds;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Build, train, run and benchmark Mixture-of-Experts language models.
#[derive(Parser, Debug)]
#[command(name = "moe", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model (default: the small MoE on the built-in corpus, on the CPU).
    Train(train_cmds::TrainArgs),
    /// Evaluate a checkpoint: per-domain loss and the domain x expert routing table.
    Eval(train_cmds::EvalArgs),
    /// Generate text from a prompt.
    Generate(model_cmds::GenerateArgs),
    /// Print the logits of every prompt position as JSON.
    Logits(model_cmds::LogitsArgs),
    /// Show parameters, active parameters, FLOPs and memory of a checkpoint or config.
    Inspect(inspect::InspectArgs),
    /// Import a Hugging Face Mixtral directory as a checkpoint.
    ImportHf(model_cmds::ImportArgs),
    /// Turn a dense checkpoint into an MoE one (sparse upcycling).
    Upcycle(model_cmds::UpcycleArgs),
    /// Export a checkpoint's weights as safetensors.
    Export(model_cmds::ExportArgs),
}

fn main() -> ExitCode {
    // A bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        eprintln!("error: internal error: {msg}");
    }));
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => train_cmds::train(a),
        Command::Eval(a) => train_cmds::eval(a),
        Command::Generate(a) => model_cmds::generate(a),
        Command::Logits(a) => model_cmds::logits(a),
        Command::Inspect(a) => inspect::inspect(a),
        Command::ImportHf(a) => model_cmds::import_hf(a),
        Command::Upcycle(a) => model_cmds::upcycle(a),
        Command::Export(a) => model_cmds::export(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line; a cause already spelled out by the message before it
/// (library errors embed their source) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain().map(|c| c.to_string()) {
        if !line.contains(&cause) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&cause);
        }
    }
    line.replace('\n', " ")
}

/// Opens a device by name, as every command does.
pub(crate) fn device(name: &str) -> anyhow::Result<burn::tensor::Device> {
    Ok(moe_core::parse_device(name)?)
}
