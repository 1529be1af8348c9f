//! `lorakit`: merge a PEFT adapter into a model checkpoint, inspect an adapter (and match
//! it against a checkpoint), generate text with a model folder and an adapter, classify
//! texts with a classifier folder and an adapter, or export a LoRA adapter for llama.cpp
//! (GGUF).
//!
//! ```text
//! lorakit merge --base <CHECKPOINT> --adapter <DIR> --out <PATH> [--dtype <DTYPE>] [--quiet] [--remove-leftovers]
//! lorakit inspect <ADAPTER_DIR> [--base <CHECKPOINT>]
//! lorakit generate --model <DIR> [--adapter <DIR> [--merge]] (--prompt <TEXT> | --prompt-ids <IDS>)
//!                  [--max-new-tokens <N>] [--temperature <T>] [--top-k <K>] [--top-p <P>] [--seed <S>]
//!                  [--dtype <DTYPE>] [--ignore-eos] [--logits-out <FILE>]
//! lorakit classify --model <DIR> [--adapter <DIR> [--merge]] (--text <TEXT> [--text-pair <TEXT>] | --ids <IDS>)
//!                  [--num-labels <N>] [--dtype <DTYPE>] [--logits-out <FILE>]
//! lorakit export-gguf --adapter <DIR> --base <MODEL> --out <FILE> [--dtype <DTYPE>] [--quiet]
//! lorakit help [COMMAND]    (or --help after any command), lorakit --version
//! ```
//!
//! This binary needs the crate's `cli` feature, which is on by default and brings clap
//! (arguments), indicatif (the progress bar) and ctrlc (SIGINT/SIGTERM). A program that only
//! uses the library leaves them out with `lorakit = { version = "…", default-features = false }`.
//!
//! Conventions: results on stdout, progress, warnings (`warning: …`) and errors on stderr; an
//! error is one line `error: …` and exit status 1; a usage error exits 2; an interrupted merge
//! removes its temporaries and exits 130; a closed stdout (`lorakit inspect dir | head`) ends
//! the command quietly.

// The command's own file: a folder beside this one (a file directly in src/bin/ would be a
// binary of its own), named by path since this file is the binary's root.
#[path = "lorakit/classify.rs"]
mod classify;
#[path = "lorakit/convert.rs"]
mod convert;
#[path = "lorakit/export_gguf.rs"]
mod export_gguf;
#[path = "lorakit/generate.rs"]
mod generate;

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lorakit::checkpoint::Checkpoint;
use lorakit::peft::inspect::{inspect_against, not_an_adapter};
use lorakit::peft::load::{CONFIG_FILE, WEIGHTS_FILE};
use lorakit::peft::weights_file::PICKLE_WEIGHTS_FILE;
use lorakit::peft::{merge_checkpoint, MergeOptions, MergeProgress, OutputDType};

/// The exit status of a command stopped by SIGINT or SIGTERM.
const INTERRUPTED: u8 = 130;

/// How long a merge runs before its progress bar appears (short merges show none).
const BAR_DELAY: Duration = Duration::from_millis(300);

#[derive(Parser, Debug)]
#[command(
    name = "lorakit",
    version,
    about = "Merge Hugging Face PEFT adapters (LoRA, DoRA, rsLoRA, VeRA, AdaLoRA) into safetensors checkpoints, inspect them, generate text with them, and export LoRA adapters for llama.cpp (GGUF)",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const MERGE_ABOUT: &str = "\
Merge a PEFT adapter into a checkpoint, as PEFT's merge_and_unload() does, one tensor
at a time.

A .safetensors file gives a file; a model folder or its *.safetensors.index.json gives
a folder with the same shards, index and config/tokenizer files. The output is built
beside --out under a temporary name (.NAME.tmpPID.N) and renamed into place: an error,
SIGINT or SIGTERM leaves nothing behind. Temporaries of an earlier killed run are
reported (deleted with --remove-leftovers).

A bitsandbytes 4-bit checkpoint (a `-bnb-4bit` model: NF4 or FP4 weights) gives a float
checkpoint, as a PEFT user writes after QLoRA training: every 4-bit weight dequantized as
bitsandbytes does (in the dtype its quant state records, bf16 or f16), the adapter merged,
`quantization_config` removed from config.json.";

const INSPECT_ABOUT: &str = "\
Summarize a PEFT adapter: type, targets, dtype, each module's rank and scale.

With --base, also list the checkpoint tensor each adapter module applies to
(<module>.weight), its shape and dtype and whether it fits, and the checkpoint's 2-D
weights the adapter does not target. Reads tensor headers only.";

#[derive(Subcommand, Debug)]
enum Command {
    /// Merge a PEFT adapter into a checkpoint, as PEFT's merge_and_unload() does
    #[command(long_about = MERGE_ABOUT)]
    Merge(MergeArgs),
    /// Summarize a PEFT adapter; with --base, match its modules against a checkpoint
    #[command(long_about = INSPECT_ABOUT)]
    Inspect(InspectArgs),
    /// Generate text with a model folder (Llama family or GPT-2) and a PEFT adapter
    #[command(long_about = generate::ABOUT)]
    Generate(generate::GenerateArgs),
    /// Classify texts with a classifier folder (BERT, Llama family or GPT-2) and a PEFT adapter
    #[command(long_about = classify::ABOUT)]
    Classify(classify::ClassifyArgs),
    /// Export a PEFT LoRA adapter as a llama.cpp LoRA adapter (GGUF)
    #[command(long_about = export_gguf::ABOUT)]
    ExportGguf(export_gguf::ExportGgufArgs),
    /// Rewrite a model folder saved as PyTorch pickles (pytorch_model.bin) as safetensors
    #[command(long_about = convert::ABOUT)]
    Convert(convert::ConvertArgs),
}

#[derive(Args, Debug)]
struct MergeArgs {
    /// The base model: a .safetensors file, a model folder, or a *.safetensors.index.json
    #[arg(long, value_name = "CHECKPOINT")]
    base: PathBuf,
    /// The PEFT adapter folder (adapter_config.json and adapter_model.safetensors)
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    /// Where to write: a file for a file base, a new or empty folder for a folder or index base
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// The dtype of the output's float tensors (keep: each tensor's own)
    ///
    /// The merge computes in f32 as PEFT's does on the model loaded in the checkpoint's own
    /// dtype (a bf16 checkpoint's PiSSA residual rounded to bf16 first, as PEFT holds it),
    /// then converts each tensor once.
    #[arg(long, value_enum, value_name = "DTYPE", default_value_t = DTypeArg::Keep)]
    dtype: DTypeArg,
    /// No progress bar and no summary; warnings and errors still go to stderr
    #[arg(short, long)]
    quiet: bool,
    /// Delete temporaries beside --out left by an earlier killed run (only reported otherwise)
    #[arg(long)]
    remove_leftovers: bool,
    /// The pad_token_id to write in the output's config.json (the id the model was trained
    /// with; a decoder classifier needs one to classify batches of more than one row)
    #[arg(long, value_name = "ID")]
    pad_token_id: Option<u32>,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// The PEFT adapter folder (adapter_config.json and adapter_model.safetensors)
    #[arg(value_name = "ADAPTER_DIR")]
    adapter: PathBuf,
    /// A checkpoint (.safetensors file, model folder or index) to match the adapter against
    #[arg(long, value_name = "CHECKPOINT")]
    base: Option<PathBuf>,
}

/// `--dtype`'s values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DTypeArg {
    Keep,
    #[value(alias = "float32")]
    F32,
    #[value(alias = "float16")]
    F16,
    #[value(alias = "bfloat16")]
    Bf16,
}

impl From<DTypeArg> for OutputDType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::Keep => OutputDType::Keep,
            DTypeArg::F32 => OutputDType::F32,
            DTypeArg::F16 => OutputDType::F16,
            DTypeArg::Bf16 => OutputDType::BF16,
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout (exit 0), usage errors to stderr (exit 2). A
            // closed stdout is an error clap returns and we ignore: nothing to tell anyone.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    match cli.command {
        Command::Merge(args) => merge(args),
        Command::Inspect(args) => inspect(args),
        Command::Generate(args) => generate::generate(args),
        Command::Classify(args) => classify::classify(args),
        Command::ExportGguf(args) => export_gguf::export(args),
        Command::Convert(args) => convert::convert(args),
    }
}

fn merge(args: MergeArgs) -> ExitCode {
    signals::install();
    if let Some(e) = wrong_way_round(&args.base, &args.adapter) {
        return fail(e);
    }
    let mut bar = Bar::new(!args.quiet && std::io::stderr().is_terminal());
    let delay = test_hook::tensor_delay();
    let mut progress = |p: &MergeProgress<'_>| -> ControlFlow<()> {
        bar.update(p);
        if let Some(d) = delay {
            test_hook::wait(d);
        }
        if signals::interrupted() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let options = MergeOptions {
        dtype: args.dtype.into(),
        progress: Some(&mut progress),
        remove_leftovers: args.remove_leftovers,
        pad_token_id: args.pad_token_id,
    };
    let result = merge_checkpoint(&args.base, &args.adapter, &args.out, options);
    signals::merge_ended();
    bar.finish();
    let report = match result {
        Ok(report) => report,
        Err(lorakit::Error::Cancelled { .. }) if signals::interrupted() => {
            eprintln!("interrupted; nothing was written");
            return ExitCode::from(INTERRUPTED);
        }
        Err(e) => return fail(e),
    };
    for w in &report.warnings {
        warn(w);
    }
    if args.quiet {
        return ExitCode::SUCCESS;
    }
    let mut text = format!(
        "merged {} module(s) into {} ({} tensors, {} file(s))\n",
        report.merged.len(),
        args.out.display(),
        report.tensors,
        report.shards
    );
    for m in &report.merged {
        text.push_str(&format!("  {m}\n"));
    }
    if !report.added.is_empty() {
        text.push_str(&format!(
            "added (modules_to_save the checkpoint lacked): {}\n",
            report.added.join(", ")
        ));
    }
    if !report.untied.is_empty() {
        text.push_str(&format!(
            "untied (a head tied to the embedding, written as its own tensor): {}\n",
            report.untied.join(", ")
        ));
    }
    if !report.copied.is_empty() {
        text.push_str(&format!("copied: {}\n", report.copied.join(", ")));
    }
    for change in &report.config_changes {
        text.push_str(&format!("config.json: {change}\n"));
    }
    if !report.dropped.is_empty() {
        text.push_str(&format!(
            "left out (pre-training heads, which the classifier has not): {}\n",
            report.dropped.join(", ")
        ));
    }
    emit(&text)
}

/// Before any work: an error when `--adapter` is a checkpoint rather than an adapter folder,
/// or `--base` an adapter folder rather than a checkpoint (the two swapped, most likely).
fn wrong_way_round(base: &Path, adapter: &Path) -> Option<lorakit::Error> {
    let swapped = if base.join(CONFIG_FILE).is_file() {
        "; --base and --adapter look swapped"
    } else {
        ""
    };
    match not_an_adapter(adapter) {
        Some(lorakit::Error::Checkpoint { path, reason }) => {
            return Some(lorakit::Error::checkpoint(
                path,
                format!("{reason}{swapped}"),
            ));
        }
        Some(e) => return Some(e),
        None => {}
    }
    (!swapped.is_empty()).then(|| {
        lorakit::Error::checkpoint(
            base,
            "is a PEFT adapter folder, not a model checkpoint (give the adapter as --adapter)",
        )
    })
}

fn inspect(args: InspectArgs) -> ExitCode {
    let summary = match lorakit::peft::inspect(&args.adapter) {
        Ok(s) => s,
        Err(e) => {
            let name = args.adapter.file_name().and_then(|n| n.to_str());
            let adapter_file =
                matches!(name, Some(CONFIG_FILE | WEIGHTS_FILE | PICKLE_WEIGHTS_FILE));
            let is_checkpoint = !adapter_file
                && !args.adapter.join(CONFIG_FILE).exists()
                && Checkpoint::open(&args.adapter).is_ok();
            if is_checkpoint {
                eprintln!(
                    "error: {}; to match an adapter against it: lorakit inspect <ADAPTER_DIR> --base {}",
                    one_line(&e),
                    args.adapter.display()
                );
                return ExitCode::FAILURE;
            }
            return fail(e);
        }
    };
    let mut text = summary.to_string();
    if let Some(base) = &args.base {
        match inspect_against(&args.adapter, base) {
            Ok(m) => {
                for w in &m.warnings {
                    warn(w);
                }
                text.push('\n');
                text.push_str(&m.to_string());
            }
            Err(e) => return fail(e),
        }
    }
    emit(&text)
}

/// Prints `e` as one line `error: …` on stderr; exit status 1.
fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {}", one_line(&e));
    ExitCode::FAILURE
}

fn warn(w: &str) {
    eprintln!("warning: {}", one_line(&w));
}

/// `text` on one line: line breaks (a multi-line message from a dependency) become spaces.
fn one_line(text: &impl std::fmt::Display) -> String {
    let text = text.to_string();
    text.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
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

/// The merge's progress bar on stderr: bytes processed, with the tensor count in its message.
/// Only on a terminal and without `--quiet`, and only once the merge has run for
/// [`BAR_DELAY`].
struct Bar {
    bar: Option<ProgressBar>,
    start: Instant,
    shown: bool,
}

impl Bar {
    fn new(enabled: bool) -> Self {
        let bar = enabled.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{bar:40}] {bytes}/{total_bytes} {msg} (eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            signals::set_bar(bar.clone());
            bar
        });
        Self {
            bar,
            start: Instant::now(),
            shown: false,
        }
    }

    fn update(&mut self, p: &MergeProgress<'_>) {
        let Some(bar) = &self.bar else {
            return;
        };
        if signals::interrupted() {
            return; // the signal handler has cleared the bar
        }
        if !self.shown && self.start.elapsed() >= BAR_DELAY {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            self.shown = true;
        }
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        bar.set_message(format!("{}/{} tensors", p.tensors_done, p.tensors_total));
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// SIGINT and SIGTERM (and SIGHUP) during a merge: the first asks the merge to stop at the
/// next tensor (the progress callback returns `Break`; the library removes its temporaries
/// and returns `Error::Cancelled`); a second removes this process's temporaries and exits at
/// once, for a tensor that takes too long.
mod signals {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;

    use indicatif::ProgressBar;

    static INTERRUPTED: AtomicBool = AtomicBool::new(false);
    static MERGE_ENDED: AtomicBool = AtomicBool::new(false);
    static BAR: OnceLock<ProgressBar> = OnceLock::new();

    /// Whether a first signal has arrived.
    pub fn interrupted() -> bool {
        INTERRUPTED.load(Ordering::SeqCst)
    }

    /// Marks the merge as returned (written, or failed and cleaned up): a signal now has
    /// nothing to stop.
    pub fn merge_ended() {
        MERGE_ENDED.store(true, Ordering::SeqCst);
    }

    /// The progress bar the signal handler clears before its note.
    pub fn set_bar(bar: ProgressBar) {
        let _ = BAR.set(bar);
    }

    pub fn install() {
        let result = ctrlc::set_handler(|| {
            if MERGE_ENDED.load(Ordering::SeqCst) {
                // Only the summary is left to print; the output is in place (or was never
                // there). Stop, as asked.
                eprintln!("interrupted");
                std::process::exit(super::INTERRUPTED.into());
            }
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                lorakit::staging::remove_live_temporaries();
                eprintln!("interrupted; nothing was written");
                std::process::exit(super::INTERRUPTED.into());
            }
            // The bar goes for good (updates stop once interrupted): a note printed
            // above a bar that is still drawn gets garbled on some terminals.
            if let Some(bar) = BAR.get() {
                bar.finish_and_clear();
            }
            eprintln!("stopping after the current tensor (send the signal again to stop now)");
        });
        if let Err(e) = result {
            super::warn(&format!(
                "cannot catch SIGINT/SIGTERM ({e}); an interrupted merge may leave a \
                 temporary beside --out"
            ));
        }
    }
}

/// Test-only hooks, read from the environment; not user settings and not documented as such.
///
/// `LORAKIT_TEST_TENSOR_DELAY_MS=N` makes `merge` wait N ms after each tensor, so that the
/// test suite can signal a merge that is surely still running (it waits for the temporary
/// beside `--out` to appear, then sends SIGTERM). The wait ends early on a first signal,
/// unless `LORAKIT_TEST_DELAY_IGNORES_SIGNALS=1`, which stands for one tensor too slow to
/// stop (the test of the second signal).
mod test_hook {
    use std::time::{Duration, Instant};

    pub fn tensor_delay() -> Option<Duration> {
        let ms: u64 = std::env::var("LORAKIT_TEST_TENSOR_DELAY_MS")
            .ok()?
            .parse()
            .ok()?;
        Some(Duration::from_millis(ms))
    }

    pub fn wait(delay: Duration) {
        let stubborn = std::env::var_os("LORAKIT_TEST_DELAY_IGNORES_SIGNALS").is_some();
        let end = Instant::now() + delay;
        while Instant::now() < end {
            if !stubborn && super::signals::interrupted() {
                return;
            }
            std::thread::sleep(
                Duration::from_millis(5).min(end.saturating_duration_since(Instant::now())),
            );
        }
    }
}
