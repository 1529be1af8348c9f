//! `lorakit`: merge a PEFT adapter into a base model, or inspect an adapter.
//!
//! ```text
//! lorakit merge --base <model.safetensors> --adapter <peft-dir> --out <merged.safetensors>
//! lorakit inspect <peft-dir>
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage:
  lorakit merge --base <model.safetensors> --adapter <peft-dir> --out <merged.safetensors>
  lorakit inspect <peft-dir>";

enum Command {
    Merge {
        base: PathBuf,
        adapter: PathBuf,
        out: PathBuf,
    },
    Inspect(PathBuf),
    Help,
}

fn parse(args: &[String]) -> Result<Command, String> {
    let Some((cmd, rest)) = args.split_first() else {
        return Err("missing command".to_string());
    };
    if rest.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(Command::Help);
    }
    match cmd.as_str() {
        "-h" | "--help" | "help" => Ok(Command::Help),
        "inspect" => match rest {
            [dir] if !dir.starts_with('-') => Ok(Command::Inspect(PathBuf::from(dir))),
            _ => Err("inspect takes exactly one argument: the adapter directory".to_string()),
        },
        "merge" => {
            let (mut base, mut adapter, mut out) = (None, None, None);
            let mut it = rest.iter();
            while let Some(flag) = it.next() {
                let slot = match flag.as_str() {
                    "--base" => &mut base,
                    "--adapter" => &mut adapter,
                    "--out" => &mut out,
                    other => return Err(format!("merge: unknown argument `{other}`")),
                };
                let value = it
                    .next()
                    .ok_or_else(|| format!("merge: {flag} needs a value"))?;
                *slot = Some(PathBuf::from(value));
            }
            let need =
                |v: Option<PathBuf>, name: &str| v.ok_or_else(|| format!("merge: missing {name}"));
            Ok(Command::Merge {
                base: need(base, "--base")?,
                adapter: need(adapter, "--adapter")?,
                out: need(out, "--out")?,
            })
        }
        other => Err(format!("unknown command `{other}`")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse(&args) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("error: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match command {
        Command::Help => Ok(format!("{USAGE}\n")),
        Command::Inspect(dir) => lorakit::peft::inspect(&dir).map(|s| s.to_string()),
        Command::Merge { base, adapter, out } => lorakit::peft::merge_files(&base, &adapter, &out)
            .map(|r| {
                let mut text = format!(
                    "merged {} module(s) into {} ({} tensors)\n",
                    r.merged.len(),
                    out.display(),
                    r.tensors
                );
                for m in &r.merged {
                    text.push_str(&format!("  {m}\n"));
                }
                text
            }),
    };
    match result {
        Ok(text) => emit(&text),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `text` to stdout. A reader that went away (`lorakit inspect dir | head`) ends the
/// command quietly, as command-line tools do, instead of panicking as `print!` would.
fn emit(text: &str) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}
