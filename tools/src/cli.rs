//! The command line `bench_fleet` and `bench_kong` share: `--quick`, `--rounds N` and
//! `--out DIR` ([`RunArgs`], flattened into each binary's own `Cli`), with each binary's own help
//! lines for them ([`RunHelp`], [`parse`]).

use clap::{Args, Parser};
use market_router_testbed::crate_root;
use std::path::PathBuf;

/// `--quick`, `--rounds N`, `--out DIR`: flatten it first into a binary's `Cli`
/// (`#[command(flatten)]`) and parse that with [`parse`].
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Fewer, shorter rounds
    #[arg(long)]
    pub quick: bool,
    /// Rounds [default: depends on --quick]
    #[arg(long, value_name = "N")]
    pub rounds: Option<usize>,
    /// Where the results go [default: bench/results]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

impl RunArgs {
    /// `full`, or `quick` with `--quick`: the default of an option that depends on `--quick`.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }

    /// `--rounds`, else `full` (`quick` with `--quick`).
    pub fn rounds(&self, full: usize, quick: usize) -> usize {
        self.rounds.unwrap_or_else(|| self.pick(full, quick))
    }

    /// `--out`, else `bench/results` of the project.
    pub fn out(&self) -> PathBuf {
        self.out
            .clone()
            .unwrap_or_else(|| crate_root().join("bench").join("results"))
    }
}

/// One binary's help lines for the shared arguments (their defaults differ per binary).
pub struct RunHelp {
    pub quick: &'static str,
    pub rounds: &'static str,
    pub out: &'static str,
}

/// Parses the process's arguments into `T`, a `Cli` that flattens [`RunArgs`] first: with
/// `help`'s lines for the shared arguments, and `--out` listed after the binary's own options (as
/// `--help` showed it when each binary declared all of them). Exits on an error or `--help`, as
/// `T::parse()` does.
pub fn parse<T: Parser>(help: &RunHelp) -> T {
    try_parse_from(help, std::env::args_os()).unwrap_or_else(|e| e.exit())
}

/// [`parse`] of `args` (the first is the binary's name), returning clap's error.
pub fn try_parse_from<T: Parser>(
    help: &RunHelp,
    args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
) -> Result<T, clap::Error> {
    let mut cmd = T::command();
    let last = cmd.get_arguments().count();
    cmd = cmd
        .mut_arg("quick", |a| a.help(help.quick))
        .mut_arg("rounds", |a| a.help(help.rounds))
        .mut_arg("out", |a| a.help(help.out).display_order(last));
    let mut matches = cmd.try_get_matches_from(args)?;
    T::from_arg_matches_mut(&mut matches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    #[command(name = "t")]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
        /// Seconds
        #[arg(long)]
        secs: Option<u64>,
    }

    const HELP: RunHelp = RunHelp {
        quick: "QUICK-HELP",
        rounds: "ROUNDS-HELP",
        out: "OUT-HELP",
    };

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        try_parse_from(&HELP, std::iter::once("t").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_follow_quick_and_flags_win() {
        let full = parse(&[]).unwrap();
        assert_eq!((full.run.rounds(6, 2), full.run.pick(5, 3)), (6, 5));
        assert!(full.run.out().ends_with("bench/results"));
        let quick = parse(&["--quick", "--secs", "7"]).unwrap();
        assert_eq!((quick.run.rounds(6, 2), quick.run.pick(5, 3)), (2, 3));
        assert_eq!(quick.secs, Some(7));
        let set = parse(&["--quick", "--rounds", "9", "--out", "/x"]).unwrap();
        assert_eq!(set.run.rounds(6, 2), 9);
        assert_eq!(set.run.out(), PathBuf::from("/x"));
        assert!(parse(&["--rounds", "x"]).is_err());
    }

    #[test]
    fn help_has_the_binarys_lines_and_out_after_its_own_options() {
        let help = parse(&["--help"]).unwrap_err().to_string();
        let at = |s: &str| help.find(s).unwrap_or_else(|| panic!("{s} not in {help}"));
        assert!(at("QUICK-HELP") < at("ROUNDS-HELP"));
        assert!(at("ROUNDS-HELP") < at("--secs"));
        assert!(at("--secs") < at("OUT-HELP"));
        assert!(at("OUT-HELP") < at("--help"));
    }
}
