//! The register blocks' depth loops as the compiler built them, read back from this test
//! binary's own machine code with `objdump` (binutils): what [`super::accumulate`]'s doc
//! says of them, checked on every optimized build of the tests (`cargo test --release`;
//! CI runs it), so that a change to the block or a new compiler that spills an
//! accumulator or rebuilds the row addresses every step fails a test instead of slowing
//! every product by a few percent unseen.
//!
//! In each block's `multiply` (one per vector set), the innermost loops with at least two
//! FMAs:
//! - none refers to the stack (an accumulator or a row start spilled to memory);
//! - the six-row loop takes [`STEPS_PER_PASS`] steps a pass and is its FMAs, vector loads
//!   and broadcasts and at most four instructions more (the step's count, the panel's
//!   pointer, a compare and the branch).
//!
//! The counts go by mnemonic: a vector load is a `vmovaps`/`vmovups` from memory, an FMA
//! with a memory operand counts as an FMA and not a load. `scripts/kernel_loops.py` runs
//! this test with `LORAKIT_KERNEL_LOOPS_OUT` set to a folder, where each loop is written
//! as `llvm-mca` input, and models the loops on other CPUs.

use std::process::Command;

use regex::Regex;

use super::{BlockIsa, ROWS, STEPS_PER_PASS};

/// Instructions of the six-row loop besides its FMAs, loads and broadcasts, a pass.
const LOOP_OVERHEAD: usize = 4;

/// One innermost loop: its instructions (Intel syntax), the backward branch last.
struct Loop(Vec<String>);

impl Loop {
    fn count(&self, word: &str) -> usize {
        self.0.iter().filter(|t| t.contains(word)).count()
    }

    fn fmas(&self) -> usize {
        self.count("fmadd")
    }

    fn broadcasts(&self) -> usize {
        self.count("broadcast")
    }

    fn loads(&self) -> usize {
        let load = Regex::new(r"(?i)^vmov[au]ps\s+[xyz]mm\d+,\s*\w*\s*ptr").unwrap();
        self.0.iter().filter(|t| load.is_match(t)).count()
    }

    fn stack_refs(&self) -> usize {
        self.count("rsp") + self.count("rbp")
    }

    fn summary(&self) -> String {
        format!(
            "fmas {} vector loads {} broadcasts {} stack refs {} instructions {}",
            self.fmas(),
            self.loads(),
            self.broadcasts(),
            self.stack_refs(),
            self.0.len()
        )
    }

    /// The loop as `llvm-mca` input: its branch to a label of its own.
    fn as_mca_source(&self) -> String {
        let mut lines = vec![".intel_syntax noprefix".to_string(), ".Lstep:".to_string()];
        let (last, body) = self.0.split_last().unwrap();
        lines.extend(body.iter().map(|t| format!("  {t}")));
        lines.push(format!(
            "  {} .Lstep",
            last.split_whitespace().next().unwrap()
        ));
        lines.join("\n") + "\n"
    }
}

/// `multiply`'s demangled path for a block.
fn function_name(isa: BlockIsa) -> &'static str {
    match isa {
        BlockIsa::Avx512 => "packed::kernel::avx512::multiply",
        BlockIsa::Avx2 => "packed::kernel::avx2::multiply",
    }
}

/// `f32` lanes of the block's registers.
fn lanes(isa: BlockIsa) -> usize {
    match isa {
        BlockIsa::Avx512 => 16,
        BlockIsa::Avx2 => 8,
    }
}

/// This binary's machine code, demangled, in Intel syntax.
fn disassembly() -> String {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("objdump")
        .args(["-d", "-C", "--no-show-raw-insn", "-M", "intel"])
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("objdump (binutils) could not run: {e}"));
    assert!(
        out.status.success(),
        "objdump {exe:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The instructions of the one function whose header names `path`, as (address, text).
fn function_body(listing: &str, path: &str) -> Vec<(u64, String)> {
    let lines: Vec<&str> = listing.lines().collect();
    let heads: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].ends_with(">:") && lines[i].contains(&format!("{path}>")))
        .collect();
    assert_eq!(heads.len(), 1, "functions named {path} in the disassembly");
    let instruction = Regex::new(r"^\s*([0-9a-f]+):\s+(.*)$").unwrap();
    let comment = Regex::new(r"\s*#.*$").unwrap();
    lines[heads[0] + 1..]
        .iter()
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| instruction.captures(l))
        .map(|c| {
            let text = comment.replace(&c[2], "").trim().to_string();
            (u64::from_str_radix(&c[1], 16).unwrap(), text)
        })
        .collect()
}

/// The loops with at least two FMAs and no other loop inside them: each closed by a
/// branch back to an address of the function.
fn innermost_loops(body: &[(u64, String)]) -> Vec<Loop> {
    let branch = Regex::new(r"^j\w+\s+([0-9a-f]+)\b").unwrap();
    let index_of = |address: u64| body.iter().position(|(a, _)| *a == address);
    let spans: Vec<(usize, usize)> = body
        .iter()
        .enumerate()
        .filter_map(|(last, (address, text))| {
            let target = u64::from_str_radix(&branch.captures(text)?[1], 16).ok()?;
            (target <= *address).then(|| index_of(target).map(|first| (first, last)))?
        })
        .collect();
    spans
        .iter()
        .filter(|&&(f, l)| {
            !spans
                .iter()
                .any(|&(g, m)| f <= g && m <= l && (g, m) != (f, l))
        })
        .map(|&(f, l)| Loop(body[f..=l].iter().map(|(_, t)| t.clone()).collect()))
        .filter(|lp| lp.fmas() >= 2)
        .collect()
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "reads the optimized loops: run with `cargo test --release`"
)]
fn the_register_blocks_loops_keep_to_registers_and_their_instruction_count() {
    let listing = disassembly();
    let out_dir = std::env::var_os("LORAKIT_KERNEL_LOOPS_OUT").map(std::path::PathBuf::from);
    for isa in BlockIsa::ALL {
        let loops = innermost_loops(&function_body(&listing, function_name(isa)));
        for (n, lp) in loops.iter().enumerate() {
            println!("{isa:?} loop {n}: {}", lp.summary());
            if let Some(dir) = &out_dir {
                std::fs::create_dir_all(dir).unwrap();
                let file = dir.join(format!("{isa:?}_{n}.s").to_lowercase());
                std::fs::write(file, lp.as_mca_source()).unwrap();
            }
            assert_eq!(lp.stack_refs(), 0, "{isa:?} loop {n} spills: {:#?}", lp.0);
        }
        let vectors = isa.strip() / lanes(isa);
        let main_fmas = STEPS_PER_PASS * ROWS * vectors;
        let main: Vec<&Loop> = loops.iter().filter(|lp| lp.fmas() == main_fmas).collect();
        assert_eq!(
            main.len(),
            1,
            "{isa:?}: loops of {main_fmas} FMAs (the six-row loop)"
        );
        let main = main[0];
        let overhead =
            (main.0.len()).saturating_sub(main.fmas() + main.loads() + main.broadcasts());
        assert!(
            overhead <= LOOP_OVERHEAD,
            "{isa:?}'s six-row loop has {overhead} instructions a pass besides its FMAs, \
             loads and broadcasts ({}): {:#?}",
            main.summary(),
            main.0
        );
    }
}
