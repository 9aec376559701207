//! Kernel symbols from a build's System.map or a running guest's /proc/kallsyms, to name
//! addresses found in guest memory as `symbol+offset`.
//!
//! Both files have one `<hex address> <type letter> <name>` line per symbol; kallsyms adds
//! `\t[module]` to symbols outside vmlinux, which is how it lists JIT-compiled BPF images
//! (`bpf_prog_<tag>_<name>  [bpf]`) and anything else the kernel registers at run time. The
//! guest boots with `nokaslr`, so System.map addresses are the running addresses.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SymbolError {
    #[error("line {line}: expected `<address> <type> <name> [module]`, got {text:?}")]
    Malformed { line: usize, text: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    pub addr: u64,
    /// The nm type letter: `T`/`t` text, `D`/`d` data, `A` absolute, ...
    pub kind: char,
    pub name: String,
    /// `bpf` for BPF images, the module name for module symbols; `None` for vmlinux.
    pub module: Option<String>,
}

impl Symbol {
    pub fn is_text(&self) -> bool {
        matches!(self.kind, 'T' | 't' | 'W' | 'w')
    }
}

/// An address expressed relative to the symbol at or below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location<'a> {
    pub symbol: &'a Symbol,
    pub offset: u64,
}

impl fmt::Display for Location<'_> {
    /// `name+0xoff`, the way the kernel prints `%pS`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{:#x}", self.symbol.name, self.offset)
    }
}

/// Symbols sorted by address, searchable by name and by address.
#[derive(Debug, Clone, Default)]
pub struct SymbolTable {
    /// Sorted by address; several names can share one address.
    symbols: Vec<Symbol>,
    /// First index of each name (a static function name can occur more than once).
    by_name: HashMap<String, usize>,
}

impl SymbolTable {
    /// Parses System.map or /proc/kallsyms text. Blank lines are skipped. Lines of
    /// kallsyms read without privilege show address 0 for everything; they parse, but then
    /// every symbol sits at 0 and [`SymbolTable::symbolize`] finds nothing useful.
    pub fn parse(text: &str) -> Result<Self, SymbolError> {
        let mut symbols = Vec::new();
        for (number, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            symbols.push(parse_line(line).ok_or_else(|| SymbolError::Malformed {
                line: number + 1,
                text: line.to_owned(),
            })?);
        }
        Ok(Self::from_symbols(symbols))
    }

    fn from_symbols(mut symbols: Vec<Symbol>) -> Self {
        // Stable: symbols sharing an address keep the file's order (System.map lists the
        // alias the kernel prefers first).
        symbols.sort_by_key(|s| s.addr);
        let mut by_name = HashMap::with_capacity(symbols.len());
        for (index, symbol) in symbols.iter().enumerate() {
            by_name.entry(symbol.name.clone()).or_insert(index);
        }
        Self { symbols, by_name }
    }

    /// Adds symbols known only at run time (e.g. the BPF lines of kallsyms) to a System.map.
    pub fn merge(self, other: SymbolTable) -> Self {
        let mut symbols = self.symbols;
        symbols.extend(other.symbols);
        Self::from_symbols(symbols)
    }

    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Symbol> {
        self.symbols.iter()
    }

    /// The lowest-addressed symbol called `name`.
    pub fn get(&self, name: &str) -> Option<&Symbol> {
        self.by_name.get(name).map(|&i| &self.symbols[i])
    }

    pub fn addr(&self, name: &str) -> Option<u64> {
        self.get(name).map(|s| s.addr)
    }

    /// Symbols whose name starts with `prefix`, by address (e.g. `bpf_prog_`).
    pub fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a Symbol> + 'a {
        self.symbols.iter().filter(move |s| s.name.starts_with(prefix))
    }

    /// Where `symbol` ends as far as the table can tell: at the next higher symbol address.
    /// `None` for the highest symbol, whose end is unknown.
    pub fn extent(&self, symbol: &Symbol) -> Option<Range<u64>> {
        let after = self.symbols.partition_point(|s| s.addr <= symbol.addr);
        self.symbols.get(after).map(|next| symbol.addr..next.addr)
    }

    /// Like [`SymbolTable::symbolize`], but only code: `None` unless the symbol found is a
    /// text symbol. For stack words, where small integers would otherwise be named after
    /// zero-based per-CPU symbols and stray values after data or absolute symbols.
    pub fn symbolize_text(&self, addr: u64) -> Option<Location<'_>> {
        self.symbolize(addr).filter(|at| at.symbol.is_text())
    }

    /// The symbol at or below `addr` whose extent contains it, and the offset. `None` below
    /// the first symbol and at or past the last one (its size is unknown). Any kind of
    /// symbol counts, so any value gets a name; see [`SymbolTable::symbolize_text`].
    pub fn symbolize(&self, addr: u64) -> Option<Location<'_>> {
        let after = self.symbols.partition_point(|s| s.addr <= addr);
        if after == 0 || after == self.symbols.len() {
            return None;
        }
        // The first of the names at that address.
        let at = self.symbols[after - 1].addr;
        let first = self.symbols[..after].partition_point(|s| s.addr < at);
        let symbol = &self.symbols[first];
        Some(Location { symbol, offset: addr - symbol.addr })
    }
}

fn parse_line(line: &str) -> Option<Symbol> {
    let mut fields = line.split_whitespace();
    let addr = u64::from_str_radix(fields.next()?, 16).ok()?;
    let mut kind = fields.next()?.chars();
    let kind = match (kind.next(), kind.next()) {
        (Some(c), None) => c,
        _ => return None,
    };
    let name = fields.next()?.to_owned();
    let module = match fields.next() {
        None => None,
        Some(m) => Some(m.strip_prefix('[')?.strip_suffix(']')?.to_owned()),
    };
    if fields.next().is_some() {
        return None;
    }
    Some(Symbol { addr, kind, name, module })
}

/// Address ranges, each labelled with a caller's class, for sorting words found in guest
/// memory (e.g. "old image", "copy", "kernel text"). Later insertions win where ranges
/// overlap, so broad ranges go in first and specific ones after.
#[derive(Debug, Clone)]
pub struct AddressClasses<C> {
    ranges: Vec<(Range<u64>, C)>,
}

impl<C> Default for AddressClasses<C> {
    fn default() -> Self {
        Self { ranges: Vec::new() }
    }
}

impl<C> AddressClasses<C> {
    pub fn insert(&mut self, range: Range<u64>, class: C) {
        self.ranges.push((range, class));
    }

    /// The class of the most recently inserted range containing `addr`.
    pub fn classify(&self, addr: u64) -> Option<&C> {
        self.ranges.iter().rev().find(|(range, _)| range.contains(&addr)).map(|(_, class)| class)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as they appear in the guest build's System.map (per-CPU symbols are zero-based
    /// offsets, `_text` and `_stext` share an address).
    const SYSTEM_MAP: &str = "\
0000000000000000 D __per_cpu_start
0000000000000000 D fixed_percpu_data
000000000002c298 D __irq_regs
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81055f48 T __x64_sys_getpid
ffffffff81055f85 t __do_sys_getppid
ffffffff81055f85 T __x64_sys_getppid
ffffffff81055fa0 T __ia32_sys_getppid
ffffffff81600000 T _etext
";

    /// /proc/kallsyms: unsorted, BPF images at the end with a module column, tab separated.
    const KALLSYMS: &str = "\
ffffffff81000000 T _stext
ffffffff81055f85 T __x64_sys_getppid
ffffffffa0001e30 t bpf_term_6deef7357e7b4530_loops\t[bpf]
ffffffffa0000a54 t bpf_prog_6deef7357e7b4530_loops\t[bpf]
ffffffffa0000c00 t bpf_prog_0123456789abcdef_other\t[bpf]
";

    #[test]
    fn system_map_lookups_by_name_and_address() {
        let map = SymbolTable::parse(SYSTEM_MAP).unwrap();
        assert_eq!(map.len(), 10);
        assert_eq!(map.addr("__irq_regs"), Some(0x2c298));
        assert_eq!(map.addr("__x64_sys_getppid"), Some(0xffff_ffff_8105_5f85));
        assert_eq!(map.get("_text").unwrap().kind, 'T');
        let at = map.symbolize(0xffff_ffff_8105_5f90).unwrap();
        // The alias listed first in the file names a shared address.
        assert_eq!(at.to_string(), "__do_sys_getppid+0xb");
        assert_eq!(map.symbolize(0xffff_ffff_8100_0000).unwrap().to_string(), "_stext+0x0");
        // A small integer lands on a per-CPU offset symbol, which is no code.
        assert_eq!(map.symbolize(2).unwrap().to_string(), "__per_cpu_start+0x2");
        assert_eq!(map.symbolize_text(2), None);
        assert_eq!(
            map.symbolize_text(0xffff_ffff_8105_5f90).unwrap().symbol.name,
            "__do_sys_getppid"
        );
        assert_eq!(
            map.extent(map.get("__x64_sys_getpid").unwrap()),
            Some(0xffff_ffff_8105_5f48..0xffff_ffff_8105_5f85)
        );
        // Past the last symbol nothing bounds it.
        assert_eq!(map.symbolize(0xffff_ffff_8160_0000), None);
        assert_eq!(map.extent(map.get("_etext").unwrap()), None);
    }

    #[test]
    fn kallsyms_bpf_images_sort_in_and_carry_their_module() {
        let syms = SymbolTable::parse(KALLSYMS).unwrap();
        let old = syms.get("bpf_prog_6deef7357e7b4530_loops").unwrap();
        assert_eq!(old.module.as_deref(), Some("bpf"));
        assert_eq!(old.kind, 't');
        assert!(old.is_text());
        assert_eq!(syms.extent(old), Some(0xffff_ffff_a000_0a54..0xffff_ffff_a000_0c00));
        assert_eq!(
            syms.symbolize(0xffff_ffff_a000_0a9c).unwrap().to_string(),
            "bpf_prog_6deef7357e7b4530_loops+0x48"
        );
        let progs: Vec<_> = syms.with_prefix("bpf_prog_").map(|s| s.name.as_str()).collect();
        assert_eq!(progs, ["bpf_prog_6deef7357e7b4530_loops", "bpf_prog_0123456789abcdef_other"]);
        assert_eq!(syms.get("__x64_sys_getppid").unwrap().module, None);
    }

    #[test]
    fn merge_adds_runtime_symbols_to_the_map() {
        let merged =
            SymbolTable::parse(SYSTEM_MAP).unwrap().merge(SymbolTable::parse(KALLSYMS).unwrap());
        assert_eq!(
            merged.symbolize(0xffff_ffff_a000_0c10).unwrap().to_string(),
            "bpf_prog_0123456789abcdef_other+0x10"
        );
        // The map's last symbol now ends where the first BPF image begins.
        assert_eq!(merged.symbolize(0xffff_ffff_9000_0000).unwrap().symbol.name, "_etext");
        assert_eq!(
            merged.extent(merged.get("_etext").unwrap()),
            Some(0xffff_ffff_8160_0000..0xffff_ffff_a000_0a54)
        );
    }

    #[test]
    fn malformed_lines_are_reported_with_their_number() {
        for bad in [
            "ffffffff81000000 T",
            "zz T name",
            "ffffffff81000000 TT name",
            "ffffffff81000000 t name bpf",
            "1 t a [m] x",
        ] {
            let text = format!("ffffffff81000000 T _text\n{bad}\n");
            assert_eq!(
                SymbolTable::parse(&text).unwrap_err(),
                SymbolError::Malformed { line: 2, text: bad.to_owned() }
            );
        }
    }

    #[test]
    fn classes_prefer_the_latest_overlapping_range() {
        let mut classes = AddressClasses::default();
        classes.insert(0xffff_ffff_8100_0000..0xffff_ffff_8160_0000, "kernel text");
        classes.insert(0xffff_ffff_a000_0a54..0xffff_ffff_a000_0c00, "old image");
        classes.insert(0xffff_ffff_8105_5f85..0xffff_ffff_8105_5fa0, "getppid");
        assert_eq!(classes.classify(0xffff_ffff_8105_5f90), Some(&"getppid"));
        assert_eq!(classes.classify(0xffff_ffff_8100_0010), Some(&"kernel text"));
        assert_eq!(classes.classify(0xffff_ffff_a000_0b00), Some(&"old image"));
        assert_eq!(classes.classify(0x1000), None);
    }
}
