//! Inline requests (`PING`, `SET a "b c"` typed into a terminal) split
//! into words the way Redis's `sdssplitargs` does.

use alloc::vec::Vec;

use super::parser::ProtoError;
use crate::kv::mem::try_grow;

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Splits an inline request like Redis's `sdssplitargs`: whitespace-separated
/// words, "double quotes" with \n \r \t \b \a \xHH escapes, 'single quotes'
/// with only \' escaped; a closing quote must be followed by a space or the
/// end. Unescaped bytes go to `out`, word ranges to `ranges`.
pub fn split_args(
    line: &[u8],
    out: &mut Vec<u8>,
    ranges: &mut Vec<(usize, usize)>,
) -> Result<(), ProtoError> {
    let n = line.len();
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    try_grow(out, n)?;
    let mut i = 0;
    loop {
        while i < n && is_space(line[i]) {
            i += 1;
        }
        if i >= n {
            return Ok(());
        }
        let start = out.len();
        let (mut inq, mut insq, mut done) = (false, false, false);
        while !done {
            let c = at(i);
            if inq {
                if c == b'\\' && at(i + 1) == b'x' {
                    if let (Some(h), Some(l)) = (hex_val(at(i + 2)), hex_val(at(i + 3))) {
                        out.push(h * 16 + l);
                        i += 3;
                    } else {
                        // "\x" not followed by two hex digits: plain escape.
                        i += 1;
                        out.push(b'x');
                    }
                } else if c == b'\\' && i + 1 < n {
                    i += 1;
                    out.push(match line[i] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        o => o,
                    });
                } else if c == b'"' && i < n {
                    if i + 1 < n && !is_space(line[i + 1]) {
                        return Err(ProtoError::UnbalancedQuotes);
                    }
                    done = true;
                } else if i >= n {
                    return Err(ProtoError::UnbalancedQuotes);
                } else {
                    out.push(c);
                }
            } else if insq {
                if c == b'\\' && at(i + 1) == b'\'' {
                    i += 1;
                    out.push(b'\'');
                } else if c == b'\'' && i < n {
                    if i + 1 < n && !is_space(line[i + 1]) {
                        return Err(ProtoError::UnbalancedQuotes);
                    }
                    done = true;
                } else if i >= n {
                    return Err(ProtoError::UnbalancedQuotes);
                } else {
                    out.push(c);
                }
            } else if i >= n {
                done = true;
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => done = true,
                    b'"' => inq = true,
                    b'\'' => insq = true,
                    _ => out.push(c),
                }
            }
            if i < n {
                i += 1;
            }
        }
        try_grow(ranges, 1)?;
        ranges.push((start, out.len()));
    }
}
