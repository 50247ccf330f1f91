//! Kernel command line: whitespace-separated `key=value` words.
//!
//! A word without `=` is a key with an empty value. Unknown keys are
//! ignored by whoever asks; when a key repeats, the last word wins (as on
//! Linux), so a VMM can append overrides.

#[derive(Clone, Copy)]
pub struct Cmdline<'a> {
    raw: &'a str,
}

impl<'a> Cmdline<'a> {
    pub fn new(raw: &'a str) -> Self {
        Self { raw }
    }

    /// The whole command line.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// Value of the last `key=value` (or bare `key`) word.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.raw
            .split_ascii_whitespace()
            .rev()
            .find_map(|word| match word.split_once('=') {
                Some((k, v)) => (k == key).then_some(v),
                None => (word == key).then_some(""),
            })
    }

    /// `key` parsed as an integer, with `default` when absent; `Err` with
    /// the offending text when present but not a number.
    pub fn get_u64(&self, key: &str, default: u64) -> Result<u64, &'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(text) => parse_u64(text).ok_or(text),
        }
    }
}

/// Decimal or `0x` hexadecimal.
pub fn parse_u64(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}
