//! Which scenarios a command works on: `--filter REGEX` on the scenario
//! name, then `--shard I/N` to split the rest over N CI jobs.
//!
//! Sharding balances the scenarios' expected costs: the filtered scenarios,
//! most expensive first (ties by name, then path), each go to the shard with
//! the least so far (ties to the lowest-numbered). Every job of a CI matrix
//! that is given the same files computes the same split, each scenario lands
//! in exactly one shard, and the shards' costs differ by at most one
//! scenario's. Dealt round-robin by name instead, two shards of the 21 program
//! types took 263 s beside each other where balanced ones took 240 s (nested,
//! 2026-12-06): one shard drew the long scenarios.

use std::fmt;
use std::str::FromStr;

use regex::Regex;
use thiserror::Error;

use crate::scenario::{LoadedScenario, Scenario};

/// A guest's boot, in the time of one step run: about four (nested,
/// 2026-12-06, the program types' scenarios).
const BOOT_IN_STEP_RUNS: u64 = 4;

/// What a scenario is expected to cost, in step runs: its boot, then each
/// step once per repetition, as its file says (a `--repeat` given to all
/// scenarios alike leaves the order of costs about the same, and a job that
/// lists its shard without one computes the same split).
fn cost(scenario: &Scenario) -> u64 {
    BOOT_IN_STEP_RUNS + scenario.steps.len() as u64 * u64::from(scenario.repetitions.get())
}

/// `--shard I/N`: the I-th (1-based) of N shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: u32,
    count: u32,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ShardError {
    #[error("`{0}` is not I/N (e.g. 2/4)")]
    Format(String),
    #[error("shard {index}/{count}: I must be between 1 and N")]
    Range { index: u32, count: u32 },
}

impl Shard {
    pub fn new(index: u32, count: u32) -> Result<Shard, ShardError> {
        if count == 0 || index == 0 || index > count {
            return Err(ShardError::Range { index, count });
        }
        Ok(Shard { index, count })
    }

    pub fn index(self) -> u32 {
        self.index
    }

    pub fn count(self) -> u32 {
        self.count
    }
}

impl FromStr for Shard {
    type Err = ShardError;
    fn from_str(text: &str) -> Result<Shard, ShardError> {
        let (index, count) = text.split_once('/').ok_or_else(|| ShardError::Format(text.into()))?;
        let number = |part: &str| {
            part.trim().parse::<u32>().map_err(|_| ShardError::Format(text.to_owned()))
        };
        Shard::new(number(index)?, number(count)?)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[derive(Debug, Error)]
pub enum SelectionError {
    #[error("--filter `{filter}` matches none of the {total} scenario(s) given")]
    NothingMatches { filter: String, total: usize },
}

/// The scenarios `filter` and `shard` keep, in the order given. An empty
/// shard is no error (a matrix can have more jobs than scenarios); a filter
/// that matches nothing is (a typo would otherwise pass silently).
pub fn select(
    scenarios: Vec<LoadedScenario>,
    filter: Option<&Regex>,
    shard: Option<Shard>,
) -> Result<Vec<LoadedScenario>, SelectionError> {
    let total = scenarios.len();
    let matching: Vec<LoadedScenario> = scenarios
        .into_iter()
        .filter(|scenario| filter.is_none_or(|filter| filter.is_match(&scenario.name)))
        .collect();
    if let Some(filter) = filter {
        if matching.is_empty() && total > 0 {
            return Err(SelectionError::NothingMatches { filter: filter.to_string(), total });
        }
    }
    let Some(shard) = shard else { return Ok(matching) };
    let costs: Vec<u64> = matching.iter().map(|scenario| cost(&scenario.scenario)).collect();
    let mut dealing_order: Vec<usize> = (0..matching.len()).collect();
    dealing_order.sort_by(|&a, &b| {
        costs[b].cmp(&costs[a]).then_with(|| {
            (&matching[a].name, &matching[a].path).cmp(&(&matching[b].name, &matching[b].path))
        })
    });
    let mut loads = vec![0u64; shard.count as usize];
    let mut mine = vec![false; matching.len()];
    for at in dealing_order {
        // The first of the least loaded: min_by_key keeps the first of equals.
        let (least, _) =
            loads.iter().enumerate().min_by_key(|&(_, load)| *load).expect("count > 0");
        loads[least] += costs[at];
        mine[at] = least == (shard.index - 1) as usize;
    }
    Ok(matching
        .into_iter()
        .zip(mine)
        .filter_map(|(scenario, mine)| mine.then_some(scenario))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scenarios(names: &[&str]) -> Vec<LoadedScenario> {
        names.iter().map(|name| scenario_with_steps(name, 1)).collect()
    }

    /// A scenario of `steps` steps, each run 10 times (the default
    /// repetitions): it costs BOOT_IN_STEP_RUNS + 10 * steps.
    fn scenario_with_steps(name: &str, steps: usize) -> LoadedScenario {
        let steps: String = (0..steps)
            .map(|step| format!("[[step]]\nexec = {{ label = \"s{step}\", argv = [\"true\"] }}\n"))
            .collect();
        let text = format!("description = \"x\"\n[vm]\nkernel = \"default\"\n{steps}");
        LoadedScenario {
            name: name.to_owned(),
            path: PathBuf::from(format!("scenarios/{name}.toml")),
            dir: PathBuf::from("scenarios"),
            scenario: crate::scenario::parse(&text).expect("minimal scenario"),
        }
    }

    fn names(selected: &[LoadedScenario]) -> Vec<&str> {
        selected.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn shards_parse_and_out_of_range_ones_are_refused() {
        assert_eq!("2/4".parse::<Shard>(), Ok(Shard { index: 2, count: 4 }));
        assert_eq!("1/1".parse::<Shard>().map(|s| s.to_string()), Ok("1/1".to_owned()));
        assert_eq!("0/4".parse::<Shard>(), Err(ShardError::Range { index: 0, count: 4 }));
        assert_eq!("5/4".parse::<Shard>(), Err(ShardError::Range { index: 5, count: 4 }));
        assert_eq!("1/0".parse::<Shard>(), Err(ShardError::Range { index: 1, count: 0 }));
        assert_eq!("2".parse::<Shard>(), Err(ShardError::Format("2".into())));
        assert_eq!("a/4".parse::<Shard>(), Err(ShardError::Format("a/4".into())));
    }

    /// Every scenario in exactly one shard, for every N up to more shards
    /// than scenarios, whatever order the files were given in.
    #[test]
    fn the_shards_partition_the_scenarios() {
        let all = ["loops", "budget", "control", "errors", "two-cpus", "budget-off", "x"];
        let mut reversed = all;
        reversed.reverse();
        for count in 1..=9 {
            let mut seen: Vec<String> = Vec::new();
            for index in 1..=count {
                let shard = Shard::new(index, count).expect("valid");
                let kept = select(scenarios(&all), None, Some(shard)).expect("no filter");
                // Same split whatever the order on the command line.
                let kept_reversed = select(scenarios(&reversed), None, Some(shard)).expect("ok");
                let mut a = names(&kept);
                let mut b = names(&kept_reversed);
                a.sort();
                b.sort();
                assert_eq!(a, b, "shard {shard}");
                // Equal costs: sizes differ by at most one.
                let size = kept.len();
                assert!(
                    size == all.len() / count as usize
                        || size == all.len().div_ceil(count as usize)
                );
                seen.extend(kept.into_iter().map(|s| s.name));
            }
            let mut expected: Vec<String> = all.iter().map(|s| (*s).to_owned()).collect();
            expected.sort();
            seen.sort();
            assert_eq!(seen, expected, "{count} shards");
        }
    }

    /// The most expensive scenarios first, each to the least loaded shard:
    /// the long ones do not all land in one shard, the shards' costs differ
    /// by at most one scenario's, and the split ignores the files' order.
    #[test]
    fn the_shards_balance_the_scenarios_costs() {
        let steps = [("a", 21), ("b", 10), ("c", 10), ("d", 6), ("e", 5), ("f", 5), ("g", 4)];
        let all: Vec<LoadedScenario> =
            steps.iter().map(|&(name, steps)| scenario_with_steps(name, steps)).collect();
        let mut reversed = all.clone();
        reversed.reverse();
        let cost_of = |name: &str| {
            let steps = steps.iter().find(|(n, _)| *n == name).expect("known").1 as u64;
            BOOT_IN_STEP_RUNS + 10 * steps
        };
        for count in 1..=4 {
            let mut loads = Vec::new();
            for index in 1..=count {
                let shard = Shard::new(index, count).expect("valid");
                let kept = select(all.clone(), None, Some(shard)).expect("no filter");
                let kept_reversed = select(reversed.clone(), None, Some(shard)).expect("ok");
                let mut a = names(&kept);
                let mut b = names(&kept_reversed);
                a.sort();
                b.sort();
                assert_eq!(a, b, "shard {shard}");
                loads.push(a.iter().map(|name| cost_of(name)).sum::<u64>());
            }
            let spread = loads.iter().max().expect("shards") - loads.iter().min().expect("shards");
            assert!(spread <= cost_of("a"), "{count} shards: loads {loads:?}");
        }
        // Two shards: 322 and 316, where round-robin by name gives a, c, e, g 416
        // and b, d, f 222.
        let first = select(all.clone(), None, Some(Shard::new(1, 2).expect("valid"))).expect("ok");
        assert_eq!(names(&first), ["a", "e", "f"]);
        let second = select(all, None, Some(Shard::new(2, 2).expect("valid"))).expect("ok");
        assert_eq!(names(&second), ["b", "c", "d", "g"]);
    }

    #[test]
    fn the_filter_matches_names_and_keeps_the_given_order() {
        let all = scenarios(&["loops", "budget", "loops-subprog", "control"]);
        let filter = Regex::new("^loops").expect("regex");
        let kept = select(all.clone(), Some(&filter), None).expect("matches");
        assert_eq!(names(&kept), ["loops", "loops-subprog"]);
        let shard = Shard::new(2, 2).expect("valid");
        assert_eq!(
            names(&select(all.clone(), Some(&filter), Some(shard)).expect("ok")),
            ["loops-subprog"]
        );
        let none = Regex::new("^nope$").expect("regex");
        let error = select(all, Some(&none), None).expect_err("nothing matches");
        assert_eq!(error.to_string(), "--filter `^nope$` matches none of the 4 scenario(s) given");
    }
}
